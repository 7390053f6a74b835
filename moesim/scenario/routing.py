"""Scenario sections for the numerical gate: router, token stream, gate training.

``router`` says how a token picks its experts (docs/model/gate.md; DeepSeek-V3, arXiv 2412.19437
§2.1.2; DeepSeek-V2, arXiv 2405.04434 §2.2; Megatron-LM megatron/core/transformer/moe/router.py):
the score function,
the gate values, group-limited routing (``node_limit``, ``device_limit`` or an explicit
``num_groups``/``group_topk`` pair; at most one of the three) and an optional expert capacity
with token dropping (``capacity``; absent = dropless). ``stream`` shapes the synthetic tokens the
routers see: topics with Zipf popularity, per-sequence topic mixtures, optional domain-packed
micro-batches and a data-mix drift over training. ``gate`` sets the gate's own training and how
its simulated layers stand for the model's MoE layers (``layers_simulated``, ``layer_map``), or
replaces the synthetic gate by a recorded trace of expert loads (``trace``).

Cross-field checks that need the whole scenario (the parallel layout, the model's experts) live
in :meth:`Router.check_scenario`, which :class:`~moesim.scenario.schema.Scenario` calls last; its
errors start with the dotted field path they blame (``router.device_limit: …``).

Example (DeepSeek-V2-like routing: softmax over all experts, not renormalised, 3 devices per
token, device-level dropping at capacity 1.0 with 10% of the sequences exempt)::

    router:
      score: softmax
      normalize: false
      device_limit: 3
      capacity: {factor: 1.0, level: device, policy: probs, exempt_fraction: 0.1}
    stream: {packing: domain, domain_share: 0.9, drift_tokens: 2.0e9}
    gate: {layers_simulated: 4, layer_map: blocks}
"""

from __future__ import annotations

import math
import warnings
from pathlib import PurePath
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, model_validator

from moesim.scenario.base import Frozen, PositiveFloat, PositiveInt

if TYPE_CHECKING:
    from moesim.scenario.schema import Scenario

UnitInterval = Annotated[float, Field(ge=0, le=1)]
Count = Annotated[int, Field(gt=0, le=1_048_576)]
"""A gate size (sequences, tokens, dimensions, steps): at most 2^20."""


class Capacity(Frozen):
    """Expert capacity and token dropping (DeepSeek-V2, arXiv 2405.04434 §2.2 "Device-level token
    dropping", §5.1,
    Megatron-LM ``moe_expert_capacity_factor``).

    Capacity is counted per router call — per micro-batch of one rank: ``T`` tokens, ``K`` experts
    each. At ``level: expert`` every expert keeps at most ``ceil(T·K/N·factor)`` assignments; at
    ``level: device`` every expert-parallel rank (its ``N/D`` experts together) keeps at most
    ``ceil(T·K/D·factor)``, DeepSeek-V2's budget at ``factor: 1.0``. Assignments over the budget
    are dropped (the token skips that expert through the residual).
    """

    factor: PositiveFloat = Field(
        ge=0.01,
        le=1000,
        description="capacity factor: the budget is this multiple of the balanced load; "
        "larger drops fewer tokens (1.0 = exactly the mean load)",
    )
    policy: Literal["probs", "position"] = Field(
        "probs",
        description="which assignments an over-budget expert/device drops: probs = the lowest "
        "gate values; position = the latest positions in the sequence",
    )
    level: Literal["expert", "device"] = Field(
        "expert",
        description="expert = a budget per expert (Switch/Megatron); device = one budget per "
        "expert-parallel rank shared by its experts (DeepSeek-V2)",
    )
    exempt_fraction: UnitInterval = Field(
        0.0,
        description="fraction of sequences whose tokens are never dropped (V2 exempts about "
        "0.1); their assignments still use up the budget first",
    )


class Router(Frozen):
    """How tokens pick experts (docs/model/gate.md; DeepSeek-V3, arXiv 2412.19437 §2.1.2; "
    "DeepSeek-V2, arXiv 2405.04434 §2.2; Megatron-LM megatron/core/transformer/moe/router.py)."""

    score: Literal["sigmoid", "softmax"] = Field(
        "sigmoid",
        description="affinity function: element-wise sigmoid (DeepSeek-V3) or softmax over the "
        "routed experts (DeepSeek-V2, Mixtral)",
    )
    normalize: bool = Field(True, description="normalise gate values over the selected experts")
    scaling_factor: PositiveFloat = Field(
        1.0, le=1000, description="multiplies normalised gate values"
    )
    topk_before_softmax: bool = Field(
        False,
        description="softmax only: true = top-k first, gate values = softmax over the selected "
        "logits (Mixtral; needs normalize); false = softmax over all experts, then top-k "
        "(with normalize: false, DeepSeek-V2's unnormalised gates)",
    )
    node_limit: PositiveInt | None = Field(
        None, description="each token reaches at most this many nodes of its EP group"
    )
    device_limit: PositiveInt | None = Field(
        None,
        description="each token reaches at most this many expert-parallel ranks (DeepSeek-V2 "
        "device-limited routing, M = 3): groups = the EP ranks",
    )
    num_groups: PositiveInt | None = Field(
        None,
        description="explicit group-limited routing: contiguous expert groups (must divide the "
        "routed experts); set together with group_topk",
    )
    group_topk: PositiveInt | None = Field(
        None, description="groups a token may use when num_groups is set (≤ num_groups)"
    )
    capacity: Capacity | None = Field(
        None, description="expert capacity and token dropping; absent = dropless (DeepSeek-V3)"
    )

    @model_validator(mode="after")
    def _check(self) -> Router:
        if self.topk_before_softmax and self.score != "softmax":
            raise ValueError("topk_before_softmax: only meaningful with score: softmax")
        if self.topk_before_softmax and not self.normalize:
            raise ValueError(
                "normalize: a softmax over the selected logits always sums to 1; set normalize: "
                "true, or topk_before_softmax: false for unnormalised gates"
            )
        if (self.num_groups is None) != (self.group_topk is None):
            missing = "group_topk" if self.group_topk is None else "num_groups"
            raise ValueError(f"{missing}: num_groups and group_topk must be given together")
        if (
            self.group_topk is not None
            and self.num_groups is not None
            and self.group_topk > self.num_groups
        ):
            raise ValueError(
                f"group_topk: {self.group_topk} is larger than num_groups ({self.num_groups})"
            )
        limits = [
            name
            for name, value in (
                ("node_limit", self.node_limit),
                ("device_limit", self.device_limit),
                ("num_groups", self.num_groups),
            )
            if value is not None
        ]
        if len(limits) > 1:
            raise ValueError(f"{limits[1]}: cannot be combined with {limits[0]} (one group level)")
        return self

    def check_scenario(self, scenario: Scenario) -> None:
        """Checks that need the rest of the scenario; raises ``ValueError("path: message")``.

        - ``router.num_groups`` must divide ``model.moe.routed_experts``;
        - ``router.device_limit`` ≤ the expert-parallel ranks (``parallelism.expert``);
        - the kept groups (nodes, devices, groups) must hold at least ``top_k`` experts;
        - ``gate.trace`` cannot be combined with a capacity (a trace records loads as processed).
        """
        moe = scenario.model.moe_spec
        n_experts, top_k = moe.routed_experts, moe.top_k
        ep = scenario.parallelism.expert
        if self.num_groups is not None and self.group_topk is not None:
            if n_experts % self.num_groups:
                raise ValueError(
                    f"router.num_groups: {self.num_groups} groups do not divide the {n_experts} "
                    "routed experts"
                )
            _check_holds(
                "router.group_topk", self.group_topk, n_experts // self.num_groups, top_k, "group"
            )
        if self.device_limit is not None:
            if self.device_limit > ep:
                raise ValueError(
                    f"router.device_limit: {self.device_limit} exceeds the {ep} expert-parallel "
                    "rank(s) of an EP group"
                )
            _check_holds("router.device_limit", self.device_limit, n_experts // ep, top_k, "rank")
        if self.node_limit is not None and self.node_limit < scenario.ep_nodes:
            per_node = n_experts // scenario.ep_nodes
            _check_holds("router.node_limit", self.node_limit, per_node, top_k, "node")
        if scenario.gate.trace is not None and self.capacity is not None:
            raise ValueError(
                "router.capacity: a gate.trace replays loads as processed; drop the capacity"
            )
        for message in slow_bias_messages(scenario):
            warnings.warn(message, BiasSpeedWarning, stacklevel=2)


class BiasSpeedWarning(UserWarning):
    """A loss-free bias step γ below the gate router's largest score change per update
    (:func:`score_step_bound`): the bias can fall behind the router's learning."""


def score_step_bound(scenario: Scenario) -> float:
    """The largest change one Adam step can make to a router score of the gate:
    ``slope · gate.learning_rate · E‖u‖₁`` (docs/model/gate.md, "Loss-free stability").

    Adam moves every router weight by at most about ``learning_rate`` per update, so a logit
    ``w_i·u`` moves by at most ``learning_rate · ‖u‖₁``; a sigmoid score by at most a quarter of
    that (σ' ≤ 1/4), a softmax probability by at most half (``Σ_j |∂p_i/∂z_j| ≤ 2 p_i(1 − p_i)``).
    The stream's inputs (unit centroid, common direction of norm ``common``, noise of RMS norm
    ``noise``) have coordinates of variance ``(1 + common² + noise²)/dim``, close to Gaussian,
    hence ``E‖u‖₁ = √(2·dim/π) · √(1 + common² + noise²)``.
    """
    stream = scenario.stream
    slope = 0.25 if scenario.router.score == "sigmoid" else 0.5
    l1 = math.sqrt(2.0 * stream.dim / math.pi) * math.sqrt(1.0 + stream.common**2 + stream.noise**2)
    return slope * scenario.gate.learning_rate * l1


def slow_bias_messages(scenario: Scenario) -> list[str]:
    """One message per strategy whose additive sign-rule bias starts with γ below
    :func:`score_step_bound` (none with ``gate.trace``, which trains no router)."""
    if scenario.gate.trace is not None:
        return []
    bound = score_step_bound(scenario)
    out = []
    for i, strategy in enumerate(scenario.strategies):
        bias = strategy.canonical().bias
        if bias is None or bias.mode != "add" or bias.rule != "sign":
            continue
        gamma = bias.gamma_at(0.0)
        if 0 < gamma < bound:
            out.append(
                f"strategies[{i}]: the bias step γ = {gamma:g} is below the largest change "
                f"{bound:.2g} one gate update can make to a router score (¼·gate.learning_rate·"
                f"E‖u‖₁, docs/model/gate.md 'Loss-free stability'): the bias can lag the "
                f"router's learning and the gate's balance converge late; raise γ above it or "
                f"lower gate.learning_rate below {gamma / bound * scenario.gate.learning_rate:.2g}"
            )
    return out


def _check_holds(path: str, kept: int, per_group: int, top_k: int, what: str) -> None:
    if kept * per_group < top_k:
        raise ValueError(
            f"{path}: {kept} {what}(s) of {per_group} experts cannot hold top_k = {top_k} experts"
        )


class Domain(Frozen):
    """One data domain of the stream (a data source such as code, web text or papers): a block
    of topics that its sequences draw from, and its share of the sequences."""

    name: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="label in routing_by_domain.parquet (letters, digits, _ . -; not 'pooled')",
    )
    share: Annotated[float, Field(gt=0, le=1)] = Field(
        description="share of the stream's sequences from this domain; shares sum to 1"
    )
    topics: Count = Field(
        description="topics of this domain (its sequences mix only these); the domains' topics "
        "sum to stream.topics, taken in order as contiguous blocks"
    )


class Stream(Frozen):
    """Synthetic token stream: sequences drawn from a mixture of topics (see
    :mod:`moesim.gate.stream` for the generative model).

    Each topic has a random unit centroid in the gate's ``dim``-dimensional representation space;
    topic popularity follows a Zipf law with ``zipf_exponent``; each sequence draws a topic
    mixture from a Dirichlet with ``concentration`` (small → one dominant topic per sequence);
    each token is its topic's centroid plus isotropic Gaussian ``noise``. ``packing: domain``
    makes each rank's micro-batch share one dominant topic (packed, domain-sorted data);
    ``drift_tokens`` rotates the popularity ranking as training proceeds.
    """

    topics: Count = Field(
        64, description="number of topics (domains); more topics spread the load more evenly"
    )
    zipf_exponent: Annotated[float, Field(ge=0, le=10)] = Field(
        1.0,
        description="popularity of the topic of rank r ∝ 1/r^this; 0 = all topics equally "
        "common, larger = a few topics dominate (more expert-load skew)",
    )
    concentration: PositiveFloat = Field(
        0.3,
        ge=1e-6,
        le=1e6,
        description="Dirichlet concentration of a sequence's topic mixture (α = this·topics·"
        "popularity): small = one dominant topic per sequence, large = every sequence mixes "
        "topics by their popularity",
    )
    noise: Annotated[float, Field(ge=0, le=100)] = Field(
        0.5,
        description="RMS norm of the Gaussian noise around a topic centroid (unit norm): larger "
        "blurs topics, so routers separate them less cleanly",
    )
    dim: PositiveInt = Field(64, le=4096, description="dimension of the router input vectors")
    common: Annotated[float, Field(ge=0, le=1e3)] = Field(
        1.0,
        description="norm of one direction added to every token (hidden states of trained "
        "language models share a large common component: Ethayarajh, arXiv 1909.00512); it "
        "lets an expert that wins some tokens win others (the rich-get-richer path to routing "
        "collapse); 0 = topic centroids only",
    )
    packing: Literal["mixed", "domain"] = Field(
        "mixed",
        description="mixed = sequences of a micro-batch are independent; domain = all sequences "
        "of one rank's micro-batch share a dominant topic drawn by popularity (packed, "
        "domain-sorted data, arXiv 2501.11873), so micro-batch loads are far less balanced",
    )
    domain_share: UnitInterval = Field(
        0.9,
        description="with packing: domain, the share of each sequence's topic mixture given to "
        "its micro-batch's dominant topic (the rest is the usual Dirichlet mixture); "
        "1 = single-topic micro-batches",
    )
    domains: tuple[Domain, ...] | None = Field(
        None,
        max_length=256,
        description="data domains as blocks of topics, each with its share of the sequences: a "
        "sequence (a document) comes from one domain and mixes only its topics, the Zipf law "
        "ranks topics within each domain, and packed micro-batches share a domain; none = one "
        "domain of all topics (docs/model/gate.md, 'Data domains')",
    )
    domain_overlap: UnitInterval = Field(
        0.5,
        description="with domains: the share of each sequence's topic mixture drawn from all "
        "topics at the stream's popularity (tokens of kinds every domain has: function words, "
        "punctuation, numbers) rather than from its own domain's topics; 0 = disjoint domains",
    )
    drift_tokens: PositiveFloat | None = Field(
        None,
        ge=1,
        le=1e16,
        description="data-mix drift: every this many tokens trained the popularity ranking "
        "moves one topic along (topic k takes the popularity topic k−1 had), blended linearly "
        "in between, so the hot experts move and a balancer must track them; none = a fixed mix",
    )

    @model_validator(mode="after")
    def _check_domains(self) -> Stream:
        if self.domains is None:
            return self
        names = [d.name for d in self.domains]
        if "pooled" in names:
            raise ValueError("domains: 'pooled' names all domains together; pick another name")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"domains: names must be unique; repeated: {', '.join(repeated)}")
        n_topics = sum(d.topics for d in self.domains)
        if n_topics != self.topics:
            raise ValueError(
                f"domains: their topics sum to {n_topics}, but stream.topics is {self.topics}"
            )
        total = sum(d.share for d in self.domains)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"domains: shares sum to {total:.6g}; they must sum to 1")
        return self


class Trace(Frozen):
    """A recorded per-step, per-layer expert load to replay instead of the synthetic gate
    (:mod:`moesim.gate.trace`).

    The file has columns ``step, layer, expert, tokens`` (the shape of Megatron's logged
    ``tokens_per_expert``): ``tokens`` (token, expert) assignments expert ``expert`` received in
    simulated layer ``layer`` (0-based, ``< gate.layers_simulated``) at optimizer step ``step``.
    Experts without a row got 0. Extra columns are ignored.
    """

    path: str = Field(
        min_length=1,
        max_length=4096,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="CSV or Parquet file (relative to the working directory)",
    )
    format: Literal["csv", "parquet"] = Field(
        description="file format; defaults from the suffix (.csv, .parquet/.pq)"
    )
    split: Literal["multinomial", "even"] = Field(
        "multinomial",
        description="how a step's per-expert loads are dealt to micro-batches and source ranks: "
        "multinomial = at random (without replacement, each cell gets exactly its share); "
        "even = as evenly as integers allow",
    )
    rescale: bool = Field(
        True,
        description="rescale each step's loads to the scenario's global batch (top_k × tokens "
        "per step assignments per layer), keeping their proportions",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_format(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and raw.get("format") is None and isinstance(raw.get("path"), str):
            suffix = PurePath(raw["path"]).suffix.lower()
            known = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
            if suffix not in known:
                raise ValueError(
                    f"format: cannot tell the format of {raw['path']!r} from its suffix; set "
                    "format: csv or parquet"
                )
            return {**raw, "format": known[suffix]}
        return raw


class Gate(Frozen):
    """Numerical gate training (docs/model/gate.md). The gate trains on a subsample of each global
    batch: ``batch_sequences`` sequences of ``tokens_per_sequence`` tokens per update.

    **Coarsening** (``steps_per_update: k > 1``, for long runs; see :mod:`moesim.gate.training`).
    Every optimizer step of the run still takes one bias update and one Adam step (the balancing
    dynamics depend on the number of updates), but only every k-th step (0, k, 2k, …) computes
    a new gradient on ``batch_sequences`` sequences. The other steps route
    ``bias_batch_sequences`` fresh sequences with the current weights and bias, update the bias
    from their loads, and step Adam with the last gradient. ``learning_rate`` stays the step of
    every optimizer step. The gate then records every k-th step only (one record per gradient).
    """

    layers_simulated: PositiveInt = Field(
        2,
        le=1024,
        description="independent routers trained, each standing for some MoE layers (layer_map)",
    )
    layer_map: Literal["round_robin", "blocks"] = Field(
        "round_robin",
        description="which simulated router stands for MoE layer l (0-based among MoE layers): "
        "round_robin = l mod layers_simulated; blocks = contiguous blocks, "
        "l·layers_simulated // moe_layers",
    )
    batch_sequences: Count = Field(
        64, description="sequences per gate update (as many as the global batch, ideally)"
    )
    tokens_per_sequence: Count = Field(
        64,
        description="tokens drawn per sequence for a gate update (capacity and exempt "
        "sequences count positions within these)",
    )
    learning_rate: PositiveFloat = Field(
        1e-3,
        le=10,
        description="Adam step on router weights at every optimizer step (loss-free paper peak "
        "LR, arXiv 2408.15664 §4.1)",
    )
    steps_per_update: Count = Field(
        1,
        description="optimizer steps per router gradient: 1 = every step is a full update; "
        "k > 1 = a new gradient every k-th step, Adam reusing it in between, the bias still "
        "updated every step from bias_batch_sequences fresh sequences; records every k-th step",
    )
    bias_batch_sequences: Count | None = Field(
        None,
        description="with steps_per_update > 1: sequences (of tokens_per_sequence tokens) routed "
        "for the bias update of each step between gradients; none = batch_sequences (fewer is "
        "faster, but the bias reads noisier loads)",
    )
    init_logit_std: PositiveFloat = Field(
        0.19,
        le=100,
        description="spread of the initial router logits: the loss-free paper's init std 0.006 "
        "at hidden 1024 with unit-RMS inputs gives 0.006·√1024 ≈ 0.19 (arXiv 2408.15664 §4.1)",
    )
    objective: Literal["experts", "teacher"] = Field(
        "experts",
        description="the routers' task loss: experts = a small MoE layer whose experts learn "
        "per-topic targets (moesim.gate.experts); teacher = reproduce a fixed random teacher "
        "router's weighted choice (moesim.gate.teacher; experts never learn, so imbalance "
        "costs nothing)",
    )
    teacher_temperature: PositiveFloat = Field(
        1.0,
        ge=1e-3,
        le=1e3,
        description="objective: teacher only: softmax temperature of the teacher's weights "
        "over its top-k",
    )
    routed_tokens_per_sequence: Count = Field(
        256, description="tokens routed per sequence when sampling engine load (rest resampled)"
    )
    trace: Trace | None = Field(
        None, description="replay recorded expert loads instead of training the synthetic gate"
    )
