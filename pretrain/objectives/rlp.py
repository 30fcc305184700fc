"""RLP: reinforcement learning as a pretraining objective (arXiv 2510.01265).

The model samples a thought c after a context x_<t and is rewarded by how much the thought helps it predict
the document's next token: r(c) = log p_theta(x_t | x_<t, c) - log p_phi(x_t | x_<t), phi an EMA teacher of
the model (pretrain/objectives/teacher.py) that sees no thought. Over the G thoughts of one context the
advantage is leave-one-out, A_i = G / (G - 1) * (r_i - mean_j r_j), and the loss is the clipped surrogate over
the thought tokens only, -(1/|c_i|) sum_u min(rho_u A_i, clip(rho_u, 1 - eps_low, 1 + eps_high) A_i), averaged
over the thoughts; rho_u is the ratio of the current to the rollout-time probability of thought token u.

One step, per micro-batch of training samples [mb, seq + 1] (`RLP.rollout`, without gradients):
1. positions: `positions_per_sequence` scored positions t per sample, uniform over [min_context,
   seq_length - max_thought_tokens - 1], drawn from the sample's own tokens and the step (the same whatever
   the layout);
2. the teacher's log p_phi(x_t | x_<t) of every position from one forward per sample (its per-token
   losses give every position at once);
3. G thoughts per context through the key-value cache (pretrain/generation.py): the prompt is
   `x_<t <think>`, prefilled once for its G samples; a thought ends at a sampled `</think>` or
   end-of-document, else after max_thought_tokens, and then `</think>` is forced.
Then (`RLP.loss`, with gradients) one forward of every row `[x_<t, <think>, c, </think>]` with labels (the
row shifted by one, x_t the last) gives the vocabulary-parallel log-probabilities of the thought tokens and of
x_t (logits never gathered: the output layer is fused with the cross-entropy, pretrain/model/gpt.py).

Decisions the paper leaves open: a sampled `</think>` or end-of-document is a thought token (the policy chose
to stop); a forced `</think>` is not. Log-probabilities are the model's own (temperature 1): the temperature
only shapes sampling. With `ppo_epochs` > 1 the rollouts serve that many optimizer updates within one step;
rewards, advantages and the rollout-time log-probabilities are those of the first.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from pretrain.config_rlp import RLPConfig
from pretrain.generation import Sampling, generate
from pretrain.objectives.ntp import next_token_loss
from pretrain.objectives.teacher import EmaTeacher

# ----------------------------------------------------------------------------- the equations


def advantages(rewards: torch.Tensor) -> torch.Tensor:
    """A_i = G / (G - 1) * (r_i - mean_j r_j) over the last dimension (the G thoughts of a context), which is
    r_i minus the mean of the other thoughts' rewards; no division by the spread."""
    group = rewards.shape[-1]
    if group < 2:
        raise ValueError(f"the leave-one-out advantage needs at least 2 thoughts per context, got {group}")
    return group / (group - 1) * (rewards - rewards.mean(dim=-1, keepdim=True))


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, advantage: torch.Tensor, *,
                      eps_low: float, eps_high: float) -> torch.Tensor:
    """The mean over rows of -(1/|c_i|) sum_u min(rho_u A_i, clip(rho_u, 1 - eps_low, 1 + eps_high) A_i).

    logp, old_logp, mask [rows, length]: token log-probabilities now and at rollout time, and which tokens are
    the row's thought (|c_i| = mask.sum(-1) >= 1); advantage [rows]. Other positions take no part, whatever
    their values (they are replaced before use, so that not even a NaN there leaks in)."""
    mask = mask.to(logp.dtype)
    delta = torch.where(mask > 0, logp - old_logp, torch.zeros_like(logp))
    rho = delta.exp()
    a = advantage[:, None]
    per_token = torch.minimum(rho * a, rho.clamp(1.0 - eps_low, 1.0 + eps_high) * a)
    per_thought = (per_token * mask).sum(-1) / mask.sum(-1)
    return -per_thought.mean()


def kl_to_teacher(logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean over rows of the per-thought mean of exp(q - p) - (q - p) - 1 (p the policy's, q the teacher's
    token log-probability): the non-negative estimator of KL(policy || teacher) on the sampled thought tokens."""
    mask = mask.to(logp.dtype)
    diff = torch.where(mask > 0, teacher_logp - logp, torch.zeros_like(logp))
    per_token = diff.exp() - diff - 1.0
    return ((per_token * mask).sum(-1) / mask.sum(-1)).mean()


def draw_positions(samples: torch.Tensor, *, count: int, low: int, high: int, seed: int, step: int) -> torch.Tensor:
    """`count` scored positions per sample [rows, count], uniform in [low, high], from a generator keyed by the
    sample's tokens, the run's seed and the step: any layout draws the same positions for the same sample."""
    out = torch.empty(samples.shape[0], count, dtype=torch.long)
    for row, sample in enumerate(samples.cpu()):
        key = zlib.crc32(sample.numpy().tobytes(), zlib.crc32(f"{seed}:{step}".encode()))
        out[row] = torch.randint(low, high + 1, (count,), generator=torch.Generator().manual_seed(key))
    return out


@dataclass
class ScoredRows:
    """The rows of one forward `[x_<t, <think>, c, </think>]` ([rows, length], right-padded) with their labels
    (the row shifted by one; x_t labels the last real position), which labels are thought tokens, and where
    x_t is."""
    ids: torch.Tensor
    labels: torch.Tensor
    thought_mask: torch.Tensor
    target_index: torch.Tensor


def score_rows(contexts: list[list[int]], thoughts: list[list[int]], targets: list[int], *, think: int,
               think_end: int, multiple: int, pad_id: int = 0) -> ScoredRows:
    """Rows for thoughts[i] after contexts[i // G], G = len(thoughts) / len(contexts); a thought that does not end
    with `think_end` gets it forced (not a thought token). The length is padded to `multiple` (SP)."""
    group = len(thoughts) // len(contexts)
    rows = []
    for i, thought in enumerate(thoughts):
        closing = [] if thought and thought[-1] == think_end else [think_end]
        rows.append((contexts[i // group], thought, contexts[i // group] + [think] + thought + closing
                     + [targets[i // group]]))
    length = -(-max(len(r) - 1 for _, _, r in rows) // multiple) * multiple
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    target = torch.empty(len(rows), dtype=torch.long)
    for i, (context, thought, row) in enumerate(rows):
        n = len(row) - 1
        ids[i, :n] = torch.tensor(row[:-1])
        labels[i, :n] = torch.tensor(row[1:])
        mask[i, len(context):len(context) + len(thought)] = True  # labels c_1 .. c_k
        target[i] = n - 1
    return ScoredRows(ids, labels, mask, target)


# ----------------------------------------------------------------------------- the objective


@dataclass
class Rollout:
    """One micro-batch's rollouts: what `RLP.loss` needs, and what the first update fixes for the others."""
    samples: torch.Tensor  # [mb, seq + 1], on the device
    rows: ScoredRows  # on the device
    teacher_logp: torch.Tensor  # [contexts]: log p_phi(x_t | x_<t)
    teacher_token_logp: torch.Tensor | None  # [rows, length]: the teacher's log-probabilities of the rows (KL)
    hit_max: torch.Tensor  # [rows]: the thought ran to max_thought_tokens
    thought_tokens: int  # sampled thought tokens (the row's |c|, summed)
    seconds: float  # of generation
    old_logp: torch.Tensor | None = None  # [rows, length], set by the first update
    rewards: torch.Tensor | None = None  # [rows], set by the first update
    advantage: torch.Tensor | None = None  # [rows], set by the first update


class RLP:
    """The objective of `objective.name: rlp`: rollouts without gradients, then the loss of the scored rows.

    `autocast`: the trainer's forward context (bf16); `think_ids`: (<think>, </think>) checked against the
    model's vocabulary by the trainer; `vocab_limit`: ids at or above it are never sampled."""

    def __init__(self, cfg: RLPConfig, *, model, topology, seed: int, seq_length: int, think_ids: tuple[int, int],
                 eod: int, vocab_limit: int, autocast, device: torch.device):
        self.cfg, self.model, self.topology, self.seed = cfg, model, topology, seed
        self.seq_length, self.autocast, self.device = seq_length, autocast, device
        self.think, self.think_end = think_ids
        self.teacher = EmaTeacher(model, tau=cfg.tau)
        self.sampling = Sampling(max_new_tokens=cfg.max_thought_tokens, temperature=cfg.temperature,
                                 top_p=cfg.top_p, stop_ids=(self.think_end, eod), vocab_limit=vocab_limit)
        self.multiple = topology.tp if topology.sequence_parallel else 1
        self._stats: list[torch.Tensor] = []

    # -- rollouts

    @torch.no_grad()
    def rollout(self, samples: torch.Tensor, *, step: int, micro_batch: int) -> Rollout:
        c = self.cfg
        if micro_batch == 0:  # the statistics are the step's
            self._stats = []
        samples = samples.to(self.device)
        positions = draw_positions(samples, count=c.positions_per_sequence, low=c.min_context,
                                   high=self.seq_length - c.max_thought_tokens - 1, seed=self.seed, step=step)
        host = samples.cpu()
        contexts = [host[b, :t].tolist() for b, row in enumerate(positions) for t in row.tolist()]
        targets = [int(host[b, t]) for b, row in enumerate(positions) for t in row.tolist()]
        teacher_logp = self._teacher_logp(samples, positions)
        thoughts, stopped, seconds = self.sample_thoughts([ctx + [self.think] for ctx in contexts], step=step,
                                                          micro_batch=micro_batch)
        rows = score_rows(contexts, thoughts, targets, think=self.think, think_end=self.think_end,
                          multiple=self.multiple)
        rows = ScoredRows(*(t.to(self.device) for t in (rows.ids, rows.labels, rows.thought_mask,
                                                        rows.target_index)))
        teacher_tokens = None
        if c.kl_coeff > 0:
            with self.autocast():
                teacher_tokens = -self.teacher.model(rows.ids, labels=rows.labels)
        hit_max = torch.tensor([not s for s in stopped], device=self.device)
        return Rollout(samples, rows, teacher_logp, teacher_tokens, hit_max, sum(map(len, thoughts)), seconds)

    def _teacher_logp(self, samples: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """log p_phi(x_t | x_<t) of every position, from one teacher forward per sample."""
        with self.autocast():
            logp = -self.teacher.model(samples[:, :-1], labels=samples[:, 1:])  # [mb, seq]: position i scores i+1
        return logp.gather(1, (positions - 1).to(self.device)).flatten()

    def sample_thoughts(self, prompts: list[list[int]], *, step: int,
                        micro_batch: int) -> tuple[list[list[int]], list[bool], float]:
        """G thoughts per prompt (rows prompt by prompt), whether each stopped by itself, and the seconds taken.
        The generator is keyed by (seed, step, DP rank, micro-batch): the same on the ranks of a TP group."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed(zlib.crc32(f"rlp:{self.seed}:{step}:{self.topology.dp_rank}:{micro_batch}".encode()))
        out = generate(self.model, prompts, self.sampling, generator=generator, share_prefill=self.cfg.group_size,
                       autocast=self.autocast)
        return out.tokens, out.stopped, out.seconds

    # -- the loss

    def loss(self, rollout: Rollout) -> torch.Tensor:
        """The loss of one micro-batch (this rank's mean over its thoughts); records the step's statistics."""
        c, rows = self.cfg, rollout.rows
        with self.autocast():
            logp = -self.model(rows.ids, labels=rows.labels)  # [rows, length], fp32
        first = rollout.advantage is None
        if first:  # the rollout-time policy is the one of the first update
            target_logp = logp.detach().gather(1, rows.target_index[:, None]).squeeze(1)
            rewards = target_logp - rollout.teacher_logp.repeat_interleave(c.group_size)
            rollout.rewards = rewards
            rollout.advantage = advantages(rewards.view(-1, c.group_size)).flatten()
            rollout.old_logp = logp.detach()
            self._record(rollout, rewards, target_logp)
        loss = clipped_surrogate(logp, rollout.old_logp, rows.thought_mask, rollout.advantage,
                                 eps_low=c.eps_low, eps_high=c.eps_high)
        if c.kl_coeff > 0:
            loss = loss + c.kl_coeff * kl_to_teacher(logp, rollout.teacher_token_logp, rows.thought_mask)
        if c.ntp_coeff > 0:
            samples = rollout.samples
            with self.autocast():
                ntp = next_token_loss(self.model(samples[:, :-1], labels=samples[:, 1:]))
            loss = loss + c.ntp_coeff * ntp
        return loss

    def end_update(self) -> None:
        """After each optimizer step: the teacher follows."""
        self.teacher.update()

    # -- metrics

    def _record(self, rollout: Rollout, rewards: torch.Tensor, target_logp: torch.Tensor) -> None:
        lengths = rollout.rows.thought_mask.sum(-1).float()
        self._stats.append(torch.stack([
            rewards.sum(), (rewards > 0).float().sum(), rollout.advantage.square().sum(),
            lengths.sum(), rollout.hit_max.float().sum(), target_logp.sum(),
            rollout.teacher_logp.sum() * self.cfg.group_size, torch.tensor(float(rewards.numel()), device=self.device),
            torch.tensor(float(rollout.thought_tokens), device=self.device),
            torch.tensor(rollout.seconds, device=self.device),
        ]))

    def metrics(self) -> dict:
        """The last step's rollout statistics over every thought of the global batch (summed over DP; the ranks of
        a TP group hold the same thoughts): mean reward (information gain), share of positive rewards, the spread
        of the advantages, thought lengths, the policy's log p(x_t | x_<t, c) and the teacher's log p(x_t | x_<t),
        and generated tokens per second (per rank)."""
        if not self._stats:
            return {}
        total = torch.stack(self._stats).sum(0)
        self._stats = []
        group = self.topology.groups["dp"]
        seconds = float(total[9])
        if group is not None:
            torch.distributed.all_reduce(total, group=group)
        (reward, positive, adv_sq, length, hit_max, policy, teacher, count, tokens, _) = total.tolist()
        return {
            "rlp_reward": reward / count, "rlp_positive_fraction": positive / count,
            "rlp_advantage_std": (adv_sq / count) ** 0.5, "rlp_thought_length": length / count,
            "rlp_thought_hit_max": hit_max / count, "rlp_policy_logp": policy / count,
            "rlp_teacher_logp": teacher / count,
            "rlp_generated_tokens_per_s": tokens / self.topology.dp / max(seconds, 1e-9),
        }


def think_ids_of(cfg: RLPConfig, tokenizer, *, vocab_size: int) -> tuple[int, int]:
    """The (<think>, </think>) ids: objective.rlp.think_token_ids, else the tokenizer's; each must be an id of the
    model's vocabulary. Raises ValueError naming the fields."""
    ids = tuple(cfg.think_token_ids) if cfg.think_token_ids else getattr(tokenizer, "think_ids", None)
    if ids is None:
        raise ValueError(f"objective.name=rlp: the {tokenizer.name} tokenizer has no <think> / </think> tokens; set "
                         "objective.rlp.think_token_ids to two ids of the model's vocabulary")
    if max(ids) >= vocab_size:
        raise ValueError(f"objective.rlp: the think tokens {list(ids)} do not fit the model's {vocab_size} ids; "
                         "raise model.vocab_size (or model.vocab_multiple) or set objective.rlp.think_token_ids")
    return ids

