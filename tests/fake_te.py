"""A fake NVIDIA Transformer Engine for the CPU: the names, signatures and state that parallel/te_backend.py uses.

`make()` returns a module-like object: `pytorch.Linear`, `pytorch.autocast` (`autocast=False` leaves it out, as
TE before 2.9 does), `pytorch.fp8_autocast`, and `common.recipe` with `Format`, `DelayedScaling`,
`Float8CurrentScaling`, `Float8BlockScaling`. Their keywords are those of TE at d0067d0 (2.20.0.dev0:
pytorch/module/linear.py, pytorch/quantization.py, common/recipe/__init__.py), so the adapter's keywords are
checked against the fake as they are against a real TE. Each `make()` has its own autocast state (TE keeps
one per process): nothing is shared between tests.

What is recorded: a Linear's constructor arguments (`init_kwargs`) and every forward's `is_first_microbatch`
(`first_microbatch_flags`); every autocast's arguments (`autocast_calls`, `fp8_autocast_calls`).

The arithmetic: outside an enabled autocast, F.linear (TE computes in the activation dtype). Inside, F.linear
of the quantize-dequantized (e4m3) input and weight, with parallel.fp8's quantize and scale_from_amax; the
gradient flows straight through the quantization to the input and the weight. The weight is quantized at a
call with `is_first_microbatch` True or None and reused while it is False, as TE's weight workspace is, so a
test can see the caching. With DelayedScaling the input is scaled from an amax history that each forward
updates, and `get_extra_state` pickles it into a uint8 tensor (empty for stateless recipes, as TE's); like
TE after PR #3123, `set_extra_state` refuses a pickle unless NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import pickle
import types
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from parallel.fp8 import E4M3, quantize, scale_from_amax

UNSAFE_PICKLE = "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE"


class _FormatHelper(NamedTuple):
    max_fwd: float
    max_bwd: float


class Format(enum.Enum):
    E4M3 = _FormatHelper(max_fwd=448, max_bwd=448)
    E5M2 = _FormatHelper(max_fwd=57344, max_bwd=57344)
    HYBRID = _FormatHelper(max_fwd=448, max_bwd=57344)


@dataclasses.dataclass
class _Recipe:
    """What TE's recipes share."""
    fp8_dpa: bool = False
    fp8_mha: bool = False
    backward_override: Optional[str] = None

    def __post_init__(self):
        assert self.fp8_format != Format.E5M2, "Pure E5M2 training is not supported."


@dataclasses.dataclass
class DelayedScaling(_Recipe):
    margin: int = 0
    fp8_format: Format = Format.HYBRID
    amax_history_len: int = 1024
    amax_compute_algo: str | Callable = "max"
    scaling_factor_compute_algo: Optional[Callable] = None
    reduce_amax: bool = True


@dataclasses.dataclass
class Float8CurrentScaling(_Recipe):
    use_power_2_scales: bool = False
    fp8_format: Format = Format.HYBRID


@dataclasses.dataclass
class Float8BlockScaling(_Recipe):
    use_f32_scales: bool = False
    fp8_format: Format = Format.E4M3
    x_block_scaling_dim: int = 1
    w_block_scaling_dim: int = 2
    grad_block_scaling_dim: int = 1


def _quantize_dequantize(t: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    scale = scale_from_amax(amax, E4M3)
    return quantize(t.detach(), scale, E4M3).float() / scale


class _StraightThrough(torch.autograd.Function):
    """`value` in the forward pass, the gradient passed to `t` unchanged in the backward pass."""

    @staticmethod
    def forward(ctx, t, value):
        ctx.dtype = t.dtype
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype), None


class _Linear(nn.Module):
    """TE's Linear: its constructor keywords and forward signature, the fake's arithmetic."""

    _state: types.SimpleNamespace  # set by make(): the autocast stack of one fake TE

    def __init__(self, in_features: int, out_features: int, sequence_parallel: bool = False,
                 fuse_wgrad_accumulation: bool = False, tp_group=None, tp_size: int = 1,
                 get_rng_state_tracker: Optional[Callable] = None, rng_tracker_name: Optional[str] = None,
                 init_method: Optional[Callable] = None, bias: bool = True, return_bias: bool = False,
                 params_dtype: Optional[torch.dtype] = None, parallel_mode: Optional[str] = None,
                 parameters_split=None, device="cuda", ub_overlap_ag: bool = False, ub_overlap_rs: bool = False,
                 ub_overlap_rs_dgrad: bool = False, ub_bulk_dgrad: bool = False, ub_bulk_wgrad: bool = False,
                 ub_name: Optional[str] = None, delay_wgrad_compute: bool = False,
                 symmetric_ar_type: Optional[str] = None, save_original_input: bool = False,
                 name: Optional[str] = None) -> None:
        init_kwargs = dict(locals())
        del init_kwargs["self"], init_kwargs["__class__"]
        super().__init__()
        assert parallel_mode in (None, "column", "row"), f"parallel_mode {parallel_mode} not supported"
        self.init_kwargs = init_kwargs
        self.first_microbatch_flags: list[Optional[bool]] = []
        dtype = torch.get_default_dtype() if params_dtype is None else params_dtype
        self.register_parameter("weight", nn.Parameter(torch.empty(out_features, in_features, device=device,
                                                                   dtype=dtype)))
        (init_method or (lambda w: nn.init.normal_(w, 0.0, 0.023)))(self.weight)  # TE's default draws
        self.bias = torch.empty(0, device=device, dtype=dtype)  # bias=False: a plain empty tensor, as TE's
        self.recipe = None  # the recipe of the last FP8 forward (TE's fp8_meta["recipe"])
        self.amax_history: Optional[torch.Tensor] = None  # delayed scaling: the inputs' amaxes, newest first
        self._workspace: Optional[torch.Tensor] = None  # the quantized weight, as TE's _fp8_workspaces

    def forward(self, inp: torch.Tensor, is_first_microbatch: Optional[bool] = None, fp8_output: bool = False,
                fp8_grad: bool = False) -> torch.Tensor:
        self.first_microbatch_flags.append(is_first_microbatch)
        active = self._state.stack[-1] if self._state.stack else None
        if active is None or not active["enabled"]:
            return F.linear(inp, self.weight)
        self.recipe = recipe = active["recipe"]
        if is_first_microbatch is not False or self._workspace is None:
            workspace = _quantize_dequantize(self.weight, self.weight.detach().abs().amax())
            self._workspace = workspace if is_first_microbatch is not None else None
        else:
            workspace = self._workspace
        weight = _StraightThrough.apply(self.weight, workspace)
        amax_now = inp.detach().abs().amax().float()
        if isinstance(recipe, DelayedScaling):
            if self.amax_history is None:
                self.amax_history = torch.zeros(recipe.amax_history_len)
            history = self.amax_history
            amax = history.max() if recipe.amax_compute_algo == "max" else history[0]
            history.copy_(torch.roll(history, 1))
            history[0] = amax_now
        else:
            amax = amax_now
        return F.linear(_StraightThrough.apply(inp, _quantize_dequantize(inp, amax)), weight)

    def get_extra_state(self) -> torch.Tensor:
        if not isinstance(self.recipe, DelayedScaling) or self.amax_history is None:
            return torch.empty(0, dtype=torch.uint8)
        state = {"recipe": self.recipe, "amax_history_fwd": self.amax_history.clone(),
                 "extra_fp8_variables": {"num_gemms": 1}}
        return torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8)

    def set_extra_state(self, state: Optional[torch.Tensor]) -> None:
        if state is None or state.numel() == 0:
            return
        if os.getenv(UNSAFE_PICKLE, "0") != "1":
            raise RuntimeError(f"Refusing to load pickled Transformer Engine extra state for {type(self).__name__}. "
                               f"To load it anyway, set {UNSAFE_PICKLE}=1.")
        loaded = pickle.loads(state.numpy().tobytes())
        self.recipe, self.amax_history = loaded["recipe"], loaded["amax_history_fwd"]


def make(*, autocast: bool = True) -> types.SimpleNamespace:
    """A fresh fake `transformer_engine` (`autocast=False`: TE before 2.9, with only `fp8_autocast`)."""
    state = types.SimpleNamespace(stack=[])
    calls = types.SimpleNamespace(autocast=[], fp8_autocast=[])

    class Linear(_Linear):
        _state = state

    class _Autocast:
        def __init__(self, enabled: bool = True, calibrating: bool = False, recipe=None,
                     amax_reduction_group=None, _graph: bool = False) -> None:
            self.arguments = {"enabled": enabled, "recipe": recipe, "group": amax_reduction_group}

        def __enter__(self):
            state.stack.append(self.arguments)
            return self

        def __exit__(self, *exc) -> None:
            state.stack.pop()

    def autocast_(enabled: bool = True, calibrating: bool = False, recipe=None, amax_reduction_group=None,
                  _graph: bool = False):
        calls.autocast.append(dict(enabled=enabled, recipe=recipe, amax_reduction_group=amax_reduction_group))
        return _Autocast(enabled, calibrating, recipe, amax_reduction_group, _graph)

    def fp8_autocast(enabled: bool = True, calibrating: bool = False, fp8_recipe=None, fp8_group=None,
                     _graph: bool = False):
        calls.fp8_autocast.append(dict(enabled=enabled, fp8_recipe=fp8_recipe, fp8_group=fp8_group))
        return _Autocast(enabled, calibrating, fp8_recipe, fp8_group, _graph)

    pytorch = types.SimpleNamespace(Linear=Linear, fp8_autocast=fp8_autocast)
    if autocast:
        pytorch.autocast = autocast_
    recipe = types.SimpleNamespace(Format=Format, DelayedScaling=DelayedScaling,
                                   Float8CurrentScaling=Float8CurrentScaling, Float8BlockScaling=Float8BlockScaling)
    return types.SimpleNamespace(pytorch=pytorch, common=types.SimpleNamespace(recipe=recipe), calls=calls,
                                 state=state)
