"""Trace replay: drive the engine from recorded expert loads instead of the synthetic gate.

A trace records, per optimizer step and MoE layer, how many (token, expert) assignments each
expert received — the shape of Megatron's logged ``tokens_per_expert`` (Megatron-LM
megatron/core/transformer/moe/router.py; docs/model/gate.md). The file is CSV or Parquet with (at
least) the integer columns

``step``
    optimizer step (≥ 0); steps need not be contiguous;
``layer``
    simulated layer, ``0 ≤ layer < gate.layers_simulated`` (which MoE layers each stands for is
    ``gate.layer_map``'s business, as for trained routers);
``expert``
    routed expert, ``0 ≤ expert < model.moe.routed_experts``;
``tokens``
    assignments (≥ 0). An expert without a row for a (step, layer) got 0.

Every recorded step must list every layer, a (step, layer, expert) triple may appear once, and a
(step, layer) must carry some tokens. :func:`load_trace` checks all of this and reports the first
violation as a :class:`~moesim.errors.ScenarioError` naming the file, the row (1-based data row;
for CSV also the file line) and the column. Extra columns are ignored.

:func:`trace_sample` turns one step's per-layer loads into a
:class:`~moesim.gate.sample.RoutingSample` for the engine:

1. **Step.** The recorded step nearest to the requested one (the earlier on a tie).
2. **Rescale** (``gate.trace.rescale``, default on). Each layer's loads are scaled to the
   scenario's step, ``top_k × micro_batches × n_src × micro_batch_size × seq_len``
   assignments, keeping their proportions (largest-remainder rounding, ties to the lower
   expert). A trace recorded with this scenario's batch passes unchanged.
3. **Split** over the ``M × n_src`` (micro-batch, source rank) cells. Each cell's total is the
   layer total divided as evenly as integers allow (``k·T`` each after rescaling).
   ``multinomial``: the step's assignments are dealt to the cells at random *without
   replacement* (a multivariate hypergeometric draw per cell), so each cell gets exactly its
   total and each expert's step total is kept exactly; cell loads scatter around the step's
   proportions as a random micro-batch would. ``even``: assignments are laid out expert by
   expert and dealt round-robin, so every cell gets ``⌊c_e/C⌋`` or ``⌈c_e/C⌉`` of expert ``e``
   — the step's imbalance without any micro-batch noise.
4. **Dispatch.** A trace has no per-token choices, so ``dest_tokens`` is estimated with
   :func:`~moesim.gate.sampling.expected_distinct`, the balanced sample's
   expected-distinct-tokens formula generalised to uneven loads (exact when balanced), clipped
   to the hard bounds ``⌈a/min(k, E/n_dest)⌉ ≤ dest ≤ min(T, a)`` for a rank receiving ``a``
   assignments. ``node_tokens`` is the same estimate over the ``scenario.ep_nodes`` nodes, with
   the same bounds for a node's ``a`` and ``E/ep_nodes`` experts and then held between the
   largest ``dest_tokens`` of the node's ranks and their sum (a token sent to one of its ranks
   reaches it; none reaches it but through a rank). ``nodes_per_token`` is the unrounded node
   estimate per token.

Nothing is dropped in a replay (a trace records loads as processed). The per-cell constraint
that a token picks an expert at most once (an expert's cell load ``≤ T``) is not enforced.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt

from moesim.errors import ScenarioError
from moesim.gate.sample import RoutingSample
from moesim.gate.sampling import expected_distinct, sample_metrics
from moesim.scenario.schema import Scenario

if TYPE_CHECKING:
    import pandas as pd

COLUMNS = ("step", "layer", "expert", "tokens")
SplitMode = Literal["multinomial", "even"]


@dataclass(frozen=True, eq=False)
class ExpertTrace:
    """Recorded expert loads, validated and densified.

    Attributes
    ----------
    path : str
        The file it came from.
    steps : ndarray, shape (S,), int64
        Recorded steps, ascending.
    loads : ndarray, shape (S, L, E), int64
        ``loads[i, l, e]``: assignments of expert ``e`` in layer ``l`` at step ``steps[i]``.
    """

    path: str
    steps: npt.NDArray[np.int64]
    loads: npt.NDArray[np.int64]

    @property
    def n_layers(self) -> int:
        """Layers recorded ``L``."""
        return int(self.loads.shape[1])

    @property
    def n_experts(self) -> int:
        """Experts ``E``."""
        return int(self.loads.shape[2])

    def recorded_step(self, step: int) -> int:
        """The recorded step nearest to ``step`` (the earlier one on a tie)."""
        i = int(np.searchsorted(self.steps, step, side="left"))
        if i == 0:
            return int(self.steps[0])
        if i == self.steps.size:
            return int(self.steps[-1])
        before, after = int(self.steps[i - 1]), int(self.steps[i])
        return after if after - step < step - before else before

    def loads_at(self, step: int) -> npt.NDArray[np.int64]:
        """Loads (L, E) of :meth:`recorded_step` ``(step)``."""
        i = int(np.searchsorted(self.steps, self.recorded_step(step)))
        return self.loads[i]


MAX_TRACE_TOKENS = 2**40
"""Largest per-row load: sums over any number of experts (≤ 2^22 rows per step and layer) stay
below 2^62, so no int64 sum of a trace can overflow."""


def _row_label(index: int, csv: bool) -> str:
    return f"row {index + 1} (line {index + 2})" if csv else f"row {index + 1}"


def _integer_column(frame: pd.DataFrame, name: str, path: str, csv: bool) -> npt.NDArray[np.int64]:
    """A column as int64; the first non-integer entry is a ScenarioError."""
    import pandas as pd

    raw = frame[name]
    if pd.api.types.is_integer_dtype(raw.dtype) and not raw.isna().any():
        return raw.to_numpy(dtype=np.int64)
    stringy = raw.dtype == object or pd.api.types.is_string_dtype(raw.dtype)
    text = raw.astype(str).str.strip() if stringy else raw
    numbers = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(numbers) | (numbers != np.round(numbers)) | (np.abs(numbers) > 2.0**62)
    if bad.any():
        i = int(np.argmax(bad))
        raise ScenarioError(
            path, f"{_row_label(i, csv)}, column {name!r}: not an integer (or beyond 2^62)"
        )
    return numbers.astype(np.int64)


def _read_frame(path: Path, fmt: str) -> pd.DataFrame:
    # pandas (and pyarrow for Parquet) only here: importing moesim.gate stays light.
    import pandas as pd

    name = str(path)
    if not path.is_file():
        raise ScenarioError(name, "no such trace file")
    try:
        if fmt == "csv":
            return pd.read_csv(
                path,
                dtype=str,
                keep_default_na=False,
                skipinitialspace=True,
                skip_blank_lines=False,
            )
        if fmt == "parquet":
            return pd.read_parquet(path)
    except (ValueError, OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        # The exception's text is not echoed: parsers quote the offending file content.
        raise ScenarioError(name, f"cannot read the {fmt} trace ({type(exc).__name__})") from None
    raise ScenarioError(name, f"unknown trace format {fmt!r} (csv or parquet)")


def load_trace(
    path: str | Path, fmt: str | None = None, *, n_experts: int, n_layers: int
) -> ExpertTrace:
    """Read and validate a trace file (module docstring).

    Parameters
    ----------
    path : str or Path
        CSV or Parquet file.
    fmt : {'csv', 'parquet'}, optional
        Default from the suffix (``.csv``; ``.parquet`` or ``.pq``).
    n_experts : int
        Routed experts; expert ids must lie in ``0..n_experts−1``.
    n_layers : int
        Simulated layers; layer ids must lie in ``0..n_layers−1`` and every step must list all.

    Returns
    -------
    ExpertTrace

    Raises
    ------
    ScenarioError
        With the file as its path and the row and column in its message: a missing column, a
        non-integer value, a negative step or token count, a layer or expert out of range, a
        repeated (step, layer, expert), a step missing a layer, a (step, layer) without tokens,
        an empty or unreadable file.
    """
    p = Path(path)
    name = str(p)
    if fmt is None:
        fmt = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}.get(p.suffix.lower())
        if fmt is None:
            raise ScenarioError(name, "cannot tell csv from parquet by the suffix; give format")
    frame = _read_frame(p, fmt)
    csv = fmt == "csv"
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        # Only header cells that look like column names are echoed: the file may not be a
        # trace at all, and its first line is not for an error message.
        names = [c for c in frame.columns if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_ ]{0,31}", c)]
        have = ", ".join(names[:8]) if names and len(names) == len(frame.columns) else None
        have = have or f"{len(frame.columns)} unnamed"
        raise ScenarioError(
            name, f"missing column(s) {', '.join(map(repr, missing))} (columns: {have})"
        )
    if len(frame) == 0:
        raise ScenarioError(name, "the trace has no data rows")
    step, layer, expert, tokens = (_integer_column(frame, c, name, csv) for c in COLUMNS)

    def fail(mask: npt.NDArray[np.bool_], column: str, what: str) -> None:
        if mask.any():
            i = int(np.argmax(mask))
            value = {"step": step, "layer": layer, "expert": expert, "tokens": tokens}[column][i]
            raise ScenarioError(name, f"{_row_label(i, csv)}, column {column!r}: {value} {what}")

    fail(step < 0, "step", "is negative")
    fail((layer < 0) | (layer >= n_layers), "layer", f"is outside 0..{n_layers - 1}")
    fail((expert < 0) | (expert >= n_experts), "expert", f"is outside 0..{n_experts - 1}")
    fail(tokens < 0, "tokens", "is negative")
    fail(tokens > MAX_TRACE_TOKENS, "tokens", f"exceeds {MAX_TRACE_TOKENS:,}")

    steps, step_index = np.unique(step, return_inverse=True)
    cell = (step_index * n_layers + layer) * n_experts + expert
    order = np.argsort(cell, kind="stable")
    repeat = np.zeros(cell.size, dtype=bool)
    repeat[order[1:]] = cell[order[1:]] == cell[order[:-1]]
    if repeat.any():
        i = int(np.argmax(repeat))
        earlier = int(order[np.searchsorted(cell[order], cell[i])])
        raise ScenarioError(
            name,
            f"{_row_label(i, csv)}, column 'expert': step {step[i]}, layer {layer[i]}, expert "
            f"{expert[i]} repeats {_row_label(earlier, csv)}",
        )
    loads = np.zeros((steps.size, n_layers, n_experts), dtype=np.int64)
    loads.reshape(-1)[cell] = tokens
    present = np.zeros((steps.size, n_layers), dtype=bool)
    present[step_index, layer] = True
    if not present.all():
        s, lay = (int(v[0]) for v in np.nonzero(~present))
        raise ScenarioError(name, f"column 'layer': step {steps[s]} has no rows for layer {lay}")
    empty = loads.sum(axis=2) == 0
    if empty.any():
        s, lay = (int(v[0]) for v in np.nonzero(empty))
        raise ScenarioError(
            name, f"column 'tokens': step {steps[s]}, layer {lay} has no tokens at all"
        )
    return ExpertTrace(path=name, steps=steps.astype(np.int64), loads=loads)


def rescale_loads(loads: npt.ArrayLike, total: int) -> npt.NDArray[np.int64]:
    """Scale each row of ``loads`` (..., E) to sum to ``total``, keeping proportions.

    Largest-remainder rounding: floors first, then one more for the largest fractional parts
    (ties to the lower index). A row that already sums to ``total`` is returned unchanged.
    """
    c = np.asarray(loads, dtype=np.int64)
    sums = c.sum(axis=-1, keepdims=True)
    if (sums <= 0).any():
        raise ValueError("loads: a row without load cannot be rescaled")
    exact = c * (float(total) / sums)
    out = np.floor(exact).astype(np.int64)
    short = total - out.sum(axis=-1)
    frac = exact - out
    rank = np.argsort(np.argsort(-frac, axis=-1, kind="stable"), axis=-1, kind="stable")
    out += rank < short[..., None]
    return out


def even_totals(total: int, n_cells: int) -> npt.NDArray[np.int64]:
    """``total`` split into ``n_cells`` integers differing by at most one (larger ones first)."""
    base, extra = divmod(int(total), n_cells)
    out = np.full(n_cells, base, dtype=np.int64)
    out[:extra] += 1
    return out


def split_loads(
    loads: npt.ArrayLike, n_cells: int, mode: SplitMode, rng: np.random.Generator | None = None
) -> npt.NDArray[np.int64]:
    """Deal one layer's expert loads (E,) to ``n_cells`` cells (module docstring, step 3).

    Returns
    -------
    ndarray, shape (n_cells, E), int64
        Sums over cells to ``loads``; cell totals are :func:`even_totals` of the layer total.
    """
    c = np.asarray(loads, dtype=np.int64)
    totals = even_totals(int(c.sum()), n_cells)
    if mode == "even":
        # Assignments laid out expert by expert and dealt round-robin: cell j gets positions
        # ≡ j (mod C). Count of such positions in [0, n): ceil((n − j)/C) for n ≥ j, else 0.
        bounds = np.concatenate(([0], np.cumsum(c)))
        cells = np.arange(n_cells, dtype=np.int64)
        upto = np.maximum(0, (bounds[:, None] - cells[None, :] + n_cells - 1) // n_cells)
        return np.ascontiguousarray((upto[1:] - upto[:-1]).T)
    if mode == "multinomial":
        if rng is None:
            raise ValueError("split_loads: the multinomial split needs a generator")
        out = np.zeros((n_cells, c.size), dtype=np.int64)
        remaining = c.copy()
        for j in range(n_cells - 1):
            if totals[j]:
                out[j] = rng.multivariate_hypergeometric(
                    remaining, int(totals[j]), method="marginals"
                )
                remaining -= out[j]
        out[-1] = remaining
        return out
    raise ValueError(f"split: unknown mode {mode!r} (multinomial or even)")


def trace_sample(
    scenario: Scenario,
    trace: ExpertTrace,
    step: int,
    n_src: int,
    n_dest: int,
    rng: np.random.Generator,
    split: SplitMode | None = None,
    rescale: bool | None = None,
) -> RoutingSample:
    """The engine's routing sample for ``step``, from a trace (module docstring, steps 1–4).

    Parameters
    ----------
    scenario : Scenario
        Supplies top-k, experts, micro-batches, micro-batch size, sequence length and nodes.
    trace : ExpertTrace
        With ``gate.layers_simulated`` layers and ``model.moe.routed_experts`` experts.
    step : int
        Requested step; the nearest recorded one is used (``metrics['trace_step']``).
    n_src, n_dest : int
        Source ranks and destination expert-parallel ranks (``n_dest`` divides the experts).
    rng : numpy.random.Generator
        Draws the multinomial split.
    split, rescale : optional
        Override ``gate.trace.split`` / ``gate.trace.rescale`` (defaults ``multinomial`` /
        True without a ``gate.trace``).

    Returns
    -------
    RoutingSample
        ``dropped`` all zero.
    """
    moe = scenario.model.moe_spec
    n_experts, top_k = moe.routed_experts, moe.top_k
    n_layers = scenario.gate.layers_simulated
    if trace.n_layers != n_layers or trace.n_experts != n_experts:
        raise ValueError(
            f"trace: {trace.n_layers} layers × {trace.n_experts} experts, the scenario simulates "
            f"{n_layers} × {n_experts}"
        )
    if n_src < 1 or n_dest < 1 or n_experts % n_dest:
        raise ValueError(f"n_src/n_dest: {n_src}/{n_dest} do not fit {n_experts} experts")
    spec = scenario.gate.trace
    split = split or (spec.split if spec is not None else "multinomial")
    rescale = rescale if rescale is not None else (spec.rescale if spec is not None else True)
    n_micro = scenario.micro_batches_at(step)
    n_cells = n_micro * n_src
    tokens = scenario.parallelism.micro_batch_size * scenario.model.seq_len

    recorded = trace.recorded_step(step)
    loads = trace.loads_at(step)
    if rescale:
        loads = rescale_loads(loads, top_k * tokens * n_cells)
    counts = np.stack([split_loads(loads[lay], n_cells, split, rng) for lay in range(n_layers)])
    counts = counts.reshape(n_layers, n_micro, n_src, n_experts)

    cell_tokens = counts.sum(axis=3, keepdims=True) / top_k  # (L, M, n_src, 1)
    per_rank = n_experts // n_dest
    rank_load = counts.reshape(n_layers, n_micro, n_src, n_dest, per_rank).sum(axis=4)
    estimate = np.rint(expected_distinct(rank_load, cell_tokens, n_experts, top_k))
    low = np.ceil(rank_load / min(top_k, per_rank))
    high = np.minimum(np.ceil(cell_tokens), rank_load)
    dest = np.clip(estimate, low, high).astype(np.int64)

    n_nodes = scenario.ep_nodes
    per_node = n_experts // n_nodes
    node_load = counts.reshape(n_layers, n_micro, n_src, n_nodes, per_node).sum(axis=4)
    reach = expected_distinct(node_load, cell_tokens, n_experts, top_k)
    node = np.clip(
        np.rint(reach),
        np.ceil(node_load / min(top_k, per_node)),
        np.minimum(np.ceil(cell_tokens), node_load),
    )
    # A node receives every token one of its ranks does, and none that none of them does
    # (when its ranks nest in it: n_dest a multiple of the nodes).
    if n_dest % n_nodes == 0:
        ranks = dest.reshape(n_layers, n_micro, n_src, n_nodes, n_dest // n_nodes)
        node = np.maximum(np.minimum(node, ranks.sum(axis=4)), ranks.max(axis=4))
    if n_nodes == 1:
        nodes_per_token = 1.0
    else:
        weight = cell_tokens[..., 0]
        total = reach.sum(axis=3)
        nodes_per_token = float(total.sum() / weight.sum()) if weight.sum() > 0 else 0.0
    metrics = sample_metrics(counts, n_dest, None, nodes_per_token)
    metrics["trace_step"] = float(recorded)
    return RoutingSample(
        step=step,
        counts=counts,
        dest_tokens=dest,
        metrics=metrics,
        node_tokens=node.astype(np.int64),
    )


def scenario_trace(scenario: Scenario) -> ExpertTrace:
    """Load the scenario's ``gate.trace`` (validated against its experts and layers)."""
    spec = scenario.gate.trace
    if spec is None:
        raise ScenarioError("gate.trace", "the scenario has no trace to replay")
    return load_trace(
        spec.path,
        spec.format,
        n_experts=scenario.model.moe_spec.routed_experts,
        n_layers=scenario.gate.layers_simulated,
    )


def trace_samples(
    scenario: Scenario,
    steps: list[int],
    n_src: int,
    n_dest: int,
    rng: np.random.Generator,
    trace: ExpertTrace | None = None,
) -> list[RoutingSample]:
    """:func:`trace_sample` for each requested step (the trace loaded once, from
    ``gate.trace`` unless given)."""
    source = trace if trace is not None else scenario_trace(scenario)
    return [trace_sample(scenario, source, s, n_src, n_dest, rng) for s in steps]
