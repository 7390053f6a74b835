"""One training step of the cluster as a SimPy model: 1F1B pipeline × expert parallelism.

Every GPU is one SimPy process: its compute stream. It walks its pipeline stage's 1F1B order of
forward and backward micro-batches; for each layer it computes (a timeout priced by
:class:`~moesim.cluster.ComputeModel`) and communicates through the fair-share network
(:class:`~moesim.engine.network.FairShareNetwork`), whose flows run concurrently with compute.

An MoE layer, forward, on GPU ``g`` of an expert-parallel group:

1. attention and router (compute);
2. dispatch: ``g`` sends each member of its group the distinct tokens routed to that member's
   experts (the :class:`RoutingSample` says how many); meanwhile ``g`` computes its shared
   experts, overlapping the transfer;
3. expert queues: a chunk joins ``g``'s queues when its transfer completes; ``g`` serves what
   has arrived as one grouped GEMM, then what arrived meanwhile, until every member's chunk is
   done — so a late sender delays only the work that waits for it;
4. combine: ``g`` returns each member its results; the layer ends for ``g`` when all of its
   own tokens are back.

The backward mirrors it: output gradients go to the experts (combine backward), the experts run
their backward, input gradients come back (dispatch backward), then router and attention
backward. A hot GPU (more tokens) finishes its experts late and every member of its group waits
for its combine: the straggler effect of routing imbalance, visible per GPU as ``a2a_wait_s``.

Activations and gradients cross stage boundaries as network flows. After its last backward each
GPU joins a ring all-reduce of its stage's dense gradients, then of its experts' gradients with
its expert-data-parallel peers.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import simpy

from moesim import units
from moesim.cluster import ComputeModel, Layout, Topology, build_layout, build_topology
from moesim.cluster.model_costs import model_costs
from moesim.engine.network import FairShareNetwork
from moesim.engine.recorder import NullRecorder, Slice
from moesim.errors import SimulationError
from moesim.gate.sampling import gate_layer_map
from moesim.scenario.schema import Scenario

Process = Generator[simpy.Event, Any, None]


class CountingEnvironment(simpy.Environment):
    """A SimPy environment that counts the events it processes (for benchmarks)."""

    def __init__(self) -> None:
        super().__init__()
        self.processed = 0

    def step(self) -> None:
        self.processed += 1
        super().step()


def one_f_one_b(stage: int, stages: int, micro_batches: int) -> list[tuple[str, int]]:
    """Order of ('F' | 'B', micro-batch) a stage runs under non-interleaved 1F1B."""
    warmup = min(stages - stage - 1, micro_batches)
    order = [("F", j) for j in range(warmup)]
    for j in range(micro_batches - warmup):
        order.append(("F", warmup + j))
        order.append(("B", j))
    order.extend(("B", j) for j in range(micro_batches - warmup, micro_batches))
    return order


@dataclass
class StepContext:
    """What a step needs that does not change between steps of one scenario."""

    scenario: Scenario
    topology: Topology
    layout: Layout
    compute: ComputeModel
    dispatch_bytes_per_token: float
    grad_bytes_per_token: float
    activation_bytes: float
    dense_params: npt.NDArray[np.float64]
    """Per stage: parameters replicated over every GPU of the stage (attention, router,
    shared experts, dense FFNs, embedding, head, MTP modules)."""
    expert_params: npt.NDArray[np.float64]
    """Per stage: one GPU's routed-expert parameters."""
    grad_bytes_per_param: float

    @property
    def dense_grad_bytes(self) -> npt.NDArray[np.float64]:
        return self.dense_params * self.grad_bytes_per_param

    @property
    def expert_grad_bytes(self) -> npt.NDArray[np.float64]:
        return self.expert_params * self.grad_bytes_per_param


def build_context(scenario: Scenario) -> StepContext:
    m, p = scenario.model, scenario.parallelism
    layout = build_layout(scenario)
    costs = model_costs(m)
    grad_bytes = units.BYTES_PER_ELEMENT[p.grad_dtype]
    dense = np.zeros(layout.stages)
    expert = np.zeros(layout.stages)
    for s, layers in enumerate(layout.stage_layers):
        for layer in layers:
            dense[s] += costs.attention.params
            if layer < m.dense_layers:
                dense[s] += costs.dense_ffn_params
            else:
                dense[s] += costs.router_params + costs.expert_params * m.moe.shared_experts
                expert[s] += costs.expert_params * layout.experts_per_rank
    dense[0] += costs.embedding_params
    dense[-1] += costs.head_params + m.mtp_depth * costs.mtp_params(
        m.moe.top_k, m.moe.shared_experts
    )
    bf16 = units.BYTES_PER_ELEMENT["bf16"]
    return StepContext(
        scenario=scenario,
        topology=build_topology(scenario),
        layout=layout,
        compute=ComputeModel(scenario),
        dispatch_bytes_per_token=m.hidden * units.BYTES_PER_ELEMENT[m.gemm_precision],
        grad_bytes_per_token=m.hidden * bf16,
        activation_bytes=float(p.micro_batch_size * m.seq_len * m.hidden * bf16),
        dense_params=dense,
        expert_params=expert,
        grad_bytes_per_param=float(grad_bytes),
    )


@dataclass(frozen=True)
class StepResult:
    """Outcome of one simulated training step.

    Per-GPU arrays have shape (gpus,); per-expert arrays (gpus, experts_per_rank); per-link
    arrays (links,). Times in seconds.
    """

    step_time_s: float
    gpu_stage: npt.NDArray[np.int64]
    compute_s: npt.NDArray[np.float64]
    """Busy time of the compute stream (every op): forward_compute_s + backward_compute_s."""
    forward_compute_s: npt.NDArray[np.float64]
    backward_compute_s: npt.NDArray[np.float64]
    expert_compute_s: npt.NDArray[np.float64]
    """Part of ``compute_s`` spent in routed experts."""
    a2a_wait_s: npt.NDArray[np.float64]
    """Compute stream idle inside MoE layers, waiting for dispatch chunks or combine results."""
    pipeline_wait_s: npt.NDArray[np.float64]
    """Idle waiting for activations or gradients from a neighbouring stage (bubble + P2P)."""
    allreduce_s: npt.NDArray[np.float64]
    """Gradient and parameter synchronisation at the end of the step (all-reduce, or ZeRO-1's
    reduce-scatter and all-gather), including waiting for the ring to form."""
    optimizer_s: npt.NDArray[np.float64]
    """The optimizer step (on this GPU's shard under ZeRO-1)."""
    tail_idle_s: npt.NDArray[np.float64]
    """Idle after this GPU finished, until the slowest GPU finished."""
    expert_tokens: npt.NDArray[np.float64]
    """Tokens each local expert processed (forward), over the step."""
    expert_wait_s: npt.NDArray[np.float64]
    """Token-weighted mean time a token waited in its expert's queue (forward and backward)."""
    max_queue_chunks: npt.NDArray[np.int64]
    """Most chunks waiting in a GPU's queues when it started a grouped GEMM."""
    link_bytes: npt.NDArray[np.float64]
    link_busy_s: npt.NDArray[np.float64]
    stage_forward_s: npt.NDArray[np.float64]
    """Mean duration of one micro-batch forward per stage (excluding waiting for inputs)."""
    stage_backward_s: npt.NDArray[np.float64]
    events: int
    flows: int
    trace: list[Slice]
    """Recorded slices (empty unless a recorder was given)."""

    @property
    def gpu_time_s(self) -> npt.NDArray[np.float64]:
        """Per GPU, the sum of its time split; equals ``step_time_s`` for every GPU."""
        return (
            self.compute_s
            + self.a2a_wait_s
            + self.pipeline_wait_s
            + self.allreduce_s
            + self.optimizer_s
            + self.tail_idle_s
        )


@dataclass
class _Exchange:
    """One all-to-all round trip (dispatch → experts → combine) of one expert-parallel group."""

    members: int
    queues: list[list[tuple[float, int]]]
    """Per member: arrived chunks (arrival time, source member) not yet served."""
    wakes: list[simpy.Event]
    returned: list[int]
    back: list[simpy.Event]
    served: list[int] = field(default_factory=list)


class _StepModel:
    def __init__(
        self,
        ctx: StepContext,
        counts: np.ndarray,
        dest: np.ndarray,
        recorder: NullRecorder,
    ) -> None:
        self.ctx = ctx
        self.rec = recorder
        self.sc = ctx.scenario
        self.counts = counts
        self.dest = dest
        self.env = CountingEnvironment()
        self.net = FairShareNetwork(self.env, ctx.topology.capacity)
        lay = ctx.layout
        n = ctx.topology.gpus
        self.n_micro = self.sc.micro_batches
        self.exchanges: dict[tuple[Any, ...], _Exchange] = {}
        self.inbox: dict[tuple[str, int, int], simpy.Event] = {}
        self.rings: dict[tuple[Any, ...], list[Any]] = {}
        self.forward_s = np.zeros(n)
        self.backward_s = np.zeros(n)
        self.expert_compute_s = np.zeros(n)
        self.a2a_wait_s = np.zeros(n)
        self.pipeline_wait_s = np.zeros(n)
        self.allreduce_s = np.zeros(n)
        self.optimizer_s = np.zeros(n)
        self.finish = np.zeros(n)
        self.expert_tokens = np.zeros((n, lay.experts_per_rank))
        self.expert_wait_token_s = np.zeros((n, lay.experts_per_rank))
        self.expert_served = np.zeros((n, lay.experts_per_rank))
        self.max_queue = np.zeros(n, dtype=np.int64)
        self.fwd_time = np.zeros(lay.stages)
        self.bwd_time = np.zeros(lay.stages)
        self.gate_layer = gate_layer_map(self.sc)
        c = ctx.compute
        self.t = {
            "attn_f": c.attention(False) + c.router(False),
            "attn_b": c.attention(True) + c.router(True),
            "shared_f": c.shared_experts(False),
            "shared_b": c.shared_experts(True),
            "dense_f": c.attention(False) + c.dense_ffn_seconds(False),
            "dense_b": c.attention(True) + c.dense_ffn_seconds(True),
            "head_f": c.head(False),
            "head_b": c.head(True),
            "embed": c.embedding(False),
            "mtp_f": c.mtp_module(False),
            "mtp_b": c.mtp_module(True),
        }

    # -------------------------------------------------------------- helpers

    def _compute(
        self, gpu: int, op: str, seconds: float, backward: bool, **args: Any
    ) -> simpy.Event:
        (self.backward_s if backward else self.forward_s)[gpu] += seconds
        now = self.env.now
        self.rec.slice(gpu, "compute", op, now, now + seconds, **args)
        return self.env.timeout(seconds)

    def _wait(self, event: simpy.Event, gpu: int, bucket: npt.NDArray[np.float64]) -> Process:
        start = self.env.now
        if not event.triggered or not event.processed:
            yield event
        bucket[gpu] += self.env.now - start

    def _mailbox(self, kind: str, gpu: int, micro: int) -> simpy.Event:
        key = (kind, gpu, micro)
        ev = self.inbox.get(key)
        if ev is None:
            ev = self.inbox[key] = self.env.event()
        return ev

    def _send(self, kind: str, src: int, dst: int, micro: int) -> None:
        topo = self.ctx.topology
        done = self.net.transfer(
            topo.path(src, dst), self.ctx.activation_bytes, topo.latency(src, dst)
        )
        box = self._mailbox(kind, dst, micro)
        start = self.env.now

        def delivered(_event: simpy.Event) -> None:
            box.succeed()
            name = "send activations" if kind == "act" else "send gradients"
            self.rec.slice(src, "pipeline", name, start, self.env.now, micro_batch=micro)

        done.callbacks.append(delivered)

    def _record_transfers(
        self,
        gpu: int,
        track: str,
        flows: list[simpy.Event],
        start: float,
        backward: bool,
        where: dict[str, int],
    ) -> None:
        """Record one slice from ``start`` to the last of ``flows`` to complete."""
        pending = [len(flows)]
        name = f"{track} {'backward' if backward else 'forward'}"

        def done(_event: simpy.Event) -> None:
            pending[0] -= 1
            if pending[0] == 0:
                self.rec.slice(gpu, track, name, start, self.env.now, **where)

        for ev in flows:
            ev.callbacks.append(done)

    # -------------------------------------------------------------- MoE layer

    def _exchange(self, key: tuple[Any, ...]) -> _Exchange:
        ex = self.exchanges.get(key)
        if ex is None:
            e = self.ctx.layout.expert
            ex = _Exchange(
                members=e,
                queues=[[] for _ in range(e)],
                wakes=[self.env.event() for _ in range(e)],
                returned=[0] * e,
                back=[self.env.event() for _ in range(e)],
                served=[0] * e,
            )
            self.exchanges[key] = ex
        return ex

    def _arrive(self, ex: _Exchange, dst: int, src: int) -> Callable[[simpy.Event], None]:
        def on_arrival(_event: simpy.Event) -> None:
            ex.queues[dst].append((self.env.now, src))
            if not ex.wakes[dst].triggered:
                ex.wakes[dst].succeed()

        return on_arrival

    def _return(self, ex: _Exchange, src: int) -> Callable[[simpy.Event], None]:
        def on_return(_event: simpy.Event) -> None:
            ex.returned[src] += 1
            if ex.returned[src] == ex.members:
                ex.back[src].succeed()

        return on_return

    def _moe(self, gpu: int, layer: int, micro: int, backward: bool) -> Process:
        lay, topo, ctx = self.ctx.layout, self.ctx.topology, self.ctx
        stage_index = gpu % lay.gpus_per_stage
        me = gpu % lay.expert
        group = lay.ep_group(gpu)
        g_layer = int(self.gate_layer[layer - self.sc.model.dense_layers])
        ex = self._exchange(("B" if backward else "F", layer, micro, group[0]))
        first_bytes = ctx.grad_bytes_per_token if backward else ctx.dispatch_bytes_per_token
        # Stage 2: send my tokens to every member's experts.
        group_base = stage_index - me
        tokens_out = self.dest[g_layer, micro, stage_index]
        start = self.env.now
        flows = self.net.start(
            [topo.path(gpu, d) for d in group],
            [float(tokens_out[k]) * first_bytes for k in range(len(group))],
            [topo.latency(gpu, d) for d in group],
        )
        for k, ev in enumerate(flows):
            ev.callbacks.append(self._arrive(ex, k, me))
        where = {"layer": layer, "micro_batch": micro}
        if self.rec.wants(gpu):
            self._record_transfers(gpu, "dispatch", flows, start, backward, where)
        yield self._compute(
            gpu,
            "shared experts",
            self.t["shared_b" if backward else "shared_f"],
            backward,
            **where,
        )
        # Stage 3: serve my queues until every member's chunk is done.
        epr = lay.experts_per_rank
        my_experts = slice(me * epr, (me + 1) * epr)
        done = 0
        while done < ex.members:
            if not ex.queues[me]:
                ex.wakes[me] = self.env.event()
                yield from self._wait(ex.wakes[me], gpu, self.a2a_wait_s)
                continue
            chunks, ex.queues[me] = ex.queues[me], []
            self.max_queue[gpu] = max(self.max_queue[gpu], len(chunks))
            sources = [group_base + src for _, src in chunks]
            rows = self.counts[g_layer, micro, sources, my_experts].astype(np.float64)
            arrivals = np.array([t for t, _ in chunks])
            waited = self.env.now - arrivals
            self.expert_wait_token_s[gpu] += waited @ rows
            self.expert_served[gpu] += rows.sum(axis=0)
            if not backward:
                self.expert_tokens[gpu] += rows.sum(axis=0)
            seconds = ctx.compute.experts(rows.sum(axis=0), backward)
            self.expert_compute_s[gpu] += seconds
            yield self._compute(
                gpu, "routed experts", seconds, backward, chunks=len(chunks), **where
            )
            done += len(chunks)
        # Stage 4: return results (or input gradients) to each member.
        back = self.net.start(
            [topo.path(gpu, d) for d in group],
            [
                float(self.dest[g_layer, micro, group_base + k, me]) * ctx.grad_bytes_per_token
                for k in range(len(group))
            ],
            [topo.latency(gpu, d) for d in group],
        )
        for k, ev in enumerate(back):
            ev.callbacks.append(self._return(ex, k))
        if self.rec.wants(gpu):
            self._record_transfers(gpu, "combine", back, self.env.now, backward, where)
        yield from self._wait(ex.back[me], gpu, self.a2a_wait_s)
        ex.served[me] = 1
        if sum(ex.served) == ex.members:
            del self.exchanges[("B" if backward else "F", layer, micro, group[0])]

    # -------------------------------------------------------------- passes

    def _forward(self, gpu: int, stage: int, micro: int) -> Process:
        lay, m = self.ctx.layout, self.sc.model
        if stage == 0:
            yield self._compute(gpu, "embedding", self.t["embed"], False, micro_batch=micro)
        for layer in lay.stage_layers[stage]:
            where = {"layer": layer, "micro_batch": micro}
            if layer < m.dense_layers:
                yield self._compute(gpu, "dense layer", self.t["dense_f"], False, **where)
            else:
                yield self._compute(gpu, "attention + router", self.t["attn_f"], False, **where)
                yield from self._moe(gpu, layer, micro, backward=False)
        if stage == lay.stages - 1:
            yield self._compute(gpu, "output head", self.t["head_f"], False, micro_batch=micro)
            for depth in range(m.mtp_depth):
                yield self._compute(gpu, "MTP module", self.t["mtp_f"], False, depth=depth)

    def _backward(self, gpu: int, stage: int, micro: int) -> Process:
        lay, m = self.ctx.layout, self.sc.model
        if stage == lay.stages - 1:
            for depth in reversed(range(m.mtp_depth)):
                yield self._compute(gpu, "MTP module", self.t["mtp_b"], True, depth=depth)
            yield self._compute(gpu, "output head", self.t["head_b"], True, micro_batch=micro)
        for layer in reversed(lay.stage_layers[stage]):
            where = {"layer": layer, "micro_batch": micro}
            if layer < m.dense_layers:
                yield self._compute(gpu, "dense layer", self.t["dense_b"], True, **where)
            else:
                yield from self._moe(gpu, layer, micro, backward=True)
                yield self._compute(gpu, "attention + router", self.t["attn_b"], True, **where)
        if stage == 0:
            yield self._compute(gpu, "embedding", self.t["embed"], True, micro_batch=micro)

    def _ring(
        self, key: tuple[Any, ...], members: list[int], nbytes: float, phases: int
    ) -> simpy.Event:
        """Join a ring collective over ``members``; the event fires when the ring has finished.

        A ring all-reduce of ``nbytes`` is 2 phases (reduce-scatter, then all-gather), each of
        ``n − 1`` steps moving ``nbytes / n`` to the next member; ``phases = 1`` is either half
        alone. Every step moves the same bytes over the same links, so the steps of a phase are
        simulated as one flow per member of ``phases·(n − 1)/n·nbytes`` with the hops' latency.
        """
        entry = self.rings.get(key)
        if entry is None:
            entry = self.rings[key] = [0, self.env.event()]
        entry[0] += 1
        if entry[0] == len(members):
            n = len(members)
            topo = self.ctx.topology
            pairs = [(members[i], members[(i + 1) % n]) for i in range(n)]
            flows = self.net.start(
                [topo.path(a, b) for a, b in pairs],
                [phases * (n - 1) / n * nbytes] * n,
                [phases * (n - 1) * topo.latency(a, b) for a, b in pairs],
            )
            done = entry[1]
            remaining = [n]

            def one_done(_e: simpy.Event) -> None:
                remaining[0] -= 1
                if remaining[0] == 0:
                    done.succeed()

            for ev in flows:
                ev.callbacks.append(one_done)
        event: simpy.Event = entry[1]
        return event

    def _gpu(self, gpu: int) -> Process:
        lay = self.ctx.layout
        stage = gpu // lay.gpus_per_stage
        prev_gpu, next_gpu = gpu - lay.gpus_per_stage, gpu + lay.gpus_per_stage
        for kind, micro in one_f_one_b(stage, lay.stages, self.n_micro):
            if kind == "F":
                if stage > 0:
                    yield from self._wait(
                        self._mailbox("act", gpu, micro), gpu, self.pipeline_wait_s
                    )
                start = self.env.now
                yield from self._forward(gpu, stage, micro)
                self.fwd_time[stage] += (self.env.now - start) / lay.gpus_per_stage
                if stage < lay.stages - 1:
                    self._send("act", gpu, next_gpu, micro)
            else:
                if stage < lay.stages - 1:
                    yield from self._wait(
                        self._mailbox("grad", gpu, micro), gpu, self.pipeline_wait_s
                    )
                start = self.env.now
                yield from self._backward(gpu, stage, micro)
                self.bwd_time[stage] += (self.env.now - start) / lay.gpus_per_stage
                if stage > 0:
                    self._send("grad", gpu, prev_gpu, micro)
        yield from self._update_weights(gpu, stage)
        self.finish[gpu] = self.env.now

    def _update_weights(self, gpu: int, stage: int) -> Process:
        """Gradient synchronisation and the optimizer step.

        Dense parameters are replicated over the whole stage, routed experts over the
        expert-data-parallel peers. Plain data parallelism all-reduces the gradients and every
        GPU updates every parameter it holds; ZeRO-1 reduce-scatters the gradients, each GPU
        updates its 1/n shard, and the updated BF16 parameters are all-gathered.
        """
        ctx, lay = self.ctx, self.ctx.layout
        groups = [
            ("dense", list(lay.stage_gpus(stage)), ctx.dense_params[stage]),
            ("expert", lay.dp_peers(gpu), ctx.expert_params[stage]),
        ]
        groups = [(name, members, params) for name, members, params in groups if params > 0]
        zero1 = self.sc.parallelism.zero1
        start = self.env.now
        for name, members, params in groups:
            if len(members) > 1:
                key = (name, "reduce", tuple(members))
                yield self._ring(key, members, params * ctx.grad_bytes_per_param, 1 if zero1 else 2)
        self.allreduce_s[gpu] += self.env.now - start
        self.rec.slice(gpu, "allreduce", "gradient reduce", start, self.env.now)
        shard = sum(params / (len(members) if zero1 else 1) for _, members, params in groups)
        seconds = ctx.compute.optimizer_step(shard)
        self.optimizer_s[gpu] += seconds
        self.rec.slice(gpu, "compute", "optimizer step", self.env.now, self.env.now + seconds)
        yield self.env.timeout(seconds)
        if zero1:
            start = self.env.now
            bf16 = units.BYTES_PER_ELEMENT["bf16"]
            for name, members, params in groups:
                if len(members) > 1:
                    key = (name, "gather", tuple(members))
                    yield self._ring(key, members, params * bf16, 1)
            self.allreduce_s[gpu] += self.env.now - start
            self.rec.slice(gpu, "allreduce", "parameter all-gather", start, self.env.now)

    def run(self) -> StepResult:
        lay = self.ctx.layout
        gpus = self.ctx.topology.gpus
        for g in range(gpus):
            self.env.process(self._gpu(g))
        self.env.run()
        if np.any(self.finish == 0.0) or self.exchanges:
            raise SimulationError("the step did not complete: a schedule deadlock")
        step_time = float(self.finish.max())
        served = np.maximum(self.expert_served, 1.0)
        return StepResult(
            step_time_s=step_time,
            gpu_stage=np.arange(gpus) // lay.gpus_per_stage,
            compute_s=self.forward_s + self.backward_s,
            forward_compute_s=self.forward_s,
            backward_compute_s=self.backward_s,
            expert_compute_s=self.expert_compute_s,
            a2a_wait_s=self.a2a_wait_s,
            pipeline_wait_s=self.pipeline_wait_s,
            allreduce_s=self.allreduce_s,
            optimizer_s=self.optimizer_s,
            tail_idle_s=step_time - self.finish,
            expert_tokens=self.expert_tokens,
            expert_wait_s=self.expert_wait_token_s / served,
            max_queue_chunks=self.max_queue,
            link_bytes=self.net.link_bytes.copy(),
            link_busy_s=self.net.link_busy_s.copy(),
            stage_forward_s=self.fwd_time / self.n_micro,
            stage_backward_s=self.bwd_time / self.n_micro,
            events=self.env.processed,
            flows=self.net.flows_started,
            trace=list(getattr(self.rec, "slices", [])),
        )


def simulate_step(
    ctx: StepContext,
    counts: np.ndarray,
    dest_tokens: np.ndarray,
    recorder: NullRecorder | None = None,
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
    """
    sc = ctx.scenario
    want = (sc.gate.layers_simulated, sc.micro_batches, ctx.layout.gpus_per_stage)
    if counts.shape[:3] != want or dest_tokens.shape[:3] != want:
        raise SimulationError(
            f"routing sample shape {counts.shape} / {dest_tokens.shape} does not match the "
            f"scenario's (layers_simulated, micro_batches, gpus_per_stage) = {want}"
        )
    return _StepModel(ctx, counts, dest_tokens, recorder or NullRecorder()).run()
