"""How fast the quickstart's router scores drift against the loss-free bias step γ.

Trains the quickstart's gate under the loss-free bias (``--gamma``, default 1e-3) at a given
gate learning rate (``--lr``, default the scenario's), keeping router snapshots every
``--every`` updates. On one fixed held-out batch it prints, every 100 updates: the largest and the
mean change per update of an expert's mean sigmoid score (relative to the experts' mean: the part
that moves loads), the bias's net movement per update, the spreads of both, and the window's
MaxVio_batch; then the bound ``¼·lr·E‖u‖₁`` of :func:`moesim.scenario.routing.score_step_bound`.
docs/model/gate.md ("Loss-free stability") quotes ``--lr 1e-3`` and ``--lr 2.5e-4``.

Run ``OPENBLAS_NUM_THREADS=1 python benchmarks/lossfree_drift.py --lr 2.5e-4`` (one quickstart
gate training: a minute or two on a free core).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from moesim.gate import train_gate  # noqa: E402
from moesim.scenario import load_scenario  # noqa: E402
from moesim.scenario.routing import score_step_bound  # noqa: E402
from moesim.scenario.strategies import LossFree  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="scenarios/quickstart.yaml")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--gamma", type=float, default=1e-3)
    parser.add_argument("--every", type=int, default=25)
    args = parser.parse_args()
    scenario = load_scenario(args.scenario)
    if args.lr is not None:
        gate = scenario.gate.model_copy(update={"learning_rate": args.lr})
        scenario = scenario.model_copy(update={"gate": gate})
    snaps = list(range(0, scenario.total_steps + 1, args.every))
    spec = LossFree(kind="loss_free", gamma=args.gamma)
    run = train_gate(scenario, spec, snaps, np.random.SeedSequence(scenario.seed))
    x, _ = run.stream.sample(256, scenario.gate.tokens_per_sequence, np.random.default_rng(3))
    x = x.reshape(-1, x.shape[-1]).astype(np.float64)
    batch = run.column("maxvio_batch")
    previous = None
    print(f"lr {scenario.gate.learning_rate:g}, γ {args.gamma:g}")
    for step in snaps:
        state = run.states[step][0]
        mean_score = (1.0 / (1.0 + np.exp(-(x @ state.weights.T.astype(np.float64))))).mean(0)
        gap = mean_score - mean_score.mean()
        bias = state.bias.astype(np.float64) - float(state.bias.mean())
        if previous is not None and step % 100 == 0:
            drift = np.abs(gap - previous[0]) / args.every
            moved = np.abs(bias - previous[1]) / args.every
            print(
                f"update {step:5d}: score drift/update max {drift.max():.2e} mean "
                f"{drift.mean():.2e} | bias move/update mean {moved.mean():.2e} | spreads: bias "
                f"{np.ptp(bias):.3f}, score {np.ptp(gap):.3f} | MaxVio_batch "
                f"{batch[step - args.every : step].mean():.3f}"
            )
        previous = (gap, bias)
    print(f"bound ¼·lr·E‖u‖₁ = {score_step_bound(scenario):.2e}; window: {run.tail_summary()}")


if __name__ == "__main__":
    main()
