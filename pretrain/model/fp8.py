"""FP8 for a built model: which GEMMs run in FP8, through which backend, and what the training loop does for them.

`apply_fp8` is a model converter (torchtitan's word): the model is built as always, then the linear layers
of the decoder layers get an FP8 GEMM object in their `fp8` attribute (parallel/fp8.py for the torch
backend, parallel/te_backend.py for Transformer Engine). Parameters, their names, placements and the
checkpoint layout do not change, so a bf16 checkpoint resumes in FP8 and the other way round.

What stays in bf16, always: the embedding, the output layer (fused with the loss), the MoE router (fp32);
by choice: the first and last decoder layers (`precision.fp8.bf16_first_layers` / `bf16_last_layers`) and
GEMMs whose global weight has fewer than `precision.fp8.min_weight_elements` elements. The experts run the
torch backend's grouped FP8 GEMM where the device has it (CUDA compute capability 9.0+; emulated on the
CPU), under either backend; elsewhere they stay bf16 and the run's description says so.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn as nn

from parallel import fp8 as torch_fp8
from parallel.collectives import group_size
from parallel.placement import placement_of
from parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from parallel.topology import Topology
from pretrain.model.features import ModelFeature
from pretrain.model.moe import Experts


def recipe_of(fp8_cfg) -> torch_fp8.Fp8Recipe:
    return torch_fp8.Fp8Recipe(scaling=fp8_cfg.recipe, format=fp8_cfg.format, amax_history_len=fp8_cfg.amax_history_len,
                               amax_compute_algo=fp8_cfg.amax_compute_algo, margin=fp8_cfg.margin)


def fp8_layers(num_layers: int, fp8_cfg) -> range:
    """The decoder layers (global numbers) whose GEMMs may run in FP8."""
    return range(fp8_cfg.bf16_first_layers, num_layers - fp8_cfg.bf16_last_layers)


def device_problem(device: torch.device, backend: str = "torch") -> Optional[str]:
    """Why FP8 GEMMs of `backend` cannot run on `device`, or None (the CPU runs torch's CPU kernel; Transformer
    Engine, CUDA only, is then asked whether it imports)."""
    if backend == "te":
        from parallel import te_backend

        if device.type != "cuda":
            return (f"Transformer Engine runs on CUDA devices only (this rank has {device.type}): use "
                    "precision.fp8.backend=torch")
        status = te_backend.load()
        if not status.available:
            return status.reason
    if not hasattr(torch, "_scaled_mm"):
        return f"this torch ({torch.__version__}) has no scaled matmul (torch._scaled_mm)"
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            name = torch.cuda.get_device_name(device)
            return (f"the GPU ({name}, compute capability {capability[0]}.{capability[1]}) has no FP8 tensor "
                    "cores: FP8 needs compute capability 8.9 or more (Ada, Hopper, Blackwell)")
    return None


class Fp8Feature(ModelFeature):
    """What FP8 GEMMs ask of the training loop: quantize the weights after each optimizer step (and before the
    first step, or after a checkpoint load), never per micro-batch, and with delayed scaling reduce the step's
    amaxes over the stage's ranks (TP x DP x CP) and update the histories once per step. `autocast` is the
    context the forward pass runs in (Transformer Engine's, with its recipe and amax group; nothing for
    torch's). Its state (the histories, TE's extra state) goes into checkpoints under the GEMMs' module
    names; `state_kind` says what that state depends on.

    `gemms` and `weights`: each FP8 GEMM object and the parameter it multiplies, by name."""

    def __init__(self, gemms: dict[str, torch_fp8.Fp8Gemm], weights: dict[str, nn.Parameter], topology: Topology, *,
                 fp8_cfg, description: str, autocast=None):
        self.gemms, self.weights, self.topology, self.description = gemms, weights, topology, description
        self.fp8_cfg, self._autocast = fp8_cfg, autocast
        self.stale = True  # the weights have not been quantized yet

    def autocast(self):
        return self._autocast() if self._autocast is not None else contextlib.nullcontext()

    def refresh(self) -> None:
        """Quantize every weight now, eagerly: the forward (compiled or not) only reads the cache."""
        for name, gemm in self.gemms.items():
            gemm.refresh(self.weights[name])
        self.stale = False

    def weights_changed(self) -> None:
        """The weights were changed outside a step (a checkpoint load): quantize them before the next forward."""
        self.stale = True

    def begin_step(self, micro_batches: int) -> None:
        if self.stale:
            self.refresh()

    def end_step(self) -> None:
        amaxes = [(gemm, gemm.amaxes()) for gemm in self.gemms.values()]
        flat = [a for _, values in amaxes for a in values]
        if flat:
            reduced = torch.stack(flat)
            group = self.topology.groups["tp-dp-cp"]
            if group_size(group) > 1:
                torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.MAX, group=group)
            at = 0
            for gemm, values in amaxes:
                gemm.push_history(list(reduced[at:at + len(values)]))
                at += len(values)
        self.refresh()  # the optimizer has stepped; an evaluation before the next step sees the new weights too

    def state_kind(self) -> Optional[str]:
        """What this run's FP8 state depends on (None: it keeps none): the backend, the recipe, the history and
        which GEMMs run in FP8 on the whole model. A resume loads a checkpoint's state only of the same kind;
        otherwise (a bf16 checkpoint, another recipe, other bf16 layers) the histories start afresh."""
        f = self.fp8_cfg
        if f.backend == "torch" and f.recipe != "delayed":
            return None
        layers = f"bf16 layers {f.bf16_first_layers}+{f.bf16_last_layers}, min {f.min_weight_elements}"
        return f"{f.backend}/{f.recipe}/{f.format}/{f.amax_history_len} ({layers})"

    def state_dict(self) -> dict:
        return {name: state for name, gemm in self.gemms.items() if (state := gemm.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        for name, gemm in self.gemms.items():
            if name in state:
                gemm.load_state_dict(state[name])
        self.weights_changed()


def apply_fp8(model: nn.Module, fp8_cfg, topology: Topology, *, num_layers: int,
              device: torch.device) -> Optional[Fp8Feature]:
    """Give the chosen GEMMs of `model` (a GPT, or one pipeline stage of it) their FP8 objects; return the
    feature that drives them (None when FP8 is off). Call after the model is on its device."""
    if not fp8_cfg.enabled:
        return None
    recipe = recipe_of(fp8_cfg)
    te = autocast = None
    if fp8_cfg.backend == "te":
        from parallel import te_backend

        te = te_backend.require()  # the trainer checked it (device_problem): a TeError would name why
        te_recipe = te_backend.make_recipe(te, recipe=fp8_cfg.recipe, format=fp8_cfg.format,
                                           amax_history_len=fp8_cfg.amax_history_len,
                                           amax_compute_algo=fp8_cfg.amax_compute_algo, margin=fp8_cfg.margin)
        stage_group = topology.groups["tp-dp-cp"]
        autocast = lambda: te_backend.autocast(te, recipe=te_recipe, amax_group=stage_group)  # noqa: E731
    chosen = set(fp8_layers(num_layers, fp8_cfg))
    gemms: dict[str, torch_fp8.Fp8Gemm] = {}
    weights: dict[str, nn.Parameter] = {}
    dense = experts = 0
    experts_bf16 = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if len(parts) < 3 or parts[0] != "layers" or int(parts[1]) not in chosen:
            continue
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            if placement_of(module.weight).global_numel < fp8_cfg.min_weight_elements:
                continue
            kind = "column" if isinstance(module, ColumnParallelLinear) else "row"
            if te is not None:
                module.fp8 = te_backend.TeLinear(te, module.weight, name=name, stateful=fp8_cfg.recipe == "delayed")
            else:
                module.fp8 = torch_fp8.Fp8Linear(recipe, kind=kind, weight_group=topology.tp_group,
                                                 batch_group=topology.groups["tp-cp"], cp_group=topology.cp_group,
                                                 name=name, device=device)
            gemms[name], weights[name] = module.fp8, module.weight
            dense += 1
        elif isinstance(module, Experts):
            problem = _experts_problem(module, device)
            if problem:
                experts_bf16.append(problem)
                continue
            module.fp8 = {}
            for weight_name in ("gate", "up", "down"):
                if getattr(module, weight_name) is not None:
                    gemm = torch_fp8.Fp8GroupedLinear(kind="row" if weight_name == "down" else "column",
                                                      weight_group=topology.groups["etp"],
                                                      name=f"{name}.{weight_name}")
                    module.fp8[weight_name] = gemms[f"{name}.{weight_name}"] = gemm
                    weights[f"{name}.{weight_name}"] = getattr(module, weight_name)
                    experts += 1
    description = (f"{precision_label(fp8_cfg)}: {dense} dense GEMM weights"
                   + (f", {experts} expert stacks (rowwise)" if experts else "")
                   + (f"; experts stay bf16 ({experts_bf16[0]})" if experts_bf16 else ""))
    return Fp8Feature(gemms, weights, topology, fp8_cfg=fp8_cfg, description=description, autocast=autocast)


def _experts_problem(experts: Experts, device: torch.device) -> Optional[str]:
    if experts.kind == "loop":
        return "model.moe.experts=loop runs no grouped GEMM"
    if device.type != "cpu" and not torch_fp8.grouped_kernel_available(device):
        return ("this device has no grouped FP8 GEMM (torch._scaled_grouped_mm needs CUDA compute capability 9.x "
                "or 10.x)")
    if any(w % 16 for w in experts.widths):
        return f"expert GEMM widths {list(experts.widths)} (hidden, ffn / ETP) are not multiples of 16"
    return None


def precision_label(fp8_cfg) -> str:
    """The name of an FP8 run's precision (`precision.fp8`), in the console line, metrics.jsonl and, with what it
    converted, the start-up lines."""
    return f"fp8 {fp8_cfg.backend} {fp8_cfg.recipe} {fp8_cfg.format}"


def describe(feature: Optional[Fp8Feature], dtype: str) -> str:
    """The precision as the run's description and console line show it."""
    return dtype if feature is None else f"{dtype} + {feature.description}"
