"""The MoE router: which experts each token goes to, with what weight, and the losses that keep experts balanced.

Scores: `softmax` (top-k of the logits, then a softmax over the k; or with `pre_softmax` a softmax
over all experts, then its top-k) or `sigmoid` (renormalised over the k; an expert bias, updated
after each step from token counts, may shift the *choice* without touching the weights).
Group-limited routing first keeps each token's best `group_top_k` of `num_groups` expert groups.

Load-balancing losses (Switch-style, E·coeff/(k·T²) · Σ_i P_i · n_i, with P_i this rank's summed
probabilities of expert i and n_i the tokens choosing i) differ in where n_i and T are counted:
`aux_loss` over the micro-batch's sequence shards (TP x CP), `seq_aux_loss` per sequence,
`global_aux_loss` over TP x DP x CP and the micro-batches so far (times DP, so that it has the
scale of `aux_loss`: Megatron-LM's is DP times weaker, its issue #3672). Each rank's value is a
partial (its own probabilities): the partials of TP x CP sum to the micro-batch's loss (for
`global_aux_loss`: the partials of TP x DP x CP, divided by DP, to the mean over DP). The losses
are not added to the training loss; their gradient is injected by `AuxLossScaler` in backward,
scaled by CP / micro-batches so that the trainer's averaging over DP x CP and micro-batches
leaves exactly the loss's gradient. The z-loss (mean squared logsumexp of the logits) goes the same way.

With a capacity factor, an expert keeps at most ceil(k T / E · factor) of this rank's tokens (the
highest probabilities, or the first positions); `pad_to_capacity` fills every expert to exactly
that many with zero-probability tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from parallel.collectives import group_size
from parallel.placement import replicated
from parallel.topology import Topology
from pretrain.config_moe import MoEConfig


class AuxLossScaler(torch.autograd.Function):
    """Forward: `x` unchanged. Backward: also sends gradient `scale` into `loss`, so its graph gets differentiated
    with this layer's backward, on this stage, without changing the training loss's value."""

    @staticmethod
    def forward(ctx, x, loss, scale: float):
        ctx.save_for_backward(loss)
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (loss,) = ctx.saved_tensors
        return grad, torch.full_like(loss, ctx.scale), None


def expert_capacity(tokens: int, top_k: int, num_experts: int, *, factor: float) -> int:
    return min(tokens, math.ceil(tokens * top_k / num_experts * factor))


class Router(nn.Module):
    def __init__(self, cfg: MoEConfig, hidden_size: int, topology: Topology):
        super().__init__()
        self.cfg = cfg
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        # replicated on the stage's ranks; under SP it sees only this rank's tokens
        self.weight = replicated(nn.Parameter(torch.empty(cfg.num_experts, hidden_size)),
                                 partial_over_tp=topology.sequence_parallel)
        self.sequence_group = topology.groups["tp-cp"]  # the shards of one micro-batch's sequences
        self.global_group = topology.groups["tp-dp-cp"]
        self.use_bias = cfg.router.expert_bias_update_rate > 0
        if self.use_bias:
            self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))
        self.recomputing = False  # set by pretrain/model/recompute.py while this layer is recomputed in backward
        self.begin_step(loss_scale=1.0)

    def begin_step(self, *, loss_scale: float) -> None:
        """Start a step: forget the last step's statistics; `loss_scale` multiplies the injected gradients of the
        balancing and z-losses (CP / micro-batches: see the module docstring)."""
        self.loss_scale = loss_scale
        zeros = lambda *shape: torch.zeros(shape, device=self.weight.device)  # noqa: E731
        self.stats = {"aux": zeros(), "z": zeros(), "tokens": zeros(self.num_experts), "routed": zeros(),
                      "kept": zeros(), "micro_batches": 0}
        self.global_tokens = zeros(self.num_experts)  # global_aux_loss: the micro-batches so far, over TP x DP x CP

    def forward(self, x: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H] this rank's tokens (`batch` sequences of T / batch tokens each). Returns the routing
        probabilities [T, E] (zero where a token does not go) and the routing map [T, E] (bool).
        Routing runs in fp32 also under bf16 autocast: the choice of experts is sensitive to rounding."""
        with torch.autocast(x.device.type, enabled=False):
            return self._route(x.float(), batch)

    def _route(self, x: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight.float())
        training = self.training and torch.is_grad_enabled()
        record = training and not self.recomputing  # a recomputed forward (model.recompute) counts nothing twice
        router = self.cfg.router
        if training and router.z_loss_coeff > 0:
            z = torch.logsumexp(logits, dim=-1).square().mean() * router.z_loss_coeff / group_size(self.sequence_group)
            logits = AuxLossScaler.apply(logits, z, self.loss_scale)
            if record:
                self.stats["z"] += z.detach() / router.z_loss_coeff
        probs, routing_map = self.top_k_routing(logits)
        if training and router.load_balancing != "none" and router.aux_loss_coeff > 0:
            aux = self.load_balancing_loss(logits, batch)
            probs = AuxLossScaler.apply(probs, aux, self.loss_scale)
            if record:
                self.stats["aux"] += aux.detach() / router.aux_loss_coeff
        chosen = routing_map
        if self.cfg.capacity_factor is not None:
            probs, routing_map = self.apply_capacity(probs, routing_map)
        if record:
            self.stats["tokens"] += (routing_map & chosen).sum(0)
            self.stats["routed"] += chosen.sum()
            self.stats["kept"] += (routing_map & chosen).sum()
            self.stats["micro_batches"] += 1
        return probs, routing_map

    def top_k_routing(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        router, k = self.cfg.router, self.top_k
        if router.score == "sigmoid":
            scores = torch.sigmoid(logits)
            choice = scores + self.expert_bias if self.use_bias else scores
        elif router.pre_softmax:
            scores = choice = torch.softmax(logits, dim=-1)
        else:
            scores, choice = None, logits
        chosen = self._choose(choice.detach())
        if scores is None:  # softmax over the chosen logits
            weights = torch.softmax(logits.gather(-1, chosen), dim=-1)
        else:
            weights = scores.gather(-1, chosen)
            if router.score == "sigmoid" and k > 1:
                weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        probs = torch.zeros_like(logits).scatter(-1, chosen, weights)
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, chosen, True)
        return probs, routing_map

    def _choose(self, choice: torch.Tensor) -> torch.Tensor:
        """The top-k experts of each token by `choice`, within its best groups under group-limited routing."""
        router, k = self.cfg.router, self.top_k
        if router.num_groups:
            T, G = choice.shape[0], router.num_groups
            grouped = choice.view(T, G, -1)
            group_scores = grouped.topk(k // router.group_top_k, dim=-1).values.sum(-1)  # [T, G]
            best = group_scores.topk(router.group_top_k, dim=-1).indices
            keep = torch.zeros(T, G, dtype=torch.bool, device=choice.device).scatter(-1, best, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(T, -1)
        return choice.topk(k, dim=-1).indices

    def load_balancing_loss(self, logits: torch.Tensor, batch: int) -> torch.Tensor:
        """This rank's partial of the configured balancing loss, from the full score distribution and its
        unbiased top-k (before any dropping)."""
        router, E, k = self.cfg.router, self.num_experts, self.top_k
        if router.score == "sigmoid":
            scores = torch.sigmoid(logits)
            scores = scores / (scores.sum(-1, keepdim=True) + 1e-20)
        else:
            scores = torch.softmax(logits, dim=-1)
        chosen = torch.zeros_like(scores).scatter(-1, logits.detach().topk(k, dim=-1).indices, 1.0)
        coeff = router.aux_loss_coeff
        if router.load_balancing == "seq_aux_loss":
            per_sequence = chosen.view(batch, -1, E).sum(1)  # [B, E]
            _all_reduce(per_sequence, self.sequence_group)
            length = chosen.shape[0] // batch * group_size(self.sequence_group)
            probs = scores.view(batch, -1, E).sum(1)
            return E * coeff / (k * length**2) * (probs * per_sequence).sum() / batch
        counts = chosen.sum(0)
        if router.load_balancing == "global_aux_loss":
            _all_reduce(counts, self.global_group)
            self.global_tokens = self.global_tokens.to(counts.device) + counts
            mean_counts = self.global_tokens / (self.stats["micro_batches"] + 1)
            total = chosen.shape[0] * group_size(self.global_group)
            dp = group_size(self.global_group) // group_size(self.sequence_group)
            return dp * E * coeff / (k * total**2) * (scores.sum(0) * mean_counts).sum()
        _all_reduce(counts, self.sequence_group)
        total = chosen.shape[0] * group_size(self.sequence_group)
        return E * coeff / (k * total**2) * (scores.sum(0) * counts).sum()

    def apply_capacity(self, probs: torch.Tensor, routing_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep at most `capacity` tokens per expert (this rank's tokens); with padding, exactly `capacity`."""
        T = probs.shape[0]
        capacity = expert_capacity(T, self.top_k, self.num_experts, factor=self.cfg.capacity_factor)
        if self.cfg.drop_policy == "probs":
            rank = probs.detach()
        else:  # earlier positions first; routed tokens before the others (integers: exact for any T)
            position = torch.arange(T, 0, -1, device=probs.device)[:, None]
            rank = routing_map.long() * (T + 1) + position
        keep = torch.zeros_like(routing_map).scatter(0, rank.topk(capacity, dim=0).indices, True)
        routing_map = keep if self.cfg.pad_to_capacity else routing_map & keep
        return probs * routing_map, routing_map

    def step_statistics(self) -> torch.Tensor:
        """This rank's sums over the step so far: [balancing loss (without its coefficient), z-loss, routed
        token-expert pairs, kept pairs, tokens per expert (E values)]."""
        s = self.stats
        return torch.cat([torch.stack([s["aux"], s["z"], s["routed"], s["kept"]]), s["tokens"]])

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """After an optimizer step: raise the bias of experts that got fewer tokens than the mean, lower the others."""
        counts = self.stats["tokens"].clone()
        _all_reduce(counts, self.global_group)
        self.expert_bias += self.cfg.router.expert_bias_update_rate * torch.sign(counts.mean() - counts)


def _all_reduce(x: torch.Tensor, group) -> None:
    if group_size(group) > 1:
        torch.distributed.all_reduce(x, group=group)
