"""Context-parallel attention on one process: every CP rank's blockwise attention over the gathered keys and values
(simulated by splitting the whole sequence with `split_sequence`) against one causal attention over the whole
sequence, forward and backward, and that no kernel call takes a mask or materialises the scores."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from parallel import context_parallel as cpa
from parallel.context_parallel import blockwise_attention, fused_kernel, split_sequence

SEQ_DIM = -2


def inputs(*, heads: int, groups: int, seq: int, dtype, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    shape = lambda h: (2, h, seq, 16)  # noqa: E731  [b, heads, s, d]
    q, k, v = (torch.randn(shape(h), generator=generator, dtype=torch.float64) for h in (heads, groups, groups))
    grad = torch.randn(shape(heads), generator=generator, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, grad)]


def reference(q, k, v, grad):
    """The one-rank attention: output and gradients of q, k, v for the upstream gradient `grad`."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), grad))


def context_parallel(q, k, v, grad, *, cp: int, masked: bool = False):
    """Every CP rank's attention on its chunks, the gradients summed as the reduce-scatter of the all-gather
    would; everything put back in sequence order to compare with `reference`. `masked`: the attention of before
    (and the fallback where no fused kernel runs), one SDPA call masked by true positions."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    gathered_k, gathered_v = (torch.cat([split_sequence(t, r, cp, dim=SEQ_DIM) for r in range(cp)], dim=SEQ_DIM)
                              for t in (k, v))
    outputs, loss = [], 0
    for rank in range(cp):
        local_q, local_grad = (split_sequence(t, rank, cp, dim=SEQ_DIM) for t in (q, grad))
        if masked:
            positions = split_sequence(torch.arange(q.shape[SEQ_DIM]), rank, cp, dim=0)
            mask = cpa.gathered_positions(cp, q.shape[SEQ_DIM], q.device)[None, :] <= positions[:, None]
            out = F.scaled_dot_product_attention(local_q, gathered_k, gathered_v, attn_mask=mask,
                                                 enable_gqa=q.shape[1] != k.shape[1])
        else:
            kernel = fused_kernel(local_q, gathered_k)
            assert kernel is not None
            out = blockwise_attention(local_q, gathered_k, gathered_v, cp_rank=rank, cp=cp, kernel=kernel)
        outputs.append(out)
        accumulate = torch.promote_types(out.dtype, torch.float32)  # the gradient sum of bf16 runs in fp32
        loss = loss + (out.to(accumulate) * local_grad.to(accumulate)).sum()
    dq, dk, dv = torch.autograd.grad(loss, (q, k, v))
    out = torch.cat(outputs, dim=SEQ_DIM)  # gathered order
    out = cpa.global_order(out, cp)
    return out.detach(), dq, dk, dv


def relative_error(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


# fp32 with d=16, S up to 64: relative (Frobenius) errors seen are about 2e-7 for outputs and gradients; the
# merge of two partial softmaxes adds one rounding of the log-sum-exp weights, nothing that grows with S
@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("heads, groups", [(4, 4), (4, 2), (6, 1)], ids=["MHA", "GQA", "MQA"])
def test_blockwise_attention_is_the_full_causal_attention(cp, heads, groups):
    q, k, v, grad = inputs(heads=heads, groups=groups, seq=16 * cp, dtype=torch.float32)
    want = reference(q, k, v, grad)
    got = context_parallel(q, k, v, grad, cp=cp)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.shape == b.shape
        assert relative_error(a, b) < 1e-5, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("cp", [2, 4])
def test_blockwise_attention_matches_the_masked_attention_of_before(cp):
    q, k, v, grad = inputs(heads=4, groups=2, seq=16 * cp, dtype=torch.float32, seed=1)
    for name, a, b in zip(("out", "dq", "dk", "dv"), context_parallel(q, k, v, grad, cp=cp),
                          context_parallel(q, k, v, grad, cp=cp, masked=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_blockwise_attention_in_fp64_is_exact_to_rounding():
    q, k, v, grad = inputs(heads=4, groups=2, seq=48, dtype=torch.float64)
    for a, b in zip(context_parallel(q, k, v, grad, cp=3), reference(q, k, v, grad)):
        assert relative_error(a, b) < 1e-13


def test_blockwise_attention_in_bf16_is_as_close_as_sdpa_itself():
    """bf16 rounds the blocks' outputs before the merge (in fp32, then rounded once): the error against the fp64
    attention stays that of one bf16 SDPA call."""
    q, k, v, grad = inputs(heads=4, groups=2, seq=64, dtype=torch.float64)
    exact = reference(q, k, v, grad)
    low = [t.bfloat16() for t in (q, k, v, grad)]
    sdpa = reference(*low)
    got = context_parallel(*low, cp=2)
    for name, a, b, e in zip(("out", "dq", "dk", "dv"), got, sdpa, exact):
        assert relative_error(a, e) < 2 * relative_error(b, e) + 1e-3, name


class KernelCalls(TorchDispatchMode):
    """The aten ops that run, by name (below autograd, so also those of the backward)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


MATH = {"_scaled_dot_product_attention_math", "_softmax", "_safe_softmax", "bmm", "baddbmm", "mm", "matmul"}


def test_no_call_takes_a_mask_or_materialises_the_scores_on_the_cpu():
    q, k, v, grad = inputs(heads=4, groups=2, seq=32, dtype=torch.float32)
    with KernelCalls() as calls:
        context_parallel(q, k, v, grad, cp=2)
    assert MATH.isdisjoint(calls.names), MATH & set(calls.names)
    # per rank: chunk r (prefix + diagonal, or the diagonal alone on rank 0) and chunk 2CP-1-r
    assert calls.names.count("_scaled_dot_product_flash_attention_for_cpu") == 4 + 3
    assert calls.names.count("_scaled_dot_product_flash_attention_for_cpu_backward") == 4 + 3


def test_a_merge_without_the_log_sum_exp_weights_is_caught(monkeypatch):
    """The test above fails if the partial outputs are averaged instead of weighted by exp(lse_j - lse)."""
    def unweighted(parts):
        if len(parts) == 1:
            return parts[0]
        return sum(o for o, _ in parts) / len(parts), torch.stack([s for _, s in parts]).logsumexp(0)

    monkeypatch.setattr(cpa, "merge", unweighted)
    q, k, v, grad = inputs(heads=4, groups=2, seq=32, dtype=torch.float32)
    got, want = context_parallel(q, k, v, grad, cp=2), reference(q, k, v, grad)
    assert relative_error(got[0], want[0]) > 1e-2


def test_the_block_gradients_need_the_merged_log_sum_exp(monkeypatch):
    """Differentiating each block with its own output and log-sum-exp (what autograd would do, the log-sum-exp
    having no gradient formula) gives wrong gradients; the merged ones give the exact ones."""
    own = {}
    forward = cpa.CpuFlash.forward

    def remember(self, q, k, v, *, causal):
        out, lse, state = forward(self, q, k, v, causal=causal)
        own[(q.data_ptr(), k.data_ptr(), k.shape[-2], causal)] = (out, lse)
        return out, lse, state

    def with_own_statistics(self, grad, q, k, v, out, lse, state, *, causal):
        out, lse = own[(q.data_ptr(), k.data_ptr(), k.shape[-2], causal)]
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(grad, q, k, v, out, lse, 0.0,
                                                                                     causal)

    monkeypatch.setattr(cpa.CpuFlash, "forward", remember)
    monkeypatch.setattr(cpa.CpuFlash, "backward", with_own_statistics)
    q, k, v, grad = inputs(heads=4, groups=2, seq=32, dtype=torch.float32)
    got, want = context_parallel(q, k, v, grad, cp=2), reference(q, k, v, grad)
    assert relative_error(got[0], want[0]) < 1e-5  # the forward is still right
    assert relative_error(got[1], want[1]) > 1e-2


def test_one_rank_is_one_causal_call():
    q, k, v, grad = inputs(heads=4, groups=2, seq=16, dtype=torch.float32)
    out = cpa.attention(q, k, v, positions=torch.arange(16)[None], cp_group=None, enable_gqa=True)
    torch.testing.assert_close(out, reference(q, k, v, grad)[0], rtol=0, atol=0)


@pytest.mark.parametrize("kernel", [cpa.CudaFlash, cpa.CudaEfficient])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_cuda_kernel_calls_are_well_formed_on_meta_tensors(kernel, dtype):
    """Without a GPU: the CUDA kernels' forward and backward take these arguments and give these shapes (their
    meta functions check the schema and shapes, not the numbers). 20 queries a chunk: the memory-efficient
    kernel pads its log-sum-exp to 32."""
    meta = dict(device="meta", dtype=dtype, requires_grad=True)
    q, k, v = torch.empty(2, 8, 40, 64, **meta), torch.empty(2, 2, 80, 64, **meta), torch.empty(2, 2, 80, 64, **meta)
    for rank in range(2):
        out = blockwise_attention(q, k, v, cp_rank=rank, cp=2, kernel=kernel())
        grads = torch.autograd.grad(out, (q, k, v), torch.empty_like(out))
        assert out.shape == q.shape and [g.shape for g in grads] == [q.shape, k.shape, v.shape]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backends", ["flash+efficient", "efficient"])
@pytest.mark.parametrize("heads, groups", [(8, 8), (8, 2)], ids=["MHA", "GQA"])
def test_cuda_stays_on_the_fused_kernels(backends, heads, groups):
    """bf16 on CUDA with the math kernel switched off: a masked or math call would raise "No available kernel"
    or show up as matmuls and a softmax. Only flash: grouped-query keys go in unrepeated; only memory-efficient:
    repeated. Both against bf16 SDPA on the whole sequence, relative to the fp64 attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    enabled = {"flash+efficient": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
               "efficient": [SDPBackend.EFFICIENT_ATTENTION]}[backends]
    expected = "flash" if backends.startswith("flash") else "efficient"
    q, k, v, grad = inputs(heads=heads, groups=groups, seq=1024, dtype=torch.float64, device="cuda")
    exact = reference(q, k, v, grad)
    low = [t.bfloat16() for t in (q, k, v, grad)]
    sdpa = reference(*low)  # one bf16 call on the whole sequence, on the kernel SDPA picks
    with sdpa_kernel(enabled):
        kernel = fused_kernel(low[0][:, :, :512], low[1])
        assert kernel is not None and expected in type(kernel).__name__.lower()
        with KernelCalls() as calls:
            got = context_parallel(*low, cp=2)
    assert MATH.isdisjoint(calls.names), MATH & set(calls.names)
    assert any(name.startswith(f"_scaled_dot_product_{expected}_attention") for name in calls.names)
    for name, a, b, e in zip(("out", "dq", "dk", "dv"), got, sdpa, exact):
        assert relative_error(a, e) < 2 * relative_error(b, e) + 1e-3, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp32_runs_the_memory_efficient_kernel_exactly():
    q, k, v, grad = inputs(heads=8, groups=2, seq=256, dtype=torch.float32, device="cuda")
    assert isinstance(fused_kernel(q[:, :, :128], k), cpa.CudaEfficient)
    for name, a, b in zip(("out", "dq", "dk", "dv"), context_parallel(q, k, v, grad, cp=2), reference(q, k, v, grad)):
        assert relative_error(a, b) < 1e-5, name
