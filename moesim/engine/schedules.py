"""Static pipeline-parallel schedules: per-rank op orders with explicit dependencies.

A schedule says, for every pipeline rank, the order in which it runs its forward and backward
work; the SimPy step model executes these orders, and :func:`evaluate` runs them with max-plus
arithmetic as a reference oracle. Nothing here knows about layers, tokens or the network.
The rules a layout must meet live in :mod:`moesim.scenario.pipeline` (the scenario schema checks
them too); ``docs/model/schedules.md`` describes the schedules, their sources and bubbles.

Sources: 1F1B is PipeDream-Flush (arXiv 2006.09503) as in Megatron-LM, whose interleaved
variant is in arXiv 2104.04473; ZB-H1 is from "Zero Bubble Pipeline Parallelism" (arXiv
2401.10241); DualPipe from the DeepSeek-V3 technical report (arXiv 2412.19437, §3.2.1, Table 2)
and deepseek-ai/DualPipe.

Data model
----------
A micro-batch travels a *path* of ``n_pieces`` consecutive model pieces, piece ``0`` first.

* ``"1f1b"`` and ``"zb1p"``: one piece per rank, piece ``p`` on rank ``p``.
* ``"interleaved"``: ``stages * virtual`` pieces, piece ``p`` on rank ``p % stages`` (rank ``r``
  holds its ``virtual`` chunks ``r, r + stages, ...``).
* ``"dualpipe"``: ``stages`` pieces per direction and two model copies. Micro-batches
  ``0 .. M/2 - 1`` go in direction 0 (enter at rank 0, piece ``p`` on rank ``p``); micro-batches
  ``M/2 .. M - 1`` go in direction 1 (enter at rank ``stages - 1``, piece ``p`` on rank
  ``stages - 1 - p``). Rank ``r`` thus holds piece ``r`` of copy 0 and piece ``stages - 1 - r``
  of copy 1.

An :class:`Op` is ``F`` (forward of one ``(micro, piece)``), ``B`` (backward: the full backward
with weight gradients, or the input gradient only when that ``(micro, piece)`` is *split*), ``W``
(weight gradient of a split backward) or ``FB`` (a forward and a backward of two different
``(micro, piece)`` run as one overlapped unit, DualPipe's steady state). Dependencies are keys
``(kind, micro, piece)`` with kind ``F``, ``B`` or ``W``; an ``FB`` op completes both its halves.

Bubbles
-------
:func:`evaluate` starts every rank at time 0 and reports, per rank, ``bubble = makespan - busy``:
the rank's idle time inside the step (the step ends when the last rank finishes). With uniform
op prices and ``p2p = 0``, writing ``F``, ``B``, ``W`` for one micro-batch's forward, full
backward (``W`` included) and weight-gradient time on one stage, and ``F&B`` for an overlapped
forward + backward unit, the published closed forms hold exactly, under these conditions
(checked in tests/engine/test_schedules.py):

* ``1f1b``, any ``M``: every rank ``(PP - 1)(F + B)``.
* ``interleaved``: every rank ``(PP - 1)(F + B) / v``, each chunk op taking ``F / v`` or
  ``B / v``.
* ``zb1p``, ``M >= PP``, ``W <= F`` and ``2W <= B``: every rank ``(PP - 1)(F + B - 2W)``.
* ``dualpipe``, ``W <= F = B - W`` (a forward chunk costs what an input-gradient chunk costs,
  the equal-chunk assumption behind DeepSeek-V3's Table 2), any ``F&B`` with
  ``max(F, B) <= F&B <= F + B``: the largest bubble over ranks is ``(PP/2 - 1)(F&B + B - 3W)``.
  It falls on the ranks that run the most ``FB`` units (the four middle ranks), since an
  overlapped unit shortens a rank's busy time but not the step; with ``F&B = F + B`` every
  rank has it. Outside ``F = B - W`` the bubble differs, in either direction.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from moesim.errors import SimulationError
from moesim.scenario.pipeline import (
    EVEN,
    SCHEDULES,
    PieceSplit,
    check_schedule,
    piece_layers,
    pieces_on_rank,
)

KINDS = SCHEDULES

OpKey = tuple[str, int, int]
"""``(kind, micro, piece)`` with kind ``'F'``, ``'B'`` or ``'W'``: one unit of work."""


@dataclass(frozen=True)
class Op:
    """One entry of a rank's order.

    Attributes
    ----------
    kind : str
        ``'F'``, ``'B'``, ``'W'`` or ``'FB'``.
    micro, piece : int
        The micro-batch and piece (for ``'FB'``: of the forward half).
    b_micro, b_piece : int
        For ``'FB'`` only: the micro-batch and piece of the backward half; ``-1`` otherwise.
    """

    kind: str
    micro: int
    piece: int
    b_micro: int = -1
    b_piece: int = -1

    @staticmethod
    def pair(forward: OpKey, backward: OpKey) -> Op:
        """The overlapped unit of ``forward`` (an ``F`` key) and ``backward`` (a ``B`` key)."""
        return Op("FB", forward[1], forward[2], backward[1], backward[2])

    @property
    def halves(self) -> tuple[OpKey, ...]:
        """The work keys this op completes: one, or two for ``'FB'`` (forward first)."""
        if self.kind == "FB":
            return (("F", self.micro, self.piece), ("B", self.b_micro, self.b_piece))
        return ((self.kind, self.micro, self.piece),)

    def __str__(self) -> str:
        return "+".join(f"{k}{m}.{p}" for k, m, p in self.halves)


@dataclass(frozen=True)
class Schedule:
    """A static pipeline schedule; build it with :func:`build_schedule`.

    Attributes
    ----------
    kind : str
        One of :data:`KINDS`.
    stages : int
        Pipeline ranks.
    micro_batches : int
        Micro-batches per step (for ``'dualpipe'``: both directions together).
    virtual : int
        Pieces per rank along one path (``'interleaved'``); 1 otherwise.
    orders : tuple of tuple of Op
        Per rank, its ops in execution order.
    split : frozenset of (micro, piece)
        The ``(micro, piece)`` whose backward is split into ``B`` (input gradient) and ``W``.
    """

    kind: str
    stages: int
    micro_batches: int
    virtual: int
    orders: tuple[tuple[Op, ...], ...]
    split: frozenset[tuple[int, int]] = field(default_factory=frozenset)

    @property
    def n_pieces(self) -> int:
        """Length of every micro-batch's path, in pieces."""
        return self.stages * self.virtual

    @property
    def split_backward(self) -> bool:
        """Whether any backward is split into ``B`` and ``W``."""
        return bool(self.split)

    def is_split(self, micro: int, piece: int) -> bool:
        """Whether the backward of ``(micro, piece)`` is split (so a ``W`` op exists)."""
        return (micro, piece) in self.split

    def pieces_of(self, micro: int) -> range:
        """The pieces ``micro`` runs through, in forward order."""
        self._check_micro(micro)
        return range(self.n_pieces)

    def direction(self, micro: int) -> int:
        """0, or 1 for the second half of the micro-batches under ``'dualpipe'``."""
        self._check_micro(micro)
        return int(self.kind == "dualpipe" and micro >= self.micro_batches // 2)

    def rank_of(self, micro: int, piece: int) -> int:
        """The rank that runs piece ``piece`` of micro-batch ``micro``."""
        if not 0 <= piece < self.n_pieces:
            raise ValueError(f"piece {piece} outside 0..{self.n_pieces - 1}")
        if self.direction(micro) == 1:
            return self.stages - 1 - piece
        return piece % self.stages

    @property
    def param_copies(self) -> int:
        """Copies of the model parameters the pipeline holds: 2 for ``'dualpipe'``, else 1."""
        return 2 if self.kind == "dualpipe" else 1

    def pieces_on(self, rank: int) -> list[tuple[int, int]]:
        """The ``(direction, piece)`` a rank holds: its chunks, or one piece per copy."""
        return pieces_on_rank(self.kind, self.stages, self.virtual, rank)

    def held_pieces(self, rank: int) -> tuple[int, ...]:
        """Piece indices whose layers (and parameters) ``rank`` holds, ascending: its chunks,
        or under ``'dualpipe'`` piece ``rank`` of one copy and ``stages - 1 - rank`` of the
        other."""
        return tuple(sorted({piece for _, piece in self.pieces_on(rank)}))

    def replicas(self, rank: int) -> tuple[int, ...]:
        """Ranks holding the same parameters as ``rank`` (itself included), ascending; they
        synchronise their gradients together (``'dualpipe'``: ``rank`` and
        ``stages - 1 - rank``)."""
        held = self.held_pieces(rank)
        return tuple(r for r in range(self.stages) if self.held_pieces(r) == held)

    def required(self) -> set[OpKey]:
        """Every work key the step must run: F and B of each (micro, piece), W where split."""
        keys: set[OpKey] = set()
        for m in range(self.micro_batches):
            for p in range(self.n_pieces):
                keys.add(("F", m, p))
                keys.add(("B", m, p))
                if self.is_split(m, p):
                    keys.add(("W", m, p))
        return keys

    def dependencies(self, op: Op | OpKey) -> list[OpKey]:
        """Work keys that must finish before ``op`` starts (for ``'FB'``: either half's).

        ``F(m, p)`` needs ``F(m, p-1)``; ``B(m, p)`` needs ``B(m, p+1)``, or ``F(m, p)`` on the
        last piece; ``W(m, p)`` needs ``B(m, p)``.
        """
        keys = op.halves if isinstance(op, Op) else (op,)
        deps: list[OpKey] = []
        for kind, m, p in keys:
            if kind == "F":
                if p > 0:
                    deps.append(("F", m, p - 1))
            elif kind == "B":
                deps.append(("B", m, p + 1) if p < self.n_pieces - 1 else ("F", m, p))
            elif kind == "W":
                deps.append(("B", m, p))
            else:
                raise ValueError(f"unknown op kind {kind!r}")
        return [d for d in deps if d not in keys]

    def piece_layers(self, n_layers: int, split: PieceSplit = EVEN) -> list[list[int]]:
        """Split layer indices ``0 .. n_layers-1`` over the pieces of one path, in order.

        Piece sizes follow :func:`moesim.scenario.pipeline.piece_layer_counts`: by default
        they differ by at most one, earlier pieces taking the extra layers; ``split`` applies
        Megatron-Core's options (the embedding or head counted as a layer, pinned first and
        last stages), so the first piece may hold only the embedding and the last only the
        head. Under ``'dualpipe'`` both directions use this split (piece ``p`` of either copy
        has the same layers).
        """
        return piece_layers(n_layers, self.stages, self.virtual, split)

    def peak_in_flight(self) -> list[int]:
        """Per rank, the most pieces whose activations are held at once.

        A piece's activations are held from its ``F`` to its full ``B``, or to its ``W`` when
        split (the weight gradient still needs them); inside an ``FB`` unit the forward
        allocates before the backward frees. In units of one piece's activations.
        """
        peaks = []
        for order in self.orders:
            held = peak = 0
            for op in order:
                for kind, m, p in op.halves:
                    if kind == "F":
                        held += 1
                        peak = max(peak, held)
                    elif kind == "W" or not self.is_split(m, p):
                        held -= 1
            peaks.append(peak)
        return peaks

    def _check_micro(self, micro: int) -> None:
        if not 0 <= micro < self.micro_batches:
            raise ValueError(f"micro-batch {micro} outside 0..{self.micro_batches - 1}")


def build_schedule(kind: str, stages: int, micro_batches: int, virtual: int = 1) -> Schedule:
    """Build the static schedule ``kind`` for ``stages`` ranks and ``micro_batches``.

    Parameters
    ----------
    kind : str
        ``'1f1b'`` (non-interleaved, PipeDream-flush), ``'interleaved'`` (Megatron interleaved
        1F1B, ``virtual`` chunks per rank), ``'zb1p'`` (zero-bubble ZB-H1: split backward,
        1F1B memory) or ``'dualpipe'`` (DeepSeek-V3 bidirectional DualPipe).
    stages : int
        Pipeline ranks, >= 1 (``'dualpipe'``: even).
    micro_batches : int
        Micro-batches per step, >= 1 (``'interleaved'``: a multiple of ``stages``;
        ``'dualpipe'``: even and >= ``2 (stages - 1)``).
    virtual : int
        Chunks per rank: >= 2 for ``'interleaved'``, 1 otherwise.

    Raises
    ------
    PipelineRuleError
        (a ``ValueError``) For an unknown kind or a setting the schedule cannot run: the rules
        of :mod:`moesim.scenario.pipeline`, which the scenario schema checks too.
    """
    check_schedule(kind, stages, micro_batches, virtual)
    if kind == "dualpipe":
        orders, split = _dualpipe(stages, micro_batches)
        return Schedule(kind, stages, micro_batches, 1, orders, split)
    if kind == "interleaved":
        orders = tuple(_interleaved(r, stages, micro_batches, virtual) for r in range(stages))
        return Schedule(kind, stages, micro_batches, virtual, orders)
    if kind == "zb1p":
        # ZB-H1 steady triple on rank r: (F x, B x-(S-1-r), W x-(S-1)). W lags F by S-1 on
        # every rank, so no rank holds more than S micro-batches: 1F1B's peak on rank 0.
        orders = tuple(
            _lagged(r, micro_batches, (("F", 0), ("B", stages - 1 - r), ("W", stages - 1)))
            for r in range(stages)
        )
        split = frozenset((m, p) for m in range(micro_batches) for p in range(stages))
        return Schedule(kind, stages, micro_batches, 1, orders, split)
    # 1F1B steady pair on rank r: (F x, B x-(S-1-r)).
    orders = tuple(
        _lagged(r, micro_batches, (("F", 0), ("B", stages - 1 - r))) for r in range(stages)
    )
    return Schedule(kind, stages, micro_batches, 1, orders)


def _lagged(rank: int, micro: int, lags: tuple[tuple[str, int], ...]) -> tuple[Op, ...]:
    """Order of one rank that repeats a group of ops at fixed micro-batch lags.

    Group ``x`` runs, for each ``(kind, lag)`` in turn, ``kind`` of micro-batch ``x - lag``;
    dropping the entries outside ``0 .. micro-1`` yields the warm-up and cool-down phases.
    """
    order = []
    last = max(lag for _, lag in lags)
    for x in range(micro + last):
        for kind, lag in lags:
            m = x - lag
            if 0 <= m < micro:
                order.append(Op(kind, m, rank))
    return tuple(order)


def _interleaved(rank: int, stages: int, micro: int, virtual: int) -> tuple[Op, ...]:
    """Megatron interleaved 1F1B order of one rank.

    Chunk ops are taken in groups of ``stages`` micro-batches: forwards sweep the chunks
    ``0 .. v-1`` for each group, backwards sweep them ``v-1 .. 0``. The warm-up runs
    ``2 (stages - 1 - rank) + (v - 1) stages`` forwards, then one forward and one backward
    alternate, then the remaining backwards drain.
    """
    per_group = stages * virtual
    total = micro * virtual

    def op(kind: str, k: int) -> Op:
        group, within = divmod(k, per_group)
        chunk = within // stages
        if kind == "B":
            chunk = virtual - 1 - chunk
        return Op(kind, group * stages + within % stages, chunk * stages + rank)

    warmup = min(2 * (stages - 1 - rank) + (virtual - 1) * stages, total)
    order = [op("F", k) for k in range(warmup)]
    for k in range(total - warmup):
        order.append(op("F", warmup + k))
        order.append(op("B", k))
    order.extend(op("B", k) for k in range(total - warmup, total))
    return tuple(order)


class _DualRank:
    """One DualPipe rank's order under construction: per-direction counters, deferred W."""

    def __init__(self, rank: int, stages: int, micro: int, split: set[tuple[int, int]]) -> None:
        self.piece = (rank, stages - 1 - rank)
        self.half_m = micro // 2
        self.next = {"F": [0, 0], "B": [0, 0]}
        self.split = split
        self.pending: deque[tuple[int, int]] = deque()
        self.order: list[Op] = []

    def _take(self, kind: str, d: int) -> OpKey:
        # Each direction runs its forwards, and its backwards, in micro-batch order.
        m = d * self.half_m + self.next[kind][d]
        self.next[kind][d] += 1
        return (kind, m, self.piece[d])

    def forward(self, d: int) -> None:
        self.order.append(Op(*self._take("F", d)))

    def backward(self, d: int, split: bool = False) -> None:
        key = self._take("B", d)
        if split:
            self.split.add(key[1:])
            self.pending.append(key[1:])
        self.order.append(Op(*key))

    def weight(self) -> None:
        self.order.append(Op("W", *self.pending.popleft()))

    def unit(self, df: int, db: int) -> None:
        self.order.append(Op.pair(self._take("F", df), self._take("B", db)))


def _dualpipe(stages: int, micro: int) -> tuple[tuple[tuple[Op, ...], ...], frozenset]:
    """DualPipe orders of all ranks and the set of split backwards.

    Each rank runs eight phases. ``near`` is the direction that enters at this rank's end of
    the pipeline, ``far`` the other; ``h`` is the rank's distance from its end, ``H`` half
    the stages:

    1. ``2 (H-h-1)`` forwards ``near``;
    2. ``h+1`` times forward ``near``, forward ``far``;
    3. ``H-h-1`` times split backward ``far``, its ``W``, forward ``far``;
    4. ``M/2 - stages + h + 1`` times unit (F ``near`` + B ``far``), unit (F ``far`` + B
       ``near``) — the middle ranks run the very first unit as two plain ops, so the
       forward reaches the other middle rank without waiting for the backward;
    5. ``H-h-1`` times backward ``far``, unit (F ``far`` + B ``near``);
    6. ``h+1`` times backward ``far``, backward ``near``, the second half of them split;
    7. ``H-h-1`` times a deferred ``W``, split backward ``near``;
    8. the ``h+1`` deferred ``W``.

    Deferred ``W`` run first-in first-out.
    """
    orders = []
    split: set[tuple[int, int]] = set()
    half_s = stages // 2
    for rank in range(stages):
        h = min(rank, stages - 1 - rank)
        near = int(rank >= half_s)
        far = 1 - near
        rest = half_s - h - 1
        run = _DualRank(rank, stages, micro, split)
        for _ in range(2 * rest):
            run.forward(near)
        for _ in range(h + 1):
            run.forward(near)
            run.forward(far)
        for _ in range(rest):
            run.backward(far, split=True)
            run.weight()
            run.forward(far)
        for i in range(micro // 2 - stages + h + 1):
            if i == 0 and h == half_s - 1:
                run.forward(near)
                run.backward(far)
            else:
                run.unit(near, far)
            run.unit(far, near)
        for _ in range(rest):
            run.backward(far)
            run.unit(far, near)
        # Phase 6: split from the middle on, the parity deciding which of the two comes first.
        zb = False
        for i in range(h + 1):
            if i == (h + 1) // 2 and h % 2 == 1:
                zb = True
            run.backward(far, split=zb)
            if i == (h + 1) // 2 and h % 2 == 0:
                zb = True
            run.backward(near, split=zb)
        for _ in range(rest):
            run.weight()
            run.backward(near, split=True)
        while run.pending:
            run.weight()
        orders.append(tuple(run.order))
    return tuple(orders), frozenset(split)


@dataclass(frozen=True)
class Timing:
    """Result of :func:`evaluate`.

    Attributes
    ----------
    makespan : float
        Time the last rank finishes (all ranks start at 0).
    busy : tuple of float
        Per rank, the sum of its op durations.
    start, finish : dict
        Per work key, when the op that runs it starts and finishes (both halves of an ``FB``
        unit share the unit's times).
    """

    makespan: float
    busy: tuple[float, ...]
    start: dict[OpKey, float]
    finish: dict[OpKey, float]

    @property
    def bubble(self) -> tuple[float, ...]:
        """Per rank, idle time inside the step: ``makespan - busy``."""
        return tuple(self.makespan - b for b in self.busy)


def op_duration(
    schedule: Schedule, f: float, b: float, w: float = 0.0, fb: float | None = None
) -> Callable[[Op], float]:
    """Uniform duration of each op, as :func:`evaluate` prices it (see there)."""
    if min(f, b, w) < 0:
        raise ValueError("op durations must be >= 0")
    if schedule.split_backward and w > b:
        raise ValueError(f"w ({w}) must be <= b ({b}): b is the full backward, w part of it")

    def backward(m: int, p: int) -> float:
        return b - w if schedule.is_split(m, p) else b

    def duration(op: Op) -> float:
        if op.kind == "F":
            return f
        if op.kind == "B":
            return backward(op.micro, op.piece)
        if op.kind == "W":
            return w
        return fb if fb is not None else f + backward(op.b_micro, op.b_piece)

    return duration


def evaluate(
    schedule: Schedule,
    f: float,
    b: float,
    w: float = 0.0,
    fb: float | None = None,
    p2p: float = 0.0,
    duration: Callable[[Op], float] | None = None,
) -> Timing:
    """Run the orders with max-plus arithmetic: the reference timing of a schedule.

    Each rank runs its ops in order; an op starts when the rank is free and every dependency
    has finished, plus ``p2p`` for a dependency that ran on another rank.

    Parameters
    ----------
    schedule : Schedule
        The schedule to time.
    f, b, w : float
        Per-op forward, full backward (weight gradient included) and weight-gradient time. A
        split ``B`` takes ``b - w`` and its ``W`` takes ``w``; an unsplit ``B`` takes ``b``.
    fb : float, optional
        Duration of an ``FB`` unit; default: forward plus the backward half's duration (no
        overlap gain).
    p2p : float
        Latency added to a dependency that crosses ranks.
    duration : callable, optional
        ``Op -> seconds``, replacing the uniform prices above.

    Returns
    -------
    Timing
        Per-rank busy time, makespan and bubbles; the closed forms they meet are listed in
        the module docstring.

    Raises
    ------
    SimulationError
        When the orders deadlock: no rank's next op can ever start.
    """
    price = duration or op_duration(schedule, f, b, w, fb)
    n = schedule.stages
    pos = [0] * n
    free = [0.0] * n
    busy = [0.0] * n
    start: dict[OpKey, float] = {}
    finish: dict[OpKey, float] = {}
    remaining = sum(len(o) for o in schedule.orders)
    while remaining:
        progressed = False
        for r in range(n):
            order = schedule.orders[r]
            while pos[r] < len(order):
                op = order[pos[r]]
                deps = schedule.dependencies(op)
                if any(d not in finish for d in deps):
                    break
                t0 = free[r]
                for d in deps:
                    hop = p2p if schedule.rank_of(d[1], d[2]) != r else 0.0
                    t0 = max(t0, finish[d] + hop)
                dt = price(op)
                for key in op.halves:
                    start[key] = t0
                    finish[key] = t0 + dt
                free[r] = t0 + dt
                busy[r] += dt
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = ", ".join(
                f"rank {r} at {schedule.orders[r][pos[r]]}"
                for r in range(n)
                if pos[r] < len(schedule.orders[r])
            )
            raise SimulationError(f"{schedule.kind} schedule deadlocks: {stuck}")
    return Timing(max(free), tuple(busy), start, finish)
