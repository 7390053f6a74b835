"""The quickstart router's balance against α and γ, over the same windows of training.

For each auxiliary-loss weight α (0, 1e-4, 1e-3, 1e-2, 1e-1; α = 0 is no balancing) and each
loss-free bias speed γ (1e-4, 1e-3, 1e-2) the quickstart's gate is trained over the whole run
(``scenarios/quickstart.yaml``, its seed) and cut into ``--windows`` equal windows of optimizer
steps; per window :func:`moesim.gate.study.window_balance` gives MaxVio_global (held-out
sequences routed by the routers at the window's end), the mean MaxVio_batch of the window's
updates and their mean task loss. The tables print the last window and the spread of
MaxVio_global over the last three. ``--seeds n`` repeats every run with n seeds (the scenario's
seed, then 1, 2, …) and prints the min–max band over seeds; ``--only alpha`` or ``--only
gamma`` runs one of the two sweeps, ``--alphas``/``--gammas`` pick their values.

Run ``OPENBLAS_NUM_THREADS=1 python benchmarks/balancing_tables.py`` (about 10 minutes on one
core; ``--steps N`` shortens the run to N optimizer steps for a quick look).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from moesim.gate import train_gate  # noqa: E402
from moesim.gate.study import window_balance, window_steps  # noqa: E402
from moesim.scenario import load_scenario  # noqa: E402
from moesim.scenario.schema import Scenario  # noqa: E402
from moesim.scenario.strategies import AuxLoss, LossFree, NoBalancing  # noqa: E402

ALPHAS = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)
GAMMAS = (1e-4, 1e-3, 1e-2)


def shortened(scenario: Scenario, steps: int | None) -> Scenario:
    if steps is None:
        return scenario
    tokens = steps * scenario.training.global_batch_sequences * scenario.model.seq_len
    training = scenario.training.model_copy(update={"total_tokens": float(tokens)})
    return scenario.model_copy(update={"training": training})


def measure(scenario: Scenario, spec, windows: int, seed: int) -> list[dict[str, float]]:  # type: ignore[no-untyped-def]
    bounds = window_steps(scenario.total_steps, windows)
    run = train_gate(scenario, spec, bounds[1:], np.random.SeedSequence(seed))
    return window_balance(scenario, run, windows)


def row(label: str, per_seed: list[list[dict[str, float]]]) -> str:
    last = [w[-1] for w in per_seed]
    tail = [[x["maxvio_global"] for x in w[-3:]] for w in per_seed]
    spread = max(max(t) - min(t) for t in tail)

    def band(key: str) -> str:
        values = [x[key] for x in last]
        if len(values) == 1:
            return f"{values[0]:.3f}"
        return f"{np.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"

    return (
        f"| {label} | {band('maxvio_global')} | {spread:.3f} | {band('maxvio_batch')} | "
        f"{band('task_loss')} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="scenarios/quickstart.yaml")
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--only", choices=["alpha", "gamma"], default=None)
    parser.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS))
    parser.add_argument("--gammas", type=float, nargs="+", default=list(GAMMAS))
    args = parser.parse_args()
    scenario = shortened(load_scenario(args.scenario), args.steps)
    seeds = [scenario.seed, *range(1, args.seeds)]
    header = (
        "| {} | MaxVio_global (last window) | max−min of MaxVio_global, last 3 windows | "
        "MaxVio_batch (last window) | task loss (last window) |\n|---|---|---|---|---|"
    )
    print(f"{scenario.name}: {scenario.total_steps} steps, {args.windows} windows, seeds {seeds}")
    print(header.format("α"))
    for alpha in args.alphas if args.only != "gamma" else ():
        spec = NoBalancing(kind="none") if alpha == 0 else AuxLoss(kind="aux_loss", alpha=alpha)
        runs = [measure(scenario, spec, args.windows, s) for s in seeds]
        print(row(f"{alpha:g}", runs), flush=True)
    print()
    print(header.format("γ"))
    for gamma in args.gammas if args.only != "alpha" else ():
        runs = [
            measure(scenario, LossFree(kind="loss_free", gamma=gamma), args.windows, s)
            for s in seeds
        ]
        print(row(f"{gamma:g}", runs), flush=True)
        for w in runs[0]:
            print(
                f"   window to step {w['end']:.0f}: global {w['maxvio_global']:.3f} "
                f"batch {w['maxvio_batch']:.3f} loss {w['task_loss']:.4f}"
            )


if __name__ == "__main__":
    main()
