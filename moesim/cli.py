"""Command line: ``moesim run | validate | schema | plot``.

Bad input ends with one line on stderr (``error: cluster.nodes: …``) and exit status 2, never a
traceback, and ``run`` creates no run directory unless the run completes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# The gate multiplies small matrices thousands of times: BLAS threads cost more than they give
# (the gate ran 10x slower with OpenBLAS's default threads on a shared 2-core machine). Set
# before numpy is first imported; an explicit setting in the environment wins.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from moesim import __version__  # noqa: E402
from moesim.errors import MoesimError  # noqa: E402


def _sig(value: float) -> str:
    """Four significant digits, thousands separated, never rounded to a bare 0 or 1."""
    if value == 0 or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def _share(part: str) -> Callable[[dict[str, Any]], float | None]:
    def share(values: dict[str, Any]) -> float | None:
        whole = values.get("gpu_hours")
        return None if values.get(part) is None or not whole else values[part] / whole

    return share


SUMMARY_COLUMNS: tuple[tuple[str | Callable[[dict[str, Any]], float | None], str, Any], ...] = (
    ("step_time_s", "step s", "{:.4g}"),
    ("balanced_step_time_s", "balanced s", "{:.4g}"),
    ("straggler_overhead", "lost vs balanced", "{:.1%}"),
    (_share("imbalance_gpu_hours"), "imbalance", "{:.1%}"),
    (_share("straggler_gpu_hours"), "hw straggler", "{:.1%}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("mfu", "MFU", "{:.1%}"),
    ("gpu_hours", "GPU-hours", _sig),
    ("cost_usd", "cost $", _sig),
    ("imbalance_cost_usd", "imbalance $", _sig),
    ("straggler_cost_usd", "hw straggler $", _sig),
    ("maxvio_batch", "MaxVio", "{:.3f}"),
    ("task_loss", "task loss", "{:.4f}"),
)
"""Summary table columns: summary key (or a function of the summary), label, format. The
routing-imbalance and hardware-straggler overheads have their own columns (share of the run's
GPU-hours, and dollars); ``lost vs balanced`` is the step time lost to both together."""


def _cell(values: dict[str, Any], key: Any, fmt: Any) -> str:
    """One summary cell; with several seeds, a banded key shows its P50 (P10–P90)."""
    text = fmt if callable(fmt) else fmt.format
    value = key(values) if callable(key) else values.get(key)
    if value is None:
        return "–"
    seeds = values.get("seeds") or 1
    if isinstance(key, str) and seeds > 1 and values.get(f"{key}_p50") is not None:
        lo, mid, hi = (values[f"{key}_p{q}"] for q in (10, 50, 90))
        return f"{text(mid)} ({text(lo)}–{text(hi)})"
    return str(text(value))


def format_summary(summary: dict[str, dict[str, Any]]) -> str:
    """The per-strategy summary as an aligned text table. With several seeds the banded
    columns (step time, GPU-hours, cost, task loss) show their P50 over seeds with its P10–P90
    range; the P50 of GPU-hours and cost is the headline seed's own value."""
    header = ["strategy", *(label for _, label, _ in SUMMARY_COLUMNS)]
    rows = [
        [name, *(_cell(values, key, fmt) for key, _, fmt in SUMMARY_COLUMNS)]
        for name, values in summary.items()
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    lines = [line(header), line(["-" * w for w in widths]), *map(line, rows)]
    seeds = max((values.get("seeds") or 1 for values in summary.values()), default=1)
    if seeds > 1:
        picked = ", ".join(
            f"{name} {values['headline_seed']}"
            for name, values in summary.items()
            if values.get("headline_seed") is not None
        )
        lines.append(
            f"\nP50 over {seeds} seeds (P10–P90 in brackets); each row is the run of its "
            f"median-GPU-hours seed ({picked})"
        )
    return "\n".join(lines)


def _default_run_dir(scenario_name: str, out_root: str) -> Path:
    base = Path(out_root) / scenario_name
    if not os.path.lexists(base):
        return base
    n = 2
    while os.path.lexists(Path(out_root) / f"{scenario_name}-{n}"):
        n += 1
    return Path(out_root) / f"{scenario_name}-{n}"


def _cache_choice(args: argparse.Namespace) -> Any:
    """The gate cache that ``--no-cache`` / ``--cache-dir`` ask for (default: the environment's)."""
    from moesim.estimate.gate_cache import GateCache

    if args.no_cache:
        return None
    if args.cache_dir is not None:
        return GateCache(Path(args.cache_dir).expanduser())
    return GateCache.default()


def cmd_run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from moesim.estimate.montecarlo import bands_work, estimate_with_bands
    from moesim.results import write_run
    from moesim.results.store import check_output_dir
    from moesim.scenario import load_scenario

    # No tqdm monitor thread: the bar is updated often enough without it, and a process with a
    # single thread can draw the run's figures in a forked process (moesim.results.store).
    tqdm.monitor_interval = 0
    overrides = {"seed": args.seed} if args.seed is not None else None
    scenario = load_scenario(args.scenario, overrides, sets=args.sets)
    if args.out is not None:
        run_dir = check_output_dir(args.out, "--out")
    else:
        run_dir = check_output_dir(
            _default_run_dir(scenario.name, scenario.output.dir), "output.dir"
        )
    # Units of work, not tasks: a gate's training weighs what it costs (moesim.estimate.run).
    with tqdm(
        total=bands_work(scenario),
        desc=scenario.name,
        file=sys.stderr,
        disable=args.quiet,
        bar_format="{l_bar}{bar}| [{elapsed}<{remaining}{postfix}]",
    ) as bar:

        def tick(label: str, units: float) -> None:
            bar.set_postfix_str(label, refresh=False)
            bar.update(units)

        estimate = estimate_with_bands(scenario, progress=tick, cache=_cache_choice(args))
    path = write_run(
        estimate,
        run_dir,
        label="--out" if args.out is not None else "output.dir",
        command=["moesim", *sys.argv[1:]],
    )
    print(format_summary(estimate.summary_dict()))
    print(f"\nrun directory: {path}")
    return 0


SWEEP_COLUMNS: tuple[tuple[str, str, Any], ...] = (
    ("gpu_hours", "GPU-hours", _sig),
    ("cost_usd", "cost $", _sig),
    ("step_time_s", "step s", "{:.4g}"),
    ("maxvio_batch", "MaxVio", "{:.3f}"),
)


def format_sweep(table: Any, keys: list[str]) -> str:
    """The sweep table as aligned text: the varied keys, the strategy and the headline
    columns (the P50 when the points ran several seeds)."""
    header = [*keys, "strategy", *(label for _, label, _ in SWEEP_COLUMNS)]
    rows = []
    for _, r in table.iterrows():
        cells = [str(r[k]) for k in keys] + [str(r["strategy"])]
        for key, _, fmt in SWEEP_COLUMNS:
            value = r.get(f"{key}_p50", r[key]) if f"{key}_p50" in r else r[key]
            text = fmt if callable(fmt) else fmt.format
            cells.append("–" if value is None or value != value else text(value))
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))
        for cells in [header, ["-" * w for w in widths], *rows]
    )


def cmd_sweep(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from moesim import sweep
    from moesim.results.plots import write_sweep_plots

    grid = [sweep.parse_axis(text, "--grid") for text in args.grid]
    zipped = [sweep.parse_axis(text, "--zip") for text in args.zip]
    sets: list[str | tuple[str, object]] = []
    if args.design:
        file_grid, file_zip, file_sets = sweep.load_design(args.design)
        grid, zipped, sets = [*file_grid, *grid], [*file_zip, *zipped], [*file_sets]
    sets += args.sets
    points = sweep.plan(args.scenario, sweep.expand(grid, zipped), sets)
    finished = 0
    with tqdm(
        total=sum(sweep.point_work(p) for p in points),
        desc="sweep",
        file=sys.stderr,
        disable=args.quiet,
        bar_format="{l_bar}{bar}| [{elapsed}<{remaining}{postfix}]",
    ) as bar:

        def tick(label: str) -> None:
            nonlocal finished
            finished += 1
            bar.set_postfix_str(f"{finished}/{len(points)} points, last {label}")

        def work(_label: str, units: float) -> None:
            bar.update(units)

        table = sweep.run_sweep(
            points,
            args.out,
            args.executor,
            args.workers,
            args.scheduler,
            progress=tick,
            command=["moesim", *sys.argv[1:]],
            cache=_cache_choice(args),
            work=work,
        )
    keys = sweep.varied_keys(table)
    plots = write_sweep_plots(table, Path(args.out))
    print(format_sweep(table, keys))
    print(f"\nsweep table: {Path(args.out) / sweep.TABLE}")
    print(f"plots: {', '.join(p.name for p in plots)}")
    return 0


def _band(value: float, lo: float, hi: float) -> str:
    return _sig(value) if lo == hi else f"{_sig(value)} ({_sig(lo)}–{_sig(hi)})"


def cmd_compare(args: argparse.Namespace) -> int:
    from moesim.results.compare import compare, headline, write_compare_figure

    df = compare(args.runs)
    gpu, gpu_lo, gpu_hi = headline(df, "gpu_hours")
    cost, cost_lo, cost_hi = headline(df, "cost_usd")
    header = ["run", "strategy", "GPU-hours", "cost $", "GPU-h vs first", "step s", "MaxVio"]
    rows = [
        [
            str(r["run"]),
            str(r["strategy"]),
            _band(gpu[i], gpu_lo[i], gpu_hi[i]),
            _band(cost[i], cost_lo[i], cost_hi[i]),
            "–"
            if r["gpu_hours_vs_first"] != r["gpu_hours_vs_first"]
            else f"{r['gpu_hours_vs_first'] - 1:+.2%}",
            f"{r['step_time_s']:.4g}",
            "–" if r["maxvio_batch"] is None else f"{r['maxvio_batch']:.3f}",
        ]
        for i, r in df.iterrows()
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for cells in [header, ["-" * w for w in widths], *rows]:
        print(
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
        )
    print(f"\nfigure: {write_compare_figure(df, args.figure)}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from moesim.scenario import load_scenario

    sc = load_scenario(args.scenario, sets=args.sets)
    if sc.gate.trace is not None:  # the replayed file is part of the scenario: check it too
        from moesim.gate.trace import scenario_trace

        scenario_trace(sc)
    from moesim.estimate.memory import check_memory

    memory = check_memory(sc)  # a layout that does not fit the GPU is not valid
    p = sc.parallelism
    layout = f"PP{p.pipeline} × EP{p.expert} × DP{p.data}"
    if p.tensor > 1 or p.context > 1:  # folded: attention TP × CP × DP on the same GPUs
        cp = f" × CP{p.context}" if p.context > 1 else ""
        layout += f" (attention TP{p.tensor}{cp} × DP{sc.attention_data})"
    runs = (
        "dense model, no strategies"
        if sc.model.moe is None
        else f"strategies: {', '.join(s.name for s in sc.strategies)}"
    )
    print(
        f"{args.scenario}: valid — {sc.cluster.gpus} × {sc.cluster.gpu.name}, {layout}, "
        f"{sc.micro_batches} micro-batches/step, {sc.total_steps:,} steps, {runs}"
    )
    print(format_memory(memory))
    return 0


def format_memory(est: Any) -> str:
    """The worst GPU's memory estimate (a :class:`moesim.cluster.memory.MemoryEstimate`) on
    one line."""
    from moesim import units
    from moesim.cluster.memory import COMPONENTS

    parts = ", ".join(f"{name} {getattr(est, name) / units.GiB:.1f}" for name in COMPONENTS)
    return (
        f"peak memory per GPU (worst: pipeline stage {est.stage}): "
        f"{est.total / units.GiB:.1f} GiB of {est.capacity / units.GiB:.1f} GiB ({est.gpu}) "
        f"— {parts} GiB"
    )


def cmd_schema(args: argparse.Namespace) -> int:
    from moesim.scenario.json_schema import scenario_json_schema

    try:
        print(json.dumps(scenario_json_schema(), indent=2), flush=True)
    except BrokenPipeError:  # `moesim schema | head`: the reader had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from moesim.results import load
    from moesim.results.plots import write_all

    run = load(args.run_dir)
    for path in write_all(run.path, run.timeline, run.bands, run.stages, run.gpus, run.experts):
        print(path)
    return 0


def _add_cache_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="gate cache directory (default: $MOESIM_CACHE_DIR, else $XDG_CACHE_HOME/moesim, "
        "else ~/.cache/moesim)",
    )
    group.add_argument(
        "--no-cache",
        action="store_true",
        help="train every gate; neither read nor write the gate cache",
    )


def _add_set_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a scenario field (dotted path, [i] for list items, YAML value), "
        "e.g. --set strategies[1].gamma=1e-4; repeatable",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moesim",
        description="Simulate MoE training on a GPU cluster: step time, GPU-hours and cost "
        "under each load-balancing strategy.",
    )
    parser.add_argument("--version", action="version", version=f"moesim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a scenario and write a run directory")
    run.add_argument("scenario", help="scenario YAML file")
    run.add_argument("--out", help="run directory to create (default: output.dir/<name>)")
    run.add_argument("--seed", type=int, help="override the scenario's seed")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_cache_options(run)
    _add_set_option(run)
    run.set_defaults(func=cmd_run)
    val = sub.add_parser("validate", help="check a scenario file without running it")
    val.add_argument("scenario")
    _add_set_option(val)
    val.set_defaults(func=cmd_validate)
    sw = sub.add_parser(
        "sweep",
        help="run a scenario over a grid of overrides: one run directory per point and "
        "one table (DIR/sweep.parquet); re-running resumes",
    )
    sw.add_argument("scenario", help="scenario YAML file")
    sw.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="values of one field to cross with the other --grid axes (cartesian product)",
    )
    sw.add_argument(
        "--zip",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="values varied together point by point (every --zip list of one length)",
    )
    sw.add_argument("--design", help="sweep file: YAML with grid:, zip: and set: mappings")
    _add_set_option(sw)
    sw.add_argument("--out", required=True, help="sweep directory (resumed if it exists)")
    sw.add_argument("--workers", type=int, help="parallel points (default: available cores)")
    sw.add_argument("--executor", choices=("process", "dask"), default="process")
    sw.add_argument("--scheduler", help="Dask scheduler address (default: a local cluster)")
    sw.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_cache_options(sw)
    sw.set_defaults(func=cmd_sweep)
    cmp = sub.add_parser("compare", help="compare run directories: one table and one figure")
    cmp.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    cmp.add_argument(
        "--figure",
        default="compare.png",
        help="figure to write (.png, .svg or .pdf; default: compare.png)",
    )
    cmp.set_defaults(func=cmd_compare)
    sch = sub.add_parser("schema", help="print the scenario JSON Schema (for editors)")
    sch.set_defaults(func=cmd_schema)
    plot = sub.add_parser("plot", help="redraw a run directory's plots")
    plot.add_argument("run_dir")
    plot.set_defaults(func=cmd_plot)
    return parser


MAX_MESSAGE_CHARS = 400
"""An error line is cut to this length (values echoed in it are already shortened)."""


def one_line(message: str) -> str:
    """The message as one printable line: control characters (newlines, ANSI escapes)
    escaped, cut to :data:`MAX_MESSAGE_CHARS`."""
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in message)
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 1] + "…"


class _Terminated(Exception):
    """SIGTERM, turned into an exception so that clean-up (temporary run directories) runs."""


_MAIN_PID = os.getpid()


def _on_sigterm(signum: int, frame: object) -> None:
    if os.getpid() != _MAIN_PID:  # a forked worker inherited the handler: die as asked
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise _Terminated


def main(argv: Sequence[str] | None = None) -> int:
    """The command line's one error boundary: every failure is one ``error:`` line on stderr
    (and no warning line) and exit status 2 (130 on Ctrl-C, 143 on SIGTERM), never a
    traceback. ``MOESIM_DEBUG=1`` re-raises unexpected errors to show their traceback."""
    args = build_parser().parse_args(argv)
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (an embedding caller): leave signals alone
        previous = None
    try:
        # Warnings (advice on a valid scenario) print after the command's output, one line
        # each; a failed command prints only its error line.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            code: int = args.func(args)
        for message in dict.fromkeys(str(w.message) for w in caught):
            print(f"warning: {one_line(message)}", file=sys.stderr)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("error: terminated", file=sys.stderr)
        return 143
    except MoesimError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {one_line(where + (exc.strerror or str(exc)))}", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: out of memory (lower engine.memory_limit_gib's estimate)", file=sys.stderr)
        return 2
    except Exception as exc:
        if os.environ.get("MOESIM_DEBUG"):
            raise
        print(
            f"error: internal error ({type(exc).__name__}: {one_line(str(exc))[:200]}); "
            "please report it with the scenario (MOESIM_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return code


if __name__ == "__main__":
    sys.exit(main())
