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
from collections.abc import Sequence
from pathlib import Path

# The gate multiplies small matrices thousands of times: BLAS threads cost more than they give
# (the gate ran 10x slower with OpenBLAS's default threads on a shared 2-core machine). Set
# before numpy is first imported; an explicit setting in the environment wins.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from moesim import __version__  # noqa: E402
from moesim.errors import MoesimError  # noqa: E402

SUMMARY_COLUMNS = (
    ("step_time_s", "step s", "{:.3f}"),
    ("balanced_step_time_s", "balanced s", "{:.3f}"),
    ("straggler_overhead", "straggler", "{:.1%}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("mfu", "MFU", "{:.1%}"),
    ("gpu_hours", "GPU-hours", "{:,.1f}"),
    ("cost_usd", "cost $", "{:,.0f}"),
    ("imbalance_cost_usd", "imbalance $", "{:,.0f}"),
    ("straggler_cost_usd", "hw straggler $", "{:,.0f}"),
    ("maxvio_batch", "MaxVio", "{:.3f}"),
    ("task_loss", "task loss", "{:.4f}"),
)


def format_summary(summary: dict[str, dict[str, float | None]]) -> str:
    """The per-strategy summary as an aligned text table."""
    header = ["strategy", *(label for _, label, _ in SUMMARY_COLUMNS)]
    rows = [
        [
            name,
            *(
                "–" if values[key] is None else fmt.format(values[key])
                for key, _, fmt in SUMMARY_COLUMNS
            ),
        ]
        for name, values in summary.items()
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _default_run_dir(scenario_name: str, out_root: str) -> Path:
    base = Path(out_root) / scenario_name
    if not os.path.lexists(base):
        return base
    n = 2
    while os.path.lexists(Path(out_root) / f"{scenario_name}-{n}"):
        n += 1
    return Path(out_root) / f"{scenario_name}-{n}"


def cmd_run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from moesim.estimate import estimate_with_bands, run_names
    from moesim.estimate.run import scenario_points
    from moesim.results import write_run
    from moesim.results.store import check_output_dir
    from moesim.scenario import load_scenario

    overrides = {"seed": args.seed} if args.seed is not None else None
    scenario = load_scenario(args.scenario, overrides)
    if args.out is not None:
        run_dir = check_output_dir(args.out, "--out")
    else:
        run_dir = check_output_dir(
            _default_run_dir(scenario.name, scenario.output.dir), "output.dir"
        )
    points = len(scenario_points(scenario)[0])
    total = 1 + len(run_names(scenario)) * (1 + points) + scenario.uncertainty.seeds - 1
    with tqdm(
        total=total, desc=scenario.name, unit="task", file=sys.stderr, disable=args.quiet
    ) as bar:

        def tick(label: str) -> None:
            bar.set_postfix_str(label)
            bar.update(1)

        estimate = estimate_with_bands(scenario, progress=tick)
    path = write_run(estimate, run_dir, label="--out" if args.out is not None else "output.dir")
    print(format_summary(estimate.summary))
    print(f"\nrun directory: {path}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from moesim.scenario import load_scenario

    sc = load_scenario(args.scenario)
    if sc.gate.trace is not None:  # the replayed file is part of the scenario: check it too
        from moesim.gate.trace import scenario_trace

        scenario_trace(sc)
    print(
        f"{args.scenario}: valid — {sc.cluster.gpus} × {sc.cluster.gpu.name}, "
        f"PP{sc.parallelism.pipeline} × EP{sc.parallelism.expert} × DP{sc.parallelism.data}, "
        f"{sc.micro_batches} micro-batches/step, {sc.total_steps:,} steps, "
        f"strategies: {', '.join(s.name for s in sc.strategies)}"
    )
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from moesim.scenario import Scenario

    print(json.dumps(Scenario.model_json_schema(), indent=2))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from moesim.results import load
    from moesim.results.plots import write_all

    run = load(args.run_dir)
    for path in write_all(run.path, run.timeline, run.bands, run.stages, run.gpus, run.experts):
        print(path)
    return 0


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
    run.set_defaults(func=cmd_run)
    val = sub.add_parser("validate", help="check a scenario file without running it")
    val.add_argument("scenario")
    val.set_defaults(func=cmd_validate)
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
    and exit status 2 (130 on Ctrl-C, 143 on SIGTERM), never a traceback. ``MOESIM_DEBUG=1``
    re-raises unexpected errors to show their traceback."""
    args = build_parser().parse_args(argv)
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (an embedding caller): leave signals alone
        previous = None
    try:
        code: int = args.func(args)
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
