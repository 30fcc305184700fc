"""The mixture-of-experts block: route each token, send it to its experts' ranks, run the experts, bring it back.

Under MoE parallel folding the experts have their own layout of the stage's ranks (ETP x EP x EDP)
while attention keeps TP x CP x DP: the block takes this rank's tokens as attention left them
(sequence-sharded under SP), and the dispatcher moves them over the expert groups.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from parallel.expert_parallel import build_dispatcher
from parallel.topology import Topology
from pretrain.config import ModelConfig
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
        first = [local, ffn // etp, hidden]
        self.gate = nn.Parameter(torch.empty(first)) if self.swiglu else None
        self.up = nn.Parameter(torch.empty(first))
        self.down = nn.Parameter(torch.empty(local, hidden, ffn // etp))
        ep_rank = topology.coords["ep"]
        for param, full, dim in ((self.gate, [ffn, hidden], 1), (self.up, [ffn, hidden], 1),
                                 (self.down, [hidden, ffn], 2)):
            if param is None:
                continue
            param.expert = True
            param.experts = range(ep_rank * local, (ep_rank + 1) * local)  # their global numbers
            param.full_shape = (moe.num_experts, *full)
            param.partition_dim = dim if etp > 1 else None
        self.kind = moe.experts  # "grouped" is checked by the config: this torch has the op
        self.widths = (hidden, ffn // etp)

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
        ends = torch.tensor(tokens_per_expert, device=x.device).cumsum(0).to(torch.int32)
        weights = [w for w in (self.gate, self.up, self.down) if w is not None]
        if torch.is_autocast_enabled(x.device.type):  # autocast does not cover the grouped matmul
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weights = x.to(dtype), [w.to(dtype) for w in weights]
        matmul = lambda a, w: F.grouped_mm(a, w.transpose(1, 2), offs=ends)  # noqa: E731
        if self.swiglu:
            gate, up, down = weights
            h = F.silu(matmul(x, gate)) * matmul(x, up)
        else:
            up, down = weights
            h = F.gelu(matmul(x, up), approximate="tanh")
        return matmul(h * probs[:, None].to(h.dtype), down)


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
        routed, tokens_per_expert, routed_probs = self.dispatcher.dispatch(tokens, probs, routing_map)
        y = self.dispatcher.combine(self.experts(routed, tokens_per_expert, routed_probs)).view(batch, seq, hidden)
        return y.to(x.dtype) + self.shared(x) if self.shared is not None else y.to(x.dtype)
