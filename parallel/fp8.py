"""FP8 matrix multiplies through torch's scaled matmul, for the tensor-parallel layers and the experts.

A GEMM in FP8 quantizes both operands, `q = clamp(x * scale, -max, max).to(fp8)`, multiplies the 8-bit
values and undoes the scales in the output (`torch._scaled_mm` takes the inverse scales). Formats:
e4m3 (largest value 448) for weights and activations, and for gradients e5m2 (57344: more range, less
precision) in the `hybrid` format or e4m3 in the `e4m3` format. A scale maps the largest magnitude
(the amax) onto the format's largest value, so nothing saturates; the clamp keeps what would (e5m2
overflows to inf, e4m3 to 448).

Recipes:
- `tensorwise`: one scale per tensor from its amax now ("current scaling"). Three FP8 GEMMs: forward,
  dgrad (gradient x weight) and wgrad (gradient^T x input).
- `rowwise`: one scale per row of each operand along the contraction: per token for activations and
  gradients, per output row of the weight (per input column for dgrad). e4m3 only, as torch's rowwise
  kernel is. The weight gradient stays in bf16 (torchao's `rowwise_with_gw_hp`): its scales would run
  along the tokens, which micro-batching and expert parallelism split in layout-dependent ways.
- `delayed`: inputs and gradients scaled by the amax history of earlier steps (`max` or `most_recent`
  of the last `amax_history_len`, divided by 2^margin), so quantizing needs no reduction first (the
  first step, without a history, scales by the current amax where Transformer Engine uses 1: a fixed
  scale would make a gradient's rounding depend on how many micro-batches its loss is divided by). The
  amaxes seen during a step are reduced over the ranks of the pipeline stage (TP x DP x CP, as
  Megatron-LM's amax group) and pushed once per step, after the optimizer step: every micro-batch of a
  step uses the same scales on every layout. The histories are checkpointed.

Weights are always scaled by their current amax: they are quantized once per optimizer step and reused by every
micro-batch and by a recomputed forward (the model feature in pretrain/model/fp8.py drops the cache when a step
begins and after the optimizer step).

The scale of a tensor is that of the whole logical tensor, whatever the layout: a weight's amax is
reduced over its tensor group (TP, ETP for experts), an activation's or gradient's over the ranks that
hold pieces of it (TP x CP where TP splits it, CP where it is the same on every TP rank: a sequence-parallel
input is gathered in bf16 before it is quantized, so its amax is already the whole sequence's; FP8
all-gathers are not used), a row's over the tensor group where the row is split. Then an FP8 layer on a
layout computes, bit for bit, the pieces one FP8 rank computes (partial sums aside, which TP adds).

The CUDA kernel's rules (row-major first operand, column-major second, dimensions multiples of 16,
fp32 scales of the right shapes) are checked here on every device: the CPU kernel accepts more, and
what passes on the CPU must run on the GPU. Where torch has no CPU kernel (the grouped scaled matmul, and
the rowwise one before torch 2.13) the same operands are dequantized and multiplied in fp32: the same numbers
up to summation order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel.collectives import group_size
from parallel.errors import FoldtronError

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}
OUT_DTYPE = torch.bfloat16  # FP8 runs under bf16 autocast: its GEMMs return what F.linear would


class Fp8Error(FoldtronError, RuntimeError):
    """An FP8 GEMM that the CUDA kernel would refuse; the message says which rule and which operand."""


@dataclass(frozen=True)
class Fp8Recipe:
    scaling: Literal["tensorwise", "rowwise", "delayed"] = "tensorwise"
    format: Literal["hybrid", "e4m3"] = "hybrid"
    amax_history_len: int = 1024
    amax_compute_algo: Literal["max", "most_recent"] = "max"
    margin: int = 0

    @property
    def gradient_dtype(self) -> torch.dtype:
        return E5M2 if self.format == "hybrid" else E4M3


# ----------------------------------------------------------------------------- quantization


def scale_from_amax(amax: torch.Tensor, dtype: torch.dtype, margin: int = 0) -> torch.Tensor:
    """The multiplier that maps `amax` onto the largest value of `dtype` (1 where amax is 0 or not finite)."""
    amax = amax.float()
    usable = (amax > 0) & torch.isfinite(amax)
    scale = FP8_MAX[dtype] / torch.where(usable, amax, torch.ones_like(amax)) / 2.0 ** margin
    return torch.where(usable, scale, torch.ones_like(scale))


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x * scale in `dtype`, saturated at its largest value (NaN stays NaN)."""
    limit = FP8_MAX[dtype]
    return (x.float() * scale).clamp_(-limit, limit).to(dtype)


def amax(x: torch.Tensor, dim: Optional[int] = None, *, group=None) -> torch.Tensor:
    """Largest magnitude of `x` (along `dim`, keeping it), in fp32, the maximum over `group` (a logical tensor
    split over its ranks)."""
    value = x.detach().abs().amax() if dim is None else x.detach().abs().amax(dim=dim, keepdim=True)
    value = value.float()
    if group_size(group) > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return value


# ----------------------------------------------------------------------------- the kernels


def _row_major(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1 and t.stride(-2) >= max(1, t.shape[-1])


def _column_major(t: torch.Tensor) -> bool:
    return t.stride(-2) == 1 and t.stride(-1) >= max(1, t.shape[-2])


def check_cuda_rules(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor, *,
                     out_dtype: torch.dtype, what: str) -> None:
    """What CUDA's `_scaled_mm` (2-D b) and `_scaled_grouped_mm` (3-D b) demand, on any device. (`what` names
    the GEMM's role, not its layer: a compiled layer would be specialised on a layer's name.)"""
    problems = []
    rowwise = b.dim() == 3 or scale_a.numel() > 1 or scale_b.numel() > 1
    if out_dtype not in ((OUT_DTYPE,) if rowwise else (OUT_DTYPE, torch.float32)):
        problems.append(f"output {out_dtype} (rowwise and grouped kernels write bf16; tensorwise bf16 or fp32)")
    if a.dtype not in FP8_MAX or b.dtype not in FP8_MAX:
        problems.append(f"operands must be float8, got {a.dtype} and {b.dtype}")
    elif a.dtype == E5M2 and b.dtype == E5M2:
        problems.append("e5m2 x e5m2 is not supported")
    if not _row_major(a):
        problems.append(f"the first operand must be row-major (strides {a.stride()})")
    if not _column_major(b):
        problems.append(f"the second operand must be column-major (strides {b.stride()})")
    k, n = b.shape[-2], b.shape[-1]
    if k % 16 or n % 16:
        problems.append(f"the contraction ({k}) and output ({n}) dimensions must be multiples of 16")
    if scale_a.dtype != torch.float32 or scale_b.dtype != torch.float32:
        problems.append("scales must be fp32")
    if b.dim() == 2:
        if (scale_a.numel() > 1 or scale_b.numel() > 1) and (
                tuple(scale_a.shape) != (a.shape[0], 1) or tuple(scale_b.shape) != (1, n)):
            problems.append(f"rowwise scales must be ({a.shape[0]}, 1) and (1, {n}), got {tuple(scale_a.shape)} "
                            f"and {tuple(scale_b.shape)}")
    else:
        if a.dtype != E4M3 or b.dtype != E4M3:
            problems.append("the grouped kernel takes e4m3 operands only")
        if tuple(scale_a.shape) != (a.shape[0],) or tuple(scale_b.shape) != (b.shape[0], n):
            problems.append(f"grouped scales must be ({a.shape[0]},) and ({b.shape[0]}, {n}), got "
                            f"{tuple(scale_a.shape)} and {tuple(scale_b.shape)}")
    if problems:
        raise Fp8Error(f"FP8 GEMM {what} [{a.shape[0]}, {a.shape[-1]}] x [{k}, {n}]: " + "; ".join(problems))


def scaled_mm(a: torch.Tensor, b: torch.Tensor, inv_a: torch.Tensor, inv_b: torch.Tensor, *,
              out_dtype: torch.dtype, what: str) -> torch.Tensor:
    """(a / scale_a) @ (b / scale_b), a [M, K] row-major FP8, b [K, N] column-major FP8; `inv_*` are the inverse
    scales (tensorwise: scalars; rowwise: [M, 1] and [1, N])."""
    check_cuda_rules(a, b, inv_a, inv_b, out_dtype=out_dtype, what=what)
    if a.device.type == "cpu" and inv_a.numel() > 1 and not cpu_rowwise_kernel():
        return ((a.float() * inv_a) @ (b.float() * inv_b)).to(out_dtype)
    return torch._scaled_mm(a, b, inv_a, inv_b, out_dtype=out_dtype)


@functools.cache
@torch.compiler.disable
def cpu_rowwise_kernel() -> bool:
    """Whether torch's CPU `_scaled_mm` takes rowwise scales (2.13 does; 2.11 asserts that it is tensorwise only)."""
    a, b = torch.zeros(16, 16, dtype=E4M3), torch.zeros(16, 16, dtype=E4M3).t()
    try:
        torch._scaled_mm(a, b, torch.ones(16, 1), torch.ones(1, 16), out_dtype=OUT_DTYPE)
    except RuntimeError:
        return False
    return True


def grouped_kernel_available(device: torch.device) -> bool:
    """Whether this device runs torch's grouped scaled matmul: CUDA compute capability 9.x or 10.x (torch's kernel
    is built for sm90 and sm100 only)."""
    return (device.type == "cuda" and hasattr(torch, "_scaled_grouped_mm")
            and torch.cuda.get_device_capability(device)[0] in (9, 10))


def scaled_grouped_mm(a: torch.Tensor, b: torch.Tensor, inv_a: torch.Tensor, inv_b: torch.Tensor,
                      ends: torch.Tensor, *, what: str) -> torch.Tensor:
    """Per group g of rows (ending at `ends[g]`): (a_g / scale_a) @ (b[g] / scale_b[g]) in bf16. a [M, K] e4m3
    row-major with inv_a [M]; b [G, K, N] e4m3 column-major with inv_b [G, N]. Where torch has no kernel (the
    CPU), the dequantized operands are multiplied in fp32."""
    check_cuda_rules(a, b, inv_a, inv_b, out_dtype=OUT_DTYPE, what=what)
    if a.device.type == "cuda":
        return torch._scaled_grouped_mm(a, b, inv_a, inv_b, offs=ends, out_dtype=OUT_DTYPE)
    dequantized = (a.float() * inv_a[:, None], b.float() * inv_b[:, None, :])
    return F.grouped_mm(*dequantized, offs=ends).to(OUT_DTYPE)


# ----------------------------------------------------------------------------- one linear layer


class Fp8Gemm:
    """What the training loop (pretrain/model/fp8.py) asks of every FP8 GEMM object, whatever its backend; the
    defaults are those of a GEMM without state. `weight_group`: the tensor group its weight is split over."""

    weight_group = None
    _cache: tuple | None = None

    def refresh(self, weight: torch.Tensor) -> None:
        """The weight has changed (an optimizer step, a checkpoint load): quantize it now, outside the forward, so
        that a compiled layer never branches on whether it is quantized."""
        self._cache = None
        self.weight_forms(weight)

    def weight_forms(self, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The quantized forms of `weight`, from the cache (quantized here on a first use without `refresh`)."""
        if self._cache is None:
            with torch.no_grad():
                self._cache = self._quantize_weight(weight.detach())
        return self._cache

    def _quantize_weight(self, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def _group_if(self, split: bool):
        """The group a rowwise amax is reduced over: the tensor group where the row is split over it."""
        return self.weight_group if split else None

    def amaxes(self) -> list[torch.Tensor]:
        """This step's amaxes to reduce over the stage (delayed scaling), in a fixed order."""
        return []

    def push_history(self, reduced: list[torch.Tensor]) -> None:
        """Take the reduced `amaxes()` once per step."""

    def state_dict(self) -> dict:
        """What a checkpoint keeps (empty: nothing)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`."""


class Fp8Linear(Fp8Gemm):
    """How one tensor-parallel linear layer (y = x W^T, W [N, K] this rank's piece) runs in FP8: its recipe,
    the groups its amaxes are reduced over, its cached quantized weight and, with delayed scaling, the
    amax histories of its input and gradient.

    `kind`: "column" (W split by output rows: N is split over the tensor group) or "row" (split by input
    columns: K is split). `weight_group`: the tensor group of W (TP). `batch_group`: the ranks holding pieces
    of the same micro-batch (TP x CP), `cp_group` its context-parallel part. A tensorwise amax is reduced
    where the tensor is split: a row layer's input (features over TP, tokens over CP) and a column layer's
    output gradient over TP x CP; a column layer's input and a row layer's output gradient, the same on
    every TP rank (gathered, or replicated, before the GEMM), over CP only. `name`: the layer's module name,
    for the checkpoint."""

    def __init__(self, recipe: Fp8Recipe, *, kind: str, weight_group, batch_group, cp_group=None, name: str,
                 device: torch.device | str = "cpu"):
        self.recipe, self.kind, self.name = recipe, kind, name
        self.weight_group = weight_group
        self.groups = {"input": batch_group if kind == "row" else cp_group,
                       "grad": batch_group if kind == "column" else cp_group}
        self._cache = None
        if recipe.scaling == "delayed":
            n = recipe.amax_history_len
            self.history = {"input": torch.zeros(n, device=device), "grad": torch.zeros(n, device=device)}
            self.step_amax = {role: torch.zeros((), device=device) for role in self.history}
            self.scales = {role: torch.ones((), device=device) for role in self.history}
            self.has_history = False  # until the first step ends, scale by the current amax (a host flag: no sync)

    def _quantize_weight(self, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(forward operand [K, N], its inverse scale, dgrad operand [N, K], its inverse scale), both column-major."""
        if self.recipe.scaling == "rowwise":
            rows = scale_from_amax(amax(w, 1, group=self._group_if(self.kind == "row")), E4M3)  # [N, 1]
            columns = scale_from_amax(amax(w, 0, group=self._group_if(self.kind == "column")), E4M3)  # [1, K]
            forward = quantize(w, rows, E4M3).t()  # [K, N], column-major
            dgrad = quantize(w, columns, E4M3).t().contiguous().t()  # [N, K], column-major
            return forward, rows.reciprocal().t(), dgrad, columns.reciprocal()
        scale = scale_from_amax(amax(w, group=self.weight_group), E4M3)
        q = quantize(w, scale, E4M3)
        return q.t(), scale.reciprocal(), q.t().contiguous().t(), scale.reciprocal()

    def activation_scale(self, x: torch.Tensor, role: str, dtype: torch.dtype, *, training: bool = True
                         ) -> torch.Tensor:
        """The scale of an input (role "input") or an output gradient ("grad") [M, features]."""
        if self.recipe.scaling == "rowwise":  # per row; the row is split over TP in a row layer's input and in
            split = (self.kind == "row") == (role == "input")  # a column layer's output gradient
            return scale_from_amax(amax(x, 1, group=self._group_if(split)), dtype)
        margin = 0
        if self.recipe.scaling == "delayed":
            if training:  # evaluation must not move the scales
                torch.maximum(self.step_amax[role], x.detach().abs().amax().float(), out=self.step_amax[role])
            if self.has_history:
                return self.scales[role]
            margin = self.recipe.margin
        return scale_from_amax(amax(x, group=self.groups[role]), dtype, margin)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # autocast would round the fp32 scales to bf16 on their way into the scaled matmul (the CPU's autocast
        # lists it): every dtype here is explicit instead. Grad mode is read here: inside the function it is off.
        training = torch.is_grad_enabled()
        with torch.autocast(x.device.type, enabled=False):
            return _Fp8Matmul.apply(x, weight, self, training, *self.weight_forms(weight))

    # --------------------------------------------------------------- delayed scaling: once per step

    def amaxes(self) -> list[torch.Tensor]:
        return [self.step_amax[role] for role in ("input", "grad")] if self.recipe.scaling == "delayed" else []

    def _scale_from_history(self, role: str) -> torch.Tensor:
        r, history = self.recipe, self.history[role]
        basis = history.max() if r.amax_compute_algo == "max" else history[0]
        return scale_from_amax(basis, E4M3 if role == "input" else r.gradient_dtype, r.margin)

    def push_history(self, reduced: list[torch.Tensor]) -> None:
        """Record this step's (stage-reduced) amaxes and set the scales of the next step from the history."""
        for role, value in zip(("input", "grad"), reduced):
            history = self.history[role]
            history.copy_(torch.roll(history, 1))
            history[0] = value
            self.scales[role] = self._scale_from_history(role)
            self.step_amax[role].zero_()
        self.has_history = True

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.recipe.scaling != "delayed":
            return {}
        return {f"{role}_amax_history": self.history[role] for role in self.history}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.recipe.scaling != "delayed":
            return
        for role in self.history:
            self.history[role].copy_(state[f"{role}_amax_history"])
            self.scales[role] = self._scale_from_history(role)
        # a history saved before its first step ended holds nothing yet (one read, when a run resumes)
        self.has_history = bool(self.history["input"].max() > 0)


class _Fp8Matmul(torch.autograd.Function):
    """y = x W^T with FP8 operands: forward, dgrad and (except rowwise) wgrad GEMMs in FP8."""

    @staticmethod
    def forward(ctx, x, weight, layer: Fp8Linear, training: bool, w_forward, w_inv, w_dgrad, w_dgrad_inv):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        scale = layer.activation_scale(x2, "input", E4M3, training=training)
        qx = quantize(x2, scale, E4M3)
        y = scaled_mm(qx, w_forward, scale.reciprocal(), w_inv, out_dtype=OUT_DTYPE, what="forward")
        rowwise = layer.recipe.scaling == "rowwise"
        # what wgrad needs: rowwise keeps the input in bf16 for a bf16 GEMM, the others its FP8 copy
        saved_input = x2.to(OUT_DTYPE) if rowwise else qx
        ctx.save_for_backward(saved_input, scale, w_dgrad, w_dgrad_inv)
        ctx.layer, ctx.input_dtype, ctx.shape, ctx.weight_dtype = layer, x.dtype, shape, weight.dtype
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        saved_input, x_scale, w_dgrad, w_dgrad_inv = ctx.saved_tensors
        layer = ctx.layer
        dtype = E4M3 if layer.recipe.scaling == "rowwise" else layer.recipe.gradient_dtype
        g = grad.contiguous().view(-1, grad.shape[-1])
        g_scale = layer.activation_scale(g, "grad", dtype)
        qg = quantize(g, g_scale, dtype)
        # an fp32 input (the norms' output under autocast) takes its gradient in fp32 straight from the GEMM's fp32
        # accumulator: no rounding to bf16 first, and tensor-parallel partial sums are then added in fp32
        wide = ctx.input_dtype == torch.float32 and layer.recipe.scaling != "rowwise"  # rowwise: bf16 output only
        grad_input = scaled_mm(qg, w_dgrad, g_scale.reciprocal(), w_dgrad_inv,
                               out_dtype=torch.float32 if wide else OUT_DTYPE, what="dgrad")
        grad_weight = None
        if ctx.needs_input_grad[1]:
            if layer.recipe.scaling == "rowwise":
                grad_weight = (g.to(OUT_DTYPE).t() @ saved_input).to(ctx.weight_dtype)
            else:  # [N, M] x [M, K]: the tokens are the contraction
                grad_weight = scaled_mm(qg.t().contiguous(), saved_input.t().contiguous().t(), g_scale.reciprocal(),
                                        x_scale.reciprocal(), out_dtype=torch.float32, what="wgrad")
                grad_weight = grad_weight.to(ctx.weight_dtype)
        return (grad_input.to(ctx.input_dtype).view(ctx.shape), grad_weight, None, None, None, None, None, None)


# ----------------------------------------------------------------------------- the experts


class Fp8GroupedLinear(Fp8Gemm):
    """The experts' GEMMs in FP8: a stack W [G, N, K] (this rank's experts, N or K split over ETP) times the
    rows of each expert. Always rowwise (per-token and per-expert-row scales, e4m3, the only form of the
    grouped kernel): per-token scales do not depend on which tokens expert parallelism puts together on a
    rank, so every EP layout quantizes alike. The weight gradient is a bf16 grouped GEMM.

    `kind` as for Fp8Linear: "column" for gate and up (N split over ETP), "row" for down (K split)."""

    def __init__(self, *, kind: str, weight_group, name: str):
        self.kind, self.weight_group, self.name = kind, weight_group, name
        self._cache = None

    def _quantize_weight(self, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(forward operand [G, K, N], inverse scales [G, N], dgrad operand [G, N, K], inverse scales [G, K])."""
        rows = scale_from_amax(amax(w, 2, group=self._group_if(self.kind == "row")), E4M3)  # [G, N, 1]
        columns = scale_from_amax(amax(w, 1, group=self._group_if(self.kind == "column")), E4M3)  # [G, 1, K]
        forward = quantize(w, rows, E4M3).transpose(1, 2)  # column-major
        dgrad = quantize(w, columns, E4M3).transpose(1, 2).contiguous().transpose(1, 2)
        return forward, rows.reciprocal().squeeze(2), dgrad, columns.reciprocal().squeeze(1)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # as in Fp8Linear
            return _Fp8GroupedMatmul.apply(x, weight, ends, self, *self.weight_forms(weight))


class _Fp8GroupedMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, ends, layer: Fp8GroupedLinear, w_forward, w_inv, w_dgrad, w_dgrad_inv):
        scale = scale_from_amax(amax(x, 1, group=layer._group_if(layer.kind == "row")), E4M3)  # [M, 1]
        qx = quantize(x, scale, E4M3)
        y = scaled_grouped_mm(qx, w_forward, scale.reciprocal().squeeze(1), w_inv, ends,
                              what="forward")
        ctx.save_for_backward(x.to(OUT_DTYPE), ends, w_dgrad, w_dgrad_inv)
        ctx.layer, ctx.input_dtype, ctx.weight_dtype = layer, x.dtype, weight.dtype
        return y

    @staticmethod
    def backward(ctx, grad):
        x, ends, w_dgrad, w_dgrad_inv = ctx.saved_tensors
        layer, grad = ctx.layer, grad.contiguous()
        scale = scale_from_amax(amax(grad, 1, group=layer._group_if(layer.kind == "column")), E4M3)
        qg = quantize(grad, scale, E4M3)
        grad_input = scaled_grouped_mm(qg, w_dgrad, scale.reciprocal().squeeze(1), w_dgrad_inv, ends,
                                       what="dgrad")
        grad_weight = F.grouped_mm(grad.to(OUT_DTYPE).t(), x, offs=ends).to(ctx.weight_dtype)  # [G, N, K]
        return grad_input.to(ctx.input_dtype), grad_weight, None, None, None, None, None, None
