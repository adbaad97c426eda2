"""Push the asd dashboard (a saved wandb workspace) to a project.

    python tools/wandb_dashboard.py --entity E --project P [--name asd] [--members b2 b3 dcase_ae] [--dry-run]

Needs `pip install -e ".[dashboard]"` (wandb-workspaces) and a wandb login (`wandb login` or
WANDB_API_KEY). `--dry-run` builds the workspace and lists its panels without pushing. The panels
are `asd.run.dashboard.dashboard_panels`; the last line printed is the workspace's URL.
"""

from __future__ import annotations

import argparse
import sys

from asd.run.dashboard import TRAINED, build_workspace, dashboard_panels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entity", required=True, help="wandb user or team")
    parser.add_argument("--project", required=True, help="wandb project the runs log to (logger.project)")
    parser.add_argument("--name", default="asd", help="the saved workspace's name")
    parser.add_argument(
        "--members", nargs="+", default=list(TRAINED), help="members with loss/gradient-norm panels"
    )
    parser.add_argument("--no-amp", action="store_true", help="leave out the AMP scale/skipped-steps panels")
    parser.add_argument("--dry-run", action="store_true", help="build and list the panels, push nothing")
    args = parser.parse_args(argv)
    try:
        panels = dashboard_panels(members=args.members, amp=not args.no_amp)
        workspace = build_workspace(args.entity, args.project, panels, name=args.name)
    except ImportError as e:
        print(f"error: {e}; install the extra: pip install -e '.[dashboard]'", file=sys.stderr)
        return 2
    if args.dry_run:
        for p in panels:
            print(f"{p.section:9s} {p.kind:6s} {p.title}: {', '.join(p.keys)}")
        return 0
    try:
        workspace.save()
    except Exception as e:  # wandb raises several types for a missing login, entity or project
        print(f"error: cannot save the workspace to {args.entity}/{args.project}: {e}", file=sys.stderr)
        return 2
    print(workspace.url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
