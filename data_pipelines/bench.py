"""Input pipeline throughput: training clips per second out of train_iterator.

  python -m data_pipelines.bench --data DIR --split S --num-frames 16 --stride 2 \
      --image-size 224 --batch-size 8 --batches 50 --workers W [--decoder simplejpeg|pil]

Prints a JPEG decode micro-benchmark (libjpeg-turbo via simplejpeg vs PIL, ms per stored
frame), then times `--batches` batches after `--warmup` batches (worker start-up excluded), and
the main process's CPU time per clip (with --workers 0 that is the whole pipeline's cost on one
core, independent of other jobs on the machine). The last line is `clips/s: X` (wall clock;
clips of [T, H, W, 3] float32, augmentation as in training).
"""

from __future__ import annotations

import argparse
import sys
import time

from data_pipelines import pipeline, records, shards


def jpeg_micro_benchmark(data_dir: str, split: str, num_frames: int = 64) -> dict[str, float]:
  """CPU milliseconds per decoded stored frame for each JPEG decoder (process time: not skewed
  by other jobs on a shared machine)."""
  from array_record.python import array_record_data_source

  source = array_record_data_source.ArrayRecordDataSource(shards.find_shards(data_dir, split))
  jpegs: list[bytes] = []
  for i in range(len(source)):
    jpegs += records.frame_jpegs(source[i])
    if len(jpegs) >= num_frames:
      break
  result = {}
  for decoder in ("simplejpeg", "pil"):
    records.decode_jpeg(jpegs[0], decoder)
    start = time.process_time()
    for _ in range(5):
      for j in jpegs:
        records.decode_jpeg(j, decoder)
    result[decoder] = (time.process_time() - start) / (5 * len(jpegs)) * 1e3
  return result


def main(argv: list[str] | None = None) -> int:
  """Command-line entry point."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data", required=True)
  parser.add_argument("--split", default="train")
  parser.add_argument("--num-frames", type=int, default=16)
  parser.add_argument("--stride", type=int, default=2)
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--batches", type=int, default=50)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--workers", type=int, default=0)
  parser.add_argument("--decoder", choices=("simplejpeg", "pil"), default="simplejpeg")
  parser.add_argument("--randaugment", action="store_true")
  parser.add_argument("--no-flip", action="store_true")
  args = parser.parse_args(argv)

  micro = jpeg_micro_benchmark(args.data, args.split)
  print("jpeg decode cpu ms/frame: " + ", ".join(f"{k} {v:.3f}" for k, v in micro.items()))
  it = pipeline.train_iterator(
    args.data,
    args.split,
    global_batch_size=args.batch_size,
    num_frames=args.num_frames,
    stride=args.stride,
    image_size=args.image_size,
    seed=0,
    process_index=0,
    process_count=1,
    worker_count=args.workers,
    flip=not args.no_flip,
    randaugment=args.randaugment,
    jpeg_decoder=args.decoder,
  )
  try:
    for _ in range(args.warmup):
      batch = next(it)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(args.batches):
      batch = next(it)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
  finally:
    it.close()
  clips = args.batches * args.batch_size
  shape = "x".join(map(str, batch["video"].shape[1:]))
  print(
    f"{clips} clips of {shape} {batch['video'].dtype} in {elapsed:.2f}s, workers={args.workers}, "
    f"decoder={args.decoder}, randaugment={args.randaugment}"
  )
  # CPU time of this process (all its threads) is what one core must deliver per clip when the
  # work runs here (--workers 0); unlike wall time it does not depend on other jobs' load.
  print(
    f"main-process cpu: {cpu / clips * 1e3:.1f} ms/clip ({clips / max(cpu, 1e-9):.1f} clips/cpu-s)"
  )
  print(f"clips/s: {clips / elapsed:.1f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
