r"""Trains the feature classifier for offline Frechet distances (not FID).

  python experiments/train_classifier.py --dataset=mnist5k   # ~1-2 min CPU
  python experiments/train_classifier.py --dataset=digits    # seconds

Writes OUT/params.msgpack and OUT/classifier.json (default OUT:
runs/classifier/<dataset>, git-ignored; the weights are produced here, never
downloaded nor committed). The CNN and the distance are in `vdm/frechet.py`;
its features give a Frechet distance that is NOT Inception FID and is not
comparable to published FIDs, only to other numbers from the same weights.
Prints the test accuracy and the Frechet distance between the train and test
splits (the floor a perfect generator would reach with that many samples).
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # pylint: disable=wrong-import-position

from vdm import frechet  # pylint: disable=wrong-import-position
from vdm import input_pipeline  # pylint: disable=wrong-import-position


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dataset", default="mnist5k",
                      help="mnist5k | digits | fashion_mnist (labelled "
                      "images)")
  parser.add_argument("--out", default=None,
                      help="output directory (default runs/classifier/"
                      "<dataset>)")
  parser.add_argument("--num_steps", type=int, default=None,
                      help="training steps (default: frechet.DEFAULT_NUM_STEPS"
                      " of the dataset)")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.num_steps is not None and args.num_steps < 1:
    parser.error(f"--num_steps must be >= 1; got {args.num_steps}")
  ds = input_pipeline.create(args.dataset, seed=args.seed)
  out = args.out or frechet.default_dir(args.dataset)
  extractor = frechet.train_classifier(
      ds, num_steps=args.num_steps, batch_size=args.batch_size, seed=args.seed)
  train = np.concatenate([b["image"][b["mask"]] for b in ds.eval_batches(
      "train", batch_size=1000)])
  rng = np.random.default_rng(args.seed)
  subset = train[rng.permutation(train.shape[0])[:ds.num_examples("test")]]
  floor = frechet.fd_to_split(extractor, subset, ds)
  extractor.info["fd_train_subset_vs_test"] = floor
  frechet.save_classifier(extractor, out)
  print(f"wrote {out}: test accuracy {extractor.info['test_accuracy']:.4f}; "
        f"Frechet distance (classifier features, not FID) of "
        f"{subset.shape[0]} train images to the test split: {floor:.4f}")


if __name__ == "__main__":
  main()
