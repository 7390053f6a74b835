"""Data domains of the token stream and the final routers' skew per domain.

Streams with ``stream.domains`` draw each sequence from one domain's block of topics; the
skew statistics of ``routing_by_domain`` (MaxVio, CV, min/mean per domain and pooled over the
domain mix) are checked against a brute-force count over the routed tokens."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moesim.errors import ScenarioError
from moesim.estimate.routing import domain_skew
from moesim.estimate.seeds import SeedPlan
from moesim.gate import TokenStream, train_gate
from moesim.gate.metrics import load_skew, pooled_load
from moesim.gate.router import route, route_options

DOMAINS = [
    {"name": "web", "share": 0.5, "topics": 32},
    {"name": "code", "share": 0.3, "topics": 16},
    {"name": "papers", "share": 0.2, "topics": 16},
]


def _brute_skew(loads: list[float]) -> tuple[float, float, float]:
    mean = sum(loads) / len(loads)
    var = sum((c - mean) ** 2 for c in loads) / len(loads)
    return (max(loads) - mean) / mean, math.sqrt(var) / mean, min(loads) / mean


def test_domains_must_partition_the_topics_and_shares(make_scenario):
    bad = [
        ({"topics": 60, "domains": DOMAINS}, "sum to 64, but stream.topics is 60"),
        (
            {"domains": [{**DOMAINS[0], "share": 0.6}, *DOMAINS[1:]]},
            "shares sum to 1.1",
        ),
        ({"domains": [{**DOMAINS[0], "name": "pooled"}, *DOMAINS[1:]]}, "'pooled'"),
        ({"domains": [DOMAINS[1], {**DOMAINS[1], "topics": 48, "share": 0.7}]}, "repeated: code"),
    ]
    for stream, message in bad:
        with pytest.raises(ScenarioError, match="stream.domains") as err:
            make_scenario(stream=stream)
        assert message in str(err.value)


@pytest.mark.parametrize("packing", ["mixed", "domain"])
def test_each_sequence_stays_in_one_domain_and_domains_follow_their_shares(make_scenario, packing):
    scenario = make_scenario(stream={"domains": DOMAINS, "packing": packing, "domain_overlap": 0.0})
    stream = TokenStream(scenario.stream, np.random.default_rng(0))
    _, topics = stream.sample(4000, 8, np.random.default_rng(1), sequences_per_micro_batch=4)
    domains = stream.domain_of_topic[topics]
    assert np.all(domains == domains[:, :1])  # one domain per sequence
    if packing == "domain":  # and one per micro-batch of 4 sequences
        assert np.all(domains[:, 0].reshape(-1, 4) == domains[::4, :1])
    shares = np.bincount(domains[:, 0], minlength=3) / domains.shape[0]
    assert np.allclose(shares, [0.5, 0.3, 0.2], atol=0.04)
    # Zipf inside each domain: the domain's first topic is its most common.
    for d in range(3):
        start, end = stream.domain_starts[d], stream.domain_starts[d + 1]
        counts = np.bincount(topics[domains == d] - start, minlength=end - start)
        assert counts.argmax() == 0


def test_a_forced_domain_draws_only_its_topics(make_scenario):
    scenario = make_scenario(
        stream={"domains": DOMAINS, "drift_tokens": 1e5, "domain_overlap": 0.0}
    )
    stream = TokenStream(scenario.stream, np.random.default_rng(0))
    _, topics = stream.sample(64, 8, np.random.default_rng(2), tokens_trained=3.5e5, domain=1)
    assert set(np.unique(topics)) <= set(range(32, 48))
    # Drift rolls the ranking inside a domain, never its share.
    drifted = stream.popularity_at(3.5e5)
    for d, share in enumerate([0.5, 0.3, 0.2]):
        start, end = stream.domain_starts[d], stream.domain_starts[d + 1]
        assert drifted[start:end].sum() == pytest.approx(share)
    with pytest.raises(ValueError, match="domain: 3"):
        stream.sample(2, 2, np.random.default_rng(0), domain=3)


@pytest.mark.parametrize("overlap", [0.0, 0.3, 0.8])
def test_domain_overlap_sets_the_share_of_foreign_topics(make_scenario, overlap):
    scenario = make_scenario(stream={"domains": DOMAINS, "domain_overlap": overlap})
    stream = TokenStream(scenario.stream, np.random.default_rng(0))
    _, topics = stream.sample(6000, 8, np.random.default_rng(1), domain=1)
    foreign = np.mean(stream.domain_of_topic[topics] != 1)
    assert foreign == pytest.approx(overlap * (1 - 0.3), abs=0.03)


def test_skew_statistics_match_a_loop():
    rng = np.random.default_rng(4)
    loads = rng.integers(0, 50, size=(3, 16))
    loads[1, 5] = 0
    stats = load_skew(loads)
    for row, expected in zip(loads, zip(*stats.values(), strict=True), strict=True):
        assert np.allclose(expected, _brute_skew([float(c) for c in row]))
    tokens, shares = np.array([100, 200, 50]), np.array([0.5, 0.3, 0.2])
    pooled = pooled_load(loads, tokens, shares)
    for e in range(16):
        brute = sum(shares[d] * loads[d, e] / tokens[d] for d in range(3))
        assert pooled[e] == pytest.approx(brute)


def test_domain_skew_matches_a_brute_force_count_over_tokens(make_scenario):
    """``domain_skew``'s rows against loads counted token by token from the same draws."""
    scenario = make_scenario(
        stream={"domains": DOMAINS},
        training={"total_tokens": 30 * 64 * 1024},
        gate={"layers_simulated": 2},
    )
    spec = scenario.strategies[1]
    run = train_gate(scenario, spec, [], np.random.SeedSequence(3))
    seeds = SeedPlan(5)
    rows = domain_skew(scenario, spec.name, run, seeds, tokens_per_domain=1500)

    # The same draws, counted one token at a time.
    gate, n_experts = scenario.gate, scenario.model.moe.routed_experts
    rng = np.random.default_rng(seeds.domains)
    per_domain: dict[tuple[int, str], list[float]] = {}
    tokens: dict[str, int] = {}
    for d, domain in enumerate(DOMAINS):
        x, topics = run.stream.sample(
            -(-1500 // gate.tokens_per_sequence),
            gate.tokens_per_sequence,
            rng,
            tokens_trained=scenario.training.total_tokens,
            domain=d,
        )
        flat = x.reshape(-1, x.shape[-1])
        tokens[domain["name"]] = flat.shape[0]
        for layer, state in enumerate(run.final):
            selected = route(flat, state, **route_options(scenario)).selected
            counts = [0.0] * n_experts
            for t in range(flat.shape[0]):
                for expert in selected[t]:
                    counts[int(expert)] += 1
            per_domain[(layer, domain["name"])] = counts
    assert len(rows) == 2 * (len(DOMAINS) + 1)
    for row in rows:
        assert row["strategy"] == spec.name
        layer, name = int(row["layer"]), str(row["domain"])
        if name == "pooled":
            loads = [
                sum(
                    dom["share"] * per_domain[(layer, dom["name"])][e] / tokens[dom["name"]]
                    for dom in DOMAINS
                )
                for e in range(n_experts)
            ]
            assert row["tokens"] == sum(tokens.values())
        else:
            loads = per_domain[(layer, name)]
            assert row["tokens"] == tokens[name] >= 1500
        got = (row["maxvio"], row["cv"], row["min_over_mean"])
        assert np.allclose(got, _brute_skew(loads))


def test_a_stream_without_domains_has_only_pooled_rows(make_scenario):
    scenario = make_scenario(training={"total_tokens": 10 * 64 * 1024})
    run = train_gate(scenario, scenario.strategies[0], [], np.random.SeedSequence(3))
    rows = domain_skew(scenario, "aux", run, SeedPlan(1), tokens_per_domain=1000)
    layers = scenario.gate.layers_simulated
    assert [(r["layer"], r["domain"]) for r in rows] == [(i, "pooled") for i in range(layers)]
    assert all(r["tokens"] >= 1000 for r in rows)


def test_a_run_writes_routing_by_domain_and_its_plot(tmp_path, tiny_dict):
    """``moesim run`` on the tiny scenario with three domains: a row per strategy, simulated
    layer and domain plus ``pooled``, at least 100K routed tokens per domain, and the plot."""
    import yaml

    from moesim.cli import main
    from moesim.results import load

    raw = {**tiny_dict, "stream": {**tiny_dict.get("stream", {}), "domains": DOMAINS}}
    path = tmp_path / "domains.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    table = load(out).routing_by_domain
    assert list(table.columns) == [
        "strategy",
        "layer",
        "domain",
        "maxvio",
        "cv",
        "min_over_mean",
        "tokens",
    ]
    layers = raw.get("gate", {}).get("layers_simulated", 2)
    assert len(table) == 2 * layers * 4
    assert set(table["domain"]) == {"web", "code", "papers", "pooled"}
    per_domain = table[table["domain"] != "pooled"]
    assert (per_domain["tokens"] >= 100_000).all()
    assert ((table["maxvio"] >= 0) & (table["min_over_mean"] <= 1)).all()
    assert (out / "routing_by_domain.png").is_file()
    assert (out / "routing_by_domain.svg").is_file()
