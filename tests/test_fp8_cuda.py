"""FP8 on the GPU's kernels: what the CPU cannot show. cuBLASLt's `_scaled_mm` and CUTLASS's grouped kernel
against the same operands multiplied in fp32 (the CPU runs torch's CPU kernel and, for the grouped GEMM, an
emulation), FP8 training against bf16 on CUDA and under torch.compile (no host sync in an FP8 step:
tests/test_devices.py).
Skipped without CUDA (or below compute capability 8.9); `python -m tools.device_check` runs them."""

import pytest
import torch

from test_cuda import cuda_config
from parallel import fp8
from parallel.fp8 import Fp8GroupedLinear, Fp8Linear, Fp8Recipe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                                reason="needs a CUDA device with FP8 (compute capability 8.9+)")


@pytest.mark.parametrize("recipe", [Fp8Recipe(), Fp8Recipe(scaling="rowwise", format="e4m3")],
                         ids=["tensorwise", "rowwise"])
def test_cuda_fp8_gemms_equal_the_cpu_kernel(recipe):
    """The same layer on CUDA and on the CPU: the kernels differ only in summation order (fp32 accumulators)."""
    torch.manual_seed(0)
    x = torch.randn(256, 512)
    w = torch.randn(384, 512) * 0.02
    g = torch.randn(256, 384).bfloat16()
    results = {}
    for device in ("cpu", "cuda"):
        layer = Fp8Linear(recipe, kind="column", weight_group=None, batch_group=None, name="t", device=device)
        xs, ws = x.to(device).requires_grad_(), w.to(device).requires_grad_()
        y = layer(xs, ws)
        y.backward(g.to(device))
        results[device] = [t.float().cpu() for t in (y, xs.grad, ws.grad)]
    for cpu, cuda in zip(results["cpu"], results["cuda"]):
        torch.testing.assert_close(cuda, cpu, rtol=1e-2, atol=1e-3)


@pytest.mark.skipif(not fp8.grouped_kernel_available(torch.device("cuda")) if torch.cuda.is_available() else True,
                    reason="needs torch._scaled_grouped_mm on this GPU (compute capability 9.0+)")
def test_cuda_grouped_fp8_equals_the_cpu_emulation():
    torch.manual_seed(0)
    x = torch.randn(96, 256)
    w = torch.randn(4, 128, 256) * 0.02
    g = torch.randn(96, 128).bfloat16()
    ends = torch.tensor([16, 16, 64, 96], dtype=torch.int32)  # one expert without tokens
    results = {}
    for device in ("cpu", "cuda"):
        layer = Fp8GroupedLinear(kind="column", weight_group=None, name="experts")
        xs, ws = x.to(device).requires_grad_(), w.to(device).requires_grad_()
        y = layer(xs, ws, ends.to(device))
        y.backward(g.to(device))
        results[device] = [t.float().cpu() for t in (y, xs.grad, ws.grad)]
    for cpu, cuda in zip(results["cpu"], results["cuda"]):
        torch.testing.assert_close(cuda, cpu, rtol=1e-2, atol=1e-3)


def _cuda_config(tmp_path, corpus, *overrides):
    return cuda_config(tmp_path, corpus, "precision.dtype=bf16", *overrides)


@pytest.mark.parametrize("extra", [(), ("train.compile=true",), ("model.moe.num_experts=4", "model.moe.top_k=2",
                                                                  "model.moe.ffn_hidden_size=128")],
                         ids=["eager", "compiled", "moe"])
def test_cuda_fp8_trains_like_bf16(tmp_path, tiny_corpus, extra):
    from pretrain.trainer import Trainer

    losses = {}
    for name, fp8_on in (("bf16", ()), ("fp8", ("precision.fp8.enabled=true",))):
        trainer = Trainer(_cuda_config(tmp_path / name, tiny_corpus, *extra, *fp8_on))
        losses[name] = [trainer.train_step()[0] for _ in range(8)]
    assert losses["fp8"][0] == pytest.approx(losses["bf16"][0], rel=2e-2)
    assert losses["fp8"][-1] == pytest.approx(losses["bf16"][-1], rel=5e-2)
    assert losses["fp8"][-1] < losses["fp8"][0]
