"""verify CLI on real ArrayRecord shards: clean data passes, flipped bytes and bad records fail."""

import os
import shutil

from data_pipelines import shards, verify


def test_clean_dataset_passes(tiny_data, capsys):
  assert verify.main(["--data", tiny_data]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out == [
    "train: 3 shards, 36 records readable, 0 unreadable, 0 bad shard(s)",
    "validation: 2 shards, 20 records readable, 0 unreadable, 0 bad shard(s)",
  ]


def test_flipped_bytes_and_undecodable_records_are_reported(
  tiny_data, tmp_path, corrupt_copy, capsys
):
  data, bad_chunk = corrupt_copy(tiny_data, tmp_path / "d", "train", 1, 0.25)
  # The validation split: shard 0 no longer opens, shard 1 holds a record that is not a video.
  _, unopenable = corrupt_copy(tiny_data, tmp_path / "v", "validation", 0, 0.5)
  shutil.copy(unopenable, data)
  good = shards.find_shards(tiny_data, "validation")[1]
  reader = shards.open_reader(good)
  kept = [reader.read([i])[0] for i in range(reader.num_records())]
  reader.close()
  with shards.AtomicShardWriter(os.path.join(data, os.path.basename(good))) as w:
    for i, record in enumerate(kept):
      w.write(record[: len(record) // 2] if i == 3 else record)  # a truncated payload
  assert verify.main(["--data", data]) == 1
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith(f"BAD {bad_chunk}: 11 readable, 1 unreadable (record ")
  assert "hash mismatch" in lines[0]
  assert lines[1] == "train: 3 shards, 35 records readable, 1 unreadable, 1 bad shard(s)"
  assert lines[2].startswith(
    f"BAD {os.path.join(data, os.path.basename(unopenable))}: does not open"
  )
  assert lines[3].startswith(f"BAD {os.path.join(data, os.path.basename(good))}: 9 readable, 1")
  assert "record 3: ValueError" in lines[3] and "truncated" in lines[3]
  assert lines[4] == (
    "validation: 2 shards, 9 records readable, 1 unreadable (+ 1 shard(s) that do not open), "
    "2 bad shard(s)"
  )
  # --split checks one split only; a missing split is a failure with the reason.
  assert verify.main(["--data", tiny_data, "--split", "validation"]) == 0
  assert verify.main(["--data", tiny_data, "--split", "test"]) == 1
  assert "No shards for split 'test'" in capsys.readouterr().out
