"""Plot per-member losses and gradient norms from a debug_freeze CSV or a run's training log.

python tools/plot_loss_curve.py logs/debug_freeze_b2.csv [--out curves.png]
python tools/plot_loss_curve.py runs/.../logs/version_0/metrics.csv
python tools/plot_loss_curve.py runs/.../logs --members   # a panel per member: training and validation loss

`--members` draws the figure a run puts in `plots/loss_curves.png` at its end
(`asd.evaluation.plots.plot_member_losses`; a `logs/` folder reads every `version_N` in order).
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
    parser.add_argument("csv", type=Path, help="a CSV log, or with --members a run's logs/ folder")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: the CSV's name with .png)")
    parser.add_argument("--title", default="")
    parser.add_argument(
        "--members", action="store_true", help="one panel per member: training and validation loss"
    )
    args = parser.parse_args(argv)
    try:
        if args.members:
            from asd.evaluation.plots import plot_member_losses

            if not args.csv.exists():
                raise AsdError(f"{args.csv}: no such file or folder; give a run's logs/ or a metrics.csv")
            out = plot_member_losses(args.csv, args.out or args.csv.with_name("loss_curves.png"))
            if out is None:
                raise AsdError(f"{args.csv}: no 'train/<member>/loss' or 'val/<member>/loss' columns")
        else:
            out = plot_loss_curves(args.csv, args.out, title=args.title or args.csv.stem)
    except AsdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
