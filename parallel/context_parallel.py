"""Context parallelism: each rank of the CP group holds part of every sequence.

The sequence is cut into 2 x CP chunks and rank r keeps chunks r and 2CP-1-r, so that
under a causal mask every rank has the same amount of attention work (an early chunk,
cheap, paired with a late one, expensive). Position ids follow the chunks. Everything
but attention is token-local and runs unchanged on the local tokens; attention all-
gathers keys and values over the CP group (backward: reduce-scatter of their gradients).

Attention passes no mask, so it stays on the fused kernels (flash or memory-efficient on
CUDA, the flash kernel on the CPU): flash takes no explicit mask, and with grouped-query
attention a masked SDPA call falls to the math kernel, which materialises the scores (the
old path here). Local query chunk c (global index) sees key chunks 0..c-1 fully and key
chunk c causally: two kernel calls, one without a mask over the prefix and one `is_causal`
on the square diagonal block, merged exactly with their log-sum-exps. The kernels that
return the log-sum-exp have no gradient for it, so the pair is one autograd Function whose
backward runs each block's backward kernel with the merged output and log-sum-exp: that
gives the exact gradient of the whole softmax. Grouped-query attention goes to the kernels
unrepeated where they take it (flash), repeated otherwise (efficient). Where no fused kernel
can run (fp64 or head sizes not a multiple of 8 on CUDA, other devices), the attention masks
by true positions as before; it is exact either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from parallel.collectives import gather_along, group_rank, group_size

HEAD_SEQ_DIM = -2  # attention tensors are [batch, heads, sequence, head_dim]
aten = torch.ops.aten


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
    global positions of the local tokens (the same for every sequence of the batch; only the
    masked fallback reads them, the blocks follow from the CP rank).
    """
    cp = group_size(cp_group)
    if cp == 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
    k = gather_along(k, HEAD_SEQ_DIM, cp_group)
    v = gather_along(v, HEAD_SEQ_DIM, cp_group)  # k, v: [b, groups, s, d], in gathered order
    if torch.is_autocast_enabled(q.device.type):  # autocast covers SDPA, not the kernels called below
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    kernel = fused_kernel(q, k)
    if kernel is None:
        mask = gathered_positions(cp, q.shape[-2] * cp, q.device)[None, :] <= positions[0][:, None]
        # mask: [s_local, s], where a query may look
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)
    return blockwise_attention(q, k, v, cp_rank=group_rank(cp_group), cp=cp, kernel=kernel)


def blockwise_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cp_rank: int, cp: int,
                        kernel: Kernel) -> torch.Tensor:
    """The causal attention of this rank's two query chunks, each over its visible prefix of the keys.

    q: [b, heads, 2L, d] (chunks r and 2CP-1-r); k, v: [b, groups, 2CP L, d] in gathered order.
    """
    length = q.shape[-2] // 2
    k, v = global_order(k, cp), global_order(v, cp)  # one copy, so that every prefix is a slice
    outputs = []
    for q_chunk, c in zip(q.split(length, dim=HEAD_SEQ_DIM), chunk_ids(cp_rank, cp)):
        end = (c + 1) * length
        outputs.append(_PrefixCausalAttention.apply(q_chunk, k[..., :end, :], v[..., :end, :], kernel))
    return torch.cat(outputs, dim=HEAD_SEQ_DIM)


def global_order(x: torch.Tensor, cp: int) -> torch.Tensor:
    """Gathered keys or values [b, groups, s, d] (rank r's chunks r and 2CP-1-r at slots 2r and 2r+1) in
    sequence order."""
    chunks = x.chunk(2 * cp, dim=HEAD_SEQ_DIM)
    slots = [2 * c if c < cp else 2 * (2 * cp - 1 - c) + 1 for c in range(2 * cp)]
    return torch.cat([chunks[slot] for slot in slots], dim=HEAD_SEQ_DIM)


def gathered_positions(cp: int, seq_length: int, device) -> torch.Tensor:
    """The positions of the keys gathered from the CP ranks, in gathered order (rank 0's two chunks first)."""
    full = torch.arange(seq_length, device=device)
    return torch.cat([split_sequence(full, r, cp, dim=0) for r in range(cp)])


# ---------------------------------------------------------------- fused kernels that return the log-sum-exp


class Kernel:
    """One fused attention kernel, forward and backward, without a mask: causal (top-left, on square blocks
    here) or not. `forward` returns the output [b, h, L, d], the log-sum-exp of each query's scores
    [b, h, L] (fp32, fp64 for fp64 inputs) and what the backward needs; `backward` takes the output and
    log-sum-exp it should differentiate, which need not be this call's own (see _PrefixCausalAttention)."""

    def forward(self, q, k, v, *, causal: bool):
        raise NotImplementedError

    def backward(self, grad, q, k, v, out, lse, state, *, causal: bool):
        raise NotImplementedError


class CpuFlash(Kernel):
    """The CPU flash kernel. It takes fewer key/value heads than query heads (grouped-query attention) and
    returns gradients of the unrepeated keys and values."""

    def forward(self, q, k, v, *, causal):
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)
        return out, lse, None

    def backward(self, grad, q, k, v, out, lse, state, *, causal):
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(grad, q, k, v, out, lse, 0.0, causal)


def _seq_major(x: torch.Tensor) -> torch.Tensor:
    """[b, h, L, d] laid out as [b, L, h, d] in memory, the CUDA kernels' own layout for out and grad_out."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


class CudaFlash(Kernel):
    """FlashAttention-2 on CUDA (fp16/bf16): takes grouped-query keys and values unrepeated."""

    def forward(self, q, k, v, *, causal):
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False)
        return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)

    def backward(self, grad, q, k, v, out, lse, state, *, causal):
        cum_q, cum_k, max_q, max_k, seed, offset = state
        return aten._scaled_dot_product_flash_attention_backward(
            _seq_major(grad), q, k, v, _seq_major(out), lse, cum_q, cum_k, max_q, max_k, 0.0, causal, seed, offset)


class CudaEfficient(Kernel):
    """The memory-efficient kernel on CUDA (also fp32). It has no grouped-query attention, so the key/value
    heads are repeated for each call (a transient copy of the block) and their gradients summed back. Its
    log-sum-exp is padded to a multiple of 32 queries; the backward gets the same padding back."""

    def forward(self, q, k, v, *, causal):
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal)
        return out, lse[..., :q.shape[-2]], (lse.shape[-1], seed, offset)

    def backward(self, grad, q, k, v, out, lse, state, *, causal):
        padded, seed, offset = state
        groups, repeat = k.shape[1], q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        lse = F.pad(lse, (0, padded - lse.shape[-1])).contiguous()
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            _seq_major(grad), q, k, v, None, _seq_major(out), lse, seed, offset, 0.0, [True, True, True, False],
            causal)
        fold = lambda g: g.unflatten(1, (groups, repeat)).sum(2)  # noqa: E731  [b, h, S, d] -> [b, groups, S, d]
        return dq, fold(dk), fold(dv)


def fused_kernel(q: torch.Tensor, k: torch.Tensor) -> Kernel | None:
    """The fused kernel for these queries and (gathered) keys, or None where none can run. On CUDA the
    choice follows SDPA's flags (`torch.nn.attention.sdpa_kernel`): flash first, then memory-efficient."""
    if q.device.type == "cpu":
        return CpuFlash() if q.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16) else None
    if q.device.type != "cuda" or q.shape[-1] % 8:  # the CUDA kernels want head sizes in multiples of 8
        return None
    from torch.backends import cuda

    # the blocks' shapes: a causal diagonal block and a longer prefix, checked as one call over all keys
    flash = cuda.SDPAParams(q, k, k, None, 0.0, False, q.shape[1] != k.shape[1])
    if cuda.flash_sdp_enabled() and cuda.can_use_flash_attention(flash):
        return CudaFlash()
    repeated = k[:, :1].expand(-1, q.shape[1], -1, -1)  # the shape of the keys once repeated, without a copy
    if cuda.mem_efficient_sdp_enabled() and cuda.can_use_efficient_attention(
            cuda.SDPAParams(q, repeated, repeated, None, 0.0, False, False)):
        return CudaEfficient()
    return None


class _PrefixCausalAttention(torch.autograd.Function):
    """L queries over P + L keys: the first P fully visible, the last L causal (a lower-right causal mask).

    Forward: a kernel call over the prefix and a causal one over the diagonal block; the two outputs are
    merged by their log-sum-exps (exact softmax over all P + L keys). Backward: each block's backward kernel,
    given the merged output and log-sum-exp, recomputes the block's probabilities of the whole softmax and
    uses rowsum(grad * merged out) for the softmax's correction term, so the block gradients are exactly the
    slices of the full attention's gradient; they are added (dq) and concatenated (dk, dv)."""

    @staticmethod
    def forward(ctx, q, k, v, kernel):
        # q: [b, h, L, d]; k, v: [b, groups, P + L, d]
        length = q.shape[-2]
        prefix = k.shape[-2] - length
        blocks = [(slice(prefix, None), True)]
        if prefix:
            blocks.insert(0, (slice(0, prefix), False))
        parts = [kernel.forward(q, k[..., keys, :], v[..., keys, :], causal=causal) for keys, causal in blocks]
        out, lse = merge([(o, s) for o, s, _ in parts])
        ctx.kernel, ctx.blocks, ctx.states = kernel, blocks, [state for _, _, state in parts]
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        grad = grad.contiguous()
        dq, dk, dv = None, [], []
        for (keys, causal), state in zip(ctx.blocks, ctx.states):
            dq_block, dk_block, dv_block = ctx.kernel.backward(grad, q, k[..., keys, :], v[..., keys, :], out, lse,
                                                               state, causal=causal)
            dq = dq_block if dq is None else dq + dq_block
            dk.append(dk_block)
            dv.append(dv_block)
        return dq, torch.cat(dk, dim=HEAD_SEQ_DIM), torch.cat(dv, dim=HEAD_SEQ_DIM), None


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of disjoint key blocks from each block's output [b, h, L, d] and log-sum-exp
    [b, h, L]: lse = logsumexp_j lse_j, out = sum_j exp(lse_j - lse) out_j (at least fp32, rounded once)."""
    if len(parts) == 1:
        return parts[0]
    lse = torch.stack([s for _, s in parts]).logsumexp(0)
    dtype = torch.promote_types(parts[0][0].dtype, torch.float32)
    out = sum(torch.exp(s - lse)[..., None].to(dtype) * o.to(dtype) for o, s in parts)
    return out.to(parts[0][0].dtype), lse
