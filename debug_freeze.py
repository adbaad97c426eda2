"""Freeze one member and watch the others train.

    python debug_freeze.py --freeze b2 [--epochs 10] [--out logs] [hydra overrides...]

Trains the ensemble with that member frozen, writes every step's per-member loss and
gradient norm to logs/debug_freeze_<member>.csv, checks that the frozen member's parameters
and buffers are bit-identical to the start, and draws the curves to logs/debug_freeze_<member>.png.
Exits 1 if the frozen member moved, 2 on bad input.
"""

import argparse
import logging
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from asd.allocator import reuse_freed_memory
from asd.diagnostics import debug_freeze
from asd.errors import AsdError
from asd.members import BRANCHES, REFERENCES

CONF = Path(__file__).resolve().parent / "conf"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--freeze", required=True, help=f"member to freeze: one of {[*BRANCHES, *REFERENCES]}"
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("logs"), help="folder for the CSV and the plot")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. branch=all data.batch_size=8")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        reuse_freed_memory()  # ASD_MALLOC: freed tensors stay in the process for the next batch
        if args.freeze not in (*BRANCHES, *REFERENCES):
            raise AsdError(
                f"--freeze {args.freeze!r}: unknown member; expected one of {[*BRANCHES, *REFERENCES]}"
            )
        if args.epochs < 1:
            raise AsdError(f"--epochs {args.epochs}: give at least 1")
        with initialize_config_dir(str(CONF), version_base="1.3"):
            cfg = compose(
                "train",
                overrides=[
                    *args.overrides,
                    f"freeze={args.freeze}",
                    f"trainer.max_epochs={args.epochs}",
                    f"run_dir={args.out / ('debug_freeze_' + args.freeze)}",
                ],
            )
        report = debug_freeze(cfg, args.freeze, args.out)
    except AsdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{report.steps} steps recorded: {report.csv}")
    print(f"curves: {report.png}")
    if report.identical:
        print(
            f"{report.member} stayed frozen: parameters and buffers bit-identical, grad norm 0 at every step"
        )
        return 0
    print(f"{report.member} MOVED while frozen: {', '.join(report.moved)}")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
