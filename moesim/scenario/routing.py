"""Scenario sections for the numerical gate: router, token stream, gate training."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from moesim.scenario.base import Frozen, PositiveFloat, PositiveInt


class Router(Frozen):
    """How tokens pick experts (routing.md §1, §3, §6)."""

    score: Literal["sigmoid", "softmax"] = "sigmoid"
    normalize: bool = Field(True, description="normalise gate values over the selected experts")
    scaling_factor: PositiveFloat = Field(1.0, description="multiplies normalised gate values")
    node_limit: PositiveInt | None = Field(
        None, description="each token reaches at most this many nodes of its EP group"
    )


class Stream(Frozen):
    """Synthetic token stream: sequences drawn from a mixture of topics.

    Each topic has a random unit centroid in the gate's ``dim``-dimensional representation space;
    topic popularity follows a Zipf law with ``zipf_exponent``; each sequence draws a topic
    mixture from a Dirichlet with ``concentration`` (small → one dominant topic per sequence);
    each token is its topic's centroid plus isotropic Gaussian ``noise``.
    """

    topics: PositiveInt = 64
    zipf_exponent: Annotated[float, Field(ge=0)] = 1.0
    concentration: PositiveFloat = 0.3
    noise: Annotated[float, Field(ge=0)] = 0.5
    dim: PositiveInt = 64


class Gate(Frozen):
    """Numerical gate training (routing.md §10). The gate trains on a subsample of each global
    batch: ``batch_sequences`` sequences of ``tokens_per_sequence`` tokens per update."""

    layers_simulated: PositiveInt = Field(
        2, description="independent routers trained; MoE layer l uses router l mod this"
    )
    batch_sequences: PositiveInt = Field(
        64, description="sequences per gate update (as many as the global batch, ideally)"
    )
    tokens_per_sequence: PositiveInt = 64
    learning_rate: PositiveFloat = Field(
        1e-3, description="Adam step on router weights (loss-free paper peak LR, §2.3)"
    )
    init_logit_std: PositiveFloat = Field(
        0.19,
        description="spread of the initial router logits: the loss-free paper's init std 0.006 "
        "at hidden 1024 with unit-RMS inputs gives 0.006·√1024 ≈ 0.19 (§2.3)",
    )
    teacher_temperature: PositiveFloat = Field(
        1.0, description="softmax temperature of the teacher's weights over its top-k"
    )
    routed_tokens_per_sequence: PositiveInt = Field(
        256, description="tokens routed per sequence when sampling engine load (rest resampled)"
    )
