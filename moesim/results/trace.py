"""Chrome trace event format (opens in Perfetto and chrome://tracing) from recorded slices.

One process per traced GPU, one thread per track (compute, dispatch, combine, pipeline,
all-reduce). Slices of the compute and all-reduce tracks never overlap on their thread, so they
are complete events (``ph: X``); all-to-alls (two of them in flight at once under DualPipe's
paired chunks) and stage-to-stage transfers may overlap each other, so they are async events
(``ph: b``/``e``). Times are microseconds. ``context`` (the traced step's strategy, step
number and sampled point) goes into every slice's ``args`` and the file's ``otherData``, so a
slice says which run and step it belongs to. The file is gzip-compressed with a zero timestamp
so identical runs give identical bytes.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from moesim import units
from moesim.records import TRACKS, Slice

ASYNC_TRACKS = ("dispatch", "combine", "pipeline")


def trace_events(
    slices: Iterable[Slice], gpu_label: dict[int, str], context: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Chrome trace events for ``slices``; ``gpu_label`` names each traced GPU's process;
    ``context`` is added to every slice's ``args``."""
    extra = context or {}
    events: list[dict[str, Any]] = []
    for gpu, label in sorted(gpu_label.items()):
        events.append({"ph": "M", "name": "process_name", "pid": gpu, "args": {"name": label}})
        events.append(
            {"ph": "M", "name": "process_sort_index", "pid": gpu, "args": {"sort_index": gpu}}
        )
        for tid, track in enumerate(TRACKS):
            events.append(
                {"ph": "M", "name": "thread_name", "pid": gpu, "tid": tid, "args": {"name": track}}
            )
    tid_of = {track: tid for tid, track in enumerate(TRACKS)}
    for n, s in enumerate(sorted(slices, key=lambda s: (s.gpu, s.start_s, s.track))):
        base = {"name": s.name, "cat": s.track, "pid": s.gpu, "tid": tid_of[s.track]}
        if s.track in ASYNC_TRACKS:
            ident = f"p{n}"
            begin, end = (units.seconds_to_microseconds(t) for t in (s.start_s, s.end_s))
            events.append(
                {**base, "ph": "b", "id": ident, "ts": begin, "args": {**extra, **s.args}}
            )
            events.append({**base, "ph": "e", "id": ident, "ts": end})
        else:
            events.append(
                {
                    **base,
                    "ph": "X",
                    "ts": units.seconds_to_microseconds(s.start_s),
                    "dur": units.seconds_to_microseconds(s.end_s - s.start_s),
                    "args": {**extra, **s.args},
                }
            )
    return events


def write_trace(
    path: Path,
    slices: Iterable[Slice],
    gpu_label: dict[int, str],
    context: dict[str, Any] | None = None,
) -> Path:
    """Write ``trace.json.gz``."""
    payload: dict[str, Any] = {
        "traceEvents": trace_events(slices, gpu_label, context),
        "displayTimeUnit": "ms",
    }
    if context:
        payload["otherData"] = context
    data = json.dumps(payload, separators=(",", ":")).encode()
    with open(path, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write(data)
    return path
