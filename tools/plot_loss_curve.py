"""Plot per-member losses and gradient norms from a debug_freeze CSV or a run's training log.

python tools/plot_loss_curve.py logs/debug_freeze_b2.csv [--out curves.png]
python tools/plot_loss_curve.py runs/.../logs/version_0/metrics.csv
"""

import argparse
import sys
from pathlib import Path

from asd.diagnostics import plot_loss_curves
from asd.errors import AsdError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("csv", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: the CSV's name with .png)")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    try:
        out = plot_loss_curves(args.csv, args.out, title=args.title or args.csv.stem)
    except AsdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
