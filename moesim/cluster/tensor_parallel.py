"""Tensor-parallel communication with sequence parallelism (Megatron-LM, arXiv 1909.08053 and
2205.05198): the all-gathers and reduce-scatters around each column- and row-parallel GEMM pair,
their ring time over the group's NVLink, and the part left exposed on the compute stream.

With sequence parallelism a layer's activations outside the GEMMs (norms, residual adds,
dropout) are split along the sequence over the ``t`` GPUs of the group. Before a column-parallel
GEMM (QKV, FFN gate+up, the vocabulary-parallel output head) the sequence shards are all-gathered
into the full ``b·s × h`` input; after a row-parallel GEMM (attention output, FFN down) the
partial sums are reduce-scattered back into shards. The backward runs the mirror: the gradient
of an all-gather is a reduce-scatter and the other way round. Each collective is a ring over
the ``t`` GPUs: every GPU sends and receives ``(t − 1)/t`` of the full tensor in ``t − 1``
hops, ``(t − 1)/t · B / bw + (t − 1) · latency``.

Overlap (``parallelism.tp_comm_overlap``, TransformerEngine's userbuffers as used by
Megatron-Core): the collective and its neighbouring GEMM are cut into ``t`` chunks and pipelined,
chunk ``i``'s GEMM running while chunk ``i + 1`` moves. A two-stage pipeline of ``t`` equal
chunks of ``C`` (communication) and ``G`` (GEMM) seconds takes ``max(C, G) + min(C, G)/t``, so
the time added to the GEMM is ``max(0, C − G) + min(C, G)/t``: what the GEMM cannot cover plus
one chunk of pipeline fill. Without overlap the whole collective is exposed.

Context parallelism (ring attention) passes each GPU's key/value chunk around the ring of
``c`` GPUs in ``c − 1`` point-to-point steps, each overlapped with flash attention on the chunk
already there: the same pipeline rule with ``c`` chunks, always on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Collective = Literal["all_gather", "reduce_scatter", "kv_ring"]


def ring_seconds(nbytes: float, members: int, bandwidth: float, latency: float) -> float:
    """Seconds of a ring all-gather or reduce-scatter of a ``nbytes`` tensor (the full,
    gathered size) over ``members`` GPUs, each sending at ``bandwidth`` bytes/s per direction
    with ``latency`` seconds per hop."""
    if members < 2:
        return 0.0
    return (members - 1) / members * nbytes / bandwidth + (members - 1) * latency


def ring_bytes(nbytes: float, members: int) -> float:
    """Bytes each GPU sends (and receives) in that ring: ``(t − 1)/t`` of the tensor."""
    return 0.0 if members < 2 else (members - 1) / members * nbytes


def exposed_seconds(comm: float, gemm: float, chunks: int, overlap: bool) -> float:
    """Seconds a collective adds to the compute stream next to a GEMM of ``gemm`` seconds:
    all of it without overlap; chunk-pipelined, ``max(0, C − G) + min(C, G)/chunks``."""
    if not overlap or gemm <= 0:
        return comm
    return max(0.0, comm - gemm) + min(comm, gemm) / chunks


@dataclass(frozen=True)
class TpCollective:
    """One tensor-parallel collective of an op's pass, for one micro-batch on one GPU."""

    op: str
    phase: str
    """``forward`` or ``backward_input``."""
    kind: Collective
    name: str
    tensor_bytes: float
    """The full (gathered) tensor: ``b·s·h`` elements (ring attention: every GPU's K/V)."""
    comm_s: float
    """Ring time of the collective alone."""
    gemm_s: float
    """The GEMM (ring attention: the flash attention) it overlaps with (0 when none)."""
    exposed_s: float
    """Time it adds to the compute stream."""
    sent_bytes: float
    """Bytes each GPU sends over NVLink (and receives)."""
