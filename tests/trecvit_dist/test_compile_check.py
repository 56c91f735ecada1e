"""compile_check: the real sharded train step AOT-compiles for a TPU slice on this CPU host."""

import subprocess
import sys

import pytest

pytest.importorskip("libtpu", reason="needs the tpu extra (pip install -e '.[tpu]')")

from trecvit_dist import compile_check  # noqa: E402


@pytest.mark.tpu_aot
@pytest.mark.slow
def test_train_step_compiles_for_tpu_with_the_mosaic_lru(load_config_fn):
  config = load_config_fn("synthetic_tiny")
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 1, 2
  devices, hbm = compile_check.topology_devices("v5p:2x2x1")
  compiled, mesh, _ = compile_check.compile_step(config, devices, batch_size=8, num_classes=4)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "time": 1, "tensor": 2}
  hlo = compiled.as_text()
  # The LRU runs as the fused Pallas kernel (Mosaic) per shard: forward + backward kernels.
  assert hlo.count("tpu_custom_call") >= 2
  total, report = compile_check.report(compiled, hbm)
  assert 0 < total < hbm and report["flops"] > 0


@pytest.mark.tpu_aot
@pytest.mark.slow
def test_cli_exits_nonzero_when_the_step_does_not_fit(tmp_path):
  cmd = [
    sys.executable,
    "-m",
    "trecvit_dist.compile_check",
    "--config",
    "configs/synthetic_tiny.py",
    "--topology",
    "v5e:2x2",
    "--batch_size",
    "65536",
    "--config.mesh.data=-1",
  ]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 1, proc.stdout + proc.stderr[-2000:]
  assert "DOES NOT FIT" in proc.stdout and "16.00 GiB of HBM per chip" in proc.stdout


@pytest.mark.tpu_aot
@pytest.mark.slow
@pytest.mark.parametrize("name", ["synthetic_mae_tiny", "synthetic_readout_tiny"])
def test_mae_and_readout_steps_compile_for_tpu(load_config_fn, name):
  config = load_config_fn(name)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 1, 2
  # compile_check checks the config as the trainer does (a readout needs init_from); it never
  # reads the parameters, so the source need not exist for a compile.
  config.init_from = "mae_workdir"
  devices, hbm = compile_check.topology_devices("v5p:2x2x1")
  compiled, _, _ = compile_check.compile_step(config, devices, batch_size=8, num_classes=4)
  # MAE: the encoder's LRU on the visible tubes and the decoder's on all of them, forward and
  # backward (6 kernels measured); readout: the frozen encoder's 2 layers, forward only.
  assert compiled.as_text().count("tpu_custom_call") >= (4 if name == "synthetic_mae_tiny" else 2)
  total, report = compile_check.report(compiled, hbm)
  assert 0 < total < hbm and report["flops"] > 0
