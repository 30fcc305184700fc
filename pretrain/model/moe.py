"""The mixture-of-experts block: route each token, send it to its experts' ranks, run the experts, bring it back.

Under MoE parallel folding the experts have their own layout of the stage's ranks (ETP x EP x EDP)
while attention keeps TP x CP x DP: the block takes this rank's tokens as attention left them
(sequence-sharded under SP), and the dispatcher moves them over the expert groups.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from parallel.collectives import group_size
from parallel.expert_parallel import build_dispatcher
from parallel.pipeline import gather_over_stages
from parallel.placement import Placement, place, split
from parallel.topology import Topology
from parallel.transfers import to_device
from pretrain.config import ModelConfig
from pretrain.model.features import ModelFeature
from pretrain.model.router import Router


class Experts(nn.Module):
    """This rank's E / EP experts, stacked ([local expert, out, in]); each MLP is split over ETP (first
    matmuls by columns, the second by rows: the outputs are partial sums, added over ETP by the combine).
    The routing probability multiplies the activation, before the second matmul."""

    def __init__(self, cfg: ModelConfig, topology: Topology):
        super().__init__()
        moe, sizes = cfg.moe, topology.sizes
        local = moe.num_experts // sizes.ep
        etp = sizes.expert_tp
        ffn, hidden = moe.ffn_hidden_size or cfg.ffn_size, cfg.hidden_size
        self.swiglu = cfg.activation == "swiglu"
        ep_rank, etp_rank = topology.index_in("ep"), topology.index_in("etp")

        def stack(rows: int, columns: int, etp_dim: int) -> nn.Parameter:
            """This rank's experts of a [num_experts, rows, columns] stack, dim `etp_dim` split over ETP."""
            shape = [local, rows, columns]
            shape[etp_dim] //= etp
            placement = Placement((moe.num_experts, rows, columns),
                                  split(0, "ep", rank=ep_rank, size=sizes.ep)
                                  + split(etp_dim, "etp", rank=etp_rank, size=etp),
                                  tensor_group="etp", data_group="edp")
            return place(nn.Parameter(torch.empty(shape)), placement)

        self.gate = stack(ffn, hidden, 1) if self.swiglu else None
        self.up = stack(ffn, hidden, 1)
        self.down = stack(hidden, ffn, 2)
        self.kind = moe.experts  # "grouped" is checked by the config: this torch has the op
        self.widths = (hidden, ffn // etp)
        self.fp8 = None  # {"gate": ..., "up": ..., "down": ...}: FP8 grouped GEMMs, when the run enables them

    def use_grouped(self, x: torch.Tensor) -> bool:
        """The grouped matmul needs rows of 16-byte multiples, and on CUDA bf16; its backward cannot take zero
        rows. `auto` falls back to the loop where it cannot run; `grouped` insists."""
        if self.kind == "loop" or not hasattr(F, "grouped_mm") or x.shape[0] == 0:
            return False
        if self.kind == "grouped":
            return True
        autocast = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        aligned = all(width * dtype.itemsize % 16 == 0 for width in self.widths)
        return aligned and (x.device.type == "cpu" or dtype == torch.bfloat16)

    def forward(self, x: torch.Tensor, tokens_per_expert: list[int], probs: torch.Tensor) -> torch.Tensor:
        if self.use_grouped(x):
            return self._grouped(x, tokens_per_expert, probs)
        outputs = []
        for i, (rows, p) in enumerate(zip(x.split(tokens_per_expert), probs.split(tokens_per_expert))):
            h = F.linear(rows, self.up[i])
            h = F.silu(F.linear(rows, self.gate[i])) * h if self.swiglu else F.gelu(h, approximate="tanh")
            outputs.append(F.linear(h * p[:, None].to(h.dtype), self.down[i]))
        return torch.cat(outputs)

    def _grouped(self, x: torch.Tensor, tokens_per_expert: list[int], probs: torch.Tensor) -> torch.Tensor:
        # the offsets go to the device without a host sync (a plain torch.tensor(..., device=) would wait)
        ends = to_device(torch.tensor(tokens_per_expert), x.device).cumsum(0).to(torch.int32)
        if self.fp8 is not None:  # FP8 GEMMs quantize the fp32 weights themselves (once per step)
            matmul = lambda a, name: self.fp8[name](a, getattr(self, name), ends)  # noqa: E731
        else:  # autocast does not cover the grouped matmul
            autocast = torch.is_autocast_enabled(x.device.type)
            dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
            matmul = lambda a, name: F.grouped_mm(a.to(dtype), getattr(self, name).to(dtype).transpose(1, 2),  # noqa: E731
                                                  offs=ends)
        if self.swiglu:
            h = F.silu(matmul(x, "gate")) * matmul(x, "up")
        else:
            h = F.gelu(matmul(x, "up"), approximate="tanh")
        return matmul(h * probs[:, None].to(h.dtype), "down")


class MoE(nn.Module):
    """Router, dispatcher, experts and an optional shared expert (a dense MLP on the attention TP group)."""

    def __init__(self, cfg: ModelConfig, topology: Topology, shared: nn.Module | None):
        super().__init__()
        self.router = Router(cfg.moe, cfg.hidden_size, topology)
        self.experts = Experts(cfg, topology)
        self.shared = shared
        self.dispatcher = build_dispatcher(cfg.moe.dispatcher, cfg.moe.num_experts, topology)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        tokens = x.reshape(-1, hidden)
        probs, routing_map = self.router(tokens, batch)
        y = self.routed(tokens, probs, routing_map).view(batch, seq, hidden)
        return y.to(x.dtype) + self.shared(x) if self.shared is not None else y.to(x.dtype)

    @torch.compiler.disable
    def routed(self, tokens: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor) -> torch.Tensor:
        """Dispatch, experts, combine: eager inside a compiled layer (`train.compile`). Their host copies, CUDA
        events and collectives are not for dynamo to trace, the split sizes change every step (each a recompile),
        and inductor's grouped matmul takes bf16 only, where the CPU's eager one also takes fp32."""
        routed, tokens_per_expert, routed_probs = self.dispatcher.dispatch(tokens, probs, routing_map)
        return self.dispatcher.combine(self.experts(routed, tokens_per_expert, routed_probs))


class MoEFeature(ModelFeature):
    """What MoE layers ask of the training loop: their routers start each step with the gradient scale of the
    injected losses (CP / micro-batches), update the expert bias after the optimizer step, and report the
    last step's statistics per layer, gathered over the stage's ranks and the pipeline: the balancing loss
    (without its coefficient: about 1 when balanced) and z-loss as means over micro-batches and DP, tokens
    per expert as max / mean, and the share of routed tokens dropped."""

    def __init__(self, routers: dict[str, Router], topology: Topology, *, z_loss: bool):
        self.routers, self.topology, self.z_loss = routers, topology, z_loss
        self.micro_batches = 1

    def begin_step(self, micro_batches: int) -> None:
        self.micro_batches = micro_batches
        for router in self.routers.values():
            router.begin_step(loss_scale=self.topology.cp / micro_batches)

    def end_step(self) -> None:
        for router in self.routers.values():
            if router.use_bias:
                router.update_expert_bias()

    def metrics(self) -> dict:
        tp, local = self.topology, sorted(self.routers, key=int)
        rows = torch.stack([self.routers[i].step_statistics() for i in local]) if local else torch.zeros(0)
        group = tp.groups["tp-dp-cp"]
        if local and group_size(group) > 1:
            torch.distributed.all_reduce(rows, group=group)
        mean_over = tp.dp * self.micro_batches
        layers = {i: {"aux_loss": float(row[0]) / mean_over, "z_loss": float(row[1]) / mean_over,
                      "routed": float(row[2]), "kept": float(row[3]),
                      "load_imbalance": float(row[4:].max() / row[4:].mean().clamp_min(1e-9))}
                  for i, row in zip(local, rows.cpu())}
        layers = gather_over_stages(layers, tp)
        total = lambda key: sum(layer[key] for layer in layers.values())  # noqa: E731
        record = {
            "moe_aux_loss": total("aux_loss") / len(layers),
            "moe_load_imbalance": total("load_imbalance") / len(layers),
            "moe_dropped_fraction": 1.0 - total("kept") / total("routed"),
            "moe_aux_loss_by_layer": {i: layer["aux_loss"] for i, layer in layers.items()},
            "moe_load_imbalance_by_layer": {i: layer["load_imbalance"] for i, layer in layers.items()},
        }
        if self.z_loss:
            record["moe_z_loss"] = total("z_loss") / len(layers)
        return record
