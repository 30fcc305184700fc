"""`model.moe`: the mixture-of-experts section of the config and its validation (the layers are in
pretrain/model/moe.py and router.py). Apart from config.py because it is one concept with many fields, the
routing and the expert layout, and config.py is long enough."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import torch

from pretrain.config_checks import Problems


@dataclass
class RouterConfig:
    score: Literal["softmax", "sigmoid"] = "softmax"
    pre_softmax: bool = False  # softmax over all experts before the top-k (else: top-k logits, then softmax)
    num_groups: Optional[int] = None  # group-limited routing: experts in groups, tokens pick group_top_k groups
    group_top_k: Optional[int] = None
    load_balancing: Literal["aux_loss", "seq_aux_loss", "global_aux_loss", "none"] = "aux_loss"
    aux_loss_coeff: float = 1e-2
    z_loss_coeff: float = 0.0  # 0: no router z-loss
    expert_bias_update_rate: float = 0.0  # > 0: auxiliary-loss-free balancing by an expert bias (sigmoid scores)


@dataclass
class MoEConfig:
    num_experts: Optional[int] = None  # null: a dense model
    top_k: int = 2
    ffn_hidden_size: Optional[int] = None  # each expert's MLP width; null: model.ffn_hidden_size
    layer_freq: Union[int, list[int]] = 1  # k: layers 0, k, 2k, ... are MoE; a list: one 0/1 per layer
    shared_expert_ffn_hidden_size: Optional[int] = None  # a dense MLP every token goes through; null: none
    router: RouterConfig = field(default_factory=RouterConfig)
    dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    capacity_factor: Optional[float] = None  # null: dropless
    # over capacity, keep the highest probabilities or the first tokens
    drop_policy: Literal["probs", "position"] = "probs"
    pad_to_capacity: bool = False  # every expert gets exactly its capacity (fixed shapes)
    experts: Literal["auto", "grouped", "loop"] = "auto"  # auto: a grouped matmul where torch has one, else a loop

    def is_moe_layer(self, layer: int) -> bool:
        if self.num_experts is None:
            return False
        if isinstance(self.layer_freq, list):
            return bool(self.layer_freq[layer])
        return layer % self.layer_freq == 0


def config_problems(cfg, e: Problems) -> None:
    """What `model.moe` (with the expert layout of `parallel`) gets wrong, added to `e`."""
    m, p = cfg.model, cfg.parallel
    moe, router = m.moe, m.moe.router
    if moe.num_experts is None:
        if p.expert > 1 or (p.expert_tensor or p.tensor) != p.tensor:
            e.add("parallel.expert / parallel.expert_tensor lay out mixture-of-experts layers: set "
                  "model.moe.num_experts, or use expert=1 and no expert_tensor")
        return
    E = moe.num_experts
    e.positive("model.moe.num_experts", E)
    e.positive("model.moe.top_k", moe.top_k)
    if E < 1 or moe.top_k < 1:
        return
    if moe.top_k > E:
        e.add(f"model.moe.top_k={moe.top_k} exceeds model.moe.num_experts={E}")
    if moe.top_k == 1 and router.score == "softmax" and not router.pre_softmax:
        e.add("model.moe.top_k=1 with router.score=softmax after the top-k gives every token probability 1 (no "
              "gradient reaches the router): set model.moe.router.pre_softmax=true or use top_k >= 2")
    if E % p.expert:
        e.add(f"model.moe.num_experts={E} is not divisible by parallel.expert={p.expert}: each expert-parallel "
              "rank holds an equal number of experts")
    for name in ("ffn_hidden_size", "shared_expert_ffn_hidden_size", "capacity_factor"):
        if getattr(moe, name) is not None:
            e.positive(f"model.moe.{name}", getattr(moe, name))
    etp = p.expert_tensor or p.tensor
    if (moe.ffn_hidden_size or m.ffn_size) % etp:
        e.add(f"model.moe.ffn_hidden_size={moe.ffn_hidden_size or m.ffn_size} is not divisible by "
              f"parallel.expert_tensor={etp}")
    if moe.shared_expert_ffn_hidden_size and moe.shared_expert_ffn_hidden_size % p.tensor:
        e.add(f"model.moe.shared_expert_ffn_hidden_size={moe.shared_expert_ffn_hidden_size} is not divisible by "
              f"parallel.tensor={p.tensor}")
    if isinstance(moe.layer_freq, list):
        if len(moe.layer_freq) != m.num_layers or set(moe.layer_freq) - {0, 1}:
            e.add(f"model.moe.layer_freq={moe.layer_freq}: a list needs one 0 (dense) or 1 (MoE) per layer, "
                  f"{m.num_layers} in all")
        elif not any(moe.layer_freq):
            e.add("model.moe.layer_freq has no 1: no layer would be MoE; remove model.moe.num_experts instead")
    else:
        e.positive("model.moe.layer_freq", moe.layer_freq)
    if p.tensor > 1 and not p.sequence_parallel:
        e.add(f"model.moe with parallel.tensor={p.tensor} needs parallel.sequence_parallel=true: without it the "
              "tensor-parallel ranks would route the same tokens twice")
    if moe.pad_to_capacity and moe.capacity_factor is None:
        e.add("model.moe.pad_to_capacity needs model.moe.capacity_factor (padding is to the capacity)")
    groups, group_top_k = router.num_groups, router.group_top_k
    if (groups is None) != (group_top_k is None):
        e.add("model.moe.router.num_groups and group_top_k go together: set both or neither")
    elif groups is not None:
        e.positive("model.moe.router.num_groups", groups)
        e.positive("model.moe.router.group_top_k", group_top_k)
        if groups > 0 and group_top_k > 0 and (E % groups or group_top_k > groups or moe.top_k % group_top_k):
            e.add(f"model.moe.router.num_groups={groups}, group_top_k={group_top_k}: num_groups must divide "
                  f"num_experts={E}, group_top_k must be at most num_groups and divide top_k={moe.top_k}")
        elif groups > 0 and group_top_k > 0 and moe.top_k // group_top_k > E // groups:
            e.add(f"model.moe.router.group_top_k={group_top_k}: each of the chosen groups must supply top_k / "
                  f"group_top_k = {moe.top_k // group_top_k} experts but holds only num_experts / num_groups = "
                  f"{E // groups}: raise group_top_k or lower num_groups")
    e.non_negative("model.moe.router.aux_loss_coeff", router.aux_loss_coeff)
    e.non_negative("model.moe.router.z_loss_coeff", router.z_loss_coeff)
    e.non_negative("model.moe.router.expert_bias_update_rate", router.expert_bias_update_rate)
    if moe.experts == "grouped" and not hasattr(torch.nn.functional, "grouped_mm"):
        e.add(f"model.moe.experts=grouped: torch {torch.__version__} has no grouped matmul; use auto or loop")
    if router.expert_bias_update_rate > 0 and router.score != "sigmoid":
        e.add("model.moe.router.expert_bias_update_rate needs router.score=sigmoid (an expert bias shifts which "
              "experts a sigmoid router picks; with softmax it is not defined)")
