"""Class predictions for raw video files from a trained workdir.

  python -m trecvit_dist.predict --workdir W --video a.mp4 b.webm [DIR ...] [list.csv ...] \
      [--top-k 5] [--frame-by-frame] [--out preds.csv]

The model is the workdir's newest checkpoint (its parameters only, no optimizer state), built from
the config saved with it through the model and task registries; any task that predicts classes
(classification, readout) works, MAE does not. Class names come from the data's classes.txt
(data.path, or WORKDIR/data for the embedded synthetic data); without it, class indices.

A video is prepared exactly as evaluation prepares a converted one: PyAV decodes it and the
converter's resizing applies (short side, fps and JPEG quality read from the data's
{split}.summary.json; the converter's defaults when it is gone), then data.eval_clips evenly
spaced clips of data.num_frames frames at data.stride, times data.eval_crops crops
(data_pipelines/transforms.py), and the logits are averaged over these views, as the eval metrics
are. A video shorter than a clip's span is looped (frame index modulo its length, as the pipeline
does), with a warning. This mode holds the video's frames as JPEGs (tens of KB each) and decodes
only the sampled ones.

--frame-by-frame (TRecViT classifiers) streams the video through `inference.make_frame_step`, one
sampled frame at a time, its data.eval_crops crops as the batch: consecutive clips of num_frames
frames at data.stride, each from a fresh recurrent state (the clips the model was trained on).
Memory is constant: one frame, the recurrent state, and until the first clip is complete up to
its span of frames (a video shorter than that loops, as above). After every step it prints the
running prediction; the final one averages the logits of the complete clips (a trailing partial
clip is shown but not counted). With eval_clips=1 and a video of one clip it equals the whole
mode.

Inputs: video files, directories (every video file under them, data_pipelines/labels.py's
VIDEO_EXTENSIONS) and .csv lists (a `path` column, or one path per line; relative paths start at
the CSV's folder). A file that cannot be decoded (not a video, truncated, empty) is reported and
skipped, the others are predicted, and the exit code is 1; bad arguments or workdir exit with 2
before any work.

--out writes a CSV with one row per video and rank: video,rank,class_index,class_name,probability,
error (a video that failed has one row, with its error and no rank).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence

import jax
import ml_collections
import numpy as np
from etils import epath
from tqdm import tqdm

from data_pipelines import convert, records, transforms
from data_pipelines import labels as labels_lib
from trecvit_dist import experiment, inference
from trecvit_dist.models import TRecViT
from trecvit_dist.tasks.classification import Classification, view_averaged_logits

CONVERTER_SHORT_SIDE = 256  # `data_pipelines.convert --short-side` default
CSV_COLUMNS = ("video", "rank", "class_index", "class_name", "probability", "error")


class VideoError(ValueError):
  """A video that cannot be predicted; the message says why."""


# ----------------------------------------------------------------------------- preparing videos


@dataclasses.dataclass(frozen=True)
class Preparation:
  """How a raw video becomes model input: the converter's storage, then the eval sampling."""

  num_frames: int
  stride: int
  image_size: int
  num_clips: int
  num_crops: int
  short_side: int  # 0: frames kept at their decoded size
  fps: float | None  # None: the source frame rate
  jpeg_quality: int
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None

  @property
  def span(self) -> int:
    return transforms.clip_span(self.num_frames, self.stride)

  def frames(self, path: str) -> Iterator[tuple[bytes, dict]]:
    """The converter's stored frames of a video (JPEG, metadata), one at a time."""
    return convert.video_frames(
      path, short_side=self.short_side, fps=self.fps, jpeg_quality=self.jpeg_quality
    )

  def normalize(self, clips_uint8: np.ndarray) -> np.ndarray:
    """uint8 [B, ...] -> the model's float32 input, as the pipeline normalises batches."""
    return transforms.normalize(clips_uint8, self.mean, self.std)


def data_path(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where the run's data is: data.path, or WORKDIR/data (the embedded synthetic data)."""
  return config.data.path or str(epath.Path(workdir) / "data")


def preparation(
  config: ml_collections.ConfigDict, data_dir: str, options: dict | None = None
) -> tuple[Preparation, str | None]:
  """(Preparation, a note when the data's conversion settings are unknown) for a run's config.

  options: the task's data_options(train=False), which override the config's clip settings in
  evaluation too (e.g. longer eval clips).
  """
  d = config.data
  stored, note = None, None
  for split in (d.eval_split, d.train_split):
    path = epath.Path(data_dir) / f"{split}.summary.json"
    if path.exists():
      stored = json.loads(path.read_text())
      break
  if stored is None:
    note = (
      f"no {d.eval_split}.summary.json in {data_dir}: preparing videos with the converter's "
      f"defaults (short side {CONVERTER_SHORT_SIDE}, source fps)."
    )
    stored = dict(short_side=CONVERTER_SHORT_SIDE)
  mean, std = d.get("mean"), d.get("std")
  prep = Preparation(
    num_frames=d.num_frames,
    stride=d.stride,
    image_size=d.image_size,
    num_clips=d.get("eval_clips", 1),
    num_crops=d.get("eval_crops", 1),
    # Synthetic data records no short side: its frames are stored at their generated size.
    short_side=int(stored.get("short_side") or 0),
    fps=stored.get("fps"),
    jpeg_quality=int(stored.get("jpeg_quality") or records.DEFAULT_JPEG_QUALITY),
    mean=None if mean is None else tuple(mean),
    std=None if std is None else tuple(std),
  )
  known = {f.name for f in dataclasses.fields(Preparation)}
  prep = dataclasses.replace(prep, **{k: v for k, v in (options or {}).items() if k in known})
  return prep, note


def _decoded(prep: Preparation, path: str) -> Iterator[tuple[bytes, dict]]:
  """prep.frames, with decoding problems as VideoError."""
  try:
    yield from prep.frames(path)
  except convert.SkipVideo as e:
    raise VideoError(
      f"cannot be decoded as a video ({e}); pass video files PyAV reads (mp4, webm, ...)."
    ) from e


def _boxes(prep: Preparation, meta: dict) -> list[transforms.Box]:
  """The eval crop boxes of a video's stored frames (their size is in the converter's metadata)."""
  return transforms.eval_boxes(meta["height"], meta["width"], prep.image_size, prep.num_crops)


def video_views(prep: Preparation, path: str) -> tuple[np.ndarray, int]:
  """(views uint8 [clips * crops, T, S, S, 3] clip-major as the eval pipeline orders them, the
  video's number of frames)."""
  jpegs, metas = [], []
  for jpeg, meta in _decoded(prep, path):
    jpegs.append(jpeg)
    metas = metas or [meta]
  n, (meta,) = len(jpegs), metas
  boxes = _boxes(prep, meta)
  views = []
  for start in transforms.eval_starts(n, prep.span, prep.num_clips):
    indices = transforms.clip_indices(n, prep.num_frames, prep.stride, start)
    frames = np.stack([records.decode_jpeg(jpegs[i]) for i in indices])
    views += [transforms.crop_resize(frames, box, prep.image_size) for box in boxes]
  return np.stack(views), n


@dataclasses.dataclass(frozen=True)
class Sample:
  """One sampled frame of a stream: its clip, which clip frame, which video frame, its crops."""

  clip: int
  position: int  # 0 .. num_frames - 1 within the clip
  frame: int  # index in the video (after the converter's fps resampling)
  crops: np.ndarray  # uint8 [crops, S, S, 3]


class FrameStream:
  """The sampled frames of consecutive clips (num_frames at stride), decoded one at a time.

  The first clip keeps its span of frames until it is complete: a video shorter than that span
  ends it with looped frames (index modulo the length, as transforms.clip_indices loops).
  `num_frames` is the video's length once the stream is exhausted.
  """

  def __init__(self, prep: Preparation, path: str):
    self.prep, self.path, self.num_frames = prep, path, 0

  def __iter__(self) -> Iterator[Sample]:
    prep = self.prep
    period = prep.num_frames * prep.stride
    boxes, first_span = None, []
    for i, (jpeg, meta) in enumerate(_decoded(prep, self.path)):
      self.num_frames = i + 1
      clip, offset = divmod(i, period)
      sampled = offset % prep.stride == 0
      if not sampled and i >= prep.span:
        continue
      boxes = boxes or _boxes(prep, meta)
      frame_1HW3 = records.decode_jpeg(jpeg)[None]
      crops = np.stack([transforms.crop_resize(frame_1HW3, b, prep.image_size)[0] for b in boxes])
      if i < prep.span:
        first_span.append(crops)
      if sampled:
        yield Sample(clip, offset // prep.stride, i, crops)
    n = self.num_frames
    if n < prep.span:  # the first clip is not complete: loop
      for position in range(math.ceil(n / prep.stride), prep.num_frames):
        i = position * prep.stride % n
        yield Sample(0, position, i, first_span[i])


# ----------------------------------------------------------------------------- predicting


@dataclasses.dataclass
class Prediction:
  """One video's result: logits and probabilities [classes], or the error that stopped it."""

  video: str
  logits: np.ndarray | None = None
  probs: np.ndarray | None = None
  num_frames: int = 0
  error: str | None = None

  def top_k(self, k: int) -> list[tuple[int, float]]:
    """(class index, probability) of the k most probable classes, most probable first."""
    order = np.argsort(-self.probs, kind="stable")[:k]
    return [(int(c), float(self.probs[c])) for c in order]


@functools.partial(jax.jit, static_argnums=0)
def _video_logits(model, params, views_VTHWC):
  """Logits [classes] of one video, averaged over its views as the eval metrics average them."""
  return view_averaged_logits(model, params, views_VTHWC[None])[0]


@functools.cache
def frame_step(cfg):
  """inference.make_frame_step(cfg), made (and compiled) once per TRecViT config."""
  return inference.make_frame_step(cfg)


def _softmax(logits: np.ndarray) -> np.ndarray:
  e = np.exp(logits - logits.max())
  return e / e.sum()


def _short_warning(video: str, n: int, prep: Preparation) -> str:
  return (
    f"warning: {video} has {n} frame(s), fewer than a clip's span of {prep.span} "
    f"({prep.num_frames} frames at stride {prep.stride}): its frames are looped to fill the clip, "
    "as evaluation does."
  )


def predict_video(trained: inference.Trained, prep: Preparation, path: str) -> Prediction:
  """Whole-video prediction: every eval view of the video at once."""
  views, n = video_views(prep, path)
  logits = np.asarray(_video_logits(trained.model, trained.params, prep.normalize(views)))
  return Prediction(path, logits, _softmax(logits), n)


StepCallback = Callable[[Sample, np.ndarray, np.ndarray], None]


def predict_stream(
  trained: inference.Trained,
  prep: Preparation,
  path: str,
  step,
  on_step: StepCallback | None = None,
) -> Prediction:
  """Frame-by-frame prediction with `step = frame_step(cfg)` (see the module docstring).

  on_step(sample, video logits so far [classes], this clip's logits so far [classes]).
  """
  state, done = None, []
  stream = FrameStream(prep, path)
  for sample in stream:
    outputs, state = step(trained.params, prep.normalize(sample.crops), state)
    clip_logits = np.mean(np.asarray(outputs["logits"]), axis=0)  # over the crops
    if sample.position == prep.num_frames - 1:
      done.append(clip_logits)
      state = None  # every clip starts from a fresh recurrent state
    if on_step is not None:
      on_step(sample, np.mean(done, axis=0) if done else clip_logits, clip_logits)
  logits = np.mean(done, axis=0)
  return Prediction(path, logits, _softmax(logits), stream.num_frames)


# ----------------------------------------------------------------------------- inputs and output


def _read_list(csv_path: str) -> list[str]:
  """Video paths of a CSV list: its `path` column, or the first column when it has no header."""
  rows = [r for r in csv.reader(epath.Path(csv_path).read_text().splitlines()) if r and r[0]]
  column = 0
  if rows and "path" in [c.strip() for c in rows[0]]:
    column = [c.strip() for c in rows[0]].index("path")
    rows = rows[1:]
  base = os.path.dirname(csv_path)
  return [os.path.join(base, row[column].strip()) for row in rows]


def expand_inputs(items: Sequence[str]) -> list[str]:
  """Video paths from files, directories and .csv lists; ValueError naming what is missing."""
  paths, problems = [], []
  for item in items:
    if os.path.isdir(item):
      found = [e.path for e in labels_lib.scan_files(item, labels_lib.VIDEO_EXTENSIONS)]
      if not found:
        problems.append(
          f"no video files ({' '.join(labels_lib.VIDEO_EXTENSIONS)}) under directory {item}"
        )
      paths += found
    elif not os.path.exists(item):
      problems.append(f"{item} does not exist")
    elif item.lower().endswith(".csv"):
      listed = _read_list(item)
      if not listed:
        problems.append(f"the list {item} names no videos")
      paths += listed
    else:
      paths.append(item)
  if problems:
    raise ValueError("; ".join(problems) + ". Check the --video paths.")
  return paths


def class_names(config, workdir: str, num_classes: int) -> tuple[list[str] | None, str | None]:
  """(names from DATA/classes.txt, or None with a note saying why indices are printed)."""
  path = epath.Path(data_path(config, workdir)) / labels_lib.CLASSES_FILE
  if not path.exists():
    return None, (
      f"{path} not found (the data moved?): printing class indices. Put the data's classes.txt "
      "there to see class names."
    )
  names = labels_lib.read_classes_file(path)
  if len(names) != num_classes:
    return None, (
      f"{path} lists {len(names)} classes but the model has {num_classes}: printing class indices."
    )
  return names, None


def write_csv(path: str, predictions: Sequence[Prediction], names, top_k: int) -> None:
  """One row per video and rank (see the module docstring)."""
  out = epath.Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  with out.open("w") as f:
    writer = csv.writer(f)
    writer.writerow(CSV_COLUMNS)
    for p in predictions:
      if p.error is not None:
        writer.writerow([p.video, "", "", "", "", p.error])
        continue
      for rank, (c, prob) in enumerate(p.top_k(top_k), start=1):
        writer.writerow([p.video, rank, c, names[c] if names else "", f"{prob:.6f}", ""])


def _label(c: int, names) -> str:
  return names[c] if names else f"class {c}"


def _format(p: Prediction, names, top_k: int) -> str:
  lines = [f"{p.video} ({p.num_frames} frames)"]
  for rank, (c, prob) in enumerate(p.top_k(top_k), start=1):
    lines.append(f"  {rank}. {_label(c, names)}  {prob:.4f}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def _parse(argv):
  parser = argparse.ArgumentParser(
    prog="python -m trecvit_dist.predict",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--workdir", required=True, help="a trained run's workdir")
  parser.add_argument(
    "--video", required=True, nargs="+", help="video files, directories of videos, .csv lists"
  )
  parser.add_argument("--top-k", type=int, default=5, help="classes to print per video")
  parser.add_argument(
    "--frame-by-frame", action="store_true", help="stream one frame at a time (TRecViT)"
  )
  parser.add_argument("--out", help="CSV to write: one row per video and rank")
  return parser.parse_args(argv)


def check_workdir(config: ml_collections.ConfigDict, workdir: str, frame_by_frame: bool) -> None:
  """ValueError (one line, with the fix) when the run cannot predict classes as asked."""
  try:
    task_cls = experiment.task_class(config)
    family = experiment.family_of(config)
  except ValueError as e:
    raise ValueError(
      f"{workdir} was trained with a model or task this installation does not have ({e}); "
      "predict from the code version that trained it."
    ) from None
  if not issubclass(task_cls, Classification):
    raise ValueError(
      f"{workdir} was trained with task={task_cls.name}, which has no classifier: predict needs "
      "task=classification or readout (e.g. train a readout with --config.init_from="
      f"{workdir}) and that run's workdir."
    )
  if frame_by_frame:
    model = experiment.make_task(config, 1).build_model()
    if not isinstance(model, TRecViT):
      raise ValueError(
        f"--frame-by-frame needs a TRecViT classifier (model.name=trecvit, task=classification); "
        f"{workdir} holds model.name={family.name} with task={task_cls.name}: drop "
        "--frame-by-frame."
      )


def main(argv=None) -> int:
  args = _parse(argv)
  # --- Every argument checked before anything slow.
  try:
    if args.top_k < 1:
      raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    paths = expand_inputs(args.video)
    _, config = inference.read_config(args.workdir)
    check_workdir(config, args.workdir, args.frame_by_frame)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  # --- The model: parameters only, on one device; what the data says about preparing videos.
  try:
    trained = inference.load_trained(args.workdir, config)
  except inference.WorkdirError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  names, names_note = class_names(config, args.workdir, trained.num_classes)
  prep, prep_note = preparation(
    config, data_path(config, args.workdir), trained.task.data_options(train=False)
  )
  for note in (names_note, prep_note):
    if note:
      print(f"note: {note}", file=sys.stderr)
  print(
    f"{args.workdir}: step {trained.step}, {trained.num_classes} classes, "
    f"{prep.num_clips} clip(s) x {prep.num_crops} crop(s) of {prep.num_frames} frames at stride "
    f"{prep.stride}, {prep.image_size}x{prep.image_size}"
    + (", frame by frame" if args.frame_by_frame else "")
  )
  step = frame_step(trained.task.model_cfg) if args.frame_by_frame else None

  def show_step(video):
    def on_step(sample, video_logits, clip_logits):
      top, clip_top = int(np.argmax(video_logits)), int(np.argmax(clip_logits))
      tqdm.write(
        f"{video} frame {sample.frame} (clip {sample.clip}, {sample.position + 1}/"
        f"{prep.num_frames}): {_label(top, names)} {_softmax(video_logits)[top]:.4f}"
        f" | this clip: {_label(clip_top, names)} {_softmax(clip_logits)[clip_top]:.4f}"
      )

    return on_step

  # --- Every video; one that fails is reported and skipped.
  predictions = []
  for path in tqdm(paths, desc="predict", unit="video", file=sys.stderr, disable=len(paths) < 2):
    try:
      if step is None:
        p = predict_video(trained, prep, path)
      else:
        p = predict_stream(trained, prep, path, step, show_step(path))
    except VideoError as e:
      tqdm.write(f"error: {path}: {e}", file=sys.stderr)
      predictions.append(Prediction(path, error=str(e)))
      continue
    if p.num_frames < prep.span:
      tqdm.write(_short_warning(path, p.num_frames, prep), file=sys.stderr)
    tqdm.write(_format(p, names, args.top_k))
    predictions.append(p)

  if args.out:
    write_csv(args.out, predictions, names, args.top_k)
    print(f"wrote {args.out}")
  failed = [p.video for p in predictions if p.error is not None]
  if failed:
    print(f"{len(failed)} of {len(predictions)} video(s) failed: {failed}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
