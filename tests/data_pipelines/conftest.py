"""Fixtures for the data pipeline tests: real encoded videos (PyAV) and tiny synthetic datasets."""

from __future__ import annotations

import os
import shutil

import av
import numpy as np
import pytest

from data_pipelines import shards, synthetic

# The installed PyAV wheel ships libx264 and libvpx-vp9 encoders (checked in test_convert).
MP4_CODEC = "libx264"
WEBM_CODEC = "libvpx-vp9"


def moving_bar_frames(num_frames: int, height: int, width: int) -> np.ndarray:
  """uint8 [T, H, W, 3]: a white bar moving right over a colour gradient (frame t is known)."""
  frames = np.zeros((num_frames, height, width, 3), np.uint8)
  frames[..., 0] = np.linspace(0, 200, width, dtype=np.uint8)[None, None, :]
  frames[..., 2] = np.linspace(0, 200, height, dtype=np.uint8)[None, :, None]
  for t in range(num_frames):
    x = (t * 4) % (width - 8)
    frames[t, :, x : x + 8] = 255
  return frames


def write_video(path, frames: np.ndarray, fps: int, codec: str) -> None:
  """Encodes frames [T, H, W, 3] into a real video file with PyAV."""
  with av.open(str(path), "w") as container:
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = "yuv420p"
    for frame in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


@pytest.fixture(name="make_frames", scope="session")
def make_frames_fixture():
  """The moving_bar_frames helper, as a fixture (test modules cannot import conftest)."""
  return moving_bar_frames


@pytest.fixture(name="write_video", scope="session")
def write_video_fixture():
  """The write_video helper, as a fixture."""
  return write_video


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
  """36 train / 20 validation synthetic videos of 12 frames at 32x32 (36 is not a multiple of 8,
  so epochs end inside a batch)."""
  out = tmp_path_factory.mktemp("tiny_data")
  synthetic.generate(str(out), "train", 36, frames=12, size=32, seed=0, num_shards=3)
  synthetic.generate(str(out), "validation", 20, frames=12, size=32, seed=1, num_shards=2)
  return str(out)


def corrupt_copy(src: str, dst, split: str, shard: int, offset: float) -> tuple[str, str]:
  """Copies a dataset's split (and classes.txt) to the new directory dst and flips 16 bytes of
  one shard at `offset` (a fraction of its size); returns (dst, the corrupted shard's path).

  Tiny shards are two 64 KiB Riegeli blocks: offset 0.5 hits the second block's header (the
  shard no longer opens), 0.25 the middle of one record's chunk (that record fails its hash).
  """
  os.makedirs(dst)
  for name in os.listdir(src):
    if name.startswith(split + ".") or name == "classes.txt":
      shutil.copy(os.path.join(src, name), os.path.join(dst, name))
  path = os.path.join(dst, shards.shard_name(split, shard, len(shards.find_shards(src, split))))
  with open(path, "rb") as f:
    data = bytearray(f.read())
  at = int(len(data) * offset)
  data[at : at + 16] = bytes(b ^ 0xFF for b in data[at : at + 16])
  with open(path, "wb") as f:
    f.write(bytes(data))
  return str(dst), path


@pytest.fixture(name="corrupt_copy", scope="session")
def corrupt_copy_fixture():
  """The corrupt_copy helper, as a fixture."""
  return corrupt_copy
