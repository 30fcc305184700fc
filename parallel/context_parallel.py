"""Context parallelism: each rank of the CP group holds part of every sequence.

The sequence is cut into 2 x CP chunks and rank r keeps chunks r and 2CP-1-r, so that
under a causal mask every rank has the same amount of attention work (an early chunk,
cheap, paired with a late one, expensive). Position ids follow the chunks. Everything
but attention is token-local and runs unchanged on the local tokens; attention all-
gathers keys and values over the CP group (backward: reduce-scatter of their gradients)
and masks by the true positions, which is exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from parallel.collectives import gather_along, group_size

HEAD_SEQ_DIM = -2  # attention tensors are [batch, heads, sequence, head_dim]


def chunk_ids(cp_rank: int, cp: int) -> tuple[int, int]:
    return cp_rank, 2 * cp - 1 - cp_rank


def split_sequence(x: torch.Tensor, cp_rank: int, cp: int, *, dim: int = 1) -> torch.Tensor:
    """This rank's two chunks of `x` along `dim` (a load-balanced split into 2 x CP chunks)."""
    if cp == 1:
        return x
    chunks = x.chunk(2 * cp, dim=dim)
    first, second = chunk_ids(cp_rank, cp)
    return torch.cat([chunks[first], chunks[second]], dim=dim)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, positions: torch.Tensor, cp_group,
              enable_gqa: bool) -> torch.Tensor:
    """Causal attention of local queries over the keys and values of the whole sequence.

    q: [b, heads, s_local, d]; k, v: [b, groups, s_local, d]; positions: [b, s_local], the
    global positions of the local tokens (the same for every sequence of the batch).
    """
    cp = group_size(cp_group)
    if cp == 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
    k = gather_along(k, HEAD_SEQ_DIM, cp_group)
    v = gather_along(v, HEAD_SEQ_DIM, cp_group)
    mask = gathered_positions(cp, q.shape[-2] * cp, q.device)[None, :] <= positions[0][:, None]
    # mask: where a query may look
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)


def gathered_positions(cp: int, seq_length: int, device) -> torch.Tensor:
    """The positions of the keys gathered from the CP ranks, in gathered order (rank 0's two chunks first)."""
    full = torch.arange(seq_length, device=device)
    return torch.cat([split_sequence(full, r, cp, dim=0) for r in range(cp)])
