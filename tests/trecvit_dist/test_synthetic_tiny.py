"""The embedded default learns motion: >= 90% held-out top-1; without temporal blocks, chance."""

import jax
import pytest

from trecvit_dist import train


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory, request):
  """The full synthetic_tiny dataset (2048 train / 256 validation), generated once."""
  from data_pipelines import synthetic

  load_config = request.getfixturevalue("load_config_fn")
  syn = load_config("synthetic_tiny").data.synthetic
  path = tmp_path_factory.mktemp("synthetic_tiny_data")
  synthetic.ensure(
    str(path),
    num_train=syn.num_train,
    num_validation=syn.num_validation,
    frames=syn.frames,
    size=syn.size,
    seed=syn.seed,
  )
  return path


@pytest.mark.slow
def test_synthetic_tiny_reaches_90_percent_and_needs_time(shared_data, load_config_fn, tmp_path):
  config = load_config_fn("synthetic_tiny")
  config.data.path = str(shared_data)
  result = train.train_and_evaluate(config, str(tmp_path / "full"), devices=jax.devices()[:1])
  assert result.step == config.total_steps
  assert result.eval_metrics["top1"] >= 0.90, result.eval_metrics

  # The same model and budget without its gated-LRU blocks sees frames one at a time: chance.
  config = load_config_fn("synthetic_tiny")
  config.data.path = str(shared_data)
  config.model.temporal_blocks = False
  ablated = train.train_and_evaluate(config, str(tmp_path / "no_time"), devices=jax.devices()[:1])
  assert ablated.eval_metrics["top1"] <= 0.35, ablated.eval_metrics
