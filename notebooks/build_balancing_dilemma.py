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

> **Note.** This notebook still shows the gate's earlier *teacher* objective
> (`gate.objective: teacher`, on a stream without the common direction, `stream.common: 0`),
> whose experts never learn. The default task is now a small MoE layer whose experts learn
> (`moesim.gate.experts`); its reproductions of the same results are asserted in
> `tests/gate/test_published_results.py` and summarised in `docs/model/gate.md`.

This notebook reproduces, *qualitatively*, six published results on MoE load balancing
(R1, R2, R3, R5, R6, R8 of `docs/model/gate.md`) with moesim's numerical gate. The same
experiments, at the same size and seed, are asserted (direction of each effect) in
`tests/gate/test_published_results.py`.

**The model.** A student router (16 routed experts, top-2, sigmoid scores unless stated) is trained
by Adam to reproduce a fixed random *teacher* router's weighted choice of experts on a synthetic
token stream (64 Zipf-popular topics in a 32-dimensional space). The task loss is the squared
error between the student's and the teacher's gate weights (`moesim.gate.teacher`); the teacher
overloads the experts of popular topics, so balancing the load has a real price in task loss, as
balancing has a price in perplexity in a real model. Each update sees 64 sequences × 16 tokens; a
run is 1,000 updates of one simulated layer.

**Metrics.**
- *MaxVio* = (max load − mean load) / mean load (arXiv 2408.15664 Eq. 4).
- *MaxVio_batch*: of each update's training batch, recorded per update; curves are smoothed over
  100 updates as in the paper's figures.
- *MaxVio_global*: the final router on 30 held-out batches of 64 sequences, loads pooled.
- *Task loss*: mean over the last 250 updates.

**Scale of α.** The task loss is not a language-model loss, so α values do not transfer from the
papers: here the aux loss only starts to matter around α ≈ 0.1–1 (the paper's 1e-4–1e-2 are
negligible next to the task gradient). The bias update speed γ acts on the sigmoid scores, whose
scale is the same as in the paper, and the paper's γ = 1e-3 is also the best here (R3).""",
    ),
    (
        "code",
        r'''import os

# The gate's matrices are small (1,024 tokens × 32 dims × 16 experts): BLAS threads only add
# overhead, and on a busy machine a lot of it. Set before NumPy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import time

import matplotlib.pyplot as plt
import numpy as np

from moesim.gate import train_gate
from moesim.gate.metrics import topic_expert_load
from moesim.gate.router import route, route_options
from moesim.gate.study import (
    frontier_at,
    head_mean,
    maxvio_by_batch,
    pareto_front,
    smooth,
    tail_mean,
)
from moesim.scenario import scenario_from_dict
from moesim.scenario.strategies import AuxLoss, Bias, Composite, LossFree, NoBalancing

STEPS, SEED, WINDOW = 1000, 11, 100
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
    """One gate run; every run uses the same seed, so the same teacher and token batches. The
    runs use the teacher objective and a stream without the common direction (see the note at
    the top)."""
    gate = scenario.gate.model_copy(update={"objective": "teacher"})
    stream = scenario.stream.model_copy(update={"common": 0.0})
    scenario = scenario.model_copy(update={"gate": gate, "stream": stream})
    return train_gate(scenario, spec, [], np.random.SeedSequence(SEED))


def smoothed(run, key):
    return smooth(run.column(key), WINDOW)


started = time.perf_counter()
scenario = make_scenario()
steps = np.arange(1, STEPS + 1)''',
    ),
    (
        "md",
        r"""## R1 — the auxiliary-loss dilemma

*Paper (Loss-Free Fig. 2, arXiv 2408.15664):* a larger α lowers MaxVio but hurts the language-model
objective; α = 0 leads to imbalance (collapse onto a few experts).

We sweep α of the micro-batch auxiliary loss `α·N·Σ f_i P_i` (Switch form, arXiv 2101.03961) from 0
to 3.""",
    ),
    (
        "code",
        r"""ALPHAS = [0.0, 0.03, 0.1, 0.3, 1.0, 3.0]
aux_runs = {}
for alpha in ALPHAS:
    spec = (
        NoBalancing(kind="none")
        if alpha == 0
        else AuxLoss(kind="aux_loss", alpha=alpha, name=f"aux α={alpha:g}")
    )
    aux_runs[alpha] = train(scenario, spec)
colors = plt.cm.viridis(np.linspace(0, 0.9, len(ALPHAS)))

fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
for (alpha, run), color in zip(aux_runs.items(), colors, strict=True):
    label = "α = 0 (no balancing)" if alpha == 0 else f"α = {alpha:g}"
    axes[0].plot(steps, smoothed(run, "maxvio_batch"), color=color, label=label)
    axes[1].plot(steps, smoothed(run, "task_loss"), color=color, label=label)
axes[0].set(
    yscale="log",
    xlabel="update",
    ylabel="MaxVio_batch (smoothed over 100)",
    title="Balance: a larger α balances better (up to α ≈ 1)",
)
axes[1].set(
    xlabel="update",
    ylabel="task loss (smoothed over 100)",
    title="Task loss: a strong α costs task loss",
)
axes[0].legend(title="auxiliary loss")
plt.show()

print(f"{'α':>6} {'late MaxVio_batch':>18} {'late task loss':>15}")
for alpha, run in aux_runs.items():
    late_maxvio, late_task = tail_mean(run, "maxvio_batch"), tail_mean(run, "task_loss")
    print(f"{alpha:6g} {late_maxvio:18.3f} {late_task:15.4f}")""",
    ),
    (
        "md",
        r"""**What the model shows.** Up to α = 1 the dilemma reproduces: late MaxVio_batch falls from
1.34 (α = 0) to 0.96 (α = 1) while the task loss rises from 0.153 to 0.279; weak α (0.03–0.1)
leaves the task loss unchanged (the aux loss's push towards unselected experts even acts as a
little exploration). Two departures from the paper: α = 0 does not *collapse* (MaxVio ≈ 1.3, the
imbalance of the teacher's own choices — the model has no positive feedback that starves experts of
training), and α = 3 balances well for ~600 updates and then loses balance again (MaxVio_batch
back to ≈ 1.2) while its aux loss keeps falling *below* its balanced value α. The loss
`Σ f_i P_i` treats the counts `f` as constants, so a strong α can lower it by moving the mean
scores `P` away from the overloaded experts without moving the top-k selection: the router games
the loss (its weight norm shrinks, logits flatten). The trade-off is therefore not monotone
at very large α.""",
    ),
    (
        "md",
        r"""### Interference gradients

*Paper (Loss-Free §2.6, Table 1):* a strong α balances but brings strong *interference gradients*
(the aux-loss gradient works against the task gradient); a weak α interferes little but leaves the
load imbalanced. Loss-free balancing has no interference by construction: the bias gets no gradient.

The gate records, per update, the cosine between `∂L_aux/∂W` and `∂L_task/∂W` on the router
weights and the norm ratio `‖∂L_aux/∂W‖ / ‖∂L_task/∂W‖` (both exactly 0 for loss-free).""",
    ),
    (
        "code",
        r"""fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
balanced = {a: r for a, r in aux_runs.items() if a > 0}
for (alpha, run), color in zip(balanced.items(), colors[1:], strict=True):
    axes[0].plot(steps, smoothed(run, "interference_cos"), color=color, label=f"α = {alpha:g}")
    axes[1].plot(steps, smoothed(run, "interference_ratio"), color=color, label=f"α = {alpha:g}")
axes[0].axhline(0, color="black", lw=0.8, ls="--", label="loss-free (0 by construction)")
axes[0].set(
    xlabel="update",
    ylabel="cos(∇L_aux, ∇L_task), smoothed",
    title="Direction: the aux gradient opposes the task's",
)
axes[0].legend(fontsize=8)
axes[1].set(
    yscale="log",
    xlabel="update",
    ylabel="‖∇L_aux‖ / ‖∇L_task‖, smoothed",
    title="Relative size (loss-free: 0, off this log scale)",
)
alphas = np.array(list(balanced))
axes[2].plot(
    alphas, [tail_mean(r, "interference_cos") for r in balanced.values()], "o-", color="C0"
)
axes[2].axhline(0, color="C0", lw=0.8, ls="--")
axes[2].set(xscale="log", xlabel="α", title="Interference against α (last 250 updates)")
axes[2].set_ylabel("cosine", color="C0")
twin = axes[2].twinx()
twin.plot(alphas, [tail_mean(r, "interference_ratio") for r in balanced.values()], "s-", color="C1")
twin.set_yscale("log")
twin.set_ylabel("norm ratio", color="C1")
plt.show()""",
    ),
    (
        "md",
        r"""**What the model shows.** The aux-loss gradient points against the task gradient (cosine
−0.27 at α = 0.03, −0.50 at α = 0.1–0.3) and its relative size grows with α (norm ratio 0.33 →
0.85 → 1.8 → 7 from α = 0.03 to 3): at α ≥ 1 the aux gradient outweighs the task gradient, which
is where the task loss rises. At α = 3 the cosine turns slightly positive — the aux gradient is
no longer opposing the task, it is gaming its own loss (above).""",
    ),
    (
        "md",
        r"""## R2 — loss-free sits below the auxiliary-loss frontier

*Paper (Loss-Free Table 2, arXiv 2408.15664):* loss-free balancing reaches MaxVio_global ≈ 0.04
against 0.5–0.7 for the aux loss, with a better objective.

Each α gives one point (MaxVio_global, task loss); the lower-left envelope of those points is the
aux-loss frontier. Loss-free (sign rule, γ = 1e-3) should lie on or below it.""",
    ),
    (
        "code",
        r"""GAMMAS = [1e-4, 1e-3, 1e-2]
lf_runs = {
    g: train(scenario, LossFree(kind="loss_free", gamma=g, name=f"loss-free γ={g:g}"))
    for g in GAMMAS
}
loss_free = lf_runs[1e-3]

aux_x = np.array([maxvio_by_batch(scenario, run, 64)[1] for run in aux_runs.values()])
aux_y = np.array([tail_mean(run, "task_loss") for run in aux_runs.values()])
lf_x = maxvio_by_batch(scenario, loss_free, 64)[1]
lf_y = tail_mean(loss_free, "task_loss")
front = pareto_front(aux_x, aux_y)

fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
ax.plot(aux_x[front], aux_y[front], color="grey", lw=1.5, zorder=1, label="aux-loss frontier")
ax.plot(
    [0.03, aux_x[front][0]],
    [aux_y[front][0]] * 2,
    color="grey",
    lw=1,
    ls="--",
    zorder=1,
    label="(no α balances better)",
)
for alpha, x, y, color in zip(ALPHAS, aux_x, aux_y, colors, strict=True):
    ax.scatter(x, y, color=color, s=60, zorder=3, label=f"aux α = {alpha:g}")
for gamma, marker in ((1e-4, "v"), (1e-2, "^")):
    run = lf_runs[gamma]
    ax.scatter(
        maxvio_by_batch(scenario, run, 64)[1],
        tail_mean(run, "task_loss"),
        marker=marker,
        s=70,
        color="salmon",
        zorder=3,
        label=f"loss-free γ = {gamma:g}",
    )
ax.scatter(lf_x, lf_y, marker="*", s=250, color="C3", zorder=4, label="loss-free γ = 1e-3")
ax.set(
    xscale="log",
    xlim=(0.03, 4),
    xlabel="MaxVio_global (held-out, final router)",
    ylabel="task loss (last 250 updates)",
    title="Loss-free against the auxiliary-loss trade-off",
)
ax.legend(loc="upper left", fontsize=8, ncol=2)
plt.show()
print(
    f"loss-free: MaxVio_global {lf_x:.3f}, task loss {lf_y:.4f}; best aux MaxVio_global "
    f"{aux_x.min():.3f}; aux frontier at the loss-free balance: "
    f"{frontier_at(aux_x, aux_y, lf_x):.4f}"
)""",
    ),
    (
        "md",
        r"""**What the model shows.** Reproduced: loss-free reaches MaxVio_global 0.08 where the best
α reaches 0.94 (α = 1), at a task loss of 0.167 against 0.279 for that α — below the frontier.
(Across seeds 11–13 loss-free's MaxVio_global is 0.03–0.08, the best α's 0.59–0.94.) The other
update speeds also lie below the frontier. Loss-free does *not* beat the unbalanced runs on task
loss (α = 0: 0.153): in this model, where experts are fixed and never starve, balance only costs;
loss-free pays much less for it.""",
    ),
    (
        "md",
        r"""## R3 — the bias update speed γ

*Paper (Loss-Free Fig. 4, arXiv 2408.15664):* u = 1e-4 converges slowly; u = 1e-2 balances fast
but fluctuates late in training; 1e-3 is best.""",
    ),
    (
        "code",
        r"""fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
for gamma, run in lf_runs.items():
    axes[0].plot(steps, smoothed(run, "maxvio_batch"), label=f"γ = {gamma:g}")
    axes[1].plot(steps, run.column("bias_abs_mean"), label=f"γ = {gamma:g}")
axes[0].set(
    yscale="log",
    xlabel="update",
    ylabel="MaxVio_batch (smoothed over 100)",
    title="Loss-free balance against the update speed",
)
axes[1].set(yscale="log", xlabel="update", ylabel="mean |b|", title="Size of the bias")
axes[0].legend()
plt.show()
for gamma, run in lf_runs.items():
    early, late = head_mean(run, "maxvio_batch", 200), tail_mean(run, "maxvio_batch")
    print(f"γ = {gamma:g}: MaxVio_batch first 200 updates {early:.3f}, last 250 {late:.3f}")""",
    ),
    (
        "md",
        r"""**What the model shows.** Reproduced: γ = 1e-4 is still imbalanced at the end (late
MaxVio_batch 0.87; the bias has not grown to the size needed), γ = 1e-2 balances quickly but then
dithers by ±γ around the equilibrium, which is large next to the score gaps (late 0.47), and
γ = 1e-3 ends best (0.20).""",
    ),
    (
        "md",
        r"""## R5 — softmax routers and the sign rule

*Paper (Loss-Free App. C, arXiv 2408.15664):* with a softmax gate the authors switch to the
proportional rule `b += u·e`, because "due to the normalization property of softmax … the score gap
between two experts [is] sensitive to the scores of other experts"; softmax is "more sensitive to
load imbalance".

**A configuration refused in scenario files.** A scenario with `router.score: softmax` and a
sign-rule bias (`loss_free`, or `composite` with `bias.rule: sign`) fails validation
(`moesim.scenario.strategies.check_strategies`), as Megatron refuses an expert bias with softmax
(Megatron-LM TransformerConfig): a fixed-size step is mis-scaled against softmax score gaps. For this experiment
we build the softmax scenario with `Scenario.model_copy(update=...)`, which bypasses validation, and
hand the strategy to `train_gate` directly.""",
    ),
    (
        "code",
        r"""softmax = scenario.model_copy(
    update={"router": scenario.router.model_copy(update={"score": "softmax"})}
)
router_runs = {
    "sigmoid, sign γ=1e-3": (scenario, loss_free),
    "softmax, sign γ=1e-3 (refused in scenario files)": (
        softmax,
        train(softmax, LossFree(kind="loss_free", gamma=1e-3)),
    ),
    "softmax, sign γ=3e-4 (refused in scenario files)": (
        softmax,
        train(softmax, LossFree(kind="loss_free", gamma=3e-4)),
    ),
    "softmax, proportional γ=1e-3 (the paper's choice)": (
        softmax,
        train(softmax, Composite(kind="composite", bias=Bias(rule="proportional", gamma=1e-3))),
    ),
}
fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), constrained_layout=True)
styles = ["-", "--", ":", "-."]
for (label, (_, run)), style in zip(router_runs.items(), styles, strict=True):
    axes[0].plot(steps, smoothed(run, "maxvio_batch"), ls=style, label=label)
axes[0].set(
    yscale="log",
    xlabel="update",
    ylabel="MaxVio_batch (smoothed over 100)",
    title="Loss-free balance: sigmoid against softmax",
)
axes[0].legend(fontsize=8)
labels = list(router_runs)
late = [tail_mean(run, "maxvio_batch") for _, run in router_runs.values()]
glob = [maxvio_by_batch(sc, run, 64)[1] for sc, run in router_runs.values()]
pos = np.arange(len(labels))
axes[1].bar(pos - 0.2, late, 0.4, label="late MaxVio_batch")
axes[1].bar(pos + 0.2, glob, 0.4, label="MaxVio_global")
axes[1].set_xticks(pos, [lab.split(" (")[0].replace(", ", "\n") for lab in labels], fontsize=8)
axes[1].set(ylabel="MaxVio", title="Late balance")
axes[1].legend()
plt.show()
for label, value, g in zip(labels, late, glob, strict=True):
    print(f"{label:52s} late MaxVio_batch {value:.3f}  MaxVio_global {g:.3f}")""",
    ),
    (
        "md",
        r"""**What the model shows.** Reproduced in direction, modestly: at the paper's γ = 1e-3,
softmax + sign balances worse late in training than sigmoid + sign (late MaxVio_batch 0.23 against
0.20; 15–20 % worse on seeds 11–13), and the proportional rule restores it (0.19). MaxVio_global
is equal on this seed (0.079) and worse for softmax + sign on seeds 12–13 (0.12 and 0.17 against
0.03 and 0.05). The cause in this
model is the one the refusal names, in its simplest form: softmax scores are about 1/16 each, so
their gaps are several times smaller than sigmoid gaps and a fixed step of 1e-3 is relatively too
large (softmax + sign balances *faster* early, then dithers more). Rescaling the step (γ = 3e-4)
makes softmax + sign as good as sigmoid here — the score scale of this small model is nearly
stationary, so the paper's stronger point (the gap depends on the *other* experts' scores and
drifts during training) is not tested. Task losses are not compared across score functions: the
teacher's weights are a softmax, which a softmax student matches more easily.""",
    ),
    (
        "md",
        r"""## R6 — computation batch size

*Paper (Loss-Free Fig. 5, §5.1, arXiv 2408.15664):* as the computation batch grows (micro-batch ×
expert-parallel ranks), loss-free MaxVio keeps falling, while the aux-loss baseline stays at a
roughly constant level.

The final routers route held-out computation batches of 1–256 sequences (30 batches per size).""",
    ),
    (
        "code",
        r"""SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
compare = {
    "loss-free γ = 1e-3": loss_free,
    "aux α = 0.3": aux_runs[0.3],
    "aux α = 1": aux_runs[1.0],
    "no balancing": aux_runs[0.0],
}
fig, ax = plt.subplots(figsize=(7.5, 4.5), constrained_layout=True)
for (label, run), marker in zip(compare.items(), "osD^", strict=True):
    values = [maxvio_by_batch(scenario, run, size)[0] for size in SIZES]
    ax.plot(SIZES, values, marker=marker, label=label)
    print(f"{label:20s}", " ".join(f"{v:.2f}" for v in values))
ax.set(
    xscale="log",
    yscale="log",
    xlabel="computation batch (sequences of 16 tokens)",
    ylabel="MaxVio of the computation batch",
    title="Balance against computation batch size",
)
ax.set_xticks(SIZES, [str(s) for s in SIZES])
ax.legend()
plt.show()""",
    ),
    (
        "md",
        r"""**What the model shows.** Reproduced: loss-free MaxVio falls steadily with the batch (0.85
at 4 sequences, 0.13 at 256), since its balance holds on average and small batches only add
sampling noise; the aux-loss runs flatten out at their global imbalance (α = 0.3: 1.5 → 1.2;
α = 1: ≈ 0.94) — they balance each micro-batch's *probabilities*, not the global load.""",
    ),
    (
        "md",
        r"""## R8 — balance scope with domain-homogeneous micro-batches

*Paper (Demons in the Detail, Table 1, arXiv 2501.11873; docs/model/gate.md):* with packed, single-domain
micro-batches, a balance loss counted per micro-batch forces every domain to spread over all
experts, which blocks specialisation and hurts quality; counting over the global batch helps. The
same holds for the aux-free bias: updated from local counts, PPL goes from 8.080 to 8.521.

The stream is switched to `packing: domain` (each micro-batch of 4 sequences shares one dominant
topic, 90 % of its tokens) with `parallelism.micro_batch_size: 4`, so a gate batch holds 16
micro-batches. We compare the aux loss (α = 0.3) counted per sequence (Balance BSZ 1), per
micro-batch (4) and over the global batch (64), and the loss-free bias updated from micro-batch or
global counts (composite strategy, `bias: {rule: sign, gamma: 1e-3, scope: ...}`).""",
    ),
    (
        "code",
        r"""packed = make_scenario(stream={"dim": 32, "packing": "domain"}, parallelism={"micro_batch_size": 4})
SCOPES = {"sequence": 1, "micro_batch": 4, "global": 64}
scope_aux = {s: train(packed, AuxLoss(kind="aux_loss", alpha=0.3, scope=s)) for s in SCOPES}
scope_lf = {
    s: train(packed, Composite(kind="composite", bias=Bias(rule="sign", gamma=1e-3, scope=s)))
    for s in ("micro_batch", "global")
}

fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
for runs, label, marker in (
    (scope_aux, "aux loss α = 0.3", "o"),
    (scope_lf, "loss-free γ = 1e-3", "*"),
):
    bsz = [SCOPES[s] for s in runs]
    axes[0].plot(
        bsz, [tail_mean(r, "task_loss") for r in runs.values()], marker=marker, ms=10, label=label
    )
    axes[1].plot(
        bsz,
        [maxvio_by_batch(packed, r, 64)[1] for r in runs.values()],
        marker=marker,
        ms=10,
        label=label,
    )
for ax in axes:
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(SCOPES.values()), [f"{v}\n({k})" for k, v in SCOPES.items()])
    ax.set_xlabel("Balance BSZ: sequences the counts cover (scope)")
    ax.legend()
axes[0].set(ylabel="task loss (last 250 updates)", title="Task loss against balance scope")
axes[1].set(yscale="log", ylabel="MaxVio_global", title="Global balance against balance scope")
plt.show()
for name, runs in (("aux", scope_aux), ("loss-free", scope_lf)):
    for s, r in runs.items():
        print(
            f"{name:9s} {s:11s} task loss {tail_mean(r, 'task_loss'):.4f}  teacher capture "
            f"{tail_mean(r, 'teacher_capture'):.3f}  MaxVio_global "
            f"{maxvio_by_batch(packed, r, 64)[1]:.3f}"
        )""",
    ),
    (
        "md",
        r"""Where each topic's tokens go: the share of a topic's assignments each expert takes (the 12
most popular topics, held-out mixed batches). Specialisation shows as rows concentrated on one or
two experts; the title gives the mean entropy of a row (1 bit = two experts equally, 4 bits = all
16).""",
    ),
    (
        "code",
        r"""def topic_shares(scenario, run, n_topics=12, sequences=256, seed=5):
    x, topics = run.stream.sample(
        sequences, scenario.gate.tokens_per_sequence, np.random.default_rng(seed)
    )
    routing = route(x.reshape(-1, x.shape[-1]), run.final[0], **route_options(scenario))
    load = topic_expert_load(
        routing.selected, topics.ravel(), scenario.stream.topics, scenario.model.moe.routed_experts
    )[:n_topics].astype(float)
    return load / np.maximum(load.sum(axis=1, keepdims=True), 1)


panels = {
    "aux, micro-batch scope": scope_aux["micro_batch"],
    "aux, global scope": scope_aux["global"],
    "loss-free, micro-batch counts": scope_lf["micro_batch"],
    "loss-free, global counts": scope_lf["global"],
}
fig, axes = plt.subplots(1, 4, figsize=(16, 3.8), constrained_layout=True, sharey=True)
for ax, (title, run) in zip(axes, panels.items(), strict=True):
    shares = topic_shares(packed, run)
    entropy = -np.sum(shares * np.log2(np.where(shares > 0, shares, 1)), axis=1).mean()
    image = ax.imshow(shares, vmin=0, vmax=0.5, cmap="magma", aspect="auto")
    ax.set(title=f"{title}\nmean entropy {entropy:.2f} bits", xlabel="expert")
axes[0].set_ylabel("topic (by popularity)")
fig.colorbar(image, ax=axes, label="share of the topic's assignments")
plt.show()""",
    ),
    (
        "md",
        r"""**What the model shows.** For the auxiliary loss, reproduced: with domain-homogeneous
micro-batches, counting per micro-batch (or per sequence) gives a clearly higher task loss than
counting over the global batch (0.272 against 0.196; 0.27–0.28 against 0.20–0.25 on seeds
11–13) and a lower teacher capture (0.49 against 0.62), while it does not even balance the global
load better (MaxVio_global 1.85 against 1.39): the heat maps show each topic spread over more
experts instead of specialising (mean row entropy 2.60 bits against 1.99).

For the loss-free bias, **not reproduced**: updating the bias from micro-batch counts gives a
*lower* task loss than global counts (0.160 against 0.175; lower on all of seeds 11–13), because it
balances far less (MaxVio_global 0.84 against 0.18). In this model the bias is one vector shared by
all micro-batches, and the micro-batch-scope update averages the signs of the 16 micro-batches'
errors: an expert moves down only if it is over-loaded in most micro-batches, i.e. the update
balances the *median* micro-batch load rather than the mean, which with domain-packed batches is a
weak, partial balancing. It cannot force each domain to spread (a single shared bias cannot depend
on the micro-batch's domain), so it does not fight specialisation; and since in this model
imbalance costs nothing in task loss (experts are fixed and never starve), balancing less simply
costs less. Demons' degradation (PPL 8.080 → 8.521) likely needs what the model leaves out:
experts that learn (an expert the router neglects stops improving), and biases updated more often
or per rank from local counts, which then chase each micro-batch's domain. We keep the stream and
the objective as they are rather than tune them until this appears.""",
    ),
    (
        "md",
        r"""## Summary

| Result | Paper | This model |
|---|---|---|
| R1 | larger α: lower MaxVio, higher loss | reproduced up to α = 1; α = 3 games the loss and re-imbalances late; no collapse at α = 0 |
| R2 | loss-free below the aux frontier | reproduced: MaxVio_global 0.08 vs ≥ 0.94, lower task loss than the best-balancing α |
| R3 | γ = 1e-3 best; 1e-4 slow; 1e-2 oscillates | reproduced |
| R5 | softmax needs the proportional rule | reproduced at γ = 1e-3 (sign rule's step mis-scaled for softmax); a smaller sign step also fixes it here |
| R6 | loss-free MaxVio falls with the computation batch; aux plateaus | reproduced |
| R8 | micro-batch scope hurts quality | reproduced for the aux loss; **not** for the loss-free bias (local counts balance less and cost less) |""",
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
