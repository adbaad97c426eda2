"""Data layer: index DCASE/MIMII folders, decode audio, cache it, serve dict batches."""

from asd.data.table import Clip, ClipTable

__all__ = ["Clip", "ClipTable"]
