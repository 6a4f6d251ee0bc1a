"""Images/s of the ImageNet training input pipeline on one host.

  python bench/input_pipeline.py                     # generated test dataset
  python bench/input_pipeline.py --data_dir=D --manual_dir=M --batch 140

Without ``--manual_dir`` it writes a small imagenet2012-format dataset of random
JPEGs (``--image_size`` pixels) into a temporary folder and prepares it with tfds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import ml_collections

from ofq_jax.data.fake_imagenet import write_fake_imagenet
from ofq_jax.data.imagenet import ImageNetSource


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data_dir")
  parser.add_argument("--manual_dir")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--batches", type=int, default=30)
  parser.add_argument("--image_size", type=int, default=320)
  parser.add_argument("--randaugment", default="rand-m9-mstd0.5-inc1", help="'' = off")
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  tmp = tempfile.mkdtemp()
  manual_dir = args.manual_dir or write_fake_imagenet(
      f"{tmp}/manual", classes=4, per_class=64, val_images=8,
      size=(args.image_size, int(args.image_size * 1.25)))
  config = ml_collections.ConfigDict(dict(
      name="imagenet2012", data_dir=args.data_dir or f"{tmp}/tfds", manual_dir=manual_dir,
      image_size=224, eval_resize=248, crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3),
      interpolation="random", hflip=0.5, randaugment=args.randaugment, random_erasing=0.25,
      mixup=0.0, cutmix=0.0, repeated_aug=0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)))
  source = ImageNetSource(config)
  batches = source.train_batches(global_batch=args.batch, start_step=0, seed=0)
  next(batches)  # warm-up: graph tracing, file opening
  start = time.perf_counter()
  for _ in range(args.batches):
    next(batches)
  seconds = time.perf_counter() - start
  result = {"images_per_sec": args.batch * args.batches / seconds, "batch": args.batch,
            "source_pixels": args.image_size, "randaugment": args.randaugment}
  if args.json:
    print(json.dumps(result))
  else:
    print(f"train pipeline: {result['images_per_sec']:.1f} images/s per host "
          f"(batch {args.batch}, {args.batches} batches, ~{args.image_size}px JPEGs, "
          f"randaugment={args.randaugment!r})")
  return result


if __name__ == "__main__":
  main()
