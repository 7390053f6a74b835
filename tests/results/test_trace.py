"""The Chrome trace writer: valid JSON events, one process per GPU, deterministic bytes."""

from __future__ import annotations

import gzip
import json

from moesim.records import Slice
from moesim.results.trace import write_trace


def _slices():
    return [
        Slice(0, "compute", "attention + router", 0.0, 1e-3, {"layer": 1}),
        Slice(0, "compute", "routed experts", 1e-3, 3e-3, {"layer": 1}),
        Slice(0, "pipeline", "send activations", 2e-3, 4e-3, {"micro_batch": 0}),
        Slice(0, "pipeline", "send activations", 3e-3, 5e-3, {"micro_batch": 1}),
        Slice(1, "dispatch", "dispatch forward", 0.5e-3, 0.9e-3, {}),
    ]


def test_trace_events(tmp_path):
    path = write_trace(tmp_path / "t.json.gz", _slices(), {0: "GPU 0", 1: "GPU 1"})
    events = json.loads(gzip.decompress(path.read_bytes()))["traceEvents"]
    names = {(e["pid"], e["args"]["name"]) for e in events if e["name"] == "process_name"}
    assert names == {(0, "GPU 0"), (1, "GPU 1")}
    complete = [e for e in events if e["ph"] == "X"]
    assert len(complete) == 2
    experts = next(e for e in complete if e["name"] == "routed experts")
    assert experts["ts"] == 1000.0  # microseconds
    assert experts["dur"] == 2000.0
    # Transfers and all-to-alls (which may overlap) are async begin/end pairs, distinct ids.
    begins = [e for e in events if e["ph"] == "b"]
    ends = [e for e in events if e["ph"] == "e"]
    assert len(begins) == len(ends) == 3
    assert len({e["id"] for e in begins}) == 3


def test_trace_is_deterministic(tmp_path):
    a = write_trace(tmp_path / "a.json.gz", _slices(), {0: "GPU 0", 1: "GPU 1"})
    b = write_trace(tmp_path / "b.json.gz", _slices(), {0: "GPU 0", 1: "GPU 1"})
    assert a.read_bytes() == b.read_bytes()


def test_trace_events_carry_strategy_and_step(tmp_path):
    context = {"strategy": "loss_free", "step": 120, "point": 1}
    path = write_trace(tmp_path / "t.json.gz", _slices(), {0: "GPU 0", 1: "GPU 1"}, context)
    payload = json.loads(gzip.decompress(path.read_bytes()))
    assert payload["otherData"] == context
    slices = [e for e in payload["traceEvents"] if e["ph"] in ("X", "b")]
    assert len(slices) == 5
    for event in slices:
        assert event["args"]["strategy"] == "loss_free"
        assert event["args"]["step"] == 120
    experts = next(e for e in slices if e["name"] == "routed experts")
    assert experts["args"]["layer"] == 1  # the slice's own args are kept
