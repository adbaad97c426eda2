"""The schema of the composed Hydra config (`conf/`): the type and range of every key, checked once.

`validate(cfg)` runs when a config is composed (the start of `train(cfg)`, and when a finished run
is loaded) and raises one `AsdError` that lists every bad key as `<dotted.key>=<value>: expected
...`; `validate_member(name, node)` does the same for one `branches.<name>` node. Constructors then
only build: what stays in code are the checks that need several keys or runtime facts (the clip
length, the class counts, a front end's output), such as "channels must be multiples of norm_groups".

- `asd.config.nodes`: the nodes (`TrainConfig` and below, `SCHEMAS` for the members).
- `asd.config.values`: the value types, each saying in words what it accepts.
"""

import difflib
import typing
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ValidationError

from asd.config.nodes import SCHEMAS, TrainConfig
from asd.errors import AsdError

__all__ = ["SCHEMAS", "TrainConfig", "validate", "validate_member"]

#: Hydra's mark of a value the user must give (`data.root: ???`)
MISSING = "???"


def validate(cfg: DictConfig) -> None:
    """Check every key of a composed config; one AsdError lists each bad key and what it expects."""
    try:
        values = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "config"
        raise AsdError(f"{key}: cannot be resolved ({str(e).splitlines()[0]})") from None
    _check(TrainConfig, values, (), OmegaConf.to_container(cfg, resolve=False))


def validate_member(name: str, node: Mapping[str, Any]) -> None:
    """Check one `branches.<name>` node; errors name the keys as `branches.<name>.<key>`."""
    if name not in SCHEMAS:
        raise AsdError(f"branches.{name}: no such member; expected one of {list(SCHEMAS)}")
    values = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    _check(SCHEMAS[name], values, ("branches", name))


def _check(model: type[BaseModel], values: Any, prefix: tuple, raw: Any = None) -> None:
    """Raise one AsdError listing every bad key of `values`. With `raw` (the unresolved config), a
    key that only copies another bad key (`scheduler: ${lr_schedule}`) is left to that key's line."""
    missing = [prefix + loc for loc in _missing(values)]
    problems = [f"{_dotted(loc)}: no value ({MISSING}); set it, e.g. {_dotted(loc)}=..." for loc in missing]
    found: dict[tuple, str] = {}
    try:
        model.model_validate(values)
    except ValidationError as e:
        for err in e.errors():
            loc = prefix + tuple(err["loc"])
            if not any(loc[: len(m)] == m for m in missing):  # a `???` is reported once, above
                found.setdefault(loc, _explain(model, err, loc, len(prefix)))
    for loc, line in found.items():
        copied = _copied_key(raw, loc)
        if not (copied and any(f"{_dotted(o)}.".startswith(f"{copied}.") for o in found if o != loc)):
            problems.append(line)
    if problems:
        s = "" if len(problems) == 1 else "s"
        raise AsdError(f"invalid config ({len(problems)} key{s}):\n  " + "\n  ".join(problems))


def _copied_key(raw: Any, loc: tuple) -> str | None:
    """The key that the unresolved config's value at `loc` (or above it) copies whole (`${key}`)."""
    for part in loc:
        if not isinstance(raw, dict) or part not in raw:
            return None
        raw = raw[part]
        if isinstance(raw, str) and raw.startswith("${") and raw.endswith("}") and ":" not in raw:
            return raw[2:-1]
    return None


def _missing(values: Any, loc: tuple = ()) -> list[tuple]:
    """Where the config still holds `???`."""
    if isinstance(values, dict):
        return [m for k, v in values.items() for m in _missing(v, (*loc, k))]
    return [loc] if values == MISSING else []


def _explain(model: type[BaseModel], err: dict, loc: tuple, skip: int) -> str:
    """One line for one pydantic error: `key=value: what is expected`."""
    key, kind = _dotted(loc), err["type"]
    if kind == "missing":
        return f"{key}: missing; this key is required"
    value = f"{key}={err['input']!r}"
    if kind == "extra_forbidden":
        known = _known_keys(model, loc[skip:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"expected some of {', '.join(known)}"
        return f"{value}: unknown key; {hint}"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"{value}: expected a mapping of keys"
    return f"{value}: {err['msg'][0].lower()}{err['msg'][1:]}"  # the value types' "expected ..."


def _known_keys(model: type[BaseModel], path: tuple) -> list[str]:
    """The keys of the node at `path` below `model`."""
    for part in path:
        field = next(f for n, f in model.model_fields.items() if part in (n, f.alias))
        model = next(
            t
            for t in (field.annotation, *typing.get_args(field.annotation))
            if isinstance(t, type) and issubclass(t, BaseModel)
        )
    return sorted(f.alias or n for n, f in model.model_fields.items())


def _dotted(loc: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
