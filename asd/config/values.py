"""Config values: the types of `asd.config.nodes`, each saying in words what it accepts.

Every one is `Annotated[Any, PlainValidator(check)]`: pydantic neither converts the value (`true`
is no integer, `'8'` from the command line no number) nor words the error; `check` returns the
value unchanged or raises an error whose message is "expected <what it accepts>".
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic.functional_validators import PlainValidator
from pydantic_core import PydanticCustomError


def value(expected: str, ok: Callable[[Any], bool], null: bool = False) -> Any:
    """A value that `ok` accepts, or null when `null`; anything else fails with "expected `expected`"."""
    expected = f"{expected} or null" if null else expected

    def check(v: Any) -> Any:
        if (v is None and null) or (v is not None and ok(v)):
            return v
        raise PydanticCustomError("asd", "expected {expected}", {"expected": expected})

    return Annotated[Any, PlainValidator(check)]


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def is_texts(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


@dataclass(frozen=True)
class Range:
    """Bounds of a number: `v in Range(gt=0, le=1)`; `str` gives " in (0, 1]", " > 0" or ""."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def __contains__(self, v: float) -> bool:
        return (
            (self.gt is None or v > self.gt)
            and (self.ge is None or v >= self.ge)
            and (self.lt is None or v < self.lt)
            and (self.le is None or v <= self.le)
        )

    def __str__(self) -> str:
        low = ("(", ">", self.gt) if self.gt is not None else ("[", ">=", self.ge)
        high = (")", "<", self.lt) if self.lt is not None else ("]", "<=", self.le)
        if low[2] is not None and high[2] is not None:
            return f" in {low[0]}{_show(low[2])}, {_show(high[2])}{high[0]}"
        bound = low if low[2] is not None else high
        return f" {bound[1]} {_show(bound[2])}" if bound[2] is not None else ""


def _show(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def integer(ge: int | None = None, le: int | None = None, null: bool = False) -> Any:
    bounds = Range(ge=ge, le=le)
    return value(f"an integer{bounds}", lambda v: is_int(v) and v in bounds, null)


def number(
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    null: bool = False,
) -> Any:
    bounds = Range(gt, ge, lt, le)
    return value(f"a number{bounds}", lambda v: is_number(v) and v in bounds, null)


def choice(*options: Any, null: bool = False) -> Any:
    names = ", ".join(repr(o) for o in options)
    return value(f"one of {names}", lambda v: not isinstance(v, bool) and v in options, null)


def integers(ge: int = 1, max_len: int | None = None) -> Any:
    """A non-empty list of integers >= `ge`, at most `max_len` of them."""
    size = f"a list of 1 to {max_len}" if max_len else "a non-empty list of"
    return value(
        f"{size} integers >= {ge}",
        lambda v: (
            isinstance(v, list)
            and 0 < len(v) <= (max_len or len(v))
            and all(is_int(c) and c >= ge for c in v)
        ),
    )


def interval(
    gt: float | None = None, ge: float | None = None, lt: float | None = None, le: float | None = None
) -> Any:
    """A [low, high] range (`level_db`, `span`, ...), both ends within the bounds, low <= high."""
    bounds = Range(gt, ge, lt, le)
    return value(
        f"[low, high] with low <= high, each a number{bounds}",
        lambda v: (
            isinstance(v, list)
            and len(v) == 2
            and all(is_number(x) and x in bounds for x in v)
            and v[0] <= v[1]
        ),
    )


Flag = value("true or false", lambda v: isinstance(v, bool))
Text = value("a non-empty string", lambda v: isinstance(v, str) and v != "")
Folder = value("a path", lambda v: isinstance(v, str) and v != "", null=True)
PosInt = integer(ge=1)
Count = integer(ge=0)
Seed = integer(ge=0)
Dropout = number(ge=0, lt=1)
Fraction = number(ge=0, le=1)
Positive = number(gt=0)
Weight = number(ge=0)
