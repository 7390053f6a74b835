"""Opt-in recording of what each GPU does during a simulated step, for timeline traces.

The step model always calls its recorder; the default :class:`NullRecorder` does nothing, so the
hot path never branches on whether tracing is on (a null object). A :class:`SliceRecorder`
keeps :class:`moesim.records.Slice` tuples ``(gpu, track, name, start_s, end_s, args)`` for a
chosen subset of GPUs; the results package turns them into a Chrome/Perfetto trace.

Tracks: ``compute`` (the GPU's compute stream; slices never overlap), ``dispatch`` and
``combine`` (this GPU's outgoing all-to-all transfers of one layer pass, from the first byte to
the last arrival), ``pipeline`` (activations or gradients sent to a neighbouring stage; these may
overlap each other), ``allreduce`` (gradient all-reduce, including waiting for the ring).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from moesim.records import TRACKS, Slice

__all__ = ["TRACKS", "NullRecorder", "Slice", "SliceRecorder"]


class NullRecorder:
    """Records nothing."""

    enabled = False

    def wants(self, gpu: int) -> bool:
        return False

    def slice(self, gpu: int, track: str, name: str, start: float, end: float, **args: Any) -> None:
        return None


class SliceRecorder(NullRecorder):
    """Records the slices of the GPUs in ``gpus``."""

    enabled = True

    def __init__(self, gpus: Iterable[int]) -> None:
        self.gpus = frozenset(gpus)
        self.slices: list[Slice] = []

    def wants(self, gpu: int) -> bool:
        return gpu in self.gpus

    def slice(self, gpu: int, track: str, name: str, start: float, end: float, **args: Any) -> None:
        if gpu in self.gpus:
            self.slices.append(Slice(gpu, track, name, start, end, args))
