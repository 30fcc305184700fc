"""A fake NVIDIA apex for the CPU: its module names, functions and FusedAdam's state layout, computed with torch.

`install(monkeypatch)` puts it into sys.modules (undone when the test ends): apex, apex.normalization,
apex.normalization.fused_layer_norm (fused_rms_norm_affine and fused_layer_norm_affine, with apex's
signatures, computing F.rms_norm / F.layer_norm and counting their calls), apex.optimizers (FusedAdam)
and the compiled extensions fused_layer_norm_cuda and amp_C as empty modules. FusedAdam keeps apex's
state layout (exp_avg and exp_avg_sq per tensor, the step count per group, `bias_correction` in the
groups: apex/optimizers/fused_adam.py) and computes apex's update (csrc/multi_tensor_adam.cu, AdamW
mode) with torch, so that the layout conversion is tested as it will meet the real one. It is not a
subclass of torch's AdamW for that reason: AdamW's per-tensor step would hide the conversion.
"""

from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F

from parallel import apex_backend


class Calls:
    rms_norm = 0
    layer_norm = 0
    adam_steps = 0
    adam_w_modes: list = []


def fused_rms_norm_affine(input, weight, normalized_shape, eps=1e-6, memory_efficient=False):
    Calls.rms_norm += 1
    return F.rms_norm(input, tuple(normalized_shape), weight, eps)


def fused_layer_norm_affine(input, weight, bias, normalized_shape, eps=1e-6, memory_efficient=False):
    Calls.layer_norm += 1
    return F.layer_norm(input, tuple(normalized_shape), weight, bias, eps)


class FusedAdam(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, adam_w_mode=True,
                 weight_decay=0.0, amsgrad=False, set_grad_none=True, capturable=False, master_weights=False):
        Calls.adam_w_modes.append(adam_w_mode)
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.adam_w_mode = 1 if adam_w_mode else 0

    @torch.no_grad()
    def step(self, closure=None):
        Calls.adam_steps += 1
        for group in self.param_groups:
            if not group["params"]:
                continue
            group["step"] = group.get("step", 0) + 1
            beta1, beta2 = group["betas"]
            c1 = 1 - beta1 ** group["step"] if group["bias_correction"] else 1.0
            c2 = 1 - beta2 ** group["step"] if group["bias_correction"] else 1.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p).float()
                    state["exp_avg_sq"] = torch.zeros_like(p).float()
                m, v, g = state["exp_avg"], state["exp_avg_sq"], p.grad
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                update = (m / c1) / ((v / c2).sqrt() + group["eps"]) + group["weight_decay"] * p
                p.sub_(group["lr"] * update)


def install(monkeypatch, *, usable_on_cpu: bool = True,
            extensions: tuple[str, ...] = ("fused_layer_norm_cuda", "amp_C"),
            normalization: bool = True) -> type[Calls]:
    """Install the fake; `usable_on_cpu` makes apex_backend take the CPU for a CUDA device (else the device check
    stands), `extensions` the compiled modules present, `normalization=False` leaves apex.normalization out."""
    Calls.rms_norm = Calls.layer_norm = Calls.adam_steps = 0
    Calls.adam_w_modes = []
    apex = types.ModuleType("apex")
    apex.__path__ = []  # a package
    modules = {"apex": apex}
    if normalization:
        norm = types.ModuleType("apex.normalization")
        norm.__path__ = []
        fused = types.ModuleType("apex.normalization.fused_layer_norm")
        fused.fused_rms_norm_affine = fused_rms_norm_affine
        fused.fused_layer_norm_affine = fused_layer_norm_affine
        norm.fused_layer_norm = fused
        apex.normalization = norm
        modules.update({"apex.normalization": norm, "apex.normalization.fused_layer_norm": fused})
    optimizers = types.ModuleType("apex.optimizers")
    optimizers.FusedAdam = FusedAdam
    apex.optimizers = optimizers
    modules["apex.optimizers"] = optimizers
    for name in ("fused_layer_norm_cuda", "amp_C"):
        modules[name] = types.ModuleType(name) if name in extensions else None  # None: "not importable"
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    if usable_on_cpu:
        monkeypatch.setattr(apex_backend, "cuda_device", lambda device: True)
    return Calls
