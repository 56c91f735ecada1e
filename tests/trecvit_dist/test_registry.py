"""The model and task registries: a new model or task is one file; old workdirs still resume.

A toy model family and a toy task are defined and registered here, in the test file itself, and
trained through train.train_and_evaluate; checkpoints written by the code before the registries
(commit 42a8303, tests/fixtures/pre_registry_checkpoints) resume and give that code's numbers;
the import graph of the packages has no cycles; bad names and configs fail before compiling, in
compile_check exactly as in the trainer.
"""

import ast
import dataclasses
import pathlib
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trecvit_dist import compile_check, experiment, models, tasks, train
from trecvit_dist.models import layers
from trecvit_dist.models.family import ModelFamily, TokenGrid
from trecvit_dist.tasks.task import Task

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "pre_registry_checkpoints"


# ----------------------------------------------------------------------------- a toy model


@dataclasses.dataclass(frozen=True)
class MeanPoolConfig:
  width: int = 16
  num_classes: int = 4
  patch_size: tuple[int, int, int] = (1, 8, 8)


class MeanPool(nn.Module):
  """Patch embedding, frame-difference features, mean pool, linear classifier."""

  cfg: MeanPoolConfig

  def setup(self):
    cfg = self.cfg
    self.embed = nn.Conv(cfg.width, cfg.patch_size, strides=cfg.patch_size)
    self.head = layers.ClassifierHead(cfg.num_classes)

  def tokens(self, video, train=False):
    del train
    x = self.embed(video)
    b, t, gh, gw, c = x.shape
    x = x.reshape(b, t, gh * gw, c)
    # Motion is the class of the synthetic data: give the model differences over time.
    return jnp.concatenate([x[:, :1], x[:, 1:] - x[:, :-1]], axis=1)

  def __call__(self, video, train=False):
    pooled = jnp.mean(jnp.abs(self.tokens(video)), axis=(1, 2))
    return self.head(pooled, train)


def _flops(cfg, num_frames, image_size, head=True):
  n = num_frames * (image_size // cfg.patch_size[1]) ** 2
  return 2.0 * n * np.prod(cfg.patch_size) * 3 * cfg.width + (2 * cfg.width * 4 if head else 0)


TOY_FAMILY = ModelFamily(
  name="toy_meanpool",
  config_class=MeanPoolConfig,
  variants={"S": dict(width=8)},
  build=MeanPool,
  config_errors=lambda cfg, mesh, frames, size: (
    [] if size % cfg.patch_size[1] == 0 else [f"image size {size} % patch {cfg.patch_size}"]
  ),
  forward_flops=_flops,
  token_grid=lambda cfg, frames, size: TokenGrid(frames, 0, size // 8, size // 8),
)


# ----------------------------------------------------------------------------- a toy task


class EvenOdd(Task):
  """Predict whether the label is even: a task with its own loss, metric names and batch keys."""

  name = "toy_even_odd"

  def loss(self, model, params, batch, rng):
    logits = model.apply({"params": params}, batch["video"], train=True, rngs={"dropout": rng})
    target = batch["label"] % 2
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits[:, :2], target))
    return loss, {}

  def eval_sums(self, model, params, batch, rng):
    video = batch["video"][:, 0]
    logits = model.apply({"params": params}, video)[:, :2]
    right = (jnp.argmax(logits, -1) == batch["label"] % 2).astype(jnp.float32)
    mask = batch["mask"].astype(jnp.float32)
    return dict(parity_accuracy=jnp.sum(right * mask), count=jnp.sum(mask))


@pytest.fixture
def registered():
  models.register(TOY_FAMILY)
  tasks.register(EvenOdd)
  yield
  models._registered.pop(TOY_FAMILY.name, None)
  tasks._registered.pop(EvenOdd.name, None)


def test_a_model_and_a_task_registered_from_a_test_file_train(registered, tiny_config, tmp_path):
  result = train.train_and_evaluate(tiny_config(**_toy()), str(tmp_path / "toy"))
  assert sorted(result.train_losses) == [1, 2, 3]
  assert set(result.eval_metrics) == {"parity_accuracy"}
  assert 0.0 <= result.eval_metrics["parity_accuracy"] <= 1.0
  params = result.state["params"]
  assert set(params) == {"embed", "head"} and params["embed"]["kernel"].shape[-1] == 8  # variant S
  # It resumes like any other run.
  again = train.train_and_evaluate(tiny_config(**_toy(total_steps=4)), str(tmp_path / "toy"))
  assert sorted(again.train_losses) == [4]


def _toy(**more):
  # model.width unset: the variant's (shrink sets it for TRecViT).
  fields = {"model.name": "toy_meanpool", "task": "toy_even_odd", "model.variant": "S"}
  fields["model.width"] = None
  return {**fields, "optimizer.learning_rate": 1e-2, **more}


# ----------------------------------------------------------------------------- old workdirs


# What the pre-registry code (commit 42a8303) computed when it resumed these checkpoints from
# step 2 to step 3 (1 CPU device); see tests/fixtures/pre_registry_checkpoints/README.md.
PRE_REGISTRY = {
  "classification": (
    "synthetic_tiny",
    1.3889398574829102,
    {"top1": 0.28125, "loss": 1.386260747909546},
  ),
  "mae": ("synthetic_mae_tiny", 0.7925597429275513, {"psnr_masked": 6.002616882324219}),
}


@pytest.mark.parametrize("task", sorted(PRE_REGISTRY))
def test_a_workdir_written_before_the_registries_resumes(
  task, load_config_fn, shrink_fn, tiny_data, tmp_path
):
  name, loss_at_3, eval_at_3 = PRE_REGISTRY[task]
  workdir = tmp_path / task
  shutil.copytree(FIXTURES / task, workdir)
  config = shrink_fn(load_config_fn(name), tiny_data, total_steps=3, checkpoint_every_steps=2)
  config.model.depth, config.model.width, config.model.mlp_dim = 1, 16, 32
  config.model.rep_size = 16
  if task == "mae":
    config.mae.decoder_width, config.mae.decoder_heads = 16, 2
  result = train.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
  assert sorted(result.train_losses) == [3]  # resumed at step 2: the parameter paths held
  np.testing.assert_allclose(result.train_losses[3], loss_at_3, rtol=1e-6)
  for key, value in eval_at_3.items():
    np.testing.assert_allclose(result.eval_metrics[key], value, rtol=1e-5)


# ----------------------------------------------------------------------------- structure


def _import_graph(packages):
  files = {}
  for package in packages:
    for path in (ROOT / package).rglob("*.py"):
      module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
      files[module.removesuffix(".__init__")] = path
  edges = {m: set() for m in files}
  for module, path in files.items():
    for node in ast.walk(ast.parse(path.read_text())):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
      for name in names:
        while name and name not in files:
          name = name.rpartition(".")[0]
        is_own_init = path.name != "__init__.py" and module.startswith(name + ".")
        if name and name != module and not is_own_init:
          edges[module].add(name)
  return edges


def test_the_packages_import_graph_has_no_cycles():
  edges = _import_graph(["trecvit_dist", "kernels", "data_pipelines"])
  state, cycles = {}, []

  def visit(m, stack):
    state[m] = "open"
    for n in sorted(edges[m]):
      if state.get(n) == "open":
        cycles.append(stack[stack.index(n) :] + [n])
      elif n not in state:
        visit(n, stack + [n])
    state[m] = "done"

  for m in sorted(edges):
    if m not in state:
      visit(m, [m])
  assert not cycles, cycles


def test_train_py_knows_no_model_or_task():
  source = (ROOT / "trecvit_dist" / "train.py").read_text()
  for name in ("trecvit_dist.models", "trecvit_dist.tasks", '"mae"', '"readout"', "TRecViT"):
    assert name not in source, name
  assert len(source.splitlines()) <= 450


# ----------------------------------------------------------------------------- bad input


def test_unknown_names_and_compile_check_reject_what_the_trainer_rejects(tiny_config, tmp_path):
  with pytest.raises(ValueError, match=r"Unknown model.name 'vivvit'; choose one of \[.*'trecvit'"):
    train.train_and_evaluate(tiny_config(**{"model.name": "vivvit"}), str(tmp_path / "m"))
  with pytest.raises(ValueError, match=r"Unknown config.task 'mea'; choose one of \[.*'mae'"):
    train.train_and_evaluate(tiny_config(task="mea"), str(tmp_path / "t"))
  with pytest.raises(ValueError, match="Unknown trecvit variant 'XL'"):
    train.train_and_evaluate(tiny_config(**{"model.variant": "XL"}), str(tmp_path / "v"))
  bad = tiny_config(batch_size=6, task="readout")
  with pytest.raises(ValueError) as trainer_error:
    train.train_and_evaluate(bad, str(tmp_path / "bad"))
  with pytest.raises(ValueError) as check_error:
    compile_check.compile_step(bad, jax.devices(), batch_size=6, num_classes=4)
  assert str(check_error.value) == str(trainer_error.value)
  assert "batch_size 6 is not divisible" in str(check_error.value)
  assert "needs init_from" in str(check_error.value)


def test_the_builder_gives_the_trainer_s_state_layout(tiny_config):
  config = tiny_config()
  exp = experiment.build(config, compile_check_mesh(), num_classes=4)
  assert exp.family.name == "trecvit" and exp.task.name == "classification"
  assert set(exp.abstract_state) == {"step", "params", "opt_state", "rng"}
  assert set(exp.abstract_state["params"]) == {"tokenizer", "encoder", "decoder"}
  assert set(exp.batch_spec(8, train=True)) == {"video", "label"}
  assert set(exp.batch_spec(16, train=False)) == {"video", "label", "mask"}


def compile_check_mesh():
  from trecvit_dist import sharding

  return sharding.make_mesh(-1, 1, 1, jax.devices())
