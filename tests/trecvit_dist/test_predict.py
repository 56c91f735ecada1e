"""predict: raw video files -> class names from a trained workdir, as evaluation sees the videos."""

import csv
import json
import pathlib
import shutil

import av
import numpy as np
import pytest

from data_pipelines import convert, pipeline
from trecvit_dist import inference, predict, train

TOL = 1e-5


def write_video(path, frames_THW3: np.ndarray, codec: str) -> str:
  """Encodes frames into a real video file with PyAV (as the data pipeline tests do)."""
  with av.open(str(path), "w") as container:
    stream = container.add_stream(codec, rate=10)
    stream.width, stream.height = frames_THW3.shape[2], frames_THW3.shape[1]
    stream.pix_fmt = "yuv420p"
    for frame in frames_THW3:
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  return str(path)


def moving_bar(num_frames: int, height: int, width: int) -> np.ndarray:
  """uint8 [T, H, W, 3]: a white bar moving right over a colour gradient."""
  frames = np.zeros((num_frames, height, width, 3), np.uint8)
  frames[..., 0] = np.linspace(0, 200, width, dtype=np.uint8)[None, None, :]
  frames[..., 2] = np.linspace(0, 200, height, dtype=np.uint8)[None, :, None]
  for t in range(num_frames):
    x = (t * 4) % (width - 8)
    frames[t, :, x : x + 8] = 255
  return frames


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
  """synthetic_tiny, shrunk, trained 2 steps (num_frames 4 at stride 2: a clip spans 7 frames)."""
  config = shrink_fn(load_config_fn("synthetic_tiny"), tiny_data, total_steps=2)
  path = tmp_path_factory.mktemp("predict_workdir")
  train.train_and_evaluate(config, str(path))
  return str(path)


@pytest.fixture(scope="module")
def trained(workdir):
  return inference.load_trained(workdir)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
  """long.mp4 (20 frames, 48x64: crops differ), span.webm (7 frames: exactly one clip span),
  short.mp4 (3 frames: shorter than a clip), notes.txt (not a video)."""
  d = tmp_path_factory.mktemp("videos")
  (d / "notes.txt").write_text("not a video\n")
  return dict(
    long=write_video(d / "long.mp4", moving_bar(20, 48, 64), "libx264"),
    span=write_video(d / "span.webm", moving_bar(7, 32, 32), "libvpx-vp9"),
    short=write_video(d / "short.mp4", moving_bar(3, 32, 32), "libx264"),
    text=str(d / "notes.txt"),
    dir=str(d),
  )


def test_cli_prints_class_names_writes_csv_and_skips_undecodable(
  workdir, trained, videos, tmp_path, capsys
):
  out = tmp_path / "preds.csv"
  argv = ["--workdir", workdir, "--video", videos["long"], videos["text"], videos["span"]]
  rc = predict.main(argv + ["--top-k", "3", "--out", str(out)])
  printed = capsys.readouterr()
  assert rc == 1  # one video failed; the others were still predicted
  assert "notes.txt" in printed.err and "pass video files" in printed.err
  names = set(pipeline.read_classes(trained.config.data.path))
  rows = list(csv.DictReader(out.open()))
  assert list(rows[0]) == list(predict.CSV_COLUMNS)
  by_video = {}
  for row in rows:
    by_video.setdefault(row["video"], []).append(row)
  assert set(by_video) == {videos["long"], videos["text"], videos["span"]}
  (failed,) = by_video[videos["text"]]
  assert failed["rank"] == "" and "pass video files" in failed["error"]
  for video in (videos["long"], videos["span"]):
    ranked = by_video[video]
    assert [r["rank"] for r in ranked] == ["1", "2", "3"]
    probs = [float(r["probability"]) for r in ranked]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert {r["class_name"] for r in ranked} <= names
    assert ranked[0]["class_name"] in printed.out


def test_views_equal_the_eval_pipeline_on_the_converted_video(trained, videos, tmp_path):
  """Multi-view (2 clips x 3 crops of a non-square video): predict prepares exactly the views the
  eval pipeline makes from the converter's record of the same file (and averages their logits with
  the eval metrics' view_averaged_logits)."""
  config = trained.config.copy_and_resolve_references()
  config.data.eval_clips, config.data.eval_crops = 2, 3
  prep, _ = predict.preparation(config, config.data.path)
  source = tmp_path / "source"
  source.mkdir()
  shutil.copy(videos["long"], source / "long.mp4")
  convert.convert(
    str(source),
    None,
    str(tmp_path / "data"),
    "validation",
    1,
    short_side=prep.short_side,
    progress=False,
  )
  d = config.data
  (batch,) = pipeline.eval_iterator(
    str(tmp_path / "data"),
    "validation",
    global_batch_size=1,
    num_frames=d.num_frames,
    stride=d.stride,
    image_size=d.image_size,
    num_clips=2,
    num_crops=3,
    process_index=0,
    process_count=1,
  )
  views, num_frames = predict.video_views(prep, videos["long"])
  assert num_frames == 20 and views.shape == (6, 4, 32, 32, 3)
  np.testing.assert_array_equal(prep.normalize(views), batch["video"][0])
  p = predict.predict_video(trained, prep, videos["long"])
  assert p.num_frames == 20 and p.logits.shape == (trained.num_classes,)
  np.testing.assert_allclose(p.probs, np.exp(p.logits) / np.exp(p.logits).sum(), atol=1e-6)


@pytest.mark.parametrize("name", ["span", "short"])
def test_frame_by_frame_equals_the_whole_video(trained, videos, name):
  """One clip (7 frames), or a 3-frame video looped into one: streaming gives the same logits."""
  prep, _ = predict.preparation(trained.config, trained.config.data.path)
  whole = predict.predict_video(trained, prep, videos[name])
  steps = []
  stream = predict.predict_stream(
    trained,
    prep,
    videos[name],
    predict.frame_step(trained.task.model_cfg),
    lambda sample, video_logits, clip_logits: steps.append((sample, video_logits)),
  )
  np.testing.assert_allclose(stream.logits, whole.logits, atol=TOL, rtol=0)
  assert stream.num_frames == whole.num_frames
  frames = [s.frame for s, _ in steps]
  assert frames == ([0, 2, 4, 6] if name == "span" else [0, 2, 1, 0])  # looped as clip_indices
  np.testing.assert_allclose(steps[-1][1], stream.logits, atol=TOL, rtol=0)


def test_frame_by_frame_cli_streams_consecutive_clips_and_warns_on_short_videos(
  workdir, videos, capsys
):
  argv = ["--workdir", workdir, "--video", videos["long"], videos["short"], "--frame-by-frame"]
  assert predict.main(argv) == 0
  printed = capsys.readouterr()
  # 20 frames: clips of frames 0..6 and 8..14, then a partial one (16, 18); every 2nd frame.
  lines = [line for line in printed.out.splitlines() if line.startswith(videos["long"] + " frame")]
  assert [int(line.split(" frame ")[1].split()[0]) for line in lines] == list(range(0, 20, 2))
  assert "(clip 1, 4/4)" in lines[7] and "(clip 2, 2/4)" in lines[9]
  assert "short.mp4 has 3 frame(s), fewer than a clip's span of 7" in printed.err


def test_inputs_directories_and_csv_lists(videos, tmp_path):
  found = predict.expand_inputs([videos["dir"]])
  assert found == sorted([videos["long"], videos["short"], videos["span"]])  # not notes.txt
  listing = tmp_path / "list.csv"
  listing.write_text("path,label\n" + "".join(f"{p},x\n" for p in found))
  assert predict.expand_inputs([str(listing)]) == found
  bare = pathlib.Path(videos["dir"]) / "bare.csv"
  bare.write_text("span.webm\nshort.mp4\n")  # relative to the list's folder
  assert predict.expand_inputs([str(bare)]) == [videos["span"], videos["short"]]
  with pytest.raises(ValueError, match="missing.mp4 does not exist"):
    predict.expand_inputs([videos["span"], str(tmp_path / "missing.mp4")])
  with pytest.raises(ValueError, match="no video files"):
    predict.expand_inputs([str(tmp_path)])


def test_bad_workdirs_fail_before_any_work_with_the_fix(workdir, videos, tmp_path, capsys):
  video = ["--video", videos["span"]]
  cases = {
    str(tmp_path / "empty"): "No checkpoint",
    edited_copy(workdir, tmp_path / "mae", task="mae"): "task=mae, which has no classifier",
    edited_copy(workdir, tmp_path / "readout", task="readout"): "needs a TRecViT classifier",
    edited_copy(workdir, tmp_path / "toy", **{"model.name": "toy"}): "does not have",
  }
  (tmp_path / "empty").mkdir()
  for path, message in cases.items():
    assert predict.main(["--workdir", path, *video, "--frame-by-frame"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
  assert predict.main(["--workdir", workdir, "--video", str(tmp_path / "x.mp4")]) == 2
  assert "x.mp4 does not exist" in capsys.readouterr().err


def test_without_classes_txt_prints_class_indices(workdir, videos, tmp_path, capsys):
  moved = edited_copy(workdir, tmp_path / "moved", **{"data.path": str(tmp_path / "gone")})
  assert predict.main(["--workdir", moved, "--video", videos["span"], "--top-k", "2"]) == 0
  printed = capsys.readouterr()
  assert "printing class indices" in printed.err
  assert "  1. class " in printed.out
