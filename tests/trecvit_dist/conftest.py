"""Shared helpers: the real configs, shrunk one way for every trainer test."""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_config(name: str, arg: str | None = None):
  """configs/NAME.py's get_config(arg), as `--config configs/NAME.py[:ARG]` would load it."""
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def shrink(config, data_dir, **overrides):
  """synthetic_tiny made fast enough for a unit test; overrides use dotted field names."""
  config.data.path = str(data_dir)
  config.batch_size = 8
  config.total_steps = 3
  config.log_every_steps = 1
  config.eval_every_steps = 1000
  config.eval_batch_size = 16
  config.checkpoint_every_steps = 1000
  config.optimizer.warmup_steps = 1
  config.model.width = 32
  config.model.mlp_dim = 64
  config.model.num_heads = 2
  config.model.rep_size = 32
  config.data.num_frames = 4
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
  """A small synthetic dataset (train 64, validation 32 videos), generated once per session."""
  from data_pipelines import synthetic

  path = tmp_path_factory.mktemp("synthetic")
  synthetic.ensure(str(path), num_train=64, num_validation=32, frames=8, size=32, seed=0)
  return path


@pytest.fixture
def tiny_config(tiny_data):
  def make(**overrides):
    return shrink(load_config("synthetic_tiny"), tiny_data, **overrides)

  return make


def read_scalars(workdir, tag: str) -> dict[int, float]:
  """{step: value} of a TensorBoard scalar that CLU's writer put in workdir's event files."""
  import tensorflow as tf

  values = {}
  for path in sorted(pathlib.Path(workdir).glob("events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for v in event.summary.value:
        if v.tag == tag:
          values[event.step] = float(tf.make_ndarray(v.tensor))
  return values


@pytest.fixture
def tb_scalars():
  """read_scalars(workdir, tag) -> {step: value} from TensorBoard event files."""
  return read_scalars


@pytest.fixture(scope="session")
def load_config_fn():
  """load_config(name, arg=None): a config file's get_config, as the CLI loads it."""
  return load_config


@pytest.fixture(scope="session")
def shrink_fn():
  """shrink(config, data_dir, **dotted overrides): any config made as small as tiny_config's."""
  return shrink
