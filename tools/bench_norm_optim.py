"""Norms and optimizer steps, torch against NVIDIA apex: `python -m tools.bench_norm_optim [--dtype fp32]`.

Times, in one run and on the same tensors: (1) RMSNorm (or LayerNorm, `--norm layernorm`) forward +
backward over [tokens, hidden], by default the shape of a 1B model's micro-batch (8192 tokens x 2048)
in bf16, torch's F.rms_norm against apex's fused kernel, both called as the model calls them
(parallel/apex_backend.py); (2) one AdamW step over `--params` fp32 parameters (1e9 by default, in
tensors shaped like a transformer's: matrices and the small vectors of norms, decay on the matrices
only), torch's AdamW (fused) against apex's FusedAdam. The table gives milliseconds per iteration,
apex's time over torch's (below 1: apex is faster) and the largest difference of their results.

`--dtype fp32` is what the trainer feeds its norms today: the residual stream stays fp32 under bf16
autocast. Where apex cannot run (the CPU, apex missing, no CUDA extensions) it says why and times
torch only; on the CPU the default sizes are smaller. Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn.functional as F

from parallel import apex_backend

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def timed(fn: Callable[[], object], *, device: torch.device, warmup: int, iters: int, rounds: int = 3) -> float:
    """Milliseconds per call: the best of `rounds` means over `iters` calls (the device synchronised at both ends)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(rounds):
        _sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(device)
        best = min(best, (time.perf_counter() - start) / iters * 1e3)
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def torch_norm(kind: str):
    """torch's norm as the model calls it (pretrain/model/gpt.py, Norm.forward)."""
    if kind == "rmsnorm":
        return lambda x, w, b, eps: F.rms_norm(x, (x.shape[-1],), w, eps)
    return lambda x, w, b, eps: F.layer_norm(x, (x.shape[-1],), w, b, eps)


def bench_norm(args, device: torch.device, apex_ok: bool) -> list[tuple]:
    """Rows (kernel, impl, size, ms, max difference to torch) of the norm's forward + backward."""
    g = torch.Generator(device=device).manual_seed(0)
    dtype = DTYPES[args.dtype]
    x = torch.randn(args.tokens, args.hidden, device=device, generator=g).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(args.hidden, device=device, generator=g)).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(args.hidden, device=device, generator=g)).to(dtype).requires_grad_() \
        if args.norm == "layernorm" else None
    dy = torch.randn(args.tokens, args.hidden, device=device, generator=g).to(dtype)
    inputs = (x, w) if b is None else (x, w, b)
    impls = {"torch": torch_norm(args.norm)}
    if apex_ok:
        impls["apex"] = apex_backend.norm_function(args.norm)
    rows, reference = [], None
    for impl, fn in impls.items():
        def step(fn=fn):
            y = fn(x, w, b, 1e-5)
            return (y, *torch.autograd.grad(y, inputs, dy))  # no accumulation into .grad between calls

        ms = timed(step, device=device, warmup=args.warmup, iters=args.iters)
        results = step()
        diff = None if reference is None else max((r.float() - t.float()).abs().max().item()
                                                  for r, t in zip(results, reference))
        reference = reference or results
        rows.append((f"{args.norm} fwd+bwd", impl, f"{args.tokens} x {args.hidden} {args.dtype}", ms, diff))
    return rows


def transformer_like(total: int, hidden: int, device: torch.device) -> list[torch.Tensor]:
    """About `total` fp32 parameters: [hidden, 4 x hidden] matrices, each followed by a [hidden] vector."""
    shapes, count = [], 0
    while count < total:
        shapes += [(hidden, min(4 * hidden, max(1, (total - count) // hidden))), (hidden,)]
        count += hidden * shapes[-2][1] + hidden
    g = torch.Generator(device=device).manual_seed(1)
    return [torch.randn(s, device=device, generator=g) for s in shapes]


def bench_adam(args, device: torch.device, apex_ok: bool) -> list[tuple]:
    """Rows of one AdamW step (the same start and the same gradients for both implementations)."""
    start = transformer_like(args.params, args.hidden, device)
    grads = [torch.randn_like(p) * 1e-3 for p in start]
    numel = sum(p.numel() for p in start)
    fused = device.type in ("cuda", "cpu")
    hyper = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8}
    impls = {"torch": lambda groups: torch.optim.AdamW(groups, **hyper, fused=fused)}
    if apex_ok:
        impls["apex"] = lambda groups: apex_backend.fused_adam(groups, **hyper)
    rows, reference = [], None
    for impl, make in impls.items():
        params = [p.clone() for p in start]
        for p, g in zip(params, grads):
            p.grad = g
        optimizer = make([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
                          {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}])
        ms = timed(optimizer.step, device=device, warmup=args.warmup, iters=args.iters)
        diff = None if reference is None else max((p - r).abs().max().item() for p, r in zip(params, reference))
        reference = reference or params
        del optimizer  # its moments: only one optimizer's are alive at a time
        label = f"{numel:,} fp32" + (" fused" if impl == "torch" and fused else "")
        rows.append(("adamw step", impl, label, ms, diff))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_norm_optim", description=__doc__.split("\n")[0])
    p.add_argument("--norm", choices=["rmsnorm", "layernorm"], default="rmsnorm")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="of the norm's input and weight")
    p.add_argument("--tokens", type=int, help="rows of the norm's input (default: 8192 on CUDA, 1024 on the CPU)")
    p.add_argument("--hidden", type=int, default=2048, help="width of the norm, and of the optimizer's tensors")
    p.add_argument("--params", type=float, help="parameters the optimizer steps (default: 1e9 on CUDA, 1e7 on the CPU)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    on_cuda = device.type == "cuda"
    args.tokens = args.tokens or (8192 if on_cuda else 1024)
    args.params = int(args.params or (1e9 if on_cuda else 1e7))
    name = torch.cuda.get_device_name(device) if on_cuda else "CPU"
    print(f"device: {name} ({device.type}), torch {torch.__version__}")
    norm_problem, adam_problem = apex_backend.norm_problem(device), apex_backend.adam_problem(device)
    for what, problem in (("fused norm", norm_problem), ("FusedAdam", adam_problem)):
        print(f"apex {what}: " + ("usable" if problem is None else f"unavailable ({problem}); torch only"))
    rows = bench_norm(args, device, norm_problem is None) + bench_adam(args, device, adam_problem is None)
    print(f"{'kernel':<18} {'impl':<5} {'size':<28} {'ms/iter':>9} {'apex/torch':>10} {'max |diff|':>10}")
    torch_ms = {}
    for kernel, impl, size, ms, diff in rows:
        torch_ms.setdefault(kernel, ms)
        ratio = f"{ms / torch_ms[kernel]:.2f}x" if impl == "apex" else "-"
        shown = "-" if diff is None else f"{diff:.1e}"
        print(f"{kernel:<18} {impl:<5} {size:<28} {ms:>9.3f} {ratio:>10} {shown:>10}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
