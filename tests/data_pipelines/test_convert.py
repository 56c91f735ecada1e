"""Converter on real encoded videos: H.264 mp4 and VP9 webm written with PyAV in the test.

The installed PyAV wheel has both libx264 and libvpx-vp9 encoders (asserted below), so no
fallback codec is needed.
"""

import json
import os

import av
import numpy as np
import pytest
from array_record.python.array_record_data_source import ArrayRecordDataSource
from PIL import Image

from data_pipelines import convert, records, shards

CSV = """path,label
a/walk1.mp4,walk
a/jump1.webm,jump
walk2.mp4,walk
trunc.mp4,walk
trunc.webm,jump
notvideo.mp4,jump
missing.mp4,walk
a/walk1.mp4,walk
"""


def read_split(out_dir, split):
  """Decoded records of a split by id, and the shard paths."""
  paths = shards.find_shards(out_dir, split)
  source = ArrayRecordDataSource(paths)
  decoded = [records.decode(source[i]) for i in range(len(source))]
  return {d["id"]: d for d in decoded}, paths


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory, make_frames, write_video):
  """Real videos, a truncated mp4 and webm, a text file named .mp4, and a `path,label` CSV."""
  for codec in ("libx264", "libvpx-vp9"):
    av.Codec(codec, "w")  # fails loudly if the wheel ever drops one of the encoders
  root = tmp_path_factory.mktemp("videos")
  (root / "a").mkdir()
  write_video(root / "a" / "walk1.mp4", make_frames(12, 64, 96), 15, "libx264")
  write_video(root / "a" / "jump1.webm", make_frames(9, 80, 64), 10, "libvpx-vp9")
  write_video(root / "walk2.mp4", make_frames(30, 48, 64), 15, "libx264")
  for name, codec in (("trunc.mp4", "libx264"), ("trunc.webm", "libvpx-vp9")):
    full = root / f"full_{name}"
    write_video(full, make_frames(30, 64, 96), 15, codec)
    data = full.read_bytes()
    (root / name).write_bytes(data[: len(data) // 2])
    full.unlink()
  (root / "notvideo.mp4").write_text("this is not a video\n")
  (root / "labels.csv").write_text(CSV)
  return root


@pytest.fixture(scope="module")
def converted(video_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("converted")
  summary = convert.convert(
    str(video_dir), str(video_dir / "labels.csv"), str(out), "train", 2, short_side=32, workers=1
  )
  return out, summary


def test_converts_real_videos_with_sizes_labels_and_frame_order(converted, video_dir, make_frames):
  out, summary = converted
  assert (out / "classes.txt").read_text() == "jump\nwalk\n"
  videos, paths = read_split(str(out), "train")
  assert [os.path.basename(p) for p in paths] == [
    "train.array_record-00000-of-00002",
    "train.array_record-00001-of-00002",
  ]
  assert summary["converted"] == 3 == len(videos)
  walk1, jump1, walk2 = videos["a/walk1.mp4"], videos["a/jump1.webm"], videos["walk2.mp4"]
  assert walk1["frames"].shape == (12, 32, 48, 3)  # 64x96 -> short side 32, aspect kept
  assert jump1["frames"].shape == (9, 40, 32, 3)  # portrait 80x64
  assert walk2["frames"].shape == (30, 32, 43, 3)
  assert (walk1["label"], jump1["label"], walk2["label"]) == (1, 0, 1)
  assert (walk1["label_name"], jump1["label_name"]) == ("walk", "jump")
  assert (walk1["fps"], jump1["fps"]) == (15.0, 10.0)
  assert (walk1["original_height"], walk1["original_width"]) == (64, 96)
  # Frame t shows the bar at x = 4t: compare with the resized source (codec + JPEG loss only).
  source = make_frames(12, 64, 96)
  expected = np.stack(
    [np.asarray(Image.fromarray(f).resize((48, 32), Image.BILINEAR)) for f in source]
  )
  error = np.abs(walk1["frames"].astype(int) - expected).mean()
  shifted_error = np.abs(walk1["frames"][1:].astype(int) - expected[:-1]).mean()
  assert error < 6 and shifted_error > 3 * error


def test_broken_and_missing_videos_are_skipped_with_reasons(converted):
  _, summary = converted
  reasons = {os.path.basename(s["path"] or "missing.mp4"): s["reason"] for s in summary["skipped"]}
  assert reasons["trunc.mp4"].startswith("unreadable")  # moov atom lost with the tail
  assert reasons["trunc.webm"].startswith("truncated")  # decodes, but only part of 2 s
  assert reasons["notvideo.mp4"].startswith("unreadable")
  assert reasons["missing.mp4"].startswith("missing")
  assert reasons["walk1.mp4"] == "duplicate id"
  assert summary["num_skipped"] == 5
  written = json.loads((converted[0] / "train.summary.json").read_text())
  assert written["skipped"] == summary["skipped"] and written["converted"] == 3


def test_rerun_with_workers_writes_identical_bytes(converted, video_dir, tmp_path):
  out, summary = converted
  convert.main(
    [
      f"--videos={video_dir}",
      f"--labels={video_dir / 'labels.csv'}",
      f"--out={tmp_path}",
      "--split=train",
      "--num-shards=2",
      "--short-side=32",
      "--workers=2",
    ]
  )
  for i in range(2):
    name = shards.shard_name("train", i, 2)
    assert (tmp_path / name).read_bytes() == (out / name).read_bytes()
  assert (tmp_path / "train.summary.json").read_text() == (out / "train.summary.json").read_text()
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_fps_resampling_picks_the_frame_on_screen(video_dir, tmp_path):
  labels = video_dir / "fps.csv"
  labels.write_text("path,label\na/walk1.mp4,walk\na/jump1.webm,jump\n")
  splits = {}
  for split, fps in (("native", None), ("down", 5.0), ("up", 30.0)):
    convert.convert(str(video_dir), str(labels), str(tmp_path), split, 1, short_side=32, fps=fps)
    splits[split] = read_split(str(tmp_path), split)[0]
  native, down, up = splits["native"], splits["down"], splits["up"]
  # 12 frames at 15 fps = 0.8 s -> 5 fps keeps source frames 0, 3, 6, 9.
  walk = native["a/walk1.mp4"]["frames"]
  np.testing.assert_array_equal(down["a/walk1.mp4"]["frames"], walk[[0, 3, 6, 9]])
  assert down["a/walk1.mp4"]["fps"] == 5.0
  # 9 frames at 10 fps = 0.9 s -> 30 fps shows every source frame 3 times.
  jump = native["a/jump1.webm"]["frames"]
  np.testing.assert_array_equal(up["a/jump1.webm"]["frames"], np.repeat(jump, 3, axis=0))


def test_kinetics_csv_and_ssv2_json(tmp_path, make_frames, write_video):
  videos = tmp_path / "videos"
  (videos / "abseiling").mkdir(parents=True)
  frames = make_frames(4, 32, 32)
  write_video(videos / "abseiling" / "yt_A-1_000010_000020.mp4", frames, 10, "libx264")
  write_video(videos / "yt2_000000_000010.mp4", frames, 10, "libx264")  # flat layout works too
  (tmp_path / "k400.csv").write_text(
    "label,youtube_id,time_start,time_end,split\n"
    "abseiling,yt_A-1,10,20,train\nzumba,yt2,0,10,train\nzumba,gone,5,15,train\n"
  )
  summary = convert.convert(
    str(videos), str(tmp_path / "k400.csv"), str(tmp_path / "k"), "train", 1
  )
  got = read_split(str(tmp_path / "k"), "train")[0]
  assert {k: v["label_name"] for k, v in got.items()} == {
    "yt_A-1_000010_000020": "abseiling",
    "yt2_000000_000010": "zumba",
  }
  assert summary["skipped"][0]["id"] == "gone_000005_000015"
  assert summary["skipped"][0]["reason"].startswith("missing")

  write_video(videos / "101.webm", frames, 10, "libvpx-vp9")
  (tmp_path / "ssv2.json").write_text(
    json.dumps(
      [
        {
          "id": "101",
          "label": "pushing a cup from left to right",
          "template": "Pushing [something] from left to right",
        },
        {"id": "102", "template": "Pushing [something] from left to right"},
      ]
    )
  )
  summary = convert.convert(
    str(videos), str(tmp_path / "ssv2.json"), str(tmp_path / "s"), "train", 1
  )
  got = read_split(str(tmp_path / "s"), "train")[0]
  assert got["101"]["label_name"] == "Pushing something from left to right"
  assert (tmp_path / "s" / "classes.txt").read_text() == "Pushing something from left to right\n"
  assert summary["skipped"][0]["id"] == "102"


def test_validation_reuses_train_classes(video_dir, tmp_path):
  convert.convert(
    str(video_dir), str(video_dir / "labels.csv"), str(tmp_path), "train", 1, short_side=16
  )
  (video_dir / "val.csv").write_text("path,label\nwalk2.mp4,walk\n")
  convert.convert(
    str(video_dir), str(video_dir / "val.csv"), str(tmp_path), "validation", 1, short_side=16
  )
  assert (tmp_path / "classes.txt").read_text() == "jump\nwalk\n"
  assert read_split(str(tmp_path), "validation")[0]["walk2.mp4"]["label"] == 1
  (video_dir / "bad.csv").write_text("path,label\nwalk2.mp4,run\n")
  with pytest.raises(ValueError, match=r"not in the existing .*classes.txt: 'run'"):
    convert.convert(str(video_dir), str(video_dir / "bad.csv"), str(tmp_path), "test", 1)
  with pytest.raises(ValueError, match="--num-shards 1"):
    convert.convert(str(video_dir), str(video_dir / "val.csv"), str(tmp_path), "validation", 2)


def test_interrupted_run_leaves_no_partial_shard(video_dir, tmp_path, monkeypatch):
  calls = []
  real = convert._convert_one

  def flaky(task):
    calls.append(task)
    if len(calls) == 6:
      raise KeyboardInterrupt
    return real(task)

  monkeypatch.setattr(convert, "_convert_one", flaky)
  with pytest.raises(KeyboardInterrupt):
    convert.convert(
      str(video_dir), str(video_dir / "labels.csv"), str(tmp_path), "train", 2, short_side=16
    )
  names = sorted(os.listdir(tmp_path))
  # Shard 0 (videos 0-3) completed and was renamed; shard 1 was in progress and is gone.
  assert names == ["classes.txt", shards.shard_name("train", 0, 2)]
  with pytest.raises(ValueError, match="incomplete"):
    shards.find_shards(str(tmp_path), "train")
