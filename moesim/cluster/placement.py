"""Expert placement with redundant experts (EPLB-style), and what it does to a step's loads.

An expert-parallel group of ``ranks`` GPUs holds ``slots_per_rank`` physical expert slots per
GPU, ``S = ranks · slots_per_rank ≥ E`` in all; the ``S − E`` redundant slots hold extra replicas
of the hottest logical experts. Slot ``s`` lives on rank ``s // slots_per_rank``, so a placed
count array in slot order obeys the engine's static rule "column ``c`` lives on rank ``c //
experts_per_rank``" with ``experts_per_rank = slots_per_rank``. The static placement is
``slots_per_rank = E / ranks`` with slot ``s`` holding expert ``s``.

**Policy** (:func:`eplb_placement`), after DeepSeek's expert-parallel load balancer
(github.com/deepseek-ai/EPLB, its hierarchical policy in ``eplb.py``), written here from its
description, per simulated layer:

1. *Groups to nodes.* The ``groups`` contiguous expert groups are packed onto the ``nodes`` nodes,
   heaviest group first onto the lightest node that still has room, ``groups / nodes`` each.
2. *Replicas within nodes.* Each node's ``S / nodes`` slots go to its ``E / nodes`` experts: one
   each, then every redundant slot to the expert with the highest load per replica.
3. *Replicas to GPUs.* A node's replicas (each carrying its expert's load over its replica count)
   are packed onto the node's GPUs, heaviest first onto the lightest GPU with room, exactly
   ``slots_per_rank`` per GPU.

When ``groups`` is not a multiple of ``nodes`` the *global* policy runs the same three steps with
one group and one node: replicas are chosen over all experts and packed over all GPUs. Nodes are
interchangeable and so are the GPUs of a node, so with ``previous`` the new nodes and GPUs are
renumbered to overlap the previous placement as much as possible (greedy matching), which leaves
every load unchanged and cuts the migration.

**Splitting tokens over replicas** (:func:`apply_placement`). DeepSeek's inference sends each
token to one replica of its expert. For a training step we split each source's assignments to
expert ``e`` evenly over ``e``'s replicas, as evenly as integers allow (replica ``j`` of ``r``
gets ``⌊c/r⌋``, plus one for the ``c mod r`` replicas following the source's index, so the
remainders of different sources land on different replicas). Even splitting is what EPLB's
objective (load per replica) assumes, so the balance it plans is the balance simulated;
preferring a replica on the source's own node would save inter-node bytes but would hand a hot
expert's whole node-local traffic to one replica and undo the balance whenever sources are not
spread evenly over nodes. Every source's total is conserved exactly.

**Dispatch volumes.** Distinct tokens per destination rank and node cannot be recounted without
the tokens, so they are estimated from the sample's own distinct counts: every assignment carries
its static rank's (node's) dedup ratio ``distinct / assignments``, and a new rank (node) receives
the sum over its slots of tokens × ratio. This is exact for the static placement, conserves the
total dispatch volume, and follows moved load proportionally; it ignores dedup lost when a
rank's co-selected experts are split, and dedup gained when experts are newly co-located. The
estimate is then clipped to what must hold: a rank receives at least as many distinct tokens as
its largest single expert holds (a token picks an expert once) and at most its assignments and
the cell's tokens; a node at least its largest rank and at most the sum of its ranks.

**Migration** (:func:`migration_bytes`). A rank receives an expert's state when it holds the
expert after rebalancing and did not before (extra replicas on a rank that already holds the
expert are local copies). DeepSeek's EPLB serves inference and moves weights only; a training
replica applies optimizer updates, so it also receives the FP32 master weight and Adam moments
(:func:`expert_state_bytes`: BF16 weight 2 + FP32 master 4 + two FP32 moments 8 = 14 bytes per
parameter by default, the state :mod:`moesim.cluster.compute`'s Adam update reads besides the
gradient). Gradients are not moved: the placement changes at a step boundary, after the optimizer
consumed them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

Int = npt.NDArray[np.int64]
Float = npt.NDArray[np.float64]

# BF16 weight, then FP32 master weight and Adam's two FP32 moments.
WEIGHT_BYTES_PER_PARAM = 2.0
OPTIMIZER_BYTES_PER_PARAM = 12.0


@dataclass(frozen=True, eq=False)
class Placement:
    """Which logical expert each physical slot of an expert-parallel group holds.

    Parameters
    ----------
    slot_expert : array_like of int, shape (L, ranks, slots_per_rank) or (ranks, slots_per_rank)
        Logical expert of every slot, per layer; a 2-D array is one layer. A one-layer placement
        applies to every layer of the counts it is applied to.
    n_experts : int
        ``E``, logical experts; each must have at least one slot in every layer.
    policy : str
        How it was built: ``"static"``, ``"hierarchical"`` or ``"global"`` (informative).

    Attributes
    ----------
    replicas : ndarray, shape (L, E), int64
        Slots holding each logical expert.
    slot_replica : ndarray, shape (L, S), int64
        For every slot in slot order, which replica ``0 ≤ j < replicas`` of its expert it is.
    """

    slot_expert: Int
    n_experts: int
    policy: str = "static"
    replicas: Int = field(init=False)
    slot_replica: Int = field(init=False)

    def __post_init__(self) -> None:
        slots = np.asarray(self.slot_expert)
        if slots.ndim == 2:
            slots = slots[None]
        if slots.ndim != 3 or min(slots.shape) < 1:
            raise ValueError(f"slot_expert: shape {slots.shape} is not (L, ranks, slots_per_rank)")
        if not np.issubdtype(slots.dtype, np.integer):
            raise ValueError(f"slot_expert: dtype {slots.dtype} is not integer")
        slots = slots.astype(np.int64)
        n = int(self.n_experts)
        if n < 1 or slots.min() < 0 or slots.max() >= n:
            raise ValueError(f"slot_expert: experts outside 0..{n - 1}")
        flat = slots.reshape(slots.shape[0], -1)
        replicas = np.stack([np.bincount(row, minlength=n) for row in flat])
        if (replicas == 0).any():
            layer, expert = np.argwhere(replicas == 0)[0]
            raise ValueError(f"slot_expert: expert {expert} has no slot in layer {layer}")
        # Replica index of each slot: its rank among the slots of the same expert.
        order = np.argsort(flat, axis=1, kind="stable")
        ordered = np.take_along_axis(flat, order, axis=1)
        first = np.cumsum(replicas, axis=1) - replicas  # first sorted position of each expert
        position = np.arange(flat.shape[1])[None, :] - np.take_along_axis(first, ordered, axis=1)
        slot_replica = np.empty_like(flat)
        np.put_along_axis(slot_replica, order, position, axis=1)
        slots.setflags(write=False)
        object.__setattr__(self, "slot_expert", slots)
        object.__setattr__(self, "n_experts", n)
        object.__setattr__(self, "replicas", replicas)
        object.__setattr__(self, "slot_replica", slot_replica)

    @classmethod
    def static(cls, n_experts: int, ranks: int, layers: int = 1) -> Placement:
        """The static placement: ``E / ranks`` slots per rank, slot ``s`` holding expert ``s``."""
        if ranks < 1 or n_experts % ranks:
            raise ValueError(f"ranks: {ranks} ranks do not evenly hold {n_experts} experts")
        slots = np.arange(n_experts, dtype=np.int64).reshape(1, ranks, n_experts // ranks)
        return cls(np.repeat(slots, layers, axis=0), n_experts, "static")

    @property
    def layers(self) -> int:
        """``L``, layers with their own placement."""
        return int(self.slot_expert.shape[0])

    @property
    def ranks(self) -> int:
        """Expert-parallel ranks."""
        return int(self.slot_expert.shape[1])

    @property
    def slots_per_rank(self) -> int:
        """Physical expert slots per rank (the engine's experts per rank)."""
        return int(self.slot_expert.shape[2])

    @property
    def slots(self) -> int:
        """``S = ranks · slots_per_rank``."""
        return self.ranks * self.slots_per_rank

    @property
    def redundant(self) -> int:
        """``S − E``, redundant slots."""
        return self.slots - self.n_experts

    def layer(self, index: int) -> int:
        """The placement layer that serves count layer ``index`` (0 for a one-layer placement)."""
        return 0 if self.layers == 1 else int(index)

    def slot_rank(self) -> Int:
        """Rank of every slot in slot order, shape (S,)."""
        return np.repeat(np.arange(self.ranks, dtype=np.int64), self.slots_per_rank)

    def holders(self, layer: int, expert: int) -> Int:
        """Ranks holding ``expert`` in ``layer`` (with repeats for replicas on one rank)."""
        return np.flatnonzero(self.slot_expert[self.layer(layer)].ravel() == expert) // (
            self.slots_per_rank
        )

    def rank_counts(self) -> Int:
        """Slots of each expert on each rank, shape (L, ranks, E), int64."""
        out = np.zeros((self.layers, self.ranks, self.n_experts), dtype=np.int64)
        rank = np.broadcast_to(np.arange(self.ranks)[:, None], self.slot_expert.shape[1:])
        for layer in range(self.layers):
            np.add.at(out[layer], (rank, self.slot_expert[layer]), 1)
        return out

    def rank_loads(self, loads: npt.ArrayLike) -> Float:
        """Per-rank load when each expert's load is split evenly over its replicas.

        Parameters
        ----------
        loads : array_like, shape (E,) or (L, E)
            Load of every logical expert (per layer); a 1-D load applies to every layer.

        Returns
        -------
        ndarray, shape (L', ranks), float64
            ``L'`` the larger of the placement's and the load's layers.
        """
        w = _as_loads(loads, self.n_experts)
        n_layers = max(self.layers, w.shape[0])
        if self.layers not in (1, n_layers) or w.shape[0] not in (1, n_layers):
            raise ValueError(f"loads: {w.shape[0]} layers for a {self.layers}-layer placement")
        out = np.empty((n_layers, self.ranks))
        for layer in range(n_layers):
            p = self.layer(layer)
            lw = w[0 if w.shape[0] == 1 else layer]
            per_replica = lw / self.replicas[p]
            out[layer] = per_replica[self.slot_expert[p]].sum(axis=1)
        return out


def _as_loads(loads: npt.ArrayLike, n_experts: int | None = None) -> Float:
    w = np.asarray(loads, dtype=np.float64)
    if w.ndim == 1:
        w = w[None]
    if w.ndim != 2 or w.shape[1] < 1:
        raise ValueError(f"loads: shape {w.shape} is not (E,) or (L, E)")
    if n_experts is not None and w.shape[1] != n_experts:
        raise ValueError(f"loads: {w.shape[1]} experts, the placement has {n_experts}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("loads: must be finite and non-negative")
    return w


def layer_loads(counts: npt.ArrayLike) -> Float:
    """Per-layer expert loads of a (L, M, n_src, E) count array: the sum over micro-batches and
    source ranks, shape (L, E), float64 — the input :func:`eplb_placement` expects."""
    c = np.asarray(counts)
    if c.ndim != 4:
        raise ValueError(f"counts: shape {c.shape} is not (L, M, n_src, E)")
    return c.sum(axis=(1, 2)).astype(np.float64)


def _pack(weights: Float, packs: int) -> Int:
    """Pack items onto ``packs`` bins of exactly ``len(weights) / packs`` items each: heaviest
    item first, each onto the lightest bin with room (lowest index on ties). Returns the bin of
    every item."""
    n = len(weights)
    per = n // packs
    where = np.empty(n, dtype=np.int64)
    if per == 1:
        where[np.argsort(-weights, kind="stable")] = np.arange(n)
        return where
    load = np.zeros(packs)
    room = np.full(packs, per)
    for item in np.argsort(-weights, kind="stable"):
        pack = int(np.argmin(np.where(room > 0, load, np.inf)))
        where[item] = pack
        load[pack] += weights[item]
        room[pack] -= 1
    return where


def _replicate(weights: Float, n_slots: int) -> Int:
    """Replica counts of each expert over ``n_slots ≥ len(weights)`` slots: one each, then each
    extra slot to the expert with the highest load per replica (fewest replicas, then lowest
    index, on ties)."""
    count = np.ones(len(weights), dtype=np.int64)
    for _ in range(n_slots - len(weights)):
        per_replica = weights / count
        best = np.flatnonzero(per_replica == per_replica.max())
        count[best[np.argmin(count[best])]] += 1
    return count


def _place_layer(weights: Float, slots_per_rank: int, ranks: int, nodes: int, groups: int) -> Int:
    """One layer of the hierarchical policy (the global one is ``nodes = groups = 1``)."""
    n_experts = len(weights)
    group_size = n_experts // groups
    ranks_per_node = ranks // nodes
    node_of_group = _pack(weights.reshape(groups, group_size).sum(axis=1), nodes)
    out = np.empty((ranks, slots_per_rank), dtype=np.int64)
    for node in range(nodes):
        mine = np.flatnonzero(node_of_group == node)
        experts = (mine[:, None] * group_size + np.arange(group_size)).ravel()
        count = _replicate(weights[experts], ranks_per_node * slots_per_rank)
        replica = np.repeat(np.arange(len(experts)), count)
        gpu = _pack((weights[experts] / count)[replica], ranks_per_node)
        for g in range(ranks_per_node):
            out[node * ranks_per_node + g] = np.sort(experts[replica[gpu == g]])
    return out


def _greedy_match(overlap: Float) -> Int:
    """A one-to-one matching of rows to columns taking the largest overlaps first (ties: lowest
    row, then lowest column). Returns the column of every row."""
    n = overlap.shape[0]
    order = np.argsort(-overlap.ravel(), kind="stable")
    match = np.full(n, -1, dtype=np.int64)
    taken = np.zeros(n, dtype=bool)
    for flat in order:
        row, col = divmod(int(flat), n)
        if match[row] < 0 and not taken[col]:
            match[row] = col
            taken[col] = True
    return match


def _align(new: Int, old: Int, nodes: int, n_experts: int) -> Int:
    """Renumber ``new``'s nodes, and GPUs inside nodes, to overlap ``old`` (one layer)."""
    ranks, per = new.shape
    rpn = ranks // nodes

    def presence(slots: Int) -> Float:
        p = np.zeros((ranks, n_experts))
        p[np.arange(ranks)[:, None], slots] = 1.0
        return p

    p_new, p_old = presence(new), presence(old)
    node_new = p_new.reshape(nodes, rpn, n_experts).max(axis=1)
    node_old = p_old.reshape(nodes, rpn, n_experts).max(axis=1)
    out = np.empty_like(new)
    for a, b in enumerate(_greedy_match(node_new @ node_old.T)):
        sub_new = slice(a * rpn, (a + 1) * rpn)
        sub_old = slice(b * rpn, (b + 1) * rpn)
        gpus = _greedy_match(p_new[sub_new] @ p_old[sub_old].T)
        out[b * rpn + gpus] = new[sub_new]
    return out


def eplb_placement(
    loads: npt.ArrayLike,
    slots_per_rank: int,
    ranks: int,
    nodes: int = 1,
    groups: int = 1,
    previous: Placement | None = None,
) -> Placement:
    """Place logical experts and their redundant replicas on the slots of an EP group.

    Parameters
    ----------
    loads : array_like, shape (E,) or (L, E)
        Recent load of every logical expert (e.g. assignments of recent steps, :func:`layer_loads`),
        per layer; each layer is placed independently.
    slots_per_rank : int
        Physical expert slots per GPU; ``ranks · slots_per_rank ≥ E``.
    ranks : int
        GPUs of the expert-parallel group.
    nodes : int
        Nodes the group spans (``ranks`` must be a multiple); node ``j`` holds ranks
        ``[j·ranks/nodes, (j+1)·ranks/nodes)``.
    groups : int
        Contiguous expert groups (must divide ``E``), e.g. the router's group-limited groups.
        The hierarchical policy runs when ``groups`` is a multiple of ``nodes``, else the global
        policy (module docstring); with one node the two coincide and the result says global.
    previous : Placement, optional
        The placement in force: nodes and GPUs of the result are renumbered to overlap it (same
        loads per rank, less migration).

    Returns
    -------
    Placement
        ``slot_expert`` of shape (L, ranks, slots_per_rank), experts sorted inside each rank.
    """
    w = _as_loads(loads)
    n_layers, n_experts = w.shape
    if ranks < 1 or slots_per_rank < 1 or ranks * slots_per_rank < n_experts:
        raise ValueError(
            f"slots: {ranks} ranks × {slots_per_rank} slots cannot hold {n_experts} experts"
        )
    if nodes < 1 or ranks % nodes:
        raise ValueError(f"nodes: {nodes} nodes do not evenly hold {ranks} ranks")
    if groups < 1 or n_experts % groups:
        raise ValueError(f"groups: {groups} groups do not divide {n_experts} experts")
    if groups % nodes:
        nodes = groups = 1
    hierarchical = nodes > 1
    slots = np.stack(
        [_place_layer(w[layer], slots_per_rank, ranks, nodes, groups) for layer in range(n_layers)]
    )
    if previous is not None:
        if (previous.ranks, previous.n_experts) != (ranks, n_experts) or previous.layers not in (
            1,
            n_layers,
        ):
            raise ValueError("previous: placement of another shape")
        slots = np.stack(
            [
                _align(slots[layer], previous.slot_expert[previous.layer(layer)], nodes, n_experts)
                for layer in range(n_layers)
            ]
        )
    return Placement(slots, n_experts, "hierarchical" if hierarchical else "global")


class PlacedLoads(NamedTuple):
    """A step's loads under a placement (:func:`apply_placement`).

    Attributes
    ----------
    counts : ndarray, shape (L, M, n_src, S), int64
        Assignments from each source to each physical slot; slot ``s`` on rank
        ``s // slots_per_rank``.
    dest_tokens : ndarray, shape (L, M, n_src, ranks), int64, or None
        Estimated distinct tokens per destination rank (None when not given).
    node_tokens : ndarray, shape (L, M, n_src, n_nodes), int64, or None
        Estimated distinct tokens per node (None when not given).
    """

    counts: Int
    dest_tokens: Int | None
    node_tokens: Int | None


def _split_counts(counts: Int, placement: Placement) -> Int:
    n_layers, n_micro, n_src, _ = counts.shape
    out = np.empty((n_layers, n_micro, n_src, placement.slots), dtype=np.int64)
    src = np.arange(n_src, dtype=np.int64)[None, :, None]
    for layer in range(n_layers):
        p = placement.layer(layer)
        expert = placement.slot_expert[p].ravel()
        r = placement.replicas[p][expert]
        c = counts[layer][..., expert]  # (M, n_src, S)
        base, rem = np.divmod(c, r)
        out[layer] = base + ((placement.slot_replica[p] - src) % r < rem)
    return out


def _group_sum(x: npt.NDArray[Any], size: int) -> npt.NDArray[Any]:
    """Sum the last axis in consecutive groups of ``size``."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // size, size).sum(axis=-1)


def _dedup_ratio(distinct: Int, assignments: Int) -> Float:
    return np.divide(
        distinct, assignments, out=np.zeros(distinct.shape), where=assignments > 0
    ).astype(np.float64)


def apply_placement(
    counts: npt.ArrayLike,
    placement: Placement,
    dest_tokens: npt.ArrayLike | None = None,
    node_tokens: npt.ArrayLike | None = None,
    tokens: npt.ArrayLike | None = None,
) -> PlacedLoads:
    """A step's loads when every expert's assignments are split evenly over its replicas.

    Parameters
    ----------
    counts : array_like of int, shape (L, M, n_src, E)
        Assignments per logical expert (``RoutingSample.counts``). A source's index only
        rotates which replicas receive its integer remainders.
    placement : Placement
        One layer, or ``L`` layers.
    dest_tokens : array_like of int, shape (L, M, n_src, ranks), optional
        Distinct tokens per destination rank under the static placement.
    node_tokens : array_like of int, shape (L, M, n_src, n_nodes), optional
        Distinct tokens per node under the static placement (``n_nodes`` divides ``ranks``).
    tokens : array_like, optional
        Tokens of each (L, M, n_src) cell (broadcast), an upper bound on any distinct count.
        Default: the smaller of the cell's summed ``dest_tokens`` and summed ``node_tokens``.

    Returns
    -------
    PlacedLoads
        ``counts`` in slot order (each source's per-layer total unchanged) and, when given,
        estimated ``dest_tokens`` / ``node_tokens`` (module docstring: dedup ratios of the static
        ranks and nodes carried by the moved assignments, clipped to the bounds that must hold).
    """
    c = np.asarray(counts)
    if c.ndim != 4 or c.shape[3] != placement.n_experts:
        raise ValueError(f"counts: shape {c.shape} is not (L, M, n_src, {placement.n_experts})")
    if not np.issubdtype(c.dtype, np.integer) or (c < 0).any():
        raise ValueError("counts: must be non-negative integers")
    if placement.layers not in (1, c.shape[0]):
        raise ValueError(f"placement: {placement.layers} layers for {c.shape[0]} count layers")
    c = c.astype(np.int64)
    slot_counts = _split_counts(c, placement)
    if dest_tokens is None:
        if node_tokens is not None:
            raise ValueError("node_tokens: needs dest_tokens")
        return PlacedLoads(slot_counts, None, None)

    n_layers, n_experts, ranks = c.shape[0], placement.n_experts, placement.ranks
    per = placement.slots_per_rank
    if n_experts % ranks:
        raise ValueError(f"dest_tokens: {ranks} static ranks do not evenly hold {n_experts}")
    dest = np.asarray(dest_tokens, dtype=np.int64)
    if dest.shape != (*c.shape[:3], ranks):
        raise ValueError(f"dest_tokens: shape {dest.shape} is not {(*c.shape[:3], ranks)}")
    nodes = None if node_tokens is None else np.asarray(node_tokens, dtype=np.int64)
    if nodes is not None and (
        nodes.ndim != 4 or nodes.shape[:3] != c.shape[:3] or ranks % max(1, nodes.shape[3])
    ):
        raise ValueError(f"node_tokens: shape {nodes.shape} does not fit {ranks} ranks")

    if tokens is not None:
        cap = np.broadcast_to(np.asarray(tokens, dtype=np.int64), c.shape[:3])
    else:
        cap = dest.sum(axis=3)
        if nodes is not None:
            cap = np.minimum(cap, nodes.sum(axis=3))
    cap = cap[..., None]

    # Dedup ratio of each static rank, carried by each slot's assignments.
    rank_ratio = _dedup_ratio(dest, _group_sum(c, n_experts // ranks))  # (L, M, n_src, ranks)
    slot_rank_ratio = np.empty(slot_counts.shape)
    same = np.empty(slot_counts.shape, dtype=np.int64)  # each slot's expert's share on its rank
    for layer in range(n_layers):
        p = placement.layer(layer)
        expert = placement.slot_expert[p].ravel()
        slot_rank_ratio[layer] = rank_ratio[layer][..., expert // (n_experts // ranks)]
        grid = placement.slot_expert[p]
        pair = (grid[:, :, None] == grid[:, None, :]).astype(np.int64)  # (ranks, per, per)
        sc = slot_counts[layer].reshape(*slot_counts.shape[1:3], ranks, per)
        same[layer] = np.einsum("mnrs,rst->mnrt", sc, pair).reshape(same.shape[1:])
    assigned = _group_sum(slot_counts, per)
    estimate = np.rint(_group_sum(slot_counts * slot_rank_ratio, per)).astype(np.int64)
    lower = same.reshape(*same.shape[:3], ranks, per).max(axis=4)
    new_dest = np.maximum(np.minimum(estimate, np.minimum(assigned, cap)), lower)
    if nodes is None:
        return PlacedLoads(slot_counts, new_dest, None)

    n_nodes = nodes.shape[3]
    node_ratio = _dedup_ratio(nodes, _group_sum(c, n_experts // n_nodes))
    slot_node_ratio = np.empty(slot_counts.shape)
    for layer in range(n_layers):
        expert = placement.slot_expert[placement.layer(layer)].ravel()
        slot_node_ratio[layer] = node_ratio[layer][..., expert // (n_experts // n_nodes)]
    node_slots = placement.slots // n_nodes
    estimate = np.rint(_group_sum(slot_counts * slot_node_ratio, node_slots)).astype(np.int64)
    by_node = new_dest.reshape(*new_dest.shape[:3], n_nodes, ranks // n_nodes)
    upper = np.minimum(by_node.sum(axis=4), cap)
    new_nodes = np.maximum(np.minimum(estimate, upper), by_node.max(axis=4))
    return PlacedLoads(slot_counts, new_dest, new_nodes)


def expert_state_bytes(
    params: float,
    weight_bytes: float = WEIGHT_BYTES_PER_PARAM,
    optimizer_bytes: float = OPTIMIZER_BYTES_PER_PARAM,
    optimizer_shards: int = 1,
) -> float:
    """Bytes one GPU receives to take over a replica of an expert of ``params`` parameters.

    Parameters
    ----------
    params : float
        Parameters of one routed expert.
    weight_bytes : float
        Per parameter, the working weight (BF16: 2).
    optimizer_bytes : float
        Per parameter, state the replica must own to update it: FP32 master weight and Adam's two
        moments (12). Pass 0 to model inference-style migration of weights only.
    optimizer_shards : int
        GPUs the optimizer state is sharded over (ZeRO-1 over the ``data`` expert-data-parallel
        replicas of an EP rank): each moves its shard, in parallel with the others.
    """
    if params < 0 or optimizer_shards < 1:
        raise ValueError("params must be ≥ 0 and optimizer_shards ≥ 1")
    return float(params) * (weight_bytes + optimizer_bytes / optimizer_shards)


@dataclass(frozen=True)
class Migration:
    """Expert state moved when one placement replaces another, in one expert-parallel group.

    Attributes
    ----------
    bytes : float
        Total bytes moved (all layers, weighted).
    transfers : float
        Expert copies moved (weighted by layer).
    received : ndarray, shape (ranks,)
        Bytes each rank receives.
    sent : ndarray, shape (ranks,)
        Bytes each rank sends.
    seconds : float
        Time of the slowest GPU: the larger of what it receives and sends over each of its links,
        divided by that link's bandwidth (0 when nothing moves).
    """

    bytes: float
    transfers: float
    received: Float
    sent: Float
    seconds: float


def migration_bytes(
    old: Placement,
    new: Placement,
    expert_bytes: float,
    link_bytes_per_s: float = float("inf"),
    layer_weight: npt.ArrayLike | None = None,
    ranks_per_node: int | None = None,
    intra_node_bytes_per_s: float | None = None,
) -> Migration:
    """Bytes of expert state that move between two placements, and how long that takes.

    A rank receives ``expert_bytes`` for every (layer, expert) it holds under ``new`` but not
    under ``old``; it is sent by a rank holding the expert under ``old``, chosen greedily: one on
    the receiver's node when ``ranks_per_node`` is given, then the one that has sent least.

    Parameters
    ----------
    old, new : Placement
        Same ranks and experts; a one-layer placement stands for every layer of the other.
    expert_bytes : float
        Bytes per moved expert, e.g. :func:`expert_state_bytes`.
    link_bytes_per_s : float
        Per-GPU bandwidth of the network link (NIC) each transfer uses (inf: time 0).
    layer_weight : array_like, shape (L,), optional
        MoE layers each placement layer stands for on one GPU (e.g. the MoE layers of the busiest
        pipeline stage mapped to each simulated layer); default 1 each.
    ranks_per_node : int, optional
        With ``intra_node_bytes_per_s``: transfers between GPUs of one node use NVLink at that
        bandwidth instead of the network link.
    intra_node_bytes_per_s : float, optional
        Per-GPU NVLink bandwidth.

    Returns
    -------
    Migration
    """
    if (old.ranks, old.n_experts) != (new.ranks, new.n_experts):
        raise ValueError("old/new: placements of different ranks or experts")
    n_layers = max(old.layers, new.layers)
    if old.layers not in (1, n_layers) or new.layers not in (1, n_layers):
        raise ValueError(f"old/new: {old.layers} and {new.layers} layers")
    weight = np.ones(n_layers) if layer_weight is None else np.asarray(layer_weight, float)
    if weight.shape != (n_layers,) or (weight < 0).any():
        raise ValueError(f"layer_weight: shape {weight.shape} is not ({n_layers},)")
    if expert_bytes < 0 or link_bytes_per_s <= 0:
        raise ValueError("expert_bytes must be ≥ 0 and link_bytes_per_s > 0")
    ranks = old.ranks
    local = ranks_per_node is not None and intra_node_bytes_per_s is not None
    per_node, intra_bytes_per_s = ranks, math.inf
    if ranks_per_node is not None and intra_node_bytes_per_s is not None:
        if ranks_per_node < 1 or ranks % ranks_per_node or intra_node_bytes_per_s <= 0:
            raise ValueError(f"ranks_per_node: {ranks_per_node} does not fit {ranks} ranks")
        per_node, intra_bytes_per_s = ranks_per_node, intra_node_bytes_per_s
    node = np.arange(ranks) // per_node
    # Bytes per rank: [received, sent] over [network, NVLink].
    moved = np.zeros((2, 2, ranks))
    transfers = 0.0
    held_old, held_new = old.rank_counts() > 0, new.rank_counts() > 0
    for layer in range(n_layers):
        have = held_old[old.layer(layer)]
        want = held_new[new.layer(layer)]
        sent = np.zeros(ranks)
        for rank, expert in np.argwhere(want & ~have):
            sources = np.flatnonzero(have[:, expert])
            near = sources[node[sources] == node[rank]]
            pool = near if local and len(near) else sources
            source = pool[np.argmin(sent[pool])]
            size = expert_bytes * weight[layer]
            sent[source] += size
            link = 1 if local and node[source] == node[rank] else 0
            moved[0, link, rank] += size
            moved[1, link, source] += size
            transfers += weight[layer]
    seconds = moved[:, 0].max() / link_bytes_per_s if moved[:, 0].any() else 0.0
    if local and moved[:, 1].any():
        seconds = max(seconds, moved[:, 1].max() / intra_bytes_per_s)
    return Migration(
        bytes=float(moved[0].sum()),
        transfers=float(transfers),
        received=moved[0].sum(axis=0),
        sent=moved[1].sum(axis=0),
        seconds=float(seconds),
    )
