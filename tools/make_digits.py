"""Write scikit-learn's bundled handwritten digits as an image anomaly dataset (no download).

    python tools/make_digits.py --out DIR [--normal 0] [--size 32] [--test-normals 0.3]
                                [--anomalies-per-digit 8] [--seed 0]

One digit is normal, every other digit an anomaly. `sklearn.datasets.load_digits` ships 1,797
pictures of 8 x 8 pixels (about 180 per digit) with scikit-learn itself; each is scaled to [0, 255]
and enlarged to `--size` pixels (bilinear) and written as PNG in the industrial-inspection layout
`asd` reads (`data=images`):

    DIR/train/good/        the normal digit's pictures not tested
    DIR/test/good/         `--test-normals` of the normal digit's pictures (seeded)
    DIR/test/digit_K/      `--anomalies-per-digit` pictures of each other digit K (seeded)

Then: `python train.py data=images data.root=DIR`. The folder must be new or empty, so an earlier
dataset is never mixed with a new one.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from asd.errors import AsdError
from asd.fileio import write_atomic

log = logging.getLogger("make_digits")


def make_digits(
    out: Path,
    normal: int = 0,
    size: int = 32,
    test_normals: float = 0.3,
    anomalies_per_digit: int = 8,
    seed: int = 0,
) -> dict[str, int]:
    """Write the dataset; returns how many pictures went to each folder."""
    from PIL import Image
    from sklearn.datasets import load_digits

    if not 0 <= normal <= 9:
        raise AsdError(f"--normal {normal}: expected a digit 0..9")
    if size < 8:
        raise AsdError(f"--size {size}: expected at least 8 pixels (the digits are 8 x 8)")
    if not 0 < test_normals < 1:
        raise AsdError(f"--test-normals {test_normals}: expected a share in (0, 1)")
    if anomalies_per_digit < 1:
        raise AsdError(f"--anomalies-per-digit {anomalies_per_digit}: expected at least 1")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AsdError(f"--out {out}: exists and is not an empty folder; give a new folder")
    digits = load_digits()
    images, labels = digits.images, digits.target  # (1797, 8, 8) values 0..16, (1797,)
    rng = np.random.default_rng(seed)
    own = np.flatnonzero(labels == normal)
    own = own[rng.permutation(len(own))]
    n_test = max(1, round(len(own) * test_normals))
    plan: list[tuple[str, np.ndarray]] = [("train/good", own[n_test:]), ("test/good", own[:n_test])]
    for digit in range(10):
        if digit == normal:
            continue
        idx = np.flatnonzero(labels == digit)
        plan.append((f"test/digit_{digit}", idx[rng.permutation(len(idx))[:anomalies_per_digit]]))

    counts = {}
    for folder, rows in plan:
        (out / folder).mkdir(parents=True, exist_ok=True)
        for i in sorted(rows.tolist()):
            pixels = np.clip(images[i] * (255.0 / 16.0), 0, 255).astype(np.uint8)  # (8, 8)
            picture = Image.fromarray(pixels, mode="L").resize((size, size), Image.Resampling.BILINEAR)
            path = out / folder / f"{i:04d}.png"
            write_atomic(path, lambda tmp, picture=picture: picture.save(tmp, format="PNG"))
        counts[folder] = len(rows)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="a new or empty folder")
    parser.add_argument("--normal", type=int, default=0, help="the digit that is normal (0..9)")
    parser.add_argument("--size", type=int, default=32, help="side in pixels of the written pictures")
    parser.add_argument("--test-normals", type=float, default=0.3, help="share of the normal digit tested")
    parser.add_argument(
        "--anomalies-per-digit", type=int, default=8, help="test pictures of each other digit"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        counts = make_digits(
            Path(args.out), args.normal, args.size, args.test_normals, args.anomalies_per_digit, args.seed
        )
    except AsdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write under {args.out}: {e}", file=sys.stderr)
        return 2
    for folder, n in counts.items():
        log.info("%s: %d pictures", folder, n)
    log.info("next: python train.py data=images data.root=%s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
