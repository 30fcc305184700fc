"""The EMA teacher of RLP: a copy of the model whose weights follow the policy's slowly,
phi <- theta at the start, then phi = tau * phi + (1 - tau) * theta after every optimizer step.

It is a second GPT of the same config on the same topology and stage, so it is sharded exactly like the model
(each rank holds the EMA of its own shards, no communication) and runs the same forward. Its weights are fp32
(the model's master weights are fp32; bf16 is autocast) and never get gradients. Buffers (the MoE routers'
expert bias) are copied from the policy at every update: they are not trained by gradients, so there is no
average to keep. It is saved in checkpoints beside the model (pretrain/checkpoint.py, part `ema`).
"""

from __future__ import annotations

import torch

from pretrain.model import GPT


class EmaTeacher:
    def __init__(self, policy: GPT, *, tau: float):
        self.policy, self.tau = policy, tau
        self.model = GPT(policy.cfg, policy.vocab_size, policy.topology, stage=policy.stage)
        self.model.to(next(policy.parameters()).device).requires_grad_(False).eval()
        names = dict(policy.named_parameters())
        self.pairs = [(p, names[n]) for n, p in self.model.named_parameters()]
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """phi <- theta: where RLP starts (a fresh run, or one initialised from another run's weights)."""
        for phi, theta in self.pairs:
            phi.copy_(theta)
        self._copy_buffers()

    @torch.no_grad()
    def update(self) -> None:
        """phi = tau * phi + (1 - tau) * theta, after an optimizer step."""
        phis = [phi for phi, _ in self.pairs]
        torch._foreach_mul_(phis, self.tau)
        torch._foreach_add_(phis, [theta for _, theta in self.pairs], alpha=1.0 - self.tau)
        self._copy_buffers()

    def _copy_buffers(self) -> None:
        policy = dict(self.policy.named_buffers())
        for name, buffer in self.model.named_buffers():
            buffer.copy_(policy[name])
