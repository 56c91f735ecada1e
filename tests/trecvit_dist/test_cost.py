"""trecvit_dist.cost: compiled FLOPs and memory against frames, written as CSV and a plot."""

import csv
import subprocess
import sys

import pytest

from trecvit_dist import cost


def test_cost_cli_writes_the_table_and_the_plot(tmp_path):
  out = tmp_path / "cost"
  code = cost.main(
    [
      "--models",
      "trecvit:Ti",
      "--frames",
      "2,4",
      "--mode",
      "forward",
      "--image-size",
      "32",
      "--out",
      str(out),
    ]
  )
  assert code == 0
  rows = list(csv.DictReader((out / "cost.csv").open()))
  assert list(rows[0]) == list(cost.COLUMNS)
  assert [(r["model"], r["variant"], int(r["frames"]), r["mode"]) for r in rows] == [
    ("trecvit", "Ti", 2, "forward"),
    ("trecvit", "Ti", 4, "forward"),
  ]
  two, four = rows
  assert int(two["params"]) == int(four["params"]) > 5_000_000  # Ti: ~5.5M + a 400-class head
  # Linear in frames: FLOPs double; the parameters (arguments) do not grow.
  assert 1.9 < float(four["flops"]) / float(two["flops"]) < 2.1
  assert int(four["temp_bytes"]) > int(two["temp_bytes"]) > 0
  assert (out / "cost.png").stat().st_size > 10_000


def test_cost_train_mode_compiles_the_train_step(tmp_path):
  forward = cost.measure(
    cost.ModelSpec("trecvit", "Ti"),
    2,
    "forward",
    devices=_cpu(),
    batch=1,
    image_size=32,
    dtype="float32",
    num_classes=10,
  )
  train = cost.measure(
    cost.ModelSpec("trecvit", "Ti"),
    2,
    "train",
    devices=_cpu(),
    batch=1,
    image_size=32,
    dtype="float32",
    num_classes=10,
  )
  # The train step holds the AdamW moments as arguments and does ~3x the forward's work.
  assert train["argument_bytes"] > 2.5 * forward["argument_bytes"]
  assert 2.5 < train["flops"] / forward["flops"] < 4.5  # measured 4.0 at this tiny size


def _cpu():
  import jax

  return jax.devices()[:1]


@pytest.mark.parametrize(
  "models, frames, message",
  [
    ("trecvit", "8", "expected NAME:VARIANT"),
    ("vivvit:B", "8", "Unknown model.name 'vivvit'"),
    ("trecvit:B:1x16", "8", "TxHxW"),
    ("trecvit:B:2x16x16", "7", "do not divide by the patch size"),
    ("trecvit:B", "0", "positive"),
  ],
)
def test_bad_arguments_fail_before_compiling(models, frames, message, tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "trecvit_dist.cost",
      "--models",
      models,
      "--frames",
      frames,
      "--out",
      str(tmp_path),
    ],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
