"""Train and evaluate the asd ensemble: `python train.py [overrides]` (see conf/train.yaml).

Hydra writes its log and settings into the run folder before `main` runs, so three checks come
first, each ending in one `error:` line and exit code 2: the arguments (an unquoted path with a
comma or a non-ASCII letter), whether the run folder can be written, and its lock (one process
per run folder, `asd.run.job.run_lock`).
"""

import logging
import sys
from contextlib import ExitStack
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, OmegaConf

from asd.allocator import reuse_freed_memory
from asd.errors import AsdError, unwritable

CONF = Path(__file__).resolve().parent / "conf"
#: keys that decide the run folder; without them its name is the start time, pinned by `run_folder`
FOLDER_KEYS = ("name", "run_dir", "hydra.run.dir")

log = logging.getLogger("asd")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from asd.run import is_rank_zero, train

    try:
        run_dir = train(cfg)
    except AsdError as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # after the fit (the fit stage answers Ctrl-C itself, with its checkpoint)
        stages = Path(cfg.run_dir) / "stages.json"
        message = (
            f"interrupted (Ctrl-C); the stages finished before it are kept in {stages}: run the same "
            "command again to continue with the first unfinished one"
        )
        log.error("%s", message)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    if is_rank_zero():
        print(run_dir, flush=True)  # the last line: the run folder


def quoted(key: str, value: str) -> str:
    """`key='value'`, the form Hydra reads any value in, and how to type it in a shell."""
    q = "'" if "'" not in value else '"'
    return f'{key}={q}{value}{q} (in a shell: "{key}={q}{value}{q}")'


def check_arguments(args: list[str]) -> None:
    """Overrides Hydra's grammar would refuse or read as a sweep, with the hint Hydra lacks: quote it."""
    parser = OverridesParser.create()
    multirun = "-m" in args or "--multirun" in args
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue  # Hydra's flags and their values
        key, _, value = arg.partition("=")
        try:
            (override,) = parser.parse_overrides([arg])
        except OverrideParseException as e:
            if value[:1] in ("'", '"'):
                continue  # quoted already: Hydra's own message says what else is wrong
            odd = "".join(dict.fromkeys(c for c in value if not c.isascii()))
            why = f"it holds {odd!r}" if odd else str(e).splitlines()[0]
            raise AsdError(
                f"argument {arg!r}: Hydra's override grammar cannot read this value unquoted ({why}); "
                f"quote it: {quoted(key, value)}"
            ) from None
        if override.is_sweep_override() and not multirun:
            raise AsdError(
                f"argument {arg!r}: Hydra reads a value with commas as several runs (a sweep); quote a path "
                f"or a name: {quoted(key, value)}, or write a list in brackets: {key}=[{value}]"
            )


def run_folder(argv: list[str]) -> Path | None:
    """The run folder Hydra will make, composed as Hydra composes it; None for Hydra's own flags
    (--help, --cfg, --multirun, ...) or a config Hydra will refuse itself.

    The composed config is checked here too (`asd.config.validate` and `asd.members.check_members`,
    which load without torch): a bad value or member name is one AsdError before torch and Lightning
    load and before Hydra writes anything.
    Without `name=` or `run_dir=`, the folder's name is the start time: it is pinned here (`name=`
    added to `argv`), so the folder checked and locked now is the one Hydra writes.
    """
    from asd.config import validate
    from asd.members import check_members

    args = argv[1:]
    if any(a.startswith("-") for a in args):
        return None
    try:
        with initialize_config_dir(str(CONF), version_base="1.3", job_name=Path(argv[0]).stem):
            cfg = compose("train", overrides=args, return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)  # `${asd_choice:...}` in run_dir reads the choices
            folder, name = Path(cfg.hydra.run.dir).resolve(), cfg.name
            job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])  # the config `main` gets
            validate(job)
            check_members(job)
    except AsdError:
        raise
    except Exception:  # Hydra reports it in its own words when it composes the config again
        return None
    finally:
        HydraConfig.instance().cfg = None
    if not any(a.lstrip("+~").partition("=")[0] in FOLDER_KEYS for a in args):
        argv.append(f"name='{name}'")
    return folder


def start(argv: list[str]) -> None:
    """Check the arguments and the run folder, hold the folder's lock, then hand over to Hydra."""
    try:
        reuse_freed_memory()  # ASD_MALLOC: freed tensors stay in the process for the next batch
        check_arguments(argv[1:])
        folder = run_folder(argv)
        if folder is not None and (why := unwritable(folder)):
            fix = "pass run_dir= a folder on a writable disk with room"
            if (folder / "stages.json").exists():
                fix = (
                    "a run writes its log and settings into its folder even when every stage is finished: "
                    "copy this one to a writable disk and pass run_dir= the copy (tools/score.py scores "
                    "from it as it is, writing nothing into it)"
                )
            raise AsdError(f"run folder {folder} cannot be written: {why}; {fix}")
        with ExitStack() as stack:
            if folder is not None:
                from asd.run.job import run_lock  # torch and Lightning load here, after the quick checks

                stack.enter_context(run_lock(folder))
            main()
    except AsdError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    start(sys.argv)
