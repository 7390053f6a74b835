"""One training step of the cluster as a SimPy model: a pipeline schedule × expert parallelism.

Granularity. Each pipeline rank is one SimPy process that walks its schedule
(:mod:`moesim.engine.schedules`: 1F1B, interleaved, ZB-H1, DualPipe). A rank stands for all
``expert × data`` GPUs of its stage, which run the same ops on different tokens: its state is
a NumPy vector of per-GPU times, so a hot GPU finishes its experts late while its peers wait in
the combine, GPU by GPU. Ranks exchange activations and gradients as SimPy events that carry
those vectors; SimPy orders the ranks' work and the data-parallel synchronisation at the end.

Each GPU has a compute stream (``free``: when it is next idle) and communication that runs
beside it. An MoE layer, forward, on every GPU of a stage:

1. attention and router (compute);
2. dispatch: each GPU sends each member of its expert-parallel group the distinct tokens routed
   to that member's experts, plain or node-limited, while the GPU computes its shared experts
   (:meth:`_StepModel._exchange`: the rank's
   :class:`~moesim.engine.exchange_tables.ExchangeTables` replay per-flow durations computed
   once per routing cell; ``docs/model/network.md``);
3. routed experts: one grouped GEMM over the GPU's experts once its tokens have arrived;
4. combine: results go back; the next op that needs them waits for the last one.

The backward mirrors it (gradients to the experts, expert backward, input gradients back,
router and attention backward). A split backward (ZB-H1, DualPipe) leaves each op's weight
gradients to a later ``W`` op. DualPipe's paired ``FB`` op runs a forward and a backward chunk
interleaved on one compute stream, switching chunk whenever one waits for an all-to-all, so
each chunk's communication hides behind the other's compute (DeepSeek-V3 technical report,
arXiv 2412.19437, §3.2.1).

Tensor parallelism (``parallelism.tensor``): the kernels are priced per GPU on their split shapes
(:class:`~moesim.cluster.ComputeModel`); the all-gathers and reduce-scatters of sequence
parallelism sit between an op's kernels on the compute stream, so each op carries the seconds
they add (:meth:`~moesim.cluster.ComputeModel.tp_costs`; all of them, or what chunked overlap
leaves), booked as exposed tensor-parallel communication, and their bytes go on the NVLink ports.
The routed experts see each GPU's ``1/tensor`` sequence shard of its group's micro-batch.
Context parallelism (``parallelism.context``) shards the sequences further; its ring-attention
key/value exchange is priced and booked the same way, with the attention.

On healthy hardware each op's bookkeeping (start, end, the idle gap's attribution, busy time
per GPU) and the choice between the chains of an overlapped pair run in compiled loops
(:mod:`moesim.engine.kernels`), operation for operation as the NumPy path beside them, which
runs with stragglers, jitter or ``MOESIM_ENGINE_KERNELS=numpy``: the step's results are the
same to the last bit either way.

Idle time of the compute stream is attributed as it happens: waiting for a neighbouring stage
(pipeline bubble and transfers), waiting for an all-to-all split into the part before the
exchange's last sender was ready (a straggler: routing imbalance upstream) and the rest
(exposed communication). After its last op each rank synchronises gradients with its
data-parallel peers (ring or hierarchical; ZeRO-1 reduce-scatter, sharded optimizer step,
parameter all-gather).
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import simpy

from moesim import units
from moesim.cluster import ComputeModel, Layout, Topology, build_layout, build_topology
from moesim.cluster.compute import ExpertCost, OpCost, OpCosts
from moesim.cluster.model_costs import model_costs
from moesim.cluster.stragglers import HardwareState, JitterSource, compute_end
from moesim.cluster.topology import NIC_IN, NIC_OUT, NVLINK_IN, NVLINK_OUT
from moesim.engine import kernels
from moesim.engine.alltoall import ExchangePorts, LinkLoad
from moesim.engine.exchange_tables import ExchangeTables, structure_key
from moesim.engine.recorder import NullRecorder, SliceRecorder
from moesim.engine.schedules import OpKey, Schedule, build_schedule
from moesim.errors import ScenarioError, SimulationError
from moesim.gate.sampling import gate_layer_map
from moesim.records import StepResult
from moesim.scenario.pipeline import PipelineRuleError
from moesim.scenario.schema import Scenario

Process = Generator[simpy.Event, Any, None]
ACCUMULATORS = (
    "forward",
    "backward",
    "weight",
    "expert",
    "comm",
    "straggler",
    "pipeline",
    "allreduce",
    "optimizer",
    "slowdown",
    "tp",
    "tp_bytes",
)
ROW = {name: row for row, name in enumerate(ACCUMULATORS)}
# Direct ufunc reductions: ``ndarray.any``/``sum`` without their Python wrappers (same loops).
_any = np.logical_or.reduce
_sum = np.add.reduce
_NO_SENDER = np.zeros(0)
_NO_SECONDS = np.zeros(0)
NO_COST = OpCost(0.0, 0.0, 0.0)
Vector = npt.NDArray[np.float64]


class CountingEnvironment(simpy.Environment):
    """A SimPy environment that counts the events it processes (for benchmarks)."""

    def __init__(self) -> None:
        super().__init__()
        self.processed = 0

    def step(self) -> None:
        self.processed += 1
        super().step()


@dataclass
class StepContext:
    """What a step needs that does not change between steps of one scenario."""

    scenario: Scenario
    topology: Topology
    layout: Layout
    compute: ComputeModel
    schedule: Schedule
    piece_layers: list[list[int]]
    rank_gpus: list[npt.NDArray[np.int64]]
    """Per pipeline rank: its GPUs, expert-parallel groups in rows (data, expert)."""
    sync_ranks: list[tuple[int, ...]]
    """Ranks that hold the same parameters (DualPipe: r and PP − 1 − r) and sync together."""
    dispatch_bytes_per_token: float
    grad_bytes_per_token: float
    activation_bytes: float
    dense_params: npt.NDArray[np.float64]
    """Per rank: parameters replicated over every GPU of the rank (attention, router, shared
    experts, dense FFNs, embedding, head, MTP modules), over all the pieces it holds."""
    expert_params: npt.NDArray[np.float64]
    """Per rank: one GPU's routed-expert parameters over all the pieces it holds."""
    grad_bytes_per_param: float
    ops: OpCosts
    """Seconds per micro-batch on one GPU of the ops whose cost does not depend on routing."""
    tp_seconds: dict[str, OpCost]
    """Per op (attention, dense_ffn, head, embedding, mtp): seconds its tensor-parallel
    collectives add to the compute stream, per pass (empty without tensor parallelism)."""
    tp_bytes: dict[str, OpCost]
    """Per op: bytes each GPU sends (and receives) over NVLink for those collectives."""
    memo: dict[str, dict[Any, Any]] = field(default_factory=dict, repr=False, compare=False)
    """What steps on healthy links share: pipeline transfer times and links, ring paths and
    bottlenecks (pure functions of the topology, filled by the first step)."""

    def tp(self, op: str) -> OpCost:
        """Tensor-parallel seconds of ``op``."""
        return self.tp_seconds.get(op, NO_COST)

    def tp_sent(self, op: str) -> OpCost:
        """Tensor-parallel bytes each GPU sends in ``op``."""
        return self.tp_bytes.get(op, NO_COST)

    @cached_property
    def moe_block(self) -> OpCost:
        """Attention and router of an MoE layer (the compute before its dispatch)."""
        return self.ops.attention + self.ops.router

    @cached_property
    def dense_layer(self) -> OpCost:
        return self.ops.attention + self.ops.dense_ffn

    @property
    def dense_grad_bytes(self) -> npt.NDArray[np.float64]:
        return self.dense_params * self.grad_bytes_per_param

    @property
    def expert_grad_bytes(self) -> npt.NDArray[np.float64]:
        return self.expert_params * self.grad_bytes_per_param


def balanced_split(scenario: Scenario, compute: ComputeModel, pieces: int) -> list[list[int]]:
    """Cut the layers into ``pieces`` contiguous pieces minimising the largest piece's forward
    + backward compute under balanced routing; the first piece also embeds, the last one runs
    the output head and the MTP modules (what a tuned pipeline layout does by hand). Exposed
    tensor-parallel communication counts with its op."""
    m = scenario.model
    ops = compute.op_costs()
    experts = compute.experts(compute.balanced_rows(scenario.parallelism.expert))
    tp, _ = compute.tp_costs()

    def both_passes(op: OpCost, name: str = "") -> float:
        op = op + tp.get(name, NO_COST)
        return op.forward + op.backward

    moe = (
        both_passes(ops.attention, "attention")
        + both_passes(ops.router + ops.shared_experts)
        + float(np.sum(experts.forward))
        + float(np.sum(experts.backward))
    )
    dense = both_passes(ops.attention, "attention") + both_passes(ops.dense_ffn, "dense_ffn")
    layer_cost = np.array([dense if i < m.ffn_dense_layers else moe for i in range(m.layers)])
    first = both_passes(ops.embedding, "embedding")
    last = both_passes(ops.head, "head") + m.mtp_depth * both_passes(ops.mtp, "mtp")
    prefix = np.concatenate([[0.0], np.cumsum(layer_cost)])
    n = m.layers
    # best[k][i]: least max piece cost cutting layers[:i] into k pieces; cut[k][i]: last cut.
    best = np.full((pieces + 1, n + 1), np.inf)
    cut = np.zeros((pieces + 1, n + 1), dtype=np.int64)
    best[0][0] = 0.0
    for k in range(1, pieces + 1):
        for i in range(k, n - (pieces - k) + 1):
            j = np.arange(k - 1, i)
            cost = prefix[i] - prefix[j] + np.where(j == 0, first, 0.0)
            if i == n:
                cost = cost + last
            total = np.maximum(best[k - 1][j], cost)
            a = int(np.argmin(total))
            best[k][i], cut[k][i] = total[a], j[a]
    bounds = [n]
    for k in range(pieces, 0, -1):
        bounds.append(int(cut[k][bounds[-1]]))
    bounds.reverse()
    return [list(range(bounds[k], bounds[k + 1])) for k in range(pieces)]


def memory_estimate_bytes(scenario: Scenario) -> float:
    """Peak bytes of one step's simulation state: the routing sample (counts, per-rank and
    per-node dispatch volumes, as int64) and the per-GPU records."""
    p, g, moe = scenario.parallelism, scenario.gate, scenario.model.moe
    if moe is None:  # a dense model has no routing sample
        return float(scenario.cluster.gpus * 16 * 8)
    cells = g.layers_simulated * scenario.micro_batches * p.expert * p.data
    sample = cells * (moe.routed_experts + p.expert + scenario.ep_nodes) * 8
    per_gpu = scenario.cluster.gpus * (16 + moe.routed_experts // p.expert) * 8
    return float(sample + per_gpu)


def build_context(scenario: Scenario, micro_batches: int | None = None) -> StepContext:
    """Everything a step needs that its routing does not change. ``micro_batches``: per
    pipeline per step (default: the scenario's full batch; fewer during a batch ramp)."""
    m, p = scenario.model, scenario.parallelism
    n_micro = scenario.micro_batches if micro_batches is None else micro_batches
    need = memory_estimate_bytes(scenario)
    limit = scenario.engine.memory_limit_gib * units.GiB
    if need > limit:
        raise ScenarioError(
            "engine.memory_limit_gib",
            f"simulating one step needs about {need / units.GiB:.1f} GiB (routing samples "
            f"of {scenario.gate.layers_simulated} layers × {scenario.micro_batches} micro-batches "
            f"× {p.expert * p.data} ranks × {m.moe_spec.routed_experts} experts), more than the "
            f"{scenario.engine.memory_limit_gib:g} GiB allowed; lower gate.layers_simulated or "
            f"raise the limit",
        )
    layout = build_layout(scenario)
    try:
        schedule = build_schedule(p.schedule, p.pipeline, n_micro, p.virtual_stages)
    except PipelineRuleError as err:
        raise ScenarioError(err.field, err.message) from None
    compute = ComputeModel(scenario)
    if p.layer_split == "balanced":
        pieces = balanced_split(scenario, compute, schedule.n_pieces)
    else:
        pieces = schedule.piece_layers(m.layers, p.piece_split)
    costs = model_costs(m)
    held = [schedule.held_pieces(r) for r in range(p.pipeline)]
    sync = [schedule.replicas(r) for r in range(p.pipeline)]
    dense = np.zeros(p.pipeline)
    expert = np.zeros(p.pipeline)
    last = len(pieces) - 1
    # Tensor-parallel weights are split over the group; the router and the shared experts
    # (run on each GPU's sequence shard) are replicated.
    t = p.tensor
    top_k = 0 if m.moe is None else m.moe.top_k
    shared = 0 if m.moe is None else m.moe.shared_experts
    for rank in range(p.pipeline):
        for piece in held[rank]:
            for layer in pieces[piece]:
                dense[rank] += costs.attention.params / t
                if layer < m.ffn_dense_layers:
                    dense[rank] += costs.dense_ffn_params / t
                else:
                    dense[rank] += costs.router_params + costs.expert_params * shared
                    expert[rank] += costs.expert_params * layout.experts_per_rank
            if piece == 0:
                dense[rank] += costs.embedding_params / t
            if piece == last:
                dense[rank] += costs.head_params / t
                dense[rank] += m.mtp_depth * costs.mtp_params(top_k, shared) / t
    bf16 = units.BYTES_PER_ELEMENT["bf16"]
    tp_seconds, tp_bytes = compute.tp_costs()
    return StepContext(
        scenario=scenario,
        topology=build_topology(scenario),
        layout=layout,
        compute=compute,
        schedule=schedule,
        piece_layers=pieces,
        rank_gpus=[
            np.asarray(layout.stage_gpus(r)).reshape(p.data, p.expert) for r in range(p.pipeline)
        ],
        sync_ranks=sync,
        dispatch_bytes_per_token=m.hidden * units.BYTES_PER_ELEMENT[m.gemm_precision],
        grad_bytes_per_token=m.hidden * bf16,
        # Sequence (and context) parallelism: each GPU sends its shard to its peer in the
        # next stage.
        activation_bytes=float(p.micro_batch_size * m.seq_len * m.hidden * bf16)
        / (p.tensor * p.context),
        dense_params=dense,
        expert_params=expert,
        grad_bytes_per_param=float(units.BYTES_PER_ELEMENT[p.grad_dtype]),
        ops=compute.op_costs(),
        tp_seconds=tp_seconds,
        tp_bytes=tp_bytes,
    )


# Chain protocol: a chain (one forward or backward piece) yields ``_Compute`` requests to its
# rank's executor, which runs each on the compute stream and replies with its end times.
@dataclass(slots=True, kw_only=True)
class _Compute:
    seconds: Vector | float
    ready: Vector
    name: str
    bucket: str  # "forward", "backward" or "weight"
    cause: str = "pipeline"  # what an idle gap before it waits for: "pipeline" or "a2a"
    last_sender: Vector | None = None
    expert: bool = False
    tp: float = 0.0
    """Part of ``seconds``: exposed tensor-parallel communication, not compute."""
    tp_bytes: float = 0.0
    """Bytes each GPU sends over NVLink for those collectives."""


Chain = Generator[Any, Any, Vector]
# An MoE forward yields like a chain and returns its output times and each GPU's last sender.
MoeChain = Generator[Any, Any, tuple[Vector, Vector]]


class _StepModel:
    def __init__(
        self,
        ctx: StepContext,
        counts: np.ndarray,
        dest: np.ndarray,
        node_tokens: np.ndarray | None,
        recorder: NullRecorder,
        hardware: HardwareState | None = None,
        jitter: JitterSource | None = None,
    ) -> None:
        self.ctx = ctx
        self.hw = None if hardware is None or hardware.is_healthy else hardware
        self.jitter = jitter if jitter is not None and jitter.sigma > 0 else None
        self.sc = sc = ctx.scenario
        self.rec = recorder
        # Each GPU routes its sequence shard: 1/(tensor × context) of its group's micro-batch.
        t = sc.parallelism.tensor * sc.parallelism.context
        self.counts = counts if t == 1 else counts / t
        self.dest = dest if t == 1 else dest / t
        self.node_tokens = node_tokens if node_tokens is None or t == 1 else node_tokens / t
        self.env = CountingEnvironment()
        self.schedule = ctx.schedule
        lay, topo = ctx.layout, ctx.topology
        n = topo.gpus
        self.g_stage = lay.gpus_per_stage
        self.data, self.expert = lay.data, lay.expert
        # Expert slots per GPU: the routed experts' share, or more with redundant replicas.
        self.n_experts = counts.shape[3]
        self.epr = self.n_experts // lay.expert
        self.node_limited = sc.parallelism.dispatch == "node_limited"
        self.load = LinkLoad.zeros(topo.links)
        self.exchange_ports = [ExchangePorts(topo, gpus, self.load) for gpus in ctx.rank_gpus]
        # A rank's GPUs are consecutive ranks: slices index per-GPU arrays without copies.
        self.span = [slice(int(g.min()), int(g.max()) + 1) for g in ctx.rank_gpus]
        # Degraded ports: a bandwidth factor per link (NVLink and NIC ports of each GPU), and
        # per GPU the factor its expert-parallel exchanges see.
        self.link_scale: Vector | None = None
        self.link_factor: Vector | None = None
        self._worst_link: dict[tuple[int, int, bool], Vector] = {}
        self._healthy_links = np.ones(0)
        if self.hw is not None and (
            np.any(self.hw.nic_factor < 1) or np.any(self.hw.nvlink_factor < 1)
        ):
            nvl, nic = self.hw.nvlink_factor, self.hw.nic_factor
            scale = np.ones(topo.links)
            per_gpu = np.stack([nvl, nvl, nic, nic], axis=1).ravel()
            scale[: per_gpu.size] = per_gpu
            self.link_scale = scale
            self.link_factor = nvl.copy()
            for rank, ports in enumerate(self.exchange_ports):
                if ports.remote.any():  # the group spans NVLink domains: NICs carry it too
                    span = self.span[rank]
                    self.link_factor[span] = np.minimum(nvl[span], nic[span])
        self.tables = self._exchange_tables()
        self.cells_per_layer = ctx.schedule.micro_batches
        self.uses = [np.zeros((dest.shape[0] * dest.shape[1], 2)) for _ in ctx.rank_gpus]
        self.free = [np.zeros(self.g_stage) for _ in range(lay.stages)]
        self.done: dict[OpKey, simpy.Event] = {}
        # Per-GPU accumulators, one row each (the compiled op books into the rows by index).
        self._acc_all = np.zeros((len(ACCUMULATORS), n))
        self.acc = {name: self._acc_all[row] for row, name in enumerate(ACCUMULATORS)}
        self.finish = np.zeros(n)
        self.ops_end = np.zeros(n)
        self.expert_tokens = np.zeros((n, self.epr))
        self.expert_wait_token_s = np.zeros((n, self.epr))
        self.expert_served = np.zeros((n, self.epr))
        self.exchanges = 0
        # Per rank: views of the per-GPU accumulators on its GPUs (in-place updates through a
        # view skip the slicing of every op).
        self.acc_of = [{name: v[span] for name, v in self.acc.items()} for span in self.span]
        self.acc_rows = [self._acc_all[:, span] for span in self.span]
        # Healthy hardware: each op is one compiled call (the hardware path stays NumPy).
        self.compiled_ops = kernels.ENABLED and self.hw is None and self.jitter is None
        # The compiled loops of the per-op path, bound once (a call then costs no lookup).
        if kernels.ENABLED:
            self._op_kernel = kernels.loop("compute")
            self._sooner = kernels.loop("sooner")
        self._exchange_kernel = kernels.loop("exchange") if kernels.ENABLED else None
        self._packed: dict[tuple[int, bool, str], tuple[Any, ...]] = {}
        self.expert_of = [
            (self.expert_tokens[span], self.expert_wait_token_s[span], self.expert_served[span])
            for span in self.span
        ]
        self._tp_fields: dict[tuple[float, str, str], dict[str, Any]] = {}
        self._rings: dict[tuple, tuple[float, float]] = ctx.memo.setdefault("rings", {})
        self._ring_paths: dict[tuple[int, ...], npt.NDArray[np.int64]] = ctx.memo.setdefault(
            "ring_paths", {}
        )
        self._expert_cache: dict[tuple[int, int], tuple[Vector, ExpertCost]] = {}
        self._all_experts: tuple[Vector, ExpertCost] | None = None
        self.gate_layer = gate_layer_map(sc)
        self.dense_layers = sc.model.ffn_dense_layers
        # Per MoE layer: its simulated router (gate layer) and its first routing cell.
        self.layer_gate = [int(g) for g in self.gate_layer]
        self.layer_cell = [g * self.cells_per_layer for g in self.layer_gate]
        self.per_token = {
            "dispatch": ctx.dispatch_bytes_per_token,
            "combine": ctx.grad_bytes_per_token,
        }
        self.traced = [
            [(i, int(g)) for i, g in enumerate(gpus.ravel()) if recorder.wants(int(g))]
            for gpus in ctx.rank_gpus
        ]
        # Transfer times depend on degraded links: shared between steps on healthy ones only.
        healthy = self.link_scale is None
        self.p2p: dict[tuple[int, int], tuple[Vector, npt.NDArray[np.int64]]] = (
            ctx.memo.setdefault("p2p", {}) if healthy else {}
        )
        self._p2p_busy: dict[tuple[int, int], Vector] = (
            ctx.memo.setdefault("p2p_busy", {}) if healthy else {}
        )
        self.rank_of: dict[tuple[int, int], int] = {}  # (micro, piece) → rank, lazily

    # -------------------------------------------------------------- helpers

    def _with_tp(self, seconds: float, op: str, phase: str) -> dict[str, Any]:
        """``_Compute`` fields of an op of ``seconds`` compute plus its tensor-parallel
        collectives in ``phase`` (``forward`` or ``backward_input``)."""
        key = (seconds, op, phase)
        fields = self._tp_fields.get(key)
        if fields is None:
            tp = float(getattr(self.ctx.tp(op), phase))
            sent = float(getattr(self.ctx.tp_sent(op), phase))
            fields = self._tp_fields[key] = {"seconds": seconds + tp, "tp": tp, "tp_bytes": sent}
        return fields

    def _p2p(self, a: int, b: int) -> tuple[Vector, npt.NDArray[np.int64]]:
        """Activation transfer time from GPU i of rank a to GPU i of rank b (alpha-beta) and
        the links those transfers cross (cached per pair of ranks)."""
        cached = self.p2p.get((a, b))
        if cached is not None:
            return cached
        topo, ctx = self.ctx.topology, self.ctx
        src, dst = ctx.rank_gpus[a].ravel(), ctx.rank_gpus[b].ravel()
        secs = np.empty(src.size)
        links: list[int] = []
        for i, (s, d) in enumerate(zip(src, dst, strict=True)):
            path = topo.path(int(s), int(d))
            links += path
            capacity = topo.capacity[path]
            if self.link_scale is not None:
                capacity = capacity * self.link_scale[path]
            bw = capacity.min()
            secs[i] = topo.latency(int(s), int(d)) + ctx.activation_bytes / bw
        self.p2p[(a, b)] = secs, np.asarray(links, dtype=np.int64)
        return self.p2p[(a, b)]

    def _event(self, key: OpKey) -> simpy.Event:
        ev = self.done.get(key)
        if ev is None:
            ev = self.done[key] = self.env.event()
        return ev

    def _rank(self, micro: int, piece: int) -> int:
        key = (micro, piece)
        r = self.rank_of.get(key)
        if r is None:
            r = self.rank_of[key] = self.schedule.rank_of(micro, piece)
        return r

    def _compute(self, rank: int, req: _Compute) -> Vector:
        if self.compiled_ops:
            out = np.empty((2, self.g_stage))
            seconds = req.seconds
            uniform = not isinstance(seconds, np.ndarray)
            self._op_kernel(
                self.free[rank],
                req.ready,
                _NO_SENDER if req.last_sender is None else req.last_sender,
                req.last_sender is not None,
                _NO_SECONDS if uniform else seconds,
                float(seconds) if uniform else 0.0,
                uniform,
                req.cause == "a2a",
                ROW[req.bucket],
                req.tp,
                req.tp_bytes,
                req.expert,
                self.acc_rows[rank],
                out,
            )
            start, end = out
            self.free[rank] = end
            for i, gpu in self.traced[rank]:
                self.rec.slice(gpu, "compute", req.name, float(start[i]), float(end[i]))
            return end
        free = self.free[rank]
        start = np.maximum(free, req.ready)
        gap = start - free
        acc = self.acc_of[rank]
        if not _any(gap):
            pass  # started the moment the stream was free: no wait to attribute
        elif req.cause == "a2a":
            if req.last_sender is not None:
                # The part of the gap before the exchange's last sender was ready.
                waited = np.minimum(np.maximum(np.minimum(req.last_sender, start) - free, 0), gap)
                acc["straggler"] += waited
                acc["comm"] += gap - waited
            else:
                acc["comm"] += gap
        else:
            acc["pipeline"] += gap
        end = self._end(self.span[rank], start, req.seconds)
        self.free[rank] = end
        acc[req.bucket] += req.seconds - req.tp
        if req.tp:
            acc["tp"] += req.tp
            acc["tp_bytes"] += req.tp_bytes
        if req.expert:
            acc["expert"] += req.seconds
        for i, gpu in self.traced[rank]:
            self.rec.slice(gpu, "compute", req.name, float(start[i]), float(end[i]))
        return end

    def _end(self, gpus: slice, start: Vector, seconds: Vector | float) -> Vector:
        """When an op of healthy duration ``seconds`` started at ``start`` ends on ``gpus``,
        given their hardware condition; the extra time is booked as slowdown."""
        if self.hw is None and self.jitter is None:
            return start + seconds
        work = seconds
        throttled = False
        if self.hw is not None:
            work = work * self.hw.gpu_speed[gpus]
            thr = self.hw.throttle
            throttled = bool(len(thr)) and thr.rank[gpus.start] != thr.rank[gpus.stop]
        if self.jitter is not None:
            work = work * self.jitter(start.size)
        if throttled:
            assert self.hw is not None
            end = compute_end(self.hw, gpus, start, work)
        else:
            end = start + work
        self.acc["slowdown"][gpus] += end - (start + seconds)
        return end

    def _record(self, rank: int, track: str, name: str, start: Vector, end: Vector) -> None:
        if not self.traced[rank]:
            return
        for i, gpu in self.traced[rank]:
            if end[i] > start[i]:
                self.rec.slice(gpu, track, name, float(start[i]), float(end[i]))

    # -------------------------------------------------------------- MoE exchanges

    def _exchange_tables(self) -> list[ExchangeTables]:
        """One table set per distinct rank structure (ranks placed alike share them)."""
        lay = self.ctx.layout
        n_layers, n_micro = self.dest.shape[:2]
        cells = n_layers * n_micro
        rank_tokens = self.dest.reshape(cells, self.data, self.expert, self.expert).astype(float)
        node_tokens = None
        if self.node_limited:
            assert self.node_tokens is not None
            node_tokens = self.node_tokens.reshape(cells, self.data, self.expert, -1)
            node_tokens = node_tokens.astype(float)
        shared: dict[tuple, ExchangeTables] = {}
        out = []
        for rank in range(lay.stages):
            key = structure_key(self.ctx.topology, self.ctx.rank_gpus[rank])
            if key not in shared:
                shared[key] = ExchangeTables(self.exchange_ports[rank], rank_tokens, node_tokens)
            out.append(shared[key])
        return out

    def _exchange(
        self, rank: int, ready: Vector, layer: int, micro: int, toward_experts: bool, kernel: str
    ) -> tuple[Vector, Vector]:
        """Arrival times at the receivers and, per receiver, its last sender's ready time.
        ``kernel``: ``dispatch`` sends at the GEMM precision (FP8 in DeepSeek-V3), ``combine``
        in BF16. The backward of a dispatch is a combine kernel and the other way round."""
        per_token = self.per_token[kernel]
        cell = self.layer_cell[layer - self.dense_layers] + micro
        self.exchanges += 1
        self.uses[rank][cell, 0 if toward_experts else 1] += per_token
        if self.link_factor is None and self._exchange_kernel is not None:
            # The compiled replay called directly (ExchangeTables.exchange's fast path).
            key = (rank, toward_experts, kernel)
            packed = self._packed.get(key)
            if packed is None:
                tables = self.tables[rank].packed(toward_experts, per_token)
                packed = self._packed[key] = () if tables is None else tables.arguments
            if packed:
                out = np.empty((2, self.g_stage))
                self._exchange_kernel(
                    ready.reshape(self.data, self.expert),
                    *packed,
                    cell,
                    out.reshape(2, self.data, self.expert),
                )
                return out[0], out[1]
        done, last = self.tables[rank].exchange(
            ready.reshape(self.data, self.expert), cell, toward_experts, per_token
        )
        if self.link_factor is not None:
            done = self._degraded(rank, cell, toward_experts, done, last)
        return done.ravel(), last.ravel()

    def _degraded(
        self, rank: int, cell: int, toward_experts: bool, done: Vector, last: Vector
    ) -> Vector:
        """Stretch each receiver's transfer by the slowest link factor among it and its
        senders (an exchange through a half-speed port takes twice as long from its last
        sender's start: the port is the bottleneck of the flows that cross it)."""
        assert self.link_factor is not None
        key = (rank, cell, toward_experts)
        worst = self._worst_link.get(key)
        if worst is None:  # link factors hold for the whole step: once per rank and cell
            f = self.link_factor[self.span[rank]].reshape(self.data, self.expert)
            senders = self.dest[cell // self.cells_per_layer, cell % self.cells_per_layer] > 0
            senders = senders.reshape(self.data, self.expert, self.expert)
            if toward_experts:
                worst = np.where(senders, f[:, :, None], 1.0).min(axis=1)
            else:
                worst = np.where(senders, f[:, None, :], 1.0).min(axis=2)
            worst = np.minimum(worst, f)
            if np.all(worst == 1.0):
                worst = self._healthy_links  # no degraded port in this exchange
            self._worst_link[key] = worst
        if worst is self._healthy_links:
            return done
        return last + (done - last) / worst

    def _experts(self, layer: int, micro: int) -> tuple[Vector, ExpertCost]:
        """Per GPU of a stage: its local experts' tokens (gpus, experts per rank) and the
        routed experts' seconds per pass (cached: layers that share a simulated router share
        their loads)."""
        g = self.layer_gate[layer - self.dense_layers]
        cached = self._expert_cache.get((g, micro))
        if cached is None:
            if self._all_experts is None:
                # Every cell at once (the cost model works row by row, one GPU a row).
                n_layers, n_micro = self.counts.shape[:2]
                c = self.counts.reshape(
                    n_layers, n_micro, self.data, self.expert, self.n_experts
                ).sum(axis=3)
                rows = c.reshape(n_layers, n_micro, self.data * self.expert, self.epr)
                rows = rows.astype(np.float64)
                self._all_experts = (rows, self.ctx.compute.experts(rows))
            rows, cost = self._all_experts
            cached = (
                rows[g, micro],
                ExpertCost(
                    cost.forward[g, micro],
                    cost.backward_input[g, micro],
                    cost.backward_weight[g, micro],
                ),
            )
            self._expert_cache[(g, micro)] = cached
        return cached

    def _serve(self, rank: int, rows: Vector, arrive: Vector, start: Vector) -> None:
        """Book the tokens' wait between their arrival and their experts' start."""
        _, waited, served = self.expert_of[rank]
        if self.compiled_ops:
            kernels.serve(start, arrive, rows, waited, served)
            return
        waited += np.maximum(start - arrive, 0.0)[:, None] * rows
        served += rows

    # -------------------------------------------------------------- chains

    def _moe_forward(
        self, rank: int, layer: int, micro: int, t: Vector, cause: str, last_in: Vector | None
    ) -> MoeChain:
        ops = self.ctx.ops
        t = yield _Compute(
            **self._with_tp(self.ctx.moe_block.forward, "attention", "forward"),
            ready=t,
            name="attention + router",
            bucket="forward",
            cause=cause,
            last_sender=last_in,
        )
        arrive, last = self._exchange(rank, t, layer, micro, True, "dispatch")
        self._record(rank, "dispatch", "dispatch forward", t, arrive)
        t = yield _Compute(
            seconds=ops.shared_experts.forward, ready=t, name="shared experts", bucket="forward"
        )
        rows, cost = self._experts(layer, micro)
        t_exp = yield _Compute(
            seconds=cost.forward,
            ready=np.maximum(t, arrive),
            name="routed experts",
            bucket="forward",
            cause="a2a",
            last_sender=last,
            expert=True,
        )
        tokens = self.expert_of[rank][0]
        tokens += rows
        self._serve(rank, rows, arrive, t_exp - cost.forward)
        back, last = self._exchange(rank, t_exp, layer, micro, False, "combine")
        self._record(rank, "combine", "combine forward", t_exp, back)
        return np.maximum(t_exp, back), last

    def _moe_backward(
        self,
        rank: int,
        layer: int,
        micro: int,
        t: Vector,
        split: bool,
        cause: str,
        last_in: Vector | None,
        filler: float,
    ) -> Chain:
        """One MoE layer's backward. Unless the backward is split (its weight gradients then
        run in a later ``W`` op), each weight-gradient GEMM waits until the next all-to-all has
        been launched and runs while it is in flight, as DualPipe and DeepSeek's trace order
        them: the experts' while their input gradients go back, the attention's (``filler``
        seconds, carried to the next layer) while that layer's gradients come in."""
        ops = self.ctx.ops
        # Backward of the combine: a dispatch kernel carrying the output gradients.
        arrive, last = self._exchange(rank, t, layer, micro, True, "dispatch")
        self._record(rank, "dispatch", "dispatch backward (of combine)", t, arrive)
        if filler:
            t = yield _Compute(
                seconds=filler,
                ready=t,
                name="weight gradients",
                bucket="weight",
                cause=cause,
                last_sender=last_in,
            )
            cause, last_in = "pipeline", None
        t_sh = yield _Compute(
            seconds=ops.shared_experts.backward_input,
            ready=t,
            name="shared experts",
            bucket="backward",
            cause=cause,
            last_sender=last_in,
        )
        rows, cost = self._experts(layer, micro)
        t_exp = yield _Compute(
            seconds=cost.backward_input,
            ready=np.maximum(t_sh, arrive),
            name="routed experts",
            bucket="backward",
            cause="a2a",
            last_sender=last,
            expert=True,
        )
        self._serve(rank, rows, arrive, t_exp - cost.backward_input)
        # Backward of the dispatch: a combine kernel carrying the input gradients (BF16).
        back, last = self._exchange(rank, t_exp, layer, micro, False, "combine")
        self._record(rank, "combine", "combine backward (of dispatch)", t_exp, back)
        if not split:
            t_exp = yield _Compute(
                seconds=cost.backward_weight + ops.shared_experts.backward_weight,
                ready=t_exp,
                name="expert weight gradients",
                bucket="weight",
                expert=True,
            )
        t = yield _Compute(
            **self._with_tp(self.ctx.moe_block.backward_input, "attention", "backward_input"),
            ready=np.maximum(t_exp, back),
            name="attention + router",
            bucket="backward",
            cause="a2a",
            last_sender=last,
        )
        return t

    def _forward(self, rank: int, micro: int, piece: int, t: Vector) -> Chain:
        ops = self.ctx.ops
        m = self.sc.model
        cause, last = "pipeline", None
        if piece == 0:
            t = yield _Compute(
                **self._with_tp(ops.embedding.forward, "embedding", "forward"),
                ready=t,
                name="embedding",
                bucket="forward",
            )
        for layer in self.ctx.piece_layers[piece]:
            if layer < self.dense_layers:
                dense_tp = self._with_tp(self.ctx.dense_layer.forward, "attention", "forward")
                ffn_tp = self._with_tp(0.0, "dense_ffn", "forward")
                t = yield _Compute(
                    seconds=dense_tp["seconds"] + ffn_tp["seconds"],
                    tp=dense_tp["tp"] + ffn_tp["tp"],
                    tp_bytes=dense_tp["tp_bytes"] + ffn_tp["tp_bytes"],
                    ready=t,
                    name="dense layer",
                    bucket="forward",
                    cause=cause,
                    last_sender=last,
                )
                cause, last = "pipeline", None
            else:
                t, last = yield from self._moe_forward(rank, layer, micro, t, cause, last)
                cause = "a2a"
        if piece == self.schedule.n_pieces - 1:
            t = yield _Compute(
                **self._with_tp(ops.head.forward, "head", "forward"),
                ready=t,
                name="output head",
                bucket="forward",
                cause=cause,
                last_sender=last,
            )
            for _ in range(m.mtp_depth):
                t = yield _Compute(
                    **self._with_tp(ops.mtp.forward, "mtp", "forward"),
                    ready=t,
                    name="MTP module",
                    bucket="forward",
                )
        return t

    def _backward(self, rank: int, micro: int, piece: int, t: Vector) -> Chain:
        ops = self.ctx.ops
        m = self.sc.model
        split = self.schedule.is_split(micro, piece)

        def backward(op: OpCost) -> float:
            return op.backward_input if split else op.backward

        if piece == self.schedule.n_pieces - 1:
            for _ in range(m.mtp_depth):
                t = yield _Compute(
                    **self._with_tp(backward(ops.mtp), "mtp", "backward_input"),
                    ready=t,
                    name="MTP module",
                    bucket="backward",
                )
            t = yield _Compute(
                **self._with_tp(backward(ops.head), "head", "backward_input"),
                ready=t,
                name="output head",
                bucket="backward",
            )
        cause, last = "pipeline", None
        filler = 0.0  # the previous MoE layer's attention weight gradients, not yet run
        for layer in reversed(self.ctx.piece_layers[piece]):
            if layer < self.dense_layers:
                dense_tp = self._with_tp(
                    backward(self.ctx.dense_layer) + filler, "attention", "backward_input"
                )
                ffn_tp = self._with_tp(0.0, "dense_ffn", "backward_input")
                t = yield _Compute(
                    seconds=dense_tp["seconds"] + ffn_tp["seconds"],
                    tp=dense_tp["tp"] + ffn_tp["tp"],
                    tp_bytes=dense_tp["tp_bytes"] + ffn_tp["tp_bytes"],
                    ready=t,
                    name="dense layer",
                    bucket="backward",
                    cause=cause,
                    last_sender=last,
                )
                filler = 0.0
            else:
                t = yield from self._moe_backward(rank, layer, micro, t, split, cause, last, filler)
                filler = 0.0 if split else self.ctx.moe_block.backward_weight
            cause, last = "pipeline", None
        if filler:
            t = yield _Compute(seconds=filler, ready=t, name="weight gradients", bucket="weight")
        if piece == 0:
            t = yield _Compute(
                **self._with_tp(ops.embedding.backward, "embedding", "backward_input"),
                ready=t,
                name="embedding",
                bucket="backward",
            )
        return t

    def _weight(self, rank: int, micro: int, piece: int, t: Vector) -> Chain:
        """The deferred weight gradients of a split backward: no communication."""
        ops, m = self.ctx.ops, self.sc.model
        seconds = np.zeros(self.g_stage)
        for layer in self.ctx.piece_layers[piece]:
            if layer < self.dense_layers:
                seconds += self.ctx.dense_layer.backward_weight
            else:
                weight = self._experts(layer, micro)[1].backward_weight
                seconds += self.ctx.moe_block.backward_weight + ops.shared_experts.backward_weight
                seconds += weight
        if piece == self.schedule.n_pieces - 1:
            seconds += ops.head.backward_weight + m.mtp_depth * ops.mtp.backward_weight
        t = yield _Compute(seconds=seconds, ready=t, name="weight gradients", bucket="weight")
        return t

    def _chain(self, rank: int, key: OpKey, ready: Vector) -> Chain:
        kind, micro, piece = key
        if kind == "F":
            return self._forward(rank, micro, piece, ready)
        if kind == "B":
            return self._backward(rank, micro, piece, ready)
        return self._weight(rank, micro, piece, ready)

    def _input(self, rank: int, key: OpKey) -> Vector:
        """When the input of ``key`` is available at ``rank``'s GPUs (its dependency's output
        plus the stage-to-stage transfer)."""
        deps = self.schedule.dependencies(key)
        if not deps:
            return np.zeros(self.g_stage)
        (dep,) = deps
        value = cast(Vector, self.done[dep].value)
        src = self._rank(dep[1], dep[2])
        if src == rank:
            return value
        seconds, links = self._p2p(src, rank)
        arrive = value + seconds
        nbytes = self.ctx.activation_bytes
        if kernels.ENABLED:
            busy = self._p2p_busy.get((src, rank))
            if busy is None:
                busy = self._p2p_busy[(src, rank)] = nbytes / self.ctx.topology.capacity[links]
            kernels.charge(links, nbytes, busy, self.load.bytes, self.load.busy_s)
        else:
            np.add.at(self.load.bytes, links, nbytes)
            np.add.at(self.load.busy_s, links, nbytes / self.ctx.topology.capacity[links])
        name = "send activations" if dep[0] == "F" else "send gradients"
        self._record(src, "pipeline", name, value, arrive)
        return arrive

    def _run_chains(self, rank: int, chains: list[Chain]) -> list[Vector]:
        """Run chains on one compute stream. With several (an overlapped pair), the stream
        takes next whichever chain's next op can start first, so one chain's compute fills the
        time the other waits for its all-to-all (on the GPUs' mean clocks: every GPU of a rank
        runs the same program)."""
        results: list[Vector] = [np.zeros(0)] * len(chains)
        pending: dict[int, _Compute] = {}
        for i, chain in enumerate(chains):
            try:
                pending[i] = chain.send(None)
            except StopIteration as stop:
                results[i] = stop.value
        free = self.free[rank]
        while pending:
            if len(pending) == 1:
                (i,) = pending
            elif len(pending) == 2 and kernels.ENABLED:
                (a, first), (b, second) = pending.items()
                i = b if self._sooner(free, first.ready, second.ready) else a
            else:
                # The chain whose next op could start first in sum over the GPUs (the first
                # in the pending order on a tie).
                best = np.inf
                for j, req in pending.items():
                    key = float(_sum(np.maximum(free, req.ready)))
                    if key < best:
                        i, best = j, key
            end = self._compute(rank, pending.pop(i))
            free = end
            try:
                pending[i] = chains[i].send(end)
            except StopIteration as stop:
                results[i] = stop.value
        return results

    # -------------------------------------------------------------- processes

    def _rank_process(self, rank: int) -> Process:
        env = self.env
        for op in self.schedule.orders[rank]:
            keys = op.halves
            for dep in self.schedule.dependencies(op):
                ev = self._event(dep)
                if not ev.processed:
                    yield ev
            chains = [self._chain(rank, key, self._input(rank, key)) for key in keys]
            ends = self._run_chains(rank, chains)
            # The halves of an overlapped pair interleave to the end: both outputs leave then.
            end = ends[0] if len(ends) == 1 else np.maximum.reduce(ends)
            yield env.timeout(max(0.0, float(end.max()) - env.now))
            for key in keys:
                self._event(key).succeed(end)
        gpus = self.span[rank]
        self.finish[gpus] = self.ops_end[gpus] = self.free[rank]
        self._event(("done", rank, 0)).succeed(self.free[rank])
        group = self.ctx.sync_ranks[rank]
        if rank == group[0]:
            for other in group[1:]:
                ev = self._event(("done", other, 0))
                if not ev.processed:
                    yield ev
            self._synchronise(group)

    def _synchronise(self, ranks: tuple[int, ...]) -> None:
        """Gradient synchronisation and the optimizer step of ranks holding the same
        parameters (closed-form collectives; they start when the last member is ready).

        Dense parameters are replicated over every GPU of the ranks with the same
        tensor-parallel rank (the attention-data-parallel group; every GPU without tensor
        parallelism), routed experts over the expert-data-parallel peers. Plain data
        parallelism all-reduces the gradients and every GPU updates every parameter it
        holds; ZeRO-1 reduce-scatters, each GPU updates its 1/n shard, and the updated BF16
        parameters are all-gather.
        """
        ctx = self.ctx
        zero1 = self.sc.parallelism.zero1
        gpus = np.stack([ctx.rank_gpus[r] for r in ranks])  # (ranks, data, expert)
        clock = np.stack([self.free[r].reshape(self.data, self.expert) for r in ranks])
        start = clock.copy()
        dense = ctx.dense_params[ranks[0]]
        # Redundant replicas (EPLB) hold weights and optimizer state too.
        expert = (
            ctx.expert_params[ranks[0]] * self.epr / ctx.layout.experts_per_rank
            if ctx.layout.experts_per_rank
            else 0.0
        )
        groups: list[tuple[npt.NDArray[np.int64], float, tuple[int, ...]]] = []
        if dense > 0:
            # One group per tensor-parallel rank (stage-local index mod tensor), all at once.
            t = self.sc.parallelism.tensor
            per_rank = gpus.reshape(len(ranks), -1, t).transpose(2, 0, 1)
            groups.append((per_rank.reshape(t, -1), dense, (0, 1, 2)))
        if expert > 0:
            # Expert-data-parallel peers: same expert-parallel rank, every group and rank.
            groups.append((gpus.transpose(2, 0, 1).reshape(self.expert, -1), expert, (0, 1)))
        bf16 = units.BYTES_PER_ELEMENT["bf16"]

        def run(phases: int, per_param: float) -> None:
            nonlocal clock
            for members, params, axes in groups:
                if members.shape[1] < 2:
                    continue
                seconds = np.array(
                    [self._collective(row, params * per_param, phases) for row in members]
                )
                if axes == (0, 1, 2):
                    clock = np.full_like(clock, clock.max() + seconds.max())
                else:
                    clock = clock.max(axis=(0, 1), keepdims=True) + seconds[None, None, :]
                    clock = np.broadcast_to(clock, gpus.shape).copy()

        run(1 if zero1 else 2, ctx.grad_bytes_per_param)
        flat = gpus.ravel()
        self.acc["allreduce"][flat] += (clock - start).ravel()
        shard = 0.0
        for members, params, _ in groups:
            shard += params / (members.shape[1] if zero1 else 1)
        if not groups:
            shard = dense + expert
        seconds = ctx.compute.optimizer_step(shard)
        self.acc["optimizer"][flat] += seconds
        for i, r in enumerate(ranks):
            self._record(r, "allreduce", "gradient reduce", start[i].ravel(), clock[i].ravel())
            begin = clock[i].ravel()
            end = self._end(self.span[r], begin, seconds)
            self._record(r, "compute", "optimizer step", begin, end)
            clock[i] = end.reshape(clock[i].shape)
        if zero1:
            gathered = clock.copy()
            run(1, bf16)
            self.acc["allreduce"][flat] += (clock - gathered).ravel()
            for i, r in enumerate(ranks):
                self._record(
                    r, "allreduce", "parameter all-gather", gathered[i].ravel(), clock[i].ravel()
                )
        self.finish[flat] = clock.ravel()

    def _collective(self, members: npt.NDArray[np.int64], nbytes: float, phases: int) -> float:
        """Seconds of a ring (or hierarchical) reduce-scatter / all-gather (``phases = 1``) or
        all-reduce (``phases = 2``) of ``nbytes`` over ``members``; bytes go on the links."""
        topo = self.ctx.topology
        n = len(members)
        domains = topo.domain_of(members)
        per_domain = int(np.sum(domains == domains[0]))
        n_domains = n // per_domain
        hierarchical = (
            self.sc.parallelism.dp_collective == "hierarchical"
            and per_domain > 1
            and n_domains > 1
            and n_domains * per_domain == n
        )
        if hierarchical:
            inner = self._ring(members.reshape(n_domains, per_domain)[0], nbytes, phases)
            outer = self._ring(
                members.reshape(n_domains, per_domain)[:, 0], nbytes / per_domain, phases
            )
            self._ring_bytes(members, nbytes, phases, hierarchical=True, per_domain=per_domain)
            return inner + outer
        self._ring_bytes(members, nbytes, phases)
        return self._ring(members, nbytes, phases)

    def _ring(self, members: npt.NDArray[np.int64], nbytes: float, phases: int) -> float:
        n = len(members)
        if n < 2:
            return 0.0
        bw, lat = self._ring_links(members)
        if self.link_scale is not None:
            links = self._ring_link_ids(members)
            bw = float((self.ctx.topology.capacity[links] * self.link_scale[links]).min())
        return phases * ((n - 1) / n * nbytes / bw + (n - 1) * lat)

    def _ring_link_ids(self, members: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Links of every hop of a ring over ``members`` (cached by the members)."""
        key = tuple(members.tolist())
        links = self._ring_paths.get(key)
        if links is None:
            topo = self.ctx.topology
            nxt = np.roll(members, -1)
            hops = [topo.path(a, b) for a, b in zip(members.tolist(), nxt.tolist(), strict=True)]
            links = np.asarray([link for hop in hops for link in hop], dtype=np.int64)
            self._ring_paths[key] = links
        return links

    def _ring_links(self, members: npt.NDArray[np.int64]) -> tuple[float, float]:
        """Bottleneck bandwidth and slowest hop latency of a ring over ``members`` (cached by
        the members' placement relative to the first)."""
        topo = self.ctx.topology
        key = structure_key(topo, members)
        cached = self._rings.get(key)
        if cached is None:
            nxt = np.roll(members, -1)
            pairs = list(zip(members.tolist(), nxt.tolist(), strict=True))
            bw = min(float(topo.capacity[topo.path(a, b)].min()) for a, b in pairs)
            lat = max(topo.latency(a, b) for a, b in pairs)
            cached = self._rings[key] = (bw, lat)
        return cached

    def _ring_bytes(
        self,
        members: npt.NDArray[np.int64],
        nbytes: float,
        phases: int,
        hierarchical: bool = False,
        per_domain: int = 1,
    ) -> None:
        topo, load = self.ctx.topology, self.load
        n = len(members)
        if hierarchical:
            inner = phases * (per_domain - 1) / per_domain * nbytes
            n_dom = n // per_domain
            outer = phases * (n_dom - 1) / n_dom * nbytes / per_domain
            for port, amount in (
                (NVLINK_OUT, inner),
                (NVLINK_IN, inner),
                (NIC_OUT, outer),
                (NIC_IN, outer),
            ):
                cap = topo.capacity[port]
                links = topo.link_id(members, port)
                load.bytes[links] += amount
                load.busy_s[links] += amount / cap
            return
        amount = phases * (n - 1) / n * nbytes
        links = self._ring_link_ids(members)
        np.add.at(load.bytes, links, amount)
        np.add.at(load.busy_s, links, amount / topo.capacity[links])

    def _charge_tp_links(self) -> None:
        """Tensor-parallel rings stay inside a node: each GPU's bytes leave on its NVLink
        port and as many arrive on it."""
        sent = self.acc["tp_bytes"]
        if not sent.any():
            return
        topo = self.ctx.topology
        gpus = np.arange(topo.gpus)
        for port in (NVLINK_OUT, NVLINK_IN):
            links = topo.link_id(gpus, port)
            self.load.bytes[links] += sent
            self.load.busy_s[links] += sent / topo.capacity[links]

    def run(self) -> StepResult:
        ctx, lay = self.ctx, self.ctx.layout
        for rank in range(lay.stages):
            self.env.process(self._rank_process(rank))
        self.env.run()
        for rank in range(lay.stages):
            self.tables[rank].charge(self.exchange_ports[rank], self.uses[rank])
        self._charge_tp_links()
        missing = [r for r in range(lay.stages) if not self._event(("done", r, 0)).processed]
        if missing:
            raise SimulationError(f"the step did not complete: ranks {missing} deadlocked")
        step_time = float(self.finish.max())
        gpus = ctx.topology.gpus
        acc = self.acc
        backward = acc["backward"] + acc["weight"]
        served = np.maximum(self.expert_served, 1.0)
        stage = np.arange(gpus) // lay.gpus_per_stage
        f_ops = np.zeros(lay.stages)
        b_ops = np.zeros(lay.stages)
        for rank, order in enumerate(self.schedule.orders):
            for op in order:
                for kind, _, _ in op.halves:
                    f_ops[rank] += kind == "F"
                    b_ops[rank] += kind == "B"
        per_stage = lambda v: np.bincount(stage, weights=v) / lay.gpus_per_stage  # noqa: E731
        return StepResult(
            step_time_s=step_time,
            gpu_stage=stage,
            compute_s=acc["forward"] + backward,
            forward_compute_s=acc["forward"],
            backward_compute_s=backward,
            weight_grad_s=acc["weight"],
            expert_compute_s=acc["expert"],
            slowdown_s=acc["slowdown"],
            a2a_wait_s=acc["comm"] + acc["straggler"],
            comm_wait_s=acc["comm"],
            straggler_wait_s=acc["straggler"],
            pipeline_wait_s=acc["pipeline"],
            tp_comm_s=acc["tp"],
            allreduce_s=acc["allreduce"],
            optimizer_s=acc["optimizer"],
            tail_idle_s=step_time - self.finish,
            ops_end_s=self.ops_end,
            expert_tokens=self.expert_tokens,
            expert_wait_s=self.expert_wait_token_s / served,
            link_bytes=self.load.bytes.copy(),
            link_busy_s=self.load.busy_s.copy(),
            stage_forward_s=per_stage(acc["forward"]) / f_ops,
            stage_backward_s=per_stage(backward) / b_ops,
            events=self.env.processed,
            exchanges=self.exchanges,
            trace=list(getattr(self.rec, "slices", [])),
        )


def simulate_step(
    ctx: StepContext,
    counts: np.ndarray,
    dest_tokens: np.ndarray,
    recorder: NullRecorder | None = None,
    node_tokens: np.ndarray | None = None,
    hardware: HardwareState | None = None,
    jitter: JitterSource | None = None,
) -> StepResult:
    """Simulate one training step.

    Parameters
    ----------
    ctx : StepContext
        From :func:`build_context`.
    counts : ndarray, shape (layers_simulated, micro_batches, gpus_per_stage, experts), int
        Tokens each source rank of a stage routes to each expert, per micro-batch.
    dest_tokens : ndarray, shape (layers_simulated, micro_batches, gpus_per_stage, expert), int
        Distinct tokens each source rank sends to each expert-parallel rank of its group.
    recorder : NullRecorder, optional
        A :class:`~moesim.engine.recorder.SliceRecorder` to capture a timeline trace.
    node_tokens : ndarray, shape (layers_simulated, micro_batches, gpus_per_stage, nodes), int
        Distinct tokens each source rank sends to each node of its group; required by
        node-limited dispatch.
    hardware : HardwareState, optional
        Slow GPUs, throttling windows and degraded links for this step
        (:mod:`moesim.cluster.stragglers`); healthy when omitted.
    jitter : JitterSource, optional
        Per-op compute-time noise.
    """
    sc = ctx.scenario
    moe = sc.model.moe
    # A dense model's sample is empty: no simulated MoE layer, no expert.
    layers = 0 if moe is None else sc.gate.layers_simulated
    want = (layers, ctx.schedule.micro_batches, ctx.layout.gpus_per_stage)
    slots = counts.shape[3] if counts.ndim == 4 else 0
    need = 0 if moe is None else moe.routed_experts
    if slots < need or slots % ctx.layout.expert:
        raise SimulationError(
            f"routing sample has {slots} expert slots: need at least the "
            f"{need} routed experts, a multiple of {ctx.layout.expert}"
        )
    if counts.shape[:3] != want or dest_tokens.shape[:3] != want:
        raise SimulationError(
            f"routing sample shape {counts.shape} / {dest_tokens.shape} does not match the "
            f"scenario's (layers_simulated, micro_batches, gpus_per_stage) = {want}"
        )
    nodes_wanted = (*want, sc.ep_nodes)
    if sc.parallelism.dispatch == "node_limited" and (
        node_tokens is None or node_tokens.shape != nodes_wanted
    ):
        raise SimulationError(f"node-limited dispatch needs node_tokens of shape {nodes_wanted}")
    model = _StepModel(
        ctx, counts, dest_tokens, node_tokens, recorder or NullRecorder(), hardware, jitter
    )
    return model.run()


@dataclass(frozen=True)
class ChunkPairResult:
    """One overlapped forward + backward chunk pair on one pipeline rank (a DualPipe ``FB``
    unit), timed on its own: no pipeline transfers, both chunks' inputs ready at 0."""

    layers: int
    span_s: float
    """First kernel to last, on the slowest GPU of the rank."""
    forward_s: float
    """Mean per GPU of the forward chunk's compute."""
    backward_input_s: float
    backward_weight_s: float
    compute_busy_s: float
    """Time the compute stream of the rank's first GPU is busy."""
    comm_busy_s: float
    """Time at least one all-to-all is in flight on that GPU (its communication SMs busy)."""
    overlap_s: float
    """Time both are busy."""


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        elif end > start:
            merged.append((start, end))
    return merged


def _length(intervals: list[tuple[float, float]]) -> float:
    return float(sum(end - start for start, end in intervals))


def simulate_chunk_pair(
    ctx: StepContext,
    counts: np.ndarray,
    dest_tokens: np.ndarray,
    node_tokens: np.ndarray | None,
    piece: int,
) -> ChunkPairResult:
    """Run the forward of one micro-batch and the backward (not split) of another through
    ``piece`` on one compute stream, as DualPipe's overlapped pair does, and measure the span,
    the compute per pass and how long the communication kernels are in flight. The sample
    arguments are those of :func:`simulate_step`. This is the set-up of DeepSeek's public
    per-layer profile (github.com/deepseek-ai/profile-data): a check of the kernel and overlap
    model, not part of a step."""
    sched = ctx.schedule
    rank = sched.rank_of(0, piece)
    micros = [
        m
        for m in range(sched.micro_batches)
        if sched.rank_of(m, piece) == rank and not sched.is_split(m, piece)
    ]
    if len(micros) < 2:
        raise SimulationError(f"piece {piece} has no two unsplit micro-batches on one rank")
    first_gpu = int(ctx.rank_gpus[rank].ravel()[0])
    recorder = SliceRecorder([first_gpu])
    model = _StepModel(ctx, counts, dest_tokens, node_tokens, recorder)
    zero = np.zeros(model.g_stage)
    chains = [
        model._forward(rank, micros[1], piece, zero),
        model._backward(rank, micros[0], piece, zero),
    ]
    ends = model._run_chains(rank, chains)
    gpus = model.span[rank]
    mine = [s for s in recorder.slices if s.gpu == first_gpu]
    compute = _union([(s.start_s, s.end_s) for s in mine if s.track == "compute"])
    comm = _union([(s.start_s, s.end_s) for s in mine if s.track in ("dispatch", "combine")])
    both = _union(
        [(max(a, c), min(b, d)) for a, b in compute for c, d in comm if min(b, d) > max(a, c)]
    )
    return ChunkPairResult(
        layers=len(ctx.piece_layers[piece]),
        span_s=float(np.maximum.reduce(ends).max()),
        forward_s=float(model.acc["forward"][gpus].mean()),
        backward_input_s=float(model.acc["backward"][gpus].mean()),
        backward_weight_s=float(model.acc["weight"][gpus].mean()),
        compute_busy_s=_length(compute),
        comm_busy_s=_length(comm),
        overlap_s=_length(both),
    )
