"""NVIDIA Transformer Engine (TE) as the FP8 backend of the dense tensor-parallel layers.

`TeLinear` keeps parallel/fp8.py's protocol (`layer.fp8(x, weight)`, `refresh`, `amaxes`, `push_history`,
`state_dict`), so a layer does not know which backend it runs. TE is optional and never imported when this
module is: `load` imports it on demand and says in one line why it cannot (`import transformer_engine` raises
RuntimeError, not ImportError, when its CUDA core is missing, and OSError when a CUDA library does not load).
`load(module=)` takes a stand-in: the tests run against tests/fake_te.py, as TE does not install without CUDA.

Decisions, and why:
- TE runs only the local GEMM. Its `Linear` is built with `parallel_mode=None`, `tp_group=None`, `tp_size=1`,
  `sequence_parallel=False`; foldtron's layers gather and reduce-scatter around the call as they do for the
  torch backend. One tested TP/SP/CP code path serves both backends; the cost is that TE's FP8 all-gather
  and its comm/GEMM overlap (userbuffers) are not used.
- TE computes with our parameter. The TE module's `weight` is replaced by the layer's (this rank's shard, the
  fp32 master), and the TE module is held in a plain attribute, not registered as a submodule: parameter
  names, placements and checkpoints are those of the torch backend, and a bf16 checkpoint resumes under TE.
  Should the layer's parameter object change (a loader or `swap_tensors` replacing it), the next call
  registers the new one and quantizes it afresh. TE is given `init_method` that leaves the values alone:
  its default draws normal(0, 0.023) from the device generator, which would shift the run's random streams
  and spend time on a tensor that is thrown away. `fuse_wgrad_accumulation` stays off: the weight gradient
  arrives in `weight.grad` as for any parameter.
- Not used: `LayerNormLinear`, because our norm runs before the SP gather, on sequence shards, and its
  weight gradient is a partial sum over TP that the gradient synchronisation completes; `GroupedLinear`,
  because it owns one weight per expert where we hold one stacked parameter per projection. The experts stay
  on the torch backend's grouped FP8 GEMM under either backend.
- FP8 weight caching: `is_first_microbatch=True` at the first call after `refresh()` (the trainer calls it
  when a step begins and after the optimizer step), False after: one quantization per optimizer step, reused
  by the other micro-batches and by a recomputed forward.
- Amaxes: TE keeps and reduces its own, inside `autocast`, so `amaxes()` is empty and `push_history` does
  nothing. With `DelayedScaling` TE reduces over the amax group and updates the scales when each autocast
  region exits (forward) and in the backward pass of each region (gradients), and a module must run once
  per region: the autocast wraps one micro-batch's forward, and scales move per micro-batch, not per step
  as in the torch backend. The group is the pipeline stage's (TP x DP x CP). foldtron writes a single-rank
  group as None, TE reads None as the whole world (all stages): there the adapter turns off TE's reduction.
- With current scaling (`tensorwise`, `blockwise`) TE scales what this rank holds: a row-parallel input and
  each weight shard get their own scale, so a TP layout matches one rank up to FP8 rounding, where the torch
  backend reduces amaxes and matches it exactly.
- What the wiring must know: TE's FP8 state lives in its autocast, which a recomputed forward
  (torch.utils.checkpoint) does not re-enter unless the recomputed function enters it itself (else the
  recompute runs in bf16), and TE's GEMMs are not aten ops, so the selective policy cannot save them. TE's
  modules are a graph break for torch.compile (`no_torch_dynamo`), and an autocast with DelayedScaling
  entered inside a compiled region raises.
- Checkpoints: TE's `get_extra_state()` (a uint8 tensor, empty for stateless recipes) is stored as `bytes`,
  a variable-size object torch.distributed.checkpoint can hold. Recent TE (PR #3123) refuses to unpickle
  delayed-scaling state unless NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1; that refusal comes back as a TeError.

TE's API as read in NVIDIA/TransformerEngine at d0067d0 (2.20.0.dev0) and the tags v2.5 to v2.18:
pytorch/module/linear.py (`Linear.__init__` keywords, `forward(inp, is_first_microbatch=None, ...)`, the weight
in `weight_names == ["weight"]` read by getattr), pytorch/module/base.py (`register_parameter`,
`get_extra_state`, `set_extra_state`), pytorch/quantization.py (`autocast(enabled, calibrating, recipe,
amax_reduction_group)`, 2.9 and later; before it `fp8_autocast(enabled, calibrating, fp8_recipe, fp8_group)` in
pytorch/fp8.py, deprecated since) and common/recipe/__init__.py (`DelayedScaling`, `Float8CurrentScaling` from
2.2, `Float8BlockScaling` from 2.3, which takes HYBRID as well as E4M3). `passed_keywords` lists what is passed,
for a test against the installed TE's signatures.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from typing import Any, Optional

import torch
import torch.distributed as dist

from parallel.errors import FoldtronError
from parallel.fp8 import Fp8Gemm

FIELD = "precision.fp8.backend=te"
RECIPES = {"delayed": "DelayedScaling", "tensorwise": "Float8CurrentScaling", "blockwise": "Float8BlockScaling"}
FORMATS = {"hybrid": "HYBRID", "e4m3": "E4M3"}
AMAX_ALGOS = ("max", "most_recent")


class TeError(FoldtronError, RuntimeError):
    """Transformer Engine cannot do what the config asks; the message names the field."""


# ----------------------------------------------------------------------------- finding TE


@dataclasses.dataclass(frozen=True)
class TeStatus:
    """The `transformer_engine` package (None when unusable) and, when unusable, why."""
    te: Optional[Any]
    reason: str = ""

    @property
    def available(self) -> bool:
        return self.te is not None


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def load(module=None) -> TeStatus:
    """Import TE now (or take `module`, a stand-in), saying in one line why it cannot be used."""
    if module is not None:
        return TeStatus(module)
    if importlib.util.find_spec("transformer_engine") is None:
        return TeStatus(None, "transformer_engine is not installed (pip install transformer-engine[pytorch] on a "
                              "CUDA machine)")
    try:
        importlib.import_module("transformer_engine.pytorch")
        importlib.import_module("transformer_engine.common.recipe")
        return TeStatus(importlib.import_module("transformer_engine"))
    except ModuleNotFoundError as err:
        if (err.name or "").startswith("transformer_engine"):
            return TeStatus(None, f"transformer_engine is installed without {err.name} (pip install "
                                  "transformer-engine[pytorch] on a CUDA machine builds it)")
        return TeStatus(None, f"transformer_engine failed to import ({_first_line(err)})")
    except ImportError as err:
        return TeStatus(None, f"transformer_engine failed to import ({_first_line(err)})")
    except RuntimeError as err:
        return TeStatus(None, f"transformer_engine is installed but its CUDA core is missing or did not load "
                              f"({_first_line(err)})")
    except OSError as err:
        return TeStatus(None, f"transformer_engine could not load a shared library ({_first_line(err)})")


def require(module=None):
    """The TE package, or a TeError saying why it cannot be used."""
    status = load(module)
    if not status.available:
        raise TeError(f"{FIELD}: {status.reason}")
    return status.te


# ----------------------------------------------------------------------------- recipes and autocast


def _recipe_call(recipe: str, *, fp8_format, amax_history_len: int, amax_compute_algo: str,
                 margin: int) -> tuple[str, dict]:
    """(TE recipe class name, its keywords) for our recipe name."""
    if recipe not in RECIPES:
        raise TeError(f"precision.fp8.recipe={recipe} is not a Transformer Engine recipe ({FIELD}): choose "
                      f"one of {', '.join(RECIPES)}")
    kwargs = {"fp8_format": fp8_format}
    if recipe == "delayed":
        kwargs.update(margin=margin, amax_history_len=amax_history_len, amax_compute_algo=amax_compute_algo)
    return RECIPES[recipe], kwargs


def make_recipe(te, *, recipe: str, format: str, amax_history_len: int, amax_compute_algo: str, margin: int):
    """TE's recipe object for ours: delayed -> DelayedScaling, tensorwise -> Float8CurrentScaling, blockwise ->
    Float8BlockScaling (TE's 1x128 / 128x128 blocks). The history, algorithm and margin are delayed scaling's;
    the other recipes ignore them."""
    if format not in FORMATS:
        raise TeError(f"precision.fp8.format={format} is not a Transformer Engine format: choose "
                      f"one of {', '.join(FORMATS)}")
    if recipe == "delayed" and amax_compute_algo not in AMAX_ALGOS:  # TE takes any other string for most_recent
        raise TeError(f"precision.fp8.amax_compute_algo={amax_compute_algo}: choose one of {', '.join(AMAX_ALGOS)}")
    fp8_format = getattr(te.common.recipe.Format, FORMATS[format])
    name, kwargs = _recipe_call(recipe, fp8_format=fp8_format, amax_history_len=amax_history_len,
                                amax_compute_algo=amax_compute_algo, margin=margin)
    return getattr(te.common.recipe, name)(**kwargs)


def _autocast_call(new_api: bool, recipe, group) -> tuple[str, dict]:
    """(TE's autocast function name, its keywords): `autocast` from TE 2.9, `fp8_autocast` before."""
    if new_api:
        return "autocast", {"enabled": True, "recipe": recipe, "amax_reduction_group": group}
    return "fp8_autocast", {"enabled": True, "fp8_recipe": recipe, "fp8_group": group}


def autocast(te, *, recipe, amax_group):
    """TE's FP8 context for one micro-batch's forward, amaxes reduced over `amax_group` (the stage group, None
    when the stage is one rank). TE reads a None group as the whole world, pipeline stages included, so there
    a delayed recipe gets `reduce_amax=False`: nothing to reduce, and no collective across stages."""
    if (amax_group is None and getattr(recipe, "reduce_amax", False) and dist.is_available()
            and dist.is_initialized() and dist.get_world_size() > 1):
        recipe = dataclasses.replace(recipe, reduce_amax=False)
    name, kwargs = _autocast_call(hasattr(te.pytorch, "autocast"), recipe, amax_group)
    return getattr(te.pytorch, name)(**kwargs)


# ----------------------------------------------------------------------------- one linear layer


def _keep_values(tensor: torch.Tensor) -> None:
    """TE's `init_method` here: its weight is replaced by ours, so nothing is drawn for it."""


def _linear_kwargs(weight: torch.Tensor, *, name: str) -> dict:
    """The keywords of TE's `Linear` for a local GEMM on `weight` [out, in]: no TP inside TE, no bias."""
    out_features, in_features = weight.shape
    return dict(in_features=in_features, out_features=out_features, bias=False, parallel_mode=None,
                tp_group=None, tp_size=1, sequence_parallel=False, params_dtype=weight.dtype,
                device=weight.device, init_method=_keep_values, name=name)


class TeLinear(Fp8Gemm):
    """y = x W^T for one layer, by TE's `Linear` computing with the layer's own parameter W [N, K] (this rank's
    shard). `name`: the layer's module name, for TE's logs and for errors. `stateful`: the recipe keeps state
    (delayed scaling), so `state_dict` names its extra state even before TE has any: a fresh run's dict is
    the template a resume loads the checkpoint's state into."""

    def __init__(self, te, weight: torch.nn.Parameter, *, name: str, stateful: bool = False):
        self.name, self.stateful = name, stateful
        self.module = te.pytorch.Linear(**_linear_kwargs(weight, name=name))  # a plain attribute: no submodule
        self.module.register_parameter("weight", weight)
        self._first = True

    def __call__(self, x: torch.Tensor, weight: torch.nn.Parameter) -> torch.Tensor:
        if self.module.weight is not weight:  # the layer's parameter was replaced: compute with the new one
            self.module.register_parameter("weight", weight)
            self._first = True
        first, self._first = self._first, False
        return self.module(x, is_first_microbatch=first)

    def refresh(self, weight: torch.nn.Parameter) -> None:
        """The weight has changed (an optimizer step, a checkpoint load): TE quantizes it at the next call (its
        amaxes it keeps and reduces itself, inside its autocast: `amaxes` stays empty)."""
        self._first = True

    def state_dict(self) -> dict[str, bytes]:
        """TE's extra state (delayed scaling's scales and amax histories) as bytes; empty for stateless recipes."""
        state = self.module.get_extra_state()
        return {"extra_state": state.detach().cpu().numpy().tobytes()} if state.numel() or self.stateful else {}

    def load_state_dict(self, state: dict) -> None:
        unknown = sorted(set(state) - {"extra_state"})
        if unknown:
            raise TeError(f"{FIELD}: the checkpoint's FP8 state of {self.name} holds {', '.join(unknown)}, not "
                          "Transformer Engine's extra state: it was written by another FP8 backend")
        data = state.get("extra_state", b"")
        tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        try:
            self.module.set_extra_state(tensor)
        except RuntimeError as err:
            raise TeError(f"{FIELD}: Transformer Engine refused the checkpoint's FP8 state of {self.name} "
                          f"({_first_line(err)})") from err
        self._first = True


def passed_keywords() -> dict[str, tuple[str, ...]]:
    """The keywords this adapter passes to each TE callable, by its path under `transformer_engine`, for a test
    against the installed TE's signatures. Of the two autocasts one is used: `autocast` where it exists."""
    probe = torch.empty(16, 16, device="meta")
    keywords = {"pytorch.Linear": tuple(_linear_kwargs(probe, name="probe")),
                "pytorch.Linear.forward": ("is_first_microbatch",)}
    for new_api in (True, False):
        name, kwargs = _autocast_call(new_api, None, None)
        keywords[f"pytorch.{name}"] = tuple(kwargs)
    for recipe, cls in RECIPES.items():
        _, kwargs = _recipe_call(recipe, fp8_format=None, amax_history_len=1, amax_compute_algo="max", margin=0)
        keywords[f"common.recipe.{cls}"] = tuple(kwargs)
    return keywords
