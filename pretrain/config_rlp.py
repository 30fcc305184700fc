"""The `objective.rlp` section (the objective itself: pretrain/objectives/rlp.py) and its validation: every line
names the field and the fix. Apart from config.py because it is one concept, and config.py is long enough."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class RLPConfig:
    """RLP (arXiv 2510.01265): thoughts sampled before a document's next token, rewarded by how much they help
    predict it. Defaults are the paper's where it gives them (G, temperature, tau, thought length)."""
    group_size: int = 16  # G: thoughts sampled per context (the advantage is leave-one-out within them)
    temperature: float = 0.7  # of the thought sampler
    top_p: float = 1.0
    max_thought_tokens: int = 2048  # a thought longer than this gets its </think> forced
    positions_per_sequence: int = 1  # scored positions drawn per training sample
    min_context: int = 32  # tokens of context before the earliest scored position
    tau: float = 0.999  # EMA teacher: phi = tau * phi + (1 - tau) * theta after every optimizer step
    eps_low: float = 0.2  # the clipped surrogate's range: [1 - eps_low, 1 + eps_high]
    eps_high: float = 0.28
    ppo_epochs: int = 1  # optimizer updates per batch of rollouts (> 1: the ratio moves and the clip matters)
    ntp_coeff: float = 0.0  # weight of an added next-token loss on the samples (the paper: none)
    kl_coeff: float = 0.0  # weight of a KL penalty to the EMA teacher on the thought tokens (the paper: none)
    think_token_ids: Optional[list[int]] = None  # [<think>, </think>]; null: the tokenizer's (data.tokenizer)


def config_problems(cfg) -> list[str]:
    """What an RLP config gets wrong (empty when the objective is another)."""
    if cfg.objective.name != "rlp":
        return []
    r, m, p = cfg.objective.rlp, cfg.model, cfg.parallel
    lines = []
    if r.group_size < 2:
        lines.append(f"objective.rlp.group_size={r.group_size}: the leave-one-out advantage needs at least 2 "
                     "thoughts per context (the paper: 16)")
    if not r.temperature > 0:
        lines.append(f"objective.rlp.temperature={r.temperature}: must be positive (identical greedy thoughts "
                     "would all get a zero advantage); the paper: 0.7")
    if not 0.0 < r.top_p <= 1.0:
        lines.append(f"objective.rlp.top_p={r.top_p}: must be in (0, 1]")
    for name in ("max_thought_tokens", "positions_per_sequence", "min_context", "ppo_epochs"):
        if getattr(r, name) < 1:
            lines.append(f"objective.rlp.{name}={getattr(r, name)}: must be at least 1")
    if r.min_context + r.max_thought_tokens + 1 > m.seq_length:
        lines.append(f"objective.rlp.max_thought_tokens={r.max_thought_tokens} with objective.rlp.min_context="
                     f"{r.min_context} does not fit model.seq_length={m.seq_length}: a scored row holds the context, "
                     "<think>, the thought, </think> (the next token is its label); shorten the thought or the "
                     "context, or raise model.seq_length")
    if not 0.0 <= r.tau < 1.0:
        lines.append(f"objective.rlp.tau={r.tau}: must be in [0, 1); the paper: 0.999")
    for name in ("eps_low", "eps_high", "ntp_coeff", "kl_coeff"):
        if not getattr(r, name) >= 0:
            lines.append(f"objective.rlp.{name}={getattr(r, name)}: must be zero or positive")
    if r.eps_low >= 1:
        lines.append(f"objective.rlp.eps_low={r.eps_low}: must be below 1 (the ratio is clipped at 1 - eps_low)")
    ids = r.think_token_ids
    if ids is not None and (len(ids) != 2 or ids[0] == ids[1] or min(ids) < 0):
        lines.append(f"objective.rlp.think_token_ids={ids}: give two different ids, [<think>, </think>]")
    if p.pipeline > 1:
        lines.append(f"objective.name=rlp with parallel.pipeline={p.pipeline}: thoughts are sampled token by token, "
                     "which a pipeline would pass through every stage each token; use parallel.pipeline=1 (RLP runs "
                     "on TP with SP, DP and EP/ETP)")
    if p.context > 1:
        lines.append(f"objective.name=rlp with parallel.context={p.context}: a context-parallel rank holds pieces of "
                     "a sequence, not its newest token; use parallel.context=1")
    if cfg.precision.fp8.enabled:
        lines.append("objective.name=rlp with precision.fp8.enabled=true: the one-token GEMMs of sampling do not meet "
                     "the FP8 kernels' shapes; use bf16 (precision.fp8.enabled=false)")
    return lines
