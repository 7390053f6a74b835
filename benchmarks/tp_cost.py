"""What tensor parallelism costs on the same GPUs. Prints; asserts nothing.

One step of each scenario under balanced routing (a dense model routes nothing), at
``tensor = 1`` and at the file's tensor degree with and without ``tp_comm_overlap``: step time,
MFU against the BF16 peak, and per GPU (mean) the exposed tensor-parallel communication, the
compute, the pipeline bubble and the gradient synchronisation. The global batch stays the same,
so ``tensor = 1`` runs ``tensor`` times fewer micro-batches per pipeline (a larger bubble) and
synchronises ``tensor`` times more non-expert gradient bytes per GPU.

Run ``python benchmarks/tp_cost.py`` (default: the two tensor-parallel scenarios).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moesim.cluster import model_flops_per_token
from moesim.engine import build_context, simulate_step
from moesim.estimate.routing import dense_sample
from moesim.gate import balanced_sample
from moesim.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ["scenarios/llama3_70b_dense.yaml", "scenarios/mixtral_tp_ep.yaml"]


def measure(path: Path, sets: list[str]) -> str:
    sc = load_scenario(path, sets=sets)
    ctx = build_context(sc)
    n_src = ctx.layout.gpus_per_stage
    if sc.model.moe is None:
        sample = dense_sample(sc, 0, n_src)
    else:
        sample = balanced_sample(sc, 0, n_src, ctx.layout.expert)
    r = simulate_step(ctx, sample.counts, sample.dest_tokens, node_tokens=sample.node_tokens)
    peak = sc.cluster.gpus * sc.cluster.gpu.peak_flops("bf16")
    mfu = model_flops_per_token(sc.model) * sc.tokens_per_step / r.step_time_s / peak
    return (
        f"{' '.join(sets):52s} micro {sc.micro_batches:3d}  step {r.step_time_s:7.3f} s  "
        f"MFU {mfu:5.1%}  TP exposed {r.tp_comm_s.mean():6.3f} s  "
        f"compute {r.compute_s.mean():7.3f} s  bubble {r.pipeline_wait_s.mean():6.3f} s  "
        f"sync {r.allreduce_s.mean():6.3f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="*", default=DEFAULT)
    args = parser.parse_args()
    for name in args.scenarios:
        path = ROOT / name if not Path(name).is_absolute() else Path(name)
        tensor = load_scenario(path).parallelism.tensor
        print(path.name)
        for sets in (
            ["parallelism.tensor=1"],
            [f"parallelism.tensor={tensor}", "parallelism.tp_comm_overlap=false"],
            [f"parallelism.tensor={tensor}", "parallelism.tp_comm_overlap=true"],
        ):
            print("  " + measure(path, sets))


if __name__ == "__main__":
    main()
