"""The benchmark CLI runs end to end and ends with the `clips/s: X` line."""

import re

from data_pipelines import bench


def test_bench_prints_clips_per_second_last(tiny_data, capsys):
  bench.main(
    [
      "--data",
      tiny_data,
      "--split",
      "train",
      "--num-frames",
      "4",
      "--stride",
      "2",
      "--image-size",
      "24",
      "--batch-size",
      "4",
      "--batches",
      "2",
      "--warmup",
      "1",
      "--decoder",
      "pil",
    ]
  )
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0].startswith("jpeg decode cpu ms/frame: simplejpeg")
  assert re.fullmatch(r"clips/s: \d+\.\d", lines[-1])
