"""NVIDIA apex's fused kernels, where apex is installed: fused RMSNorm / LayerNorm and FusedAdam.

Optional: nothing requires apex, torch is the reference and the fallback. Detection has to see
through two traps. PyPI's `apex` is an unrelated package (a Pyramid toolkit), so the name alone
proves nothing: NVIDIA apex is recognised by its own modules. And an apex built without its CUDA
extensions imports fine and fails only later (`apex.normalization` loads `fused_layer_norm_cuda`
when a norm first runs, FusedAdam needs `amp_C` when it is made), so the extensions are checked
too. `norm_problem` and `adam_problem` say in one line why apex cannot run on a device, or None;
the device is checked first, so a CPU run never imports apex at all, and an unrelated `apex` folder
on the path is recognised without being imported.

The apex API used here, as read in NVIDIA/apex (apex/normalization/fused_layer_norm.py,
apex/optimizers/fused_adam.py, apex/multi_tensor_apply/multi_tensor_apply.py, csrc/):
- `fused_rms_norm_affine(input, weight, normalized_shape, eps=1e-6, memory_efficient=False)` and
  `fused_layer_norm_affine(input, weight, bias, normalized_shape, eps=1e-6, memory_efficient=False)`.
  Under CUDA autocast both first cast every input to the autocast dtype; the kernel wants the weight
  in the input's dtype (the output is `empty_like(input)`, the weight is read as the output type).
- `FusedAdam(params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, adam_w_mode=True,
  weight_decay=0.0, ...)`: with adam_w_mode the kernel (csrc/multi_tensor_adam.cu, ADAM_MODE_1) does
  p -= lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * p), torch's AdamW update. Its state is
  `exp_avg` and `exp_avg_sq` per tensor but the step count per *group* (`group["step"]`, an int; torch
  keeps a `step` tensor per tensor), and its groups carry `bias_correction`: `to_torch_state` and
  `from_torch_state` convert, so that a checkpoint has torch's layout whichever optimizer wrote it.
  Every tensor must be on CUDA, and a zero-size tensor among others must never get a gradient
  (csrc/multi_tensor_apply.cuh would drop the chunks queued before it).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from typing import Callable, Optional

import torch

from parallel.errors import FoldtronError

NORM_EXTENSION = "fused_layer_norm_cuda"  # apex's compiled norm kernels (setup.py: CUDAExtension name)
ADAM_EXTENSION = "amp_C"  # its multi-tensor kernels, FusedAdam's included

NormFunction = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor], float], torch.Tensor]


class ApexError(FoldtronError, RuntimeError):
    """apex was asked for where it cannot run, or a checkpoint's state cannot be put into FusedAdam's layout."""


def cuda_device(device: torch.device | str) -> bool:
    """Whether `device` is a CUDA device of this machine (the tests replace this to try the rest on the CPU)."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def norm_problem(device: torch.device | str) -> Optional[str]:
    """Why apex's fused RMSNorm / LayerNorm cannot run on `device`, or None."""
    return _problem(device, package="normalization", module="apex.normalization.fused_layer_norm",
                    names=("fused_rms_norm_affine", "fused_layer_norm_affine"), extension=NORM_EXTENSION)


def adam_problem(device: torch.device | str) -> Optional[str]:
    """Why apex's FusedAdam cannot run on `device`, or None."""
    return _problem(device, package="optimizers", module="apex.optimizers", names=("FusedAdam",),
                    extension=ADAM_EXTENSION)


def _problem(device, *, package: str, module: str, names: tuple[str, ...], extension: str) -> Optional[str]:
    if not cuda_device(device):
        return "apex fused kernels need a CUDA device"
    if not _findable("apex"):
        return "apex is not installed"
    subpackage = f"apex.{package}"
    if not _may_hold(package):
        return f"the installed apex is not NVIDIA apex (no {subpackage})"
    if not _findable(extension):
        return f"NVIDIA apex without its CUDA extensions ({extension})"
    try:
        found = importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name in (subpackage, module, "apex"):
            return f"the installed apex is not NVIDIA apex (no {subpackage})"
        return f"importing {module} failed ({_first_line(err)})"
    except Exception as err:  # apex's own import failing must not stop a run that can use torch
        return f"importing {module} failed ({_first_line(err)})"
    missing = [name for name in names if not hasattr(found, name)]
    if missing:
        return f"the installed apex is not NVIDIA apex, or too old (no {module}.{missing[0]})"
    try:
        importlib.import_module(extension)
    except Exception as err:  # built against another torch or CUDA: undefined symbols and the like
        return f"NVIDIA apex's {extension} extension does not load ({_first_line(err)})"
    return None


def _findable(name: str) -> bool:
    """Whether a top-level module can be imported, without importing it."""
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _may_hold(package: str) -> bool:
    """Whether the installed `apex` can hold `apex.<package>`. An apex not imported yet is looked at on disk,
    so that an unrelated package of that name is never executed; one already imported is asked."""
    module = sys.modules.get("apex")
    if module is not None:
        return hasattr(module, "__path__")  # a package; whether it holds `package` the import says
    spec = importlib.util.find_spec("apex")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return any(os.path.isdir(os.path.join(folder, package)) for folder in locations)


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"


# ----------------------------------------------------------------------------- the norms


def norm_function(kind: str) -> NormFunction:
    """apex's fused norm for `kind` ("rmsnorm" or "layernorm") as f(x, weight, bias, eps) over the last dimension,
    taking the same tensors and giving the same dtype as torch's F.rms_norm / F.layer_norm. Autocast is turned off
    around it: apex would otherwise cast the fp32 residual stream and the fp32 weights to bf16, which torch's
    norms do not do, and the two implementations would no longer compute the same thing."""
    try:
        fused = importlib.import_module("apex.normalization.fused_layer_norm")
    except Exception as err:
        raise ApexError(f"apex's fused norms are not usable: importing apex.normalization failed ({_first_line(err)}); "
                        "use model.norm_impl=torch") from None
    if kind == "rmsnorm":
        rms = fused.fused_rms_norm_affine

        def rms_norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
            with torch.autocast(x.device.type, enabled=False):
                return rms(x, weight.to(x.dtype), (x.shape[-1],), eps)

        return rms_norm
    if kind == "layernorm":
        ln = fused.fused_layer_norm_affine

        def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
            with torch.autocast(x.device.type, enabled=False):
                return ln(x, weight.to(x.dtype), bias.to(x.dtype), (x.shape[-1],), eps)

        return layer_norm
    raise ValueError(f"no apex norm for {kind!r}: rmsnorm or layernorm")


# ----------------------------------------------------------------------------- the optimizer


def fused_adam(groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float) -> torch.optim.Optimizer:
    """apex's FusedAdam in AdamW mode over `groups` (each with its own weight_decay), bias-corrected as torch's AdamW.
    Its tensors must be on CUDA: FusedAdam's kernels check it when they run."""
    try:
        optimizers = importlib.import_module("apex.optimizers")
    except Exception as err:
        raise ApexError(f"apex's FusedAdam is not usable: importing apex.optimizers failed ({_first_line(err)})") \
            from None
    return optimizers.FusedAdam(groups, lr=lr, betas=betas, eps=eps, weight_decay=0.0, adam_w_mode=True,
                                bias_correction=True)


@functools.cache
def _torch_group_defaults() -> dict:
    """The keys (and defaults) of a torch AdamW parameter group besides its tensors: a checkpoint's layout, and what
    DCP expects to find when it loads one into torch's AdamW."""
    group = torch.optim.AdamW([torch.zeros(0)]).param_groups[0]
    return {k: v for k, v in group.items() if k not in ("params", "param_names")}


_HYPER = ("lr", "betas", "eps", "weight_decay")


def to_torch_state(state_dict: dict) -> dict:
    """FusedAdam's state dict in torch AdamW's layout: a `step` tensor per tensor (the count of its group) and torch's
    group keys. The moment tensors are FusedAdam's own, so that loading a checkpoint into them is loading in place."""
    state = {}
    for group in state_dict["param_groups"]:
        for index in group["params"]:
            if index in state_dict["state"]:
                own = state_dict["state"][index]
                state[index] = {"step": torch.tensor(float(group["step"]), dtype=torch.float32),
                                "exp_avg": own["exp_avg"], "exp_avg_sq": own["exp_avg_sq"]}
    groups = [{**_torch_group_defaults(), **{k: g[k] for k in _HYPER}, "params": list(g["params"])}
              for g in state_dict["param_groups"]]
    return {"state": state, "param_groups": groups}


def from_torch_state(state_dict: dict) -> dict:
    """A state dict in torch AdamW's layout (from either optimizer: see `to_torch_state`) in FusedAdam's: the step
    count moves to the group, which FusedAdam steps as one."""
    state = {i: {"exp_avg": s["exp_avg"], "exp_avg_sq": s["exp_avg_sq"]} for i, s in state_dict["state"].items()}
    groups = []
    for k, group in enumerate(state_dict["param_groups"]):
        steps = {float(state_dict["state"][i]["step"]) for i in group["params"] if i in state_dict["state"]}
        if len(steps) > 1:
            raise ApexError(f"parameter group {k} of the checkpoint has tensors at different steps {sorted(steps)}: "
                            "FusedAdam steps a group at once; resume it with optimizer.impl=torch")
        converted = {**{h: group[h] for h in _HYPER}, "betas": tuple(group["betas"]), "bias_correction": True,
                     "params": list(group["params"])}
        if steps:
            converted["step"] = int(steps.pop())
        groups.append(converted)
    return {"state": state, "param_groups": groups}
