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

from data_pipelines import convert, pipeline, records, shards

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


# --- Long unlabelled videos, images, TAP-Vid, and the CLI's paper cuts.


def test_segments_hold_back_at_most_one_and_a_half_segments():
  consumed = []

  def frames():
    for i in range(40):
      consumed.append(i)
      yield bytes([i]), dict(height=1, width=1, original_size=(1, 1), fps=1.0)

  stream = convert.segment_records(frames(), video_id="v", label=-1, label_name="", max_frames=16)
  first = records.read_header(next(stream))
  assert len(consumed) == 24 and (first["id"], first["num_frames"]) == ("v#0", 16)
  rest = [records.read_header(r) for r in stream]
  assert [(h["id"], h["num_frames"]) for h in rest] == [("v#1", 16), ("v#2", 8)]
  # 20 frames: the tail is balanced (10 + 10) rather than 16 + 4.
  stream = convert.segment_records(
    (f for _, f in zip(range(20), frames(), strict=False)),
    video_id="w",
    label=-1,
    label_name="",
    max_frames=16,
  )
  assert [records.read_header(r)["num_frames"] for r in stream] == [10, 10]
  ones = convert.segment_records(
    (f for _, f in zip(range(3), frames(), strict=False)),
    video_id="u",
    label=-1,
    label_name="",
    max_frames=1,
  )
  assert [records.read_header(r)["id"] for r in ones] == ["u#0", "u#1", "u#2"]


def test_long_unlabelled_videos_become_consecutive_segments(tmp_path, make_frames, write_video):
  videos = tmp_path / "videos"
  (videos / "sub").mkdir(parents=True)
  long_frames = make_frames(40, 32, 48)
  write_video(videos / "sub" / "long.mp4", long_frames, 10, "libx264")
  write_video(videos / "short.webm", make_frames(5, 32, 48), 10, "libvpx-vp9")
  (videos / "notes.txt").write_text("not listed: not a video extension\n")
  whole = convert.convert(str(videos), None, str(tmp_path / "whole"), "train", 1, short_side=16)
  summary = convert.convert(
    str(videos),
    None,
    str(tmp_path / "seg"),
    "train",
    2,
    short_side=16,
    max_record_frames=16,
    min_frames=6,
    workers=2,
  )
  got = read_split(str(tmp_path / "seg"), "train")[0]
  assert sorted(got) == ["sub/long.mp4#0", "sub/long.mp4#1", "sub/long.mp4#2"]
  assert [got[f"sub/long.mp4#{k}"]["num_frames"] for k in range(3)] == [16, 16, 8]
  assert all(r["label"] == -1 and r["label_name"] == "" for r in got.values())
  reference = read_split(str(tmp_path / "whole"), "train")[0]["sub/long.mp4"]["frames"]
  joined = np.concatenate([got[f"sub/long.mp4#{k}"]["frames"] for k in range(3)])
  np.testing.assert_array_equal(joined, reference)
  assert (summary["converted"], summary["num_records"], summary["segmented"]) == (1, 3, 1)
  assert summary["skipped"][0]["reason"] == "too short: 5 frames < --min-frames 6"
  assert whole["converted"] == 2 and whole["labels_file"] is None
  assert (tmp_path / "seg" / "classes.txt").read_text() == ""
  assert not [p for p in os.listdir(tmp_path / "seg") if p.startswith(".tmp")]


def test_images_become_one_frame_records(tmp_path, make_frames):
  images = tmp_path / "images"
  images.mkdir()
  Image.fromarray(make_frames(1, 40, 60)[0]).save(images / "cat.png")
  Image.fromarray(make_frames(1, 64, 32)[0]).save(images / "dog.jpg", quality=95)
  (images / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
  (tmp_path / "labels.csv").write_text("path,label\ncat.png,cat\ndog.jpg,dog\nbroken.jpg,dog\n")
  summary = convert.convert_images(
    str(images), str(tmp_path / "labels.csv"), str(tmp_path / "out"), "train", 1, short_side=20
  )
  got = read_split(str(tmp_path / "out"), "train")[0]
  assert got["cat.png"]["frames"].shape == (1, 20, 30, 3)
  assert got["dog.jpg"]["frames"].shape == (1, 40, 20, 3)
  assert (got["cat.png"]["label_name"], got["dog.jpg"]["label"]) == ("cat", 1)
  assert (got["cat.png"]["original_height"], got["cat.png"]["original_width"]) == (40, 60)
  assert summary["skipped"][0]["reason"].startswith("unreadable")
  expected = np.asarray(Image.fromarray(make_frames(1, 40, 60)[0]).resize((30, 20)))
  assert np.abs(got["cat.png"]["frames"][0].astype(int) - expected).mean() < 6


def _tapvid_video(num_frames=6, height=32, width=48, seed=0):
  """A blob moving right; point 0 on it, point 1 occluded half the time."""
  rng = np.random.default_rng(seed)
  grid_y, grid_x = np.mgrid[0:height, 0:width] + 0.5
  xs = 8 + 5 * np.arange(num_frames)
  video = np.stack([np.exp(-((grid_x - x) ** 2 + (grid_y - 12) ** 2) / 4.0) * 250 for x in xs])
  video = np.repeat(video[..., None], 3, axis=-1).astype(np.uint8)
  points = np.stack([np.stack([xs / width, np.full(num_frames, 12 / height)], -1)])
  points = np.concatenate([points, rng.random((1, num_frames, 2))]).astype(np.float32)
  occluded = np.zeros((2, num_frames), bool)
  occluded[1, ::2] = True
  return dict(video=video, points=points, occluded=occluded)


def test_tapvid_pickles_convert_with_tracks_in_stored_pixels(tmp_path):
  import pickle

  davis = {"bear": _tapvid_video(), "car": _tapvid_video(num_frames=4, seed=1)}
  (tmp_path / "davis.pkl").write_bytes(pickle.dumps(davis))
  convert.convert_tapvid(
    str(tmp_path / "davis.pkl"), str(tmp_path / "out"), "valid", 1, short_side=16
  )
  got = read_split(str(tmp_path / "out"), "valid")[0]
  bear = got["bear"]
  assert bear["frames"].shape == (6, 16, 24, 3) and bear["label"] == -1
  # Normalised (x, y) times the stored width and height (48x32 -> 24x16).
  np.testing.assert_allclose(bear["tracks"], davis["bear"]["points"] * [24, 16], rtol=1e-6)
  np.testing.assert_array_equal(bear["occluded"], davis["bear"]["occluded"])
  for t, (x, y) in enumerate(bear["tracks"][0]):
    iy, ix = np.unravel_index(bear["frames"][t].sum(-1).argmax(), (16, 24))
    assert abs(ix + 0.5 - x) <= 1 and abs(iy + 0.5 - y) <= 1
  # The pipeline reads them: the centre crop starts at x = 5 of 24 and the blob at x = 4, so
  # point 0 is first visible (and queried) in frame 1.
  batch = next(
    pipeline.eval_iterator(
      str(tmp_path / "out"),
      "valid",
      global_batch_size=2,
      num_frames=4,
      stride=1,
      image_size=16,
      num_points=2,
      process_index=0,
      process_count=1,
    )
  )
  assert batch["tracks"].shape == (2, 2, 4, 2) and batch["point_mask"].all()
  np.testing.assert_array_equal(batch["query_points"][:, 0, 0], [1, 1])
  assert batch["occluded"][:, 0, 0].all() and not batch["occluded"][:, 0, 1:].any()
  # A directory of list pickles with JPEG-encoded frames (the TAP-Vid Kinetics layout).
  kinetics = tmp_path / "kinetics"
  kinetics.mkdir()
  item = _tapvid_video()
  item["video"] = [records.encode_jpeg(f) for f in item["video"]]
  (kinetics / "0000_of_0001.pkl").write_bytes(pickle.dumps([item, item]))
  convert.convert_tapvid(str(kinetics), str(tmp_path / "k"), "valid", 1, short_side=0)
  got = read_split(str(tmp_path / "k"), "valid")[0]
  assert sorted(got) == ["0000_of_0001/00000", "0000_of_0001/00001"]
  np.testing.assert_allclose(got["0000_of_0001/00000"]["tracks"], item["points"] * [48, 32])

  broken = {"bear": {k: v for k, v in _tapvid_video().items() if k != "occluded"}}
  (tmp_path / "broken.pkl").write_bytes(pickle.dumps(broken))
  with pytest.raises(ValueError, match="video 'bear' is missing key 'occluded'"):
    convert.convert_tapvid(str(tmp_path / "broken.pkl"), str(tmp_path / "x"), "valid", 1)
  bad = {"cow": {**_tapvid_video(), "points": np.zeros((2, 5, 2), np.float32)}}
  (tmp_path / "bad.pkl").write_bytes(pickle.dumps(bad))
  with pytest.raises(ValueError, match=r"video 'cow': key 'points' must be \[Q, T, 2\] with T = 6"):
    convert.convert_tapvid(str(tmp_path / "bad.pkl"), str(tmp_path / "x"), "valid", 1)


def test_cli_paper_cuts(tmp_path, capsys):
  with pytest.raises(SystemExit):
    convert.main(["--help"])
  help_text = capsys.readouterr().out
  assert "(default: 256)" in help_text and "(default: 2048)" in help_text
  videos = tmp_path / "videos"
  videos.mkdir()
  (videos / "bad.mp4").write_text("not a video\n")
  args = ["--out", str(tmp_path / "out"), "--split", "train", "--num-shards", "1"]
  assert convert.main(["--videos", str(videos), "--workers", "1", *args]) == 1
  assert "nothing converted" in capsys.readouterr().err
  (tmp_path / "file").write_text("")
  assert convert.main(["--videos", str(videos), *args[:1], str(tmp_path / "file"), *args[2:]]) == 2
  assert f"--out {tmp_path / 'file'} is a file" in capsys.readouterr().err
  assert convert.main(["--videos", str(tmp_path / "file"), *args]) == 2
  assert "is a file; pass the directory" in capsys.readouterr().err
  assert convert.main(["--videos", str(tmp_path / "nope"), *args]) == 2
  assert "does not exist" in capsys.readouterr().err
