"""The clip table: one row per recording, with everything the file name and folders say."""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

DOMAINS = ("source", "target", "none")
#: domain as the long ids batches carry
DOMAIN_IDS = {"source": 0, "target": 1, "none": 2}
SPLITS = ("train", "test")
LABELS = ("normal", "anomaly", "unknown")
LAYOUTS = ("dcase2020", "dcase2021", "dcase2022", "mimii", "images")


@dataclass
class Clip:
    """One recording.

    `section` is the two-digit section (2021+) or machine ID (2020, MIMII) as a string,
    so `"00"` and `"id_00"` both become `"00"`. `attributes` maps attribute name to
    value (`{"vel": "6", "loc": "A"}`); empty when the file name carries none.
    """

    path: str
    machine: str
    section: str
    domain: str = "none"
    split: str = "train"
    label: str = "normal"
    attributes: dict[str, str] = field(default_factory=dict)
    layout: str = "dcase2022"

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("domain", self.domain, DOMAINS),
            ("split", self.split, SPLITS),
            ("label", self.label, LABELS),
            ("layout", self.layout, LAYOUTS),
        ):
            if value not in allowed:
                raise ValueError(f"Clip {self.path}: {name}={value!r}, expected one of {allowed}")

    @property
    def name(self) -> str:
        """The file name, as the DCASE submission CSVs list it. Pictures repeat names across defect
        folders (`test/good/000.png`, `test/crack/000.png`), so theirs is `<folder>_<file>`."""
        path = Path(self.path)
        return f"{path.parent.name}_{path.name}" if self.layout == "images" else path.name

    @property
    def attribute_string(self) -> str:
        """Attributes as one stable string (`loc=A,vel=6`), `""` when there are none."""
        return ",".join(f"{k}={v}" for k, v in sorted(self.attributes.items()))

    @property
    def is_normal(self) -> bool:
        return self.label == "normal"

    @property
    def is_target(self) -> bool:
        return self.domain == "target"


class ClipTable:
    """An ordered list of clips with selection, counting and CSV round trip."""

    def __init__(self, clips: Iterable[Clip]):
        self.clips: list[Clip] = list(clips)

    def __len__(self) -> int:
        return len(self.clips)

    def __iter__(self) -> Iterator[Clip]:
        return iter(self.clips)

    def __getitem__(self, i: int) -> Clip:
        return self.clips[i]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClipTable) and self.clips == other.clips

    def __repr__(self) -> str:
        return f"ClipTable({len(self)} clips, machines={self.machines()})"

    def select(self, where: Callable[[Clip], bool] | None = None, **equal: str) -> ClipTable:
        """Clips whose fields equal the given values (`split="train"`), and pass `where`."""
        out = [c for c in self.clips if all(getattr(c, k) == v for k, v in equal.items())]
        return ClipTable(c for c in out if where is None or where(c))

    def machines(self) -> list[str]:
        return sorted({c.machine for c in self.clips})

    def sections(self, machine: str | None = None) -> list[str]:
        return sorted({c.section for c in self.clips if machine is None or c.machine == machine})

    def counts(self) -> list[dict[str, str | int]]:
        """Clip counts per (machine, section, domain, split, label), sorted."""
        keys = Counter((c.machine, c.section, c.domain, c.split, c.label) for c in self.clips)
        names = ("machine", "section", "domain", "split", "label")
        return [{**dict(zip(names, k, strict=True)), "count": n} for k, n in sorted(keys.items())]

    def to_csv(self, path: str | Path) -> None:
        """Write one row per clip; attributes as JSON so any value survives."""
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(
                ["path", "machine", "section", "domain", "split", "label", "attributes", "layout"]
            )
            for c in self.clips:
                row = asdict(c)
                row["attributes"] = json.dumps(c.attributes, sort_keys=True)
                writer.writerow(
                    [row[k] for k in ("path", "machine", "section", "domain", "split", "label")]
                    + [row["attributes"], c.layout]
                )

    @classmethod
    def from_csv(cls, path: str | Path) -> ClipTable:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        return cls(Clip(**{**r, "attributes": json.loads(r["attributes"] or "{}")}) for r in rows)
