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
- every schedule: at least one layer per model piece (``stages × virtual`` pieces).
"""

from __future__ import annotations

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


def check_pieces(layers: int, stages: int, virtual: int) -> None:
    """Every model piece (``stages × virtual`` of them along a micro-batch's path) needs a
    layer.

    Raises
    ------
    PipelineRuleError
    """
    pieces = stages * virtual
    if layers < pieces:
        raise PipelineRuleError(
            "parallelism",
            f"{stages} stages × {virtual} virtual stages = {pieces} model pieces for "
            f"{layers} layers (each piece needs at least one)",
        )


def check_schedule(kind: str, stages: int, micro_batches: int, virtual: int) -> None:
    """:func:`check_pipeline` and :func:`check_micro_batches` together."""
    check_pipeline(kind, stages, virtual)
    check_micro_batches(kind, stages, micro_batches)
