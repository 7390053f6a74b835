"""Per-domain expert-load skew of the quickstart's final routers, fine and coarse experts.

The quickstart (``scenarios/quickstart.yaml``: 64 routed experts, top-6) and a coarse variant
(8 routed experts, top-2, as Mixtral, arXiv 2401.04088) are trained under the quickstart's two
strategies on the quickstart's stream split into four data domains (``MIX`` below: a web-heavy
pre-training mix with code, papers and mathematics, the kind of split the routing analyses of
Mixtral §5, OLMoE arXiv 2409.02060 and DeepSeek-V3 arXiv 2412.19437 App. C evaluate on); then
:func:`moesim.estimate.routing.domain_skew` routes at least 100K held-out tokens per domain with
each final router, as a run's ``routing_by_domain.parquet`` does. Prints one markdown table per
model: MaxVio, CV and min/mean per strategy and domain, and ``pooled`` over the mix.

Run ``OPENBLAS_NUM_THREADS=1 python benchmarks/domain_skew.py`` (a few minutes on one core;
``--steps N`` shortens the runs).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


from moesim.estimate.routing import domain_skew  # noqa: E402
from moesim.estimate.seeds import SeedPlan  # noqa: E402
from moesim.gate import train_gate  # noqa: E402
from moesim.scenario import load_scenario, scenario_from_dict  # noqa: E402
from moesim.scenario.loader import dump_scenario  # noqa: E402

MIX = [
    {"name": "web", "share": 0.6, "topics": 36},
    {"name": "code", "share": 0.2, "topics": 12},
    {"name": "papers", "share": 0.1, "topics": 8},
    {"name": "math", "share": 0.1, "topics": 8},
]


def variant(path: str, steps: int | None, coarse: bool):  # type: ignore[no-untyped-def]
    import yaml

    raw = yaml.safe_load(dump_scenario(load_scenario(path)))
    raw["stream"]["domains"] = MIX
    if coarse:
        raw["model"]["moe"].update(routed_experts=8, top_k=2, shared_experts=0)
        raw["name"] += "-coarse"
    if steps is not None:
        raw["training"]["total_tokens"] = float(
            steps * raw["training"]["global_batch_sequences"] * raw["model"]["seq_len"]
        )
    return scenario_from_dict(raw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="scenarios/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    for coarse in (False, True):
        scenario = variant(args.scenario, args.steps, coarse)
        moe = scenario.model.moe
        print(
            f"\n{scenario.name}: {moe.routed_experts} experts, top-{moe.top_k}, "
            f"{scenario.total_steps} steps"
        )
        print("| strategy | domain | MaxVio | CV | min/mean | tokens |\n|---|---|---|---|---|---|")
        seeds = SeedPlan(scenario.seed)
        for spec in scenario.strategies:
            run = train_gate(scenario, spec, [], seeds.gate)
            for r in domain_skew(scenario, spec.name, run, seeds):
                print(
                    f"| {r['strategy']} | {r['domain']} | {r['maxvio']:.3f} | {r['cv']:.3f} | "
                    f"{r['min_over_mean']:.3f} | {r['tokens']} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
