#!/usr/bin/env python
"""Generates the built-in synthetic image-caption set (PNG images and JSON-lines captions).

Writes ``OUT/images/{train,val}/*.png`` and ``OUT/captions_{train,val}.jsonl`` (one
``{"image", "image_id", "captions"}`` per line, 5 whole-scene captions per image); see
``fiber_det/data/datasets/synthetic_captions.py`` for the content. With the same seed and image
arguments the images are those of the synthetic grounding set. Same arguments give the same bytes.

Example::

    python datasets/prepare_synthetic_captions.py --out datasets/synthetic_captions --seed 0
"""
import argparse
import time

from fiber_det.data.datasets.synthetic_captions import generate_synthetic_captions


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="destination folder (created)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument("--num-train", type=int, default=2000, help="train images (5 captions each)")
    parser.add_argument("--num-val", type=int, default=200, help="val images (5 captions each)")
    parser.add_argument("--image-size", type=int, nargs="+", default=[128], metavar="PX",
                        help="SIZE for square images or HEIGHT WIDTH (each >= 64)")
    parser.add_argument("--max-objects", type=int, default=4, help="objects per image: 1..this")
    args = parser.parse_args(argv)
    if len(args.image_size) not in (1, 2):
        parser.error("--image-size takes one value (square) or two (HEIGHT WIDTH)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    size = args.image_size[0] if len(args.image_size) == 1 else tuple(args.image_size)
    start = time.perf_counter()
    out = generate_synthetic_captions(args.out, seed=args.seed, num_train=args.num_train, num_val=args.num_val,
                                      image_size=size, max_objects=args.max_objects)
    print(f"wrote {args.num_train} train + {args.num_val} val images to {out} "
          f"in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
