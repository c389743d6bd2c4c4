"""Make ``docs/review.png``: a phantom CT segmented by the demo model, with the confidence
overlay (opaque red = unsure, clear = sure) and the organs' outlines.

    python docs/make_review_picture.py [--seed 5] [--output docs/review.png]

The phantom gets noise and an intensity shift so that the model is unsure in places
(on a clean phantom the demo model is sure almost everywhere).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from repux.bundle import load_bundle
from repux.data.phantoms import make_phantom
from repux.infer import Segmenter
from repux.infer.overlay import render_review

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--output", default=str(HERE / "review.png"))
    args = parser.parse_args()
    image, _ = make_phantom(args.seed, shape=(96, 80, 64))
    noisy = image.array.astype(np.float32) + 60 + np.random.default_rng(args.seed).normal(0, 60, image.shape)
    image = image.with_array(noisy.astype(np.int16))
    bundle = load_bundle("demo")
    prediction = Segmenter(bundle, device="cpu").predict(image, review=True)
    render_review(image, prediction.labels, image.with_array(prediction.confidence), bundle.labels, args.output,
                  overwrite=True)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
