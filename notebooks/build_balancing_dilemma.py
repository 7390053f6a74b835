"""Write ``notebooks/balancing_dilemma.ipynb`` (no outputs stored).

Run from the repository root: ``.venv/bin/python notebooks/build_balancing_dilemma.py``. Edit the
cells here, not in the notebook, so the committed notebook stays output-free and reviewable
(``tests/test_notebooks.py`` checks that the two match). Markdown cells keep their own line
lengths (tables).
"""

# ruff: noqa: E501

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

OUT = Path(__file__).with_name("balancing_dilemma.ipynb")

CELLS: list[tuple[str, str]] = [
    (
        "md",
        r"""# The load-balancing dilemma in the numerical gate

A Mixture-of-Experts router trained on its task alone sends most tokens to a few experts; forcing
it to balance costs model quality. This notebook shows the dilemma with moesim's numerical gate —
a small MoE layer whose experts learn per-topic targets (`gate.objective: experts`,
`docs/model/gate.md`) — and what it costs on a cluster:

1. collapse without balancing;
2. the auxiliary-loss sweep (α) as a trade-off frontier, against the loss-free bias's point
   (arXiv 2408.15664);
3. interference (the aux loss's gradient against the task's) and perturbation (the bias's
   override of the router's own choice);
4. expert-load skew per data domain (`stream.domains`), coarse against fine experts;
5. GPU-hours and dollars on the quickstart cluster, through `moesim.estimate`.

Every number in the prose below is computed by the cell above it from the runs shown.

**Set-up.** The tests' base scenario: 16 routed experts, top-2, one shared expert, sigmoid scores;
one simulated layer trained for `STEPS` updates of 64 sequences × 16 tokens (a 32-dimensional
stream of 64 Zipf-popular topics with a common direction). All runs share the seed, hence the
task and the token batches. MaxVio = (max load − mean load) / mean load (arXiv 2408.15664 Eq. 4);
MaxVio_global pools 30 held-out batches of 64 sequences routed by the final router; task loss is
the mean over the last quarter of the updates.""",
    ),
    (
        "code",
        r'''import os

# The gate's matrices are small (1,024 tokens × 32 dims × 16 experts): BLAS threads only add
# overhead, and on a busy machine a lot of it. Set before NumPy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

from moesim.estimate import SeedPlan, estimate_run
from moesim.estimate.routing import domain_skew
from moesim.gate import train_gate
from moesim.gate.metrics import relative_load
from moesim.gate.router import route, route_options
from moesim.gate.study import frontier_at, maxvio_by_batch, smooth, tail_mean
from moesim.scenario import load_scenario, scenario_from_dict
from moesim.scenario.strategies import AuxLoss, LossFree, NoBalancing

STEPS, SEED, WINDOW = 600, 11, 50
# The tests' base scenario (tests/base_scenario.py: 16 routed experts, top-2, one 8-GPU node,
# expert parallelism 8), written out because a notebook does not import the tests. Only the
# name, the run length (training.total_tokens), the gate batch and the stream dimension differ;
# tests/test_base_scenario.py checks that everything else stays equal.
BASE = {
    "name": "balancing-dilemma",
    "seed": 1,
    "model": {
        "layers": 4,
        "dense_layers": 1,
        "hidden": 1024,
        "dense_ffn": 4096,
        "attention": {"kind": "gqa", "heads": 8, "kv_heads": 2, "head_dim": 128},
        "vocab": 32000,
        "seq_len": 1024,
        "moe": {"routed_experts": 16, "shared_experts": 1, "top_k": 2, "expert_ffn": 512},
    },
    "cluster": {
        "gpu": "H100",
        "nodes": 1,
        "gpus_per_node": 8,
        "nvlink": {"latency_us": 3, "efficiency": 0.77},
        "nic": {"latency_us": 3, "bandwidth_gbits_per_s": 400, "efficiency": 0.9},
        "price_usd_per_gpu_hour": 2.0,
    },
    "parallelism": {"pipeline": 1, "expert": 8, "data": 1, "micro_batch_size": 1},
    "strategies": [{"kind": "aux_loss", "alpha": 0.001}, {"kind": "loss_free", "gamma": 0.001}],
    "training": {
        "total_tokens": STEPS * 64 * 1024,
        "global_batch_sequences": 64,
        "sample_points": 4,
    },
    "gate": {"batch_sequences": 64, "tokens_per_sequence": 16, "layers_simulated": 1},
    "stream": {"dim": 32},
}


def make_scenario(**sections):
    """BASE with each named section updated key by key."""
    raw = {name: dict(value) if isinstance(value, dict) else value for name, value in BASE.items()}
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return scenario_from_dict(raw)


def train(scenario, spec):
    """One gate run; every run uses the same seed, so the same task and token batches."""
    return train_gate(scenario, spec, [], np.random.SeedSequence(SEED))


def balance(scenario, run):
    """(MaxVio_global on held-out batches, late task loss) of a run."""
    return maxvio_by_batch(scenario, run, 64)[1], tail_mean(run, "task_loss")


started = time.perf_counter()
scenario = make_scenario()
steps = np.arange(1, STEPS + 1)''',
    ),
    (
        "md",
        r"""## 1 — Collapse without balancing

With no balancing the router follows the task gradient alone. An expert that wins some tokens
learns their targets, so the task gradient sends it more; the stream's common direction lets one
router row raise its expert's score for every token (`docs/model/gate.md`).""",
    ),
    (
        "code",
        r"""none = train(scenario, NoBalancing(kind="none"))
loss_free = train(scenario, LossFree(kind="loss_free", gamma=1e-3))
x, _ = none.stream.sample(256, 16, np.random.default_rng(5))
flat = x.reshape(-1, x.shape[-1])
loads = {
    name: np.bincount(
        route(flat, run.final[0], **route_options(scenario)).selected.ravel(), minlength=16
    )
    for name, run in (("no balancing", none), ("loss-free γ = 1e-3", loss_free))
}
fig, axes = plt.subplots(1, 2, figsize=(12, 4), constrained_layout=True)
for name, run in (("no balancing", none), ("loss-free γ = 1e-3", loss_free)):
    axes[0].plot(steps, smooth(run.column("maxvio_batch"), WINDOW), label=name)
axes[0].set(yscale="log", xlabel="update", ylabel=f"MaxVio_batch (smoothed over {WINDOW})")
axes[0].legend()
width = 0.4
for i, (name, load) in enumerate(loads.items()):
    rel = np.sort(relative_load(load))[::-1]
    axes[1].bar(np.arange(16) + (i - 0.5) * width, rel, width, label=name)
axes[1].axhline(1, color="black", lw=0.8)
axes[1].set(
    xlabel="expert (by load)", ylabel="load / mean load", title="final router, held-out tokens"
)
axes[1].legend()
plt.show()

rel_none = relative_load(loads["no balancing"])
starved = int(np.sum(rel_none < 0.1))
g_none, l_none = balance(scenario, none)
g_lf, l_lf = balance(scenario, loss_free)
display(Markdown(
    f"Without balancing the final router's MaxVio_global is **{g_none:.2f}**: its busiest expert "
    f"takes {rel_none.max():.1f}× the mean load and {starved} of 16 experts get less than a tenth "
    f"of it (least-loaded: {rel_none.min():.2f} of the mean). The MaxVio_batch of the first {WINDOW} updates is "
    f"{none.column('maxvio_batch')[:WINDOW].mean():.2f} and of the last {WINDOW} "
    f"{none.column('maxvio_batch')[-WINDOW:].mean():.2f}. The loss-free bias (γ = 1e-3) brings "
    f"MaxVio_global to **{g_lf:.3f}**, at a task loss of {l_lf:.4f} against {l_none:.4f} "
    f"without balancing."
))""",
    ),
    (
        "md",
        r"""## 2 — The auxiliary-loss frontier against the loss-free point

The micro-batch auxiliary loss `α·N·Σ f_i P_i` (Switch, arXiv 2101.03961); its gradient is scaled
so that α means what it means in a real run (`docs/model/gate.md`, "Gradient scale"). Each α gives
one (MaxVio_global, task loss) point; the Pareto frontier of the sweep is the best the aux loss
offers at each balance.""",
    ),
    (
        "code",
        r"""ALPHAS = [1e-4, 1e-3, 1e-2, 1e-1]
aux_runs = {alpha: train(scenario, AuxLoss(kind="aux_loss", alpha=alpha)) for alpha in ALPHAS}
points = {alpha: balance(scenario, run) for alpha, run in aux_runs.items()}
xs = np.array([p[0] for p in points.values()])
ys = np.array([p[1] for p in points.values()])

fig, ax = plt.subplots(figsize=(6.5, 4.5), constrained_layout=True)
ax.plot(xs, ys, "o-", label="auxiliary loss, α sweep")
for alpha, (gx, gy) in points.items():
    ax.annotate(f"α={alpha:g}", (gx, gy), textcoords="offset points", xytext=(5, 5))
ax.plot([g_lf], [l_lf], "*", ms=14, label="loss-free, γ = 1e-3")
ax.plot([g_none], [l_none], "s", label="no balancing")
ax.set(xscale="log", xlabel="MaxVio_global (held-out)", ylabel="task loss (last quarter)")
ax.legend()
plt.show()

front = frontier_at(xs, ys, g_lf)
best_alpha = min(points, key=lambda a: points[a][0])
verdict = "below" if l_lf < front else "on or above"
display(Markdown(
    f"The α sweep trades balance for task loss: from α = {ALPHAS[0]:g} to {ALPHAS[-1]:g} "
    f"MaxVio_global goes {xs[0]:.2f} → {xs[-1]:.2f} and the task loss "
    f"{ys[0]:.4f} → {ys[-1]:.4f}. The best-balanced α ({best_alpha:g}) reaches "
    f"{points[best_alpha][0]:.3f}. At the loss-free point's balance ({g_lf:.3f}) the frontier "
    f"offers a task loss of {front:.4f}; loss-free's {l_lf:.4f} lies **{verdict}** it "
    f"({100 * (l_lf / front - 1):+.1f} %)."
))""",
    ),
    (
        "md",
        r"""## 3 — Interference and perturbation

An auxiliary loss acts through the router's gradient: its cosine with the task gradient (negative
= the two pull against each other) and its norm ratio measure the *interference* (arXiv
2408.15664 Table 1). The loss-free bias has no gradient; it *perturbs* the routing instead — the
share of assignments it moves off the router's own top-k, and the task loss the same weights
would have without the bias.""",
    ),
    (
        "code",
        r"""cos = [tail_mean(aux_runs[a], "interference_cos") for a in ALPHAS]
ratio = [tail_mean(aux_runs[a], "interference_ratio") for a in ALPHAS]
moved = tail_mean(loss_free, "bias_moved")
unbiased = tail_mean(loss_free, "task_loss_unbiased")

fig, axes = plt.subplots(1, 2, figsize=(12, 4), constrained_layout=True)
labels = [f"{a:g}" for a in ALPHAS]
axes[0].bar(labels, cos, color="tab:red")
axes[0].set(xlabel="α", ylabel="cos(∂L_aux/∂W, ∂L_task/∂W)", title="interference: direction")
ax2 = axes[0].twinx()
ax2.plot(labels, ratio, "ko-")
ax2.set(yscale="log", ylabel="‖∂L_aux/∂W‖ / ‖∂L_task/∂W‖")
axes[1].plot(
    steps, smooth(loss_free.column("bias_moved"), WINDOW), label="assignments moved by the bias"
)
axes[1].set(xlabel="update", ylabel="share", title="loss-free perturbation")
axes[1].legend()
plt.show()

display(Markdown(
    f"The cosine between the aux loss's gradient and the task's lies between {min(cos):.2f} and "
    f"{max(cos):.2f} over the sweep ({'against' if max(cos) < 0 else 'not always against'} "
    f"the task's); "
    f"its size grows with α from {ratio[0]:.2f} to {ratio[-1]:.1f} times the task gradient's. "
    f"The loss-free bias adds no gradient but overrides the router: late in training it moves "
    f"**{100 * moved:.0f} %** of the assignments off the router's own top-k, and the same "
    f"weights routed without it would have a task loss of {unbiased:.3f} instead of {l_lf:.3f} — "
    f"the router comes to rely on the bias."
))""",
    ),
    (
        "md",
        r"""## 4 — Skew per data domain

Real data comes from domains (web text, code, papers). Routing analyses of trained models find
little domain specialisation with coarse experts (Mixtral, 8 experts top-2, arXiv 2401.04088 §5)
and much more with fine-grained ones (OLMoE, 64 top-8, arXiv 2409.02060; DeepSeek-V3 App. C).
Here the stream is split into three domains (`stream.domains`) and the loss-free routers of a
coarse (8 experts, top-2) and a finer (32 experts, top-4) gate are measured per domain on
held-out tokens of each domain (`moesim.estimate.routing.domain_skew`, the table a run writes as
`routing_by_domain.parquet`; here 20K tokens per domain instead of a run's 100K).""",
    ),
    (
        "code",
        r"""DOMAINS = [
    {"name": "web", "share": 0.6, "topics": 32},
    {"name": "code", "share": 0.25, "topics": 16},
    {"name": "papers", "share": 0.15, "topics": 16},
]
skew = {}
for label, moe in (("8 experts, top-2", {"routed_experts": 8, "top_k": 2}),
                   ("32 experts, top-4", {"routed_experts": 32, "top_k": 4})):
    sc = make_scenario(stream={"dim": 32, "domains": DOMAINS},
                       model={**BASE["model"], "moe": {**BASE["model"]["moe"], **moe}})
    run = train(sc, LossFree(kind="loss_free", gamma=1e-3))
    skew[label] = domain_skew(sc, "loss_free", run, SeedPlan(SEED), tokens_per_domain=20_000)

names = [d["name"] for d in DOMAINS] + ["pooled"]
fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
for i, (label, rows) in enumerate(skew.items()):
    values = [next(r["maxvio"] for r in rows if r["domain"] == n) for n in names]
    ax.bar(np.arange(len(names)) + (i - 0.5) * 0.4, values, 0.4, label=label)
ax.set_xticks(np.arange(len(names)), names)
ax.set(ylabel="MaxVio of the domain's load", title="loss-free routers, held-out tokens per domain")
ax.legend()
plt.show()


def worst(rows):
    per = [r for r in rows if r["domain"] != "pooled"]
    top = max(per, key=lambda r: r["maxvio"])
    pooled = next(r for r in rows if r["domain"] == "pooled")
    return top, pooled


(c_top, c_pool), (f_top, f_pool) = worst(skew["8 experts, top-2"]), worst(skew["32 experts, top-4"])
finer_more = f_top["maxvio"] > c_top["maxvio"]
display(Markdown(
    f"Pooled over the mix, MaxVio is {c_pool['maxvio']:.2f} with 8 experts and "
    f"{f_pool['maxvio']:.2f} with 32. One domain alone is more skewed: the most skewed domain "
    f"reaches MaxVio {c_top['maxvio']:.2f} ({c_top['domain']}) with 8 experts and "
    f"{f_top['maxvio']:.2f} ({f_top['domain']}) with 32, where the least-loaded expert gets "
    f"{f_top['min_over_mean']:.2f} of the mean load. "
    + ("The finer router is the more domain-skewed, as OLMoE is against Mixtral. "
       if finer_more else
       "Here the coarse router is the more domain-skewed, unlike OLMoE against Mixtral. ")
    + "A batch drawn from one domain (domain-packed data) is as unbalanced as its domain's row, "
    "whatever the pooled balance."
))""",
    ),
    (
        "md",
        r"""## 5 — What the dilemma costs on the quickstart cluster

The quickstart (`scenarios/quickstart.yaml`: 64 routed experts top-6 on 2 × 8 H100, pipeline 2 ×
expert 8) estimated with `moesim.estimate.estimate_run` under no balancing, two aux-loss weights
and the loss-free bias, shortened to 20M tokens so that it runs in seconds: the gate and the
engine run as in a full run, over a shorter timeline (early training, when the loss-free bias is
still converging). `imbalance_gpu_hours` is the part of the GPU-hours the routing imbalance adds
over perfectly balanced routing.""",
    ),
    (
        "code",
        r"""root = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
quick = load_scenario(root / "scenarios" / "quickstart.yaml")
strategies = [
    NoBalancing(kind="none"),
    AuxLoss(kind="aux_loss", alpha=1e-3, name="aux α=1e-3"),
    AuxLoss(kind="aux_loss", alpha=1e-2, name="aux α=1e-2"),
    LossFree(kind="loss_free", gamma=1e-3),
]
short = quick.model_copy(update={
    "strategies": strategies,
    "training": quick.training.model_copy(update={"total_tokens": 2e7, "sample_points": 2}),
    "output": quick.output.model_copy(update={"trace": False}),
})
est = estimate_run(short, workers=2)
price = short.cluster.price_usd_per_gpu_hour
rows = {name: s for name, s in est.summary.items()}
fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
names = list(rows)
ax.bar(names, [rows[n].balanced_gpu_hours for n in names], label="balanced routing")
ax.bar(names, [rows[n].gpu_hours - rows[n].balanced_gpu_hours for n in names],
       bottom=[rows[n].balanced_gpu_hours for n in names],
       label="added by imbalance and stragglers")
ax.set(ylabel="GPU-hours (20M tokens)", title="quickstart, shortened")
ax.legend()
plt.show()

lines = ["| strategy | GPU-hours | cost (USD) | imbalance GPU-hours | step time (s) | task loss |",
         "|---|---|---|---|---|---|"]
for n, s in rows.items():
    lines.append(f"| {n} | {s.gpu_hours:.4f} | {s.cost_usd:.3f} | {s.imbalance_gpu_hours:.4f} | "
                 f"{s.step_time_s:.3f} | {s.task_loss:.4f} |")
display(Markdown("\n".join(lines)))
full = quick.training.total_tokens / short.training.total_tokens
cheapest = min(rows, key=lambda n: rows[n].gpu_hours)
dearest = max(rows, key=lambda n: rows[n].gpu_hours)
gap = rows[dearest].gpu_hours - rows[cheapest].gpu_hours
display(Markdown(
    f"Over these 20M tokens on {short.cluster.gpus} H100 at ${price:.2f}/GPU-hour, "
    f"**{dearest}** costs {rows[dearest].gpu_hours:.3f} GPU-hours (${rows[dearest].cost_usd:.2f}) "
    f"and **{cheapest}** {rows[cheapest].gpu_hours:.3f} (${rows[cheapest].cost_usd:.2f}), "
    f"{100 * gap / rows[cheapest].gpu_hours:.0f} % more; the imbalance alone adds "
    f"{rows[dearest].imbalance_gpu_hours:.3f} GPU-hours under {dearest}. "
    f"At the same rate per token the full run's {quick.training.total_tokens:.1e} tokens "
    f"would differ by about {gap * full:.1f} GPU-hours (${gap * full * price:,.2f}) — an "
    f"extrapolation of early training, where balance is worst. "
    + (
        f"The cheapest strategy pays in task loss: {rows[cheapest].task_loss:.4f} against "
        f"{rows['none'].task_loss:.4f} without balancing."
        if rows[cheapest].task_loss > rows["none"].task_loss
        else f"This early the cheapest strategy pays no task loss ({rows[cheapest].task_loss:.4f} "
        f"against {rows['none'].task_loss:.4f} without balancing): the price in quality shows "
        f"over a longer run, as in the sweep of section 2."
    )
))""",
    ),
    (
        "code",
        r"""print(f"notebook trainings and measurements: {time.perf_counter() - started:.0f} s")""",
    ),
]


def build() -> nbformat.NotebookNode:
    """The notebook, cells in order, no outputs."""
    cells = [
        new_markdown_cell(text) if kind == "md" else new_code_cell(text) for kind, text in CELLS
    ]
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {
        "display_name": "Python 3",
        "language": "python",
        "name": "python3",
    }
    nb.metadata["language_info"] = {"name": "python"}
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"
    return nb


if __name__ == "__main__":
    nbformat.write(build(), OUT)
