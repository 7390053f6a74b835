"""The rules a pipeline-parallel schedule puts on a layout, stated once.

Pure functions (no simulation): the scenario schema checks a scenario with them, and
:func:`moesim.engine.schedules.build_schedule` checks the schedule it is asked to build, so a
setting is refused with the same message wherever it is caught. The schedules themselves and
where the rules come from are described in ``docs/model/schedules.md``.

- ``dualpipe``: an even number of stages (the two directions meet in the middle) and an even
  number of micro-batches, at least ``2 (stages - 1)`` (:func:`micro_batch_rule`);
- ``interleaved``: at least 2 virtual stages (chunks) per rank and a number of micro-batches
  that is a multiple of the stages (chunks are taken in groups of ``stages`` micro-batches);
- every other schedule: one chunk per rank;
- every schedule: the layers cut into ``stages × virtual`` model pieces by
  :func:`piece_layer_counts` (Megatron-Core's split, see there), each piece holding at least
  one layer or the embedding or the output head.

:func:`pieces_on_rank` says which pieces a rank holds and :func:`peak_in_flight` how many
pieces' activations it holds at once, so the memory estimate needs no schedule.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULES = ("1f1b", "interleaved", "zb1p", "dualpipe")


class PipelineRuleError(ValueError):
    """A setting a pipeline schedule cannot run; ``field`` names the scenario field to blame
    (dotted path), the message says which rule it breaks."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field

    @property
    def message(self) -> str:
        return str(self.args[0])


def micro_batch_rule(kind: str, stages: int) -> tuple[int, int]:
    """(fewest, multiple of) micro-batches per pipeline per step that ``kind`` can run on
    ``stages`` ranks.

    DualPipe: rank 0 runs ``M/2 - stages + 1`` steady pairs of overlapped units, which may be
    none, so ``M/2 >= stages - 1``, with at least one micro-batch per direction; and ``M`` is
    even, half per direction. (DeepSeek's reference implementation, deepseek-ai/DualPipe
    ``dualpipe/dualpipe.py``, asserts ``M >= 2 stages``; one micro-batch per direction fewer
    also runs, with the same bubble.) Interleaved 1F1B takes its chunk ops in groups of
    ``stages`` micro-batches.
    """
    if kind == "dualpipe":
        return max(2, 2 * (stages - 1)), 2
    if kind == "interleaved":
        return stages, stages
    return 1, 1


def check_pipeline(kind: str, stages: int, virtual: int) -> None:
    """The schedule's rules on the layout alone (stages and chunks per rank).

    Raises
    ------
    PipelineRuleError
        For an unknown schedule or a layout it cannot run.
    """
    if kind not in SCHEDULES:
        raise PipelineRuleError(
            "parallelism.schedule",
            f"unknown pipeline schedule {kind!r}; expected one of {', '.join(SCHEDULES)}",
        )
    if stages < 1:
        raise PipelineRuleError("parallelism.pipeline", f"stages must be >= 1, got {stages}")
    if kind == "dualpipe" and stages % 2:
        raise PipelineRuleError(
            "parallelism.schedule",
            f"dualpipe needs an even number of stages, pipeline = {stages}",
        )
    if kind == "interleaved":
        if virtual < 2:
            raise PipelineRuleError(
                "parallelism.virtual_stages",
                f"interleaved needs at least 2 virtual stages (chunks) per rank, got {virtual}",
            )
    elif virtual != 1:
        raise PipelineRuleError(
            "parallelism.virtual_stages",
            f"{virtual} virtual stages are only meaningful with schedule interleaved, "
            f"not {kind}; use 1",
        )


def check_micro_batches(kind: str, stages: int, micro_batches: int) -> None:
    """The schedule's rule on the micro-batches per pipeline per step (see
    :func:`micro_batch_rule`).

    Raises
    ------
    PipelineRuleError
    """
    if micro_batches < 1:
        raise PipelineRuleError(
            "parallelism.schedule", f"micro-batches must be >= 1, got {micro_batches}"
        )
    least, multiple = micro_batch_rule(kind, stages)
    if kind == "dualpipe" and (micro_batches % multiple or micro_batches < least):
        raise PipelineRuleError(
            "parallelism.schedule",
            f"dualpipe needs an even number of micro-batches per pipeline, at least {least} "
            f"(2 × (stages − 1)) for {stages} stages, got {micro_batches}",
        )
    if micro_batches % multiple:
        raise PipelineRuleError(
            "parallelism.schedule",
            f"{kind} needs micro-batches per pipeline ({micro_batches}) to be a multiple of "
            f"the pipeline stages ({stages})",
        )


@dataclass(frozen=True)
class PieceSplit:
    """How the layers are cut into pipeline pieces beyond an even split (Megatron-Core's
    options; ``docs/model/schedules.md``).

    Attributes
    ----------
    embedding_counts_as_layer, head_counts_as_layer : bool
        The embedding (the output head) takes the place of one layer in the first (last)
        piece: Megatron-Core's ``account_for_embedding_in_pipeline_split`` and
        ``account_for_loss_in_pipeline_split``.
    first_stage_layers, last_stage_layers : int or None
        Layers on the first (last) pipeline stage, over all its virtual stages: Megatron-Core's
        ``num_layers_in_first_pipeline_stage`` / ``num_layers_in_last_pipeline_stage``
        (``--decoder-first-pipeline-num-layers``).
    """

    embedding_counts_as_layer: bool = False
    head_counts_as_layer: bool = False
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None

    @property
    def pins_stages(self) -> bool:
        return self.first_stage_layers is not None or self.last_stage_layers is not None

    @property
    def counts_extras(self) -> bool:
        return self.embedding_counts_as_layer or self.head_counts_as_layer


EVEN = PieceSplit()


def _spread(total: int, parts: int) -> list[int]:
    """``total`` over ``parts`` as evenly as possible, earlier parts taking the remainder."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def piece_layer_counts(
    layers: int, stages: int, virtual: int, split: PieceSplit = EVEN
) -> tuple[int, ...]:
    """Transformer layers in each model piece, in path order (piece ``p`` runs on pipeline
    stage ``p % stages``; its layers follow those of pieces ``0 .. p-1``).

    The rule (Megatron-Core's ``get_num_layers_to_build``, extended to remainders):

    * Without pinned stages: ``layers + e + h`` slots (``e``, ``h`` = 1 when the embedding,
      the head, counts as a layer) are spread over the ``stages × virtual`` pieces as evenly
      as possible, earlier pieces taking the remainder; the first piece then gives one slot to
      the embedding and the last one to the head. When the slots divide evenly this is
      Megatron-Core's split exactly.
    * With ``first_stage_layers`` (``last_stage_layers``): the first (last) stage's pieces —
      pieces ``0, stages, 2·stages, …`` (``stages−1, 2·stages−1, …``), one per virtual stage —
      share that many layers as evenly as possible, the piece with the embedding (the head)
      taking the fewest, so the first piece may hold only the embedding and the last only
      the head; the other layers are spread
      over the remaining pieces in path order, earlier pieces taking the remainder. With
      virtual stages this is Megatron-Core's per-stage count divided over the stage's chunks
      (which Megatron-Core requires to divide evenly). Megatron-Core refuses pinned stages
      together with the embedding or head counted as a layer, and so does moesim.

    Every piece holds at least one layer, except that the first may hold only the embedding
    and the last only the head.

    Raises
    ------
    PipelineRuleError
        For a split that leaves a piece empty, pins more layers than the model has, or pins
        stages that do not exist.
    """
    pieces = stages * virtual
    if split.pins_stages:
        counts = _pinned_counts(layers, stages, virtual, split)
    else:
        e, h = int(split.embedding_counts_as_layer), int(split.head_counts_as_layer)
        slots = layers + e + h
        if slots < pieces:
            counted = "".join(
                text for flag, text in ((e, " + the embedding"), (h, " + the head")) if flag
            )
            hint = ""
            if layers + 2 >= pieces and not (e and h):
                hint = (
                    "; the embedding and the head may each take a layer's place "
                    "(embedding_counts_as_layer, head_counts_as_layer)"
                )
            raise PipelineRuleError(
                "parallelism",
                f"{stages} stages × {virtual} virtual stages = {pieces} model pieces for "
                f"{layers} layers{counted} (each piece needs at least one){hint}",
            )
        counts = _spread(slots, pieces)
        counts[0] -= e
        counts[-1] -= h
    return tuple(counts)


def piece_layers(
    layers: int, stages: int, virtual: int, split: PieceSplit = EVEN
) -> list[list[int]]:
    """The layer indices of each piece, in path order (:func:`piece_layer_counts` sizes,
    consecutive layers)."""
    out: list[list[int]] = []
    start = 0
    for size in piece_layer_counts(layers, stages, virtual, split):
        out.append(list(range(start, start + size)))
        start += size
    return out


def _pinned_counts(layers: int, stages: int, virtual: int, split: PieceSplit) -> list[int]:
    first, last = split.first_stage_layers, split.last_stage_layers
    field = (
        "parallelism.first_stage_layers" if first is not None else "parallelism.last_stage_layers"
    )
    if split.counts_extras:
        raise PipelineRuleError(
            field,
            "first_stage_layers / last_stage_layers cannot be combined with "
            "embedding_counts_as_layer or head_counts_as_layer (Megatron-Core refuses it too): "
            "pin the stages' layer counts or count the embedding and head, not both",
        )
    if stages < 2:
        raise PipelineRuleError(
            field, f"pinning a stage's layers needs pipeline >= 2, got {stages}"
        )
    pinned = {rank: n for rank, n in ((0, first), (stages - 1, last)) if n is not None}
    names = {0: "first_stage_layers", stages - 1: "last_stage_layers"}
    for rank, n in pinned.items():
        # Only the first stage's first piece may hold just the embedding, and the last
        # stage's last piece just the head: every other piece of a pinned stage needs a layer.
        if n < virtual - 1:
            raise PipelineRuleError(
                f"parallelism.{names[rank]}",
                f"{n} layers for the {virtual} virtual stages of pipeline stage {rank} (each "
                "piece needs at least one layer; only the first piece may hold just the "
                "embedding and the last just the head)",
            )
    rest = layers - sum(pinned.values())
    pins = " + ".join(f"{names[r]} {n}" for r, n in pinned.items())
    if rest < 0:
        raise PipelineRuleError(field, f"{pins} pins more layers than the model's {layers}")
    middle = [p for p in range(stages * virtual) if p % stages not in pinned]
    if not middle and rest:
        raise PipelineRuleError(
            field,
            f"{pins} on a {stages}-stage pipeline leaves {rest} of the {layers} layers "
            "with no stage to hold them",
        )
    if len(middle) > rest:
        raise PipelineRuleError(
            "parallelism",
            f"{rest} layers left for the {len(middle)} model pieces of the other stages "
            f"({stages - len(pinned)} stages × {virtual} virtual stages; each piece needs at "
            "least one)",
        )
    counts = [0] * (stages * virtual)
    for rank, n in pinned.items():
        shares = _spread(n, virtual)  # the last stage's last piece, with the head, is lightest
        if rank == 0:
            shares.reverse()  # the first stage's first piece, with the embedding, is lightest
        for piece, share in zip(range(rank, stages * virtual, stages), shares, strict=True):
            counts[piece] = share
    for piece, share in zip(middle, _spread(rest, len(middle)) if middle else [], strict=True):
        counts[piece] = share
    return counts


def check_pieces(layers: int, stages: int, virtual: int, split: PieceSplit = EVEN) -> None:
    """Every model piece (``stages × virtual`` of them along a micro-batch's path) needs a
    layer, or the embedding or the head (:func:`piece_layer_counts`).

    Raises
    ------
    PipelineRuleError
    """
    piece_layer_counts(layers, stages, virtual, split)


def pieces_on_rank(kind: str, stages: int, virtual: int, rank: int) -> list[tuple[int, int]]:
    """The ``(direction, piece)`` pipeline rank ``rank`` holds: its ``virtual`` chunks
    ``rank, rank + stages, …``, or under ``dualpipe`` piece ``rank`` of the first model copy
    and piece ``stages − 1 − rank`` of the second."""
    if not 0 <= rank < stages:
        raise ValueError(f"rank {rank} outside 0..{stages - 1}")
    if kind == "dualpipe":
        return [(0, rank), (1, stages - 1 - rank)]
    return [(0, rank + c * stages) for c in range(virtual)]


def peak_in_flight(kind: str, stages: int, micro_batches: int, virtual: int = 1) -> tuple[int, ...]:
    """Per rank, the most pieces whose forward activations the schedule holds at once (a
    piece's activations live from its forward to its backward, or its weight gradient when
    the backward is split); the closed forms of the orders in
    :mod:`moesim.engine.schedules`:

    * ``1f1b``: rank ``r`` holds ``min(stages − r, M)`` (its warm-up forwards plus one);
    * ``zb1p``: ``min(stages, M)`` on every rank (``W`` lags ``F`` by ``stages − 1``);
    * ``interleaved``: ``min(2 (stages − 1 − r) + (v − 1) stages + 1, M v)`` chunks (Megatron's
      warm-up plus one);
    * ``dualpipe``: ``stages + 1`` (DeepSeek-V3's Table 2), except that with fewer than
      ``2 stages`` micro-batches the two end ranks hold ``stages``.
    """
    m, s = micro_batches, stages
    if kind == "1f1b":
        return tuple(min(s - r, m) for r in range(s))
    if kind == "zb1p":
        return (min(s, m),) * s
    if kind == "interleaved":
        return tuple(min(2 * (s - 1 - r) + (virtual - 1) * s + 1, m * virtual) for r in range(s))
    if kind == "dualpipe":
        ends = s if m < 2 * s else s + 1
        return tuple(ends if r in (0, s - 1) else s + 1 for r in range(s))
    raise PipelineRuleError(
        "parallelism.schedule",
        f"unknown pipeline schedule {kind!r}; expected one of {', '.join(SCHEDULES)}",
    )


def check_schedule(kind: str, stages: int, micro_batches: int, virtual: int) -> None:
    """:func:`check_pipeline` and :func:`check_micro_batches` together."""
    check_pipeline(kind, stages, virtual)
    check_micro_batches(kind, stages, micro_batches)


def in_flight_at_peak(
    kind: str, stages: int, micro_batches: int, virtual: int, rank: int
) -> dict[int, int]:
    """Which pieces' activations ``rank`` holds at its :func:`peak_in_flight`, as
    ``{piece: micro-batches}`` (the pieces may differ in size: the embedding and head pieces,
    uneven splits).

    * one piece per rank: all of them on that piece;
    * ``interleaved``: the warm-up forwards and the first steady one, taken chunk by chunk in
      groups of ``stages`` micro-batches;
    * ``dualpipe``: with ``h = min(rank, stages − 1 − rank)``, ``h + 1`` micro-batches of the
      direction that enters at the far end and the rest of the one that enters at this rank's
      end (the warm-up order of the near direction, then the steady ``F``-before-``B`` units).
    """
    peak = peak_in_flight(kind, stages, micro_batches, virtual)[rank]
    if kind == "interleaved":
        held: dict[int, int] = {}
        for k in range(peak):
            chunk = (k % (stages * virtual)) // stages
            piece = chunk * stages + rank
            held[piece] = held.get(piece, 0) + 1
        return held
    if kind == "dualpipe":
        h = min(rank, stages - 1 - rank)
        near, far = (rank, stages - 1 - rank) if rank < stages // 2 else (stages - 1 - rank, rank)
        return {near: peak - (h + 1), far: h + 1}
    return {rank: peak}
