"""official export: a trained workdir's TRecViT in the release layout, checked against the official
fixture's keys and shapes, and run by `official predict`."""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

from trecvit_dist import inference, official, train
from trecvit_dist.models import TRecViT, from_official_json
from trecvit_dist.models.trecvit import import_npz

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "official_trecvit"
TOL = 1e-5


def edited_copy(workdir: str, dest: pathlib.Path, **changes) -> str:
  """A copy of the workdir whose saved config has the dotted fields changed."""
  shutil.copytree(workdir, dest)
  (path,) = dest.glob("checkpoints/*/config/metadata")
  config = json.loads(path.read_text())
  for key, value in changes.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  path.write_text(json.dumps(config))
  return str(dest)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_data, load_config_fn, shrink_fn):
  """synthetic_tiny trained 2 steps with the official fixture's hyper-parameters."""
  fixture = json.loads((FIXTURE / "tiny_config.json").read_text())
  config = shrink_fn(
    load_config_fn("synthetic_tiny"),
    tiny_data,
    total_steps=2,
    **{
      "model.width": fixture["width"],
      "model.depth": fixture["depth"],
      "model.mlp_dim": fixture["mlp_dim"],
      "model.num_heads": fixture["num_heads"],
      "model.patch_size": tuple(fixture["patch_size"]),
      "model.rep_size": fixture["rep_size"],
      "model.num_classes": fixture["num_classes"],
      "data.num_frames": fixture["frames"],
      "data.image_size": fixture["image"],
    },
  )
  path = tmp_path_factory.mktemp("export_workdir")
  train.train_and_evaluate(config, str(path))
  return str(path)


@pytest.fixture(scope="module")
def exported(workdir, tmp_path_factory):
  out = tmp_path_factory.mktemp("export")
  assert (
    official.main(
      [
        "export",
        "--workdir",
        workdir,
        "--out",
        str(out / "p.npz"),
        "--config-out",
        str(out / "c.json"),
      ]
    )
    == 0
  )
  return out / "p.npz", out / "c.json"


def test_export_has_the_official_keys_shapes_and_config(exported):
  params, config = exported
  ours = np.load(params)
  reference = np.load(FIXTURE / "tiny_params.npz")
  assert sorted(ours.files) == sorted(reference.files)
  for key in reference.files:
    assert ours[key].shape == reference[key].shape, key
    assert ours[key].dtype == np.float32, key
  fixture = json.loads((FIXTURE / "tiny_config.json").read_text())
  written = json.loads(config.read_text())
  assert list(written) == list(fixture)
  assert {k: v for k, v in written.items() if k != "batch"} == {
    k: v for k, v in fixture.items() if k != "batch"
  }


def test_official_predict_on_the_export_gives_the_workdir_model_logits(workdir, exported, tmp_path):
  video = np.load(FIXTURE / "tiny_io.npz")["input_video"]  # [2, 8, 32, 32, 3]: one clip each
  np.save(tmp_path / "v.npy", video)
  params, config = exported
  argv = ["predict", "--params", str(params), "--config", str(config), "--video"]
  assert official.main(argv + [str(tmp_path / "v.npy"), "--out", str(tmp_path / "o.npz")]) == 0
  trained = inference.load_trained(workdir)  # its own config and parameters
  assert isinstance(trained.model, TRecViT)
  params = jax.tree.map(np.asarray, trained.params)
  expected = inference.predict(trained.task.model_cfg, params, video)["logits"]
  np.testing.assert_allclose(np.load(tmp_path / "o.npz")["logits"], expected, atol=TOL, rtol=0)


def test_encoder_only_export_of_a_readout_run_loads_with_init_from(workdir, tmp_path):
  readout = edited_copy(workdir, tmp_path / "readout", task="readout", init_from="x.npz")
  out, config = tmp_path / "e.npz", tmp_path / "e.json"
  argv = ["export", "--workdir", readout, "--out", str(out), "--config-out", str(config)]
  assert official.main(argv + ["--encoder-only"]) == 0
  flat = dict(np.load(out))
  reference = np.load(FIXTURE / "tiny_params.npz").files
  assert sorted(flat) == sorted(k for k in reference if not k.startswith("decoder/"))
  cfg = from_official_json(json.loads(config.read_text()))
  loaded, _, _ = import_npz(flat, cfg, 32, with_head=True)  # what init_from=e.npz runs
  assert set(loaded) == set(flat)


def test_export_refuses_what_the_release_layout_cannot_hold(workdir, tmp_path, capsys):
  cases = {
    edited_copy(workdir, tmp_path / "vivit", **{"model.name": "vivit"}): "only TRecViT",
    edited_copy(workdir, tmp_path / "readout", task="readout"): "--encoder-only",
    edited_copy(workdir, tmp_path / "sincos", **{"model.posemb": "sincos2d"}): "posemb='sincos2d'",
    str(tmp_path / "empty"): "No checkpoint",
  }
  (tmp_path / "empty").mkdir()
  for path, message in cases.items():
    argv = ["export", "--workdir", path, "--out", str(tmp_path / "p.npz")]
    assert official.main(argv + ["--config-out", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
  assert not (tmp_path / "p.npz").exists()


def test_input_normalisation_is_folded_into_the_patch_embedding():
  """A model trained on (video - mean) / std, exported, computes the same on [0, 1] video."""
  cfg = from_official_json(json.loads((FIXTURE / "tiny_config.json").read_text()))
  flat = official.load_npz(FIXTURE / "tiny_params.npz")
  video = np.load(FIXTURE / "tiny_io.npz")["input_video"]
  mean, std = np.array([0.4, 0.5, 0.6], np.float32), np.array([0.2, 0.25, 0.3], np.float32)
  folded = official.fold_input_normalisation(flat, mean, std)

  def logits(flat_params, video_BTHWC):
    params = official.import_params(flat_params, cfg, (32, 32))
    return inference.predict(cfg, params, video_BTHWC)["logits"]

  on_normalised = logits(flat, (video - mean) / std)
  on_raw = logits(folded, video)
  np.testing.assert_allclose(on_raw, on_normalised, atol=1e-4, rtol=0)
