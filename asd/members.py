"""Which members a config selects: `branch`, `reference` and `freeze`, resolved and checked.

Nothing here needs torch, so `train.py` checks the names before torch loads (a typo such as
`branch=b9` is reported in about a second), and `asd.run` builds exactly these members.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from asd.errors import AsdError

#: every member the design names, in order
BRANCHES = ("b1", "b2", "b3", "b4", "b5", "b6", "b7")
#: the reference detectors run beside the ensemble: the DCASE baseline autoencoder, and training-free
#: log-mel statistics; reported on their own, and fused only where `fusion.references` names a column
REFERENCES = ("dcase_ae", "stats")


def plain(node: Any) -> Any:
    """A config node as plain Python (lists, dicts), resolved; anything else unchanged."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def select_branches(branch: str | Sequence[str]) -> list[str]:
    """Resolve `branch=all|bN|[..]`; fail loudly on a typo."""
    if isinstance(branch, str):
        names = list(BRANCHES) if branch == "all" else [branch]
    else:
        names = list(branch)
    unknown = sorted(set(names) - set(BRANCHES))
    if unknown:
        raise AsdError(f"unknown branch {unknown}; expected 'all' or some of {list(BRANCHES)}")
    if not names:
        raise AsdError("branch=[] selects no member; use branch=all or e.g. branch=b2")
    return list(dict.fromkeys(names))


def select_references(reference: bool | str | Sequence[str]) -> list[str]:
    """Resolve `reference=true|false|name|[..]`: true is every reference, false none."""
    if isinstance(reference, bool):
        return list(REFERENCES) if reference else []
    names = [reference] if isinstance(reference, str) else list(reference)
    unknown = sorted(set(names) - set(REFERENCES))
    if unknown:
        raise AsdError(f"reference={unknown}: unknown; expected true, false or some of {list(REFERENCES)}")
    return list(dict.fromkeys(names))


def select_frozen(freeze: str | Sequence[str] | None, members: Sequence[str]) -> list[str]:
    """Resolve `freeze=bN|[..]` against the selected members."""
    names = [] if not freeze else [freeze] if isinstance(freeze, str) else list(freeze)
    stray = sorted(set(names) - set(members))
    if stray:
        raise AsdError(f"freeze={stray} names members that are not selected; selected: {list(members)}")
    return names


#: members that take a 2-D input and run on pictures (`data=images`) through `asd.features.ImageFrontend`
IMAGE_MEMBERS = ("b2", "b4", "b5", "b6", "b7", "dcase_ae", "stats")
#: why the others do not
AUDIO_ONLY = {
    "b1": "the Audio Spectrogram Transformer reads Kaldi fbank features of a waveform",
    "b3": "its self-supervised classes are audio transforms (time reversal, speed changes) and its "
    "full-spectrum branch an FFT of the waveform",
}


def is_image_data(cfg: DictConfig) -> bool:
    """Whether the run reads pictures (`data=images`: the data node has an `image` section)."""
    return "image" in cfg.data


def member_names(cfg: DictConfig) -> list[str]:
    """The members to build: `branch` and `reference`; on pictures, `branch=all` means the image members."""
    names = select_branches(plain(cfg.branch)) + select_references(plain(cfg.reference))
    if not is_image_data(cfg):
        return names
    audio = [n for n in names if n not in IMAGE_MEMBERS]
    if audio and plain(cfg.branch) != "all":
        why = "; ".join(f"{n}: {AUDIO_ONLY.get(n, 'an audio member')}" for n in audio)
        raise AsdError(
            f"branch: {audio} only make sense for audio ({why}); with data=images choose from "
            f"{[n for n in IMAGE_MEMBERS if n in BRANCHES]}, or branch=all (which leaves them out)"
        )
    return [n for n in names if n in IMAGE_MEMBERS]


def check_members(cfg: DictConfig) -> None:
    """`branch`, `reference` and `freeze` name members that exist: checked before any data is read."""
    select_frozen(plain(cfg.freeze), member_names(cfg))
