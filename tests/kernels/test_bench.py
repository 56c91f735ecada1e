"""python -m kernels.bench runs end to end (CPU smoke: tiny shape, Pallas interpreted)."""

from __future__ import annotations

from kernels import bench


def test_bench_quick_smoke(capsys):
  bench.main(["--quick", "--interpret", "--impls", "pallas,xla", "--dtypes", "float32"])
  out = capsys.readouterr().out
  assert "copy bandwidth" in out and "fwd 4 elements, fwd+bwd 12 elements" in out
  rows = [
    line for line in out.splitlines() if line.startswith("| pallas") or line.startswith("| xla")
  ]
  assert len(rows) == 2 * 2  # impls x modes
  for row in rows:
    ms, gbs = (float(v) for v in row.strip("|").split("|")[6:8])
    assert ms > 0 and gbs > 0
