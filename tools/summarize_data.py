"""Count the clips of a dataset folder per machine, section, domain, split and label.

python tools/summarize_data.py dev_data/ [--json] [--year 2023] [--machines fan pump]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from asd.data.index import index_dataset
from asd.errors import AsdError

COLUMNS = ("machine", "section", "domain", "split", "label", "count")


def format_table(groups: list[dict[str, str | int]], total: int) -> str:
    """Aligned text table of the count groups, with a total line."""
    rows = [list(COLUMNS)] + [[str(g[c]) for c in COLUMNS] for g in groups]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]

    def line(cells: list[str]) -> str:  # text columns left-aligned, the count right-aligned
        text = [cell.ljust(w) for cell, w in zip(cells[:-1], widths[:-1], strict=True)]
        return "  ".join([*text, cells[-1].rjust(widths[-1])])

    lines = [line(rows[0]), line(["-" * w for w in widths]), *(line(r) for r in rows[1:])]
    return "\n".join([*lines, f"total: {total} clips"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="dataset root, a folder like dev_data/raw/, or one machine folder")
    parser.add_argument("--json", action="store_true", help='print {"clips": N, "groups": [...]} instead')
    parser.add_argument("--year", type=int, default=None, help="force one DCASE year's naming (2020..2025)")
    parser.add_argument("--machines", nargs="+", default=None, help="only these machine types")
    parser.add_argument(
        "--mimii-train-normals",
        type=int,
        default=None,
        help="move this many normal clips per MIMII machine id to the train split",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the MIMII train/test draw")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    sys.stdout.reconfigure(errors="backslashreplace")
    try:
        table = index_dataset(
            args.root,
            year=args.year,
            machines=args.machines,
            mimii_train_normals=args.mimii_train_normals,
            seed=args.seed,
        )
    except AsdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    groups = table.counts()
    if args.json:
        print(json.dumps({"clips": len(table), "groups": groups}))
    else:
        print(format_table(groups, len(table)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
