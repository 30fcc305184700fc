"""The RLP objective (pretrain/objectives/rlp.py): its equations, its masks, its EMA teacher, its layouts (the same
rollouts give one rank's loss and gradients on TP2 SP, DP2 and EP2), its resume, and its refusals."""

import pytest
import torch

from conftest import tiny_config
from multirank import run_ranks
from parallel.collectives import all_gather_dim
from parallel.placement import placement_of
from pretrain import checkpoint
from pretrain.config import ConfigError
from pretrain.objectives import rlp
from pretrain.objectives.rlp import advantages, clipped_surrogate, kl_to_teacher, score_rows
from pretrain.trainer import Trainer, train
from test_parallel_equivalence import full_gradients

THINK, END = 258, 259


def rlp_config(tmp_path, corpus, *overrides):
    return tiny_config(
        tmp_path, corpus, "model.seq_length=32", "train.global_batch_size=4", "train.micro_batch_size=2",
        "objective.name=rlp", "objective.rlp.group_size=4", "objective.rlp.max_thought_tokens=6",
        "objective.rlp.min_context=4", "objective.rlp.positions_per_sequence=2", "objective.rlp.temperature=1.0",
        "scheduler.decay=constant", "scheduler.warmup_iters=0", "optimizer.lr=1e-3", "eval.interval=0",
        "checkpoint.interval=0", "data.prefetch=0", *overrides,
    )


# ----------------------------------------------------------------------------- the equations


def test_the_advantage_is_leave_one_out_and_sums_to_zero():
    rewards = torch.tensor([[1.0, 2.0, 4.0, -3.0], [0.5, 0.5, 0.5, 0.5]])
    a = advantages(rewards)
    for g in range(4):
        others = torch.cat([rewards[:, :g], rewards[:, g + 1:]], dim=1).mean(1)
        torch.testing.assert_close(a[:, g], rewards[:, g] - others)
    torch.testing.assert_close(a.sum(1), torch.zeros(2), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="at least 2"):
        advantages(torch.ones(3, 1))


def _surrogate_inputs():
    torch.manual_seed(0)
    logp = torch.randn(3, 7).requires_grad_()
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 2:5], mask[1, 1:2], mask[2, 3:7] = True, True, True  # thoughts of 3, 1 and 4 tokens
    return logp, mask, torch.tensor([0.5, -1.0, 2.0])


def test_the_surrogate_sees_only_thought_tokens_normalised_per_thought():
    logp, mask, adv = _surrogate_inputs()
    loss = clipped_surrogate(logp, logp.detach(), mask, adv, eps_low=0.2, eps_high=0.28)
    perturbed = logp.detach().clone()
    perturbed[~mask] = torch.randn(int((~mask).sum())) * 100  # context, target, padding (even a NaN)
    perturbed[0, 0] = float("nan")
    again = clipped_surrogate(perturbed, perturbed, mask, adv, eps_low=0.2, eps_high=0.28)
    torch.testing.assert_close(again, loss.detach())
    # at rho = 1 the gradient is the policy gradient -(1/BG) sum_i A_i / |c_i| grad log pi
    loss.backward()
    lengths = mask.sum(1, keepdim=True).float()
    expected = -(adv[:, None] / lengths * mask) / 3
    torch.testing.assert_close(logp.grad, expected)


def test_the_clip_zeroes_the_gradient_in_its_two_quadrants():
    old = torch.zeros(4, 1)
    mask = torch.ones(4, 1, dtype=torch.bool)
    rho = torch.tensor([[1.5], [1.5], [0.5], [0.5]])  # above 1 + eps_high, above, below 1 - eps_low, below
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    logp = rho.log().requires_grad_()
    clipped_surrogate(logp, old, mask, adv, eps_low=0.2, eps_high=0.28).backward()
    grad = logp.grad.flatten()
    assert grad[0] == 0 and grad[3] == 0  # rho > 1 + eps_high with A > 0; rho < 1 - eps_low with A < 0
    torch.testing.assert_close(grad[1], torch.tensor(1.5 / 4))  # unclipped: -(1/4) * rho * A
    torch.testing.assert_close(grad[2], torch.tensor(-0.5 / 4))


def test_the_kl_penalty_is_zero_at_the_teacher_and_positive_elsewhere():
    logp, mask, _ = _surrogate_inputs()
    assert kl_to_teacher(logp.detach(), logp.detach(), mask) == 0
    assert kl_to_teacher(logp.detach(), logp.detach() + 0.3, mask) > 0


def test_scored_rows_force_a_missing_close_and_mask_the_thought():
    rows = score_rows([[1, 2, 3], [4]], [[7, END], [8, 9, 10], [11], [12, 13]], [5, 6], think=THINK, think_end=END,
                      multiple=4)
    assert rows.ids.shape == (4, 8)  # the longest row (7 tokens) padded to a multiple of 4
    assert rows.ids[0, :6].tolist() == [1, 2, 3, THINK, 7, END] and rows.labels[0, 5] == 5
    assert rows.ids[1, :7].tolist() == [1, 2, 3, THINK, 8, 9, 10] and rows.labels[1, :8].tolist() == [
        2, 3, THINK, 8, 9, 10, END, 5]  # forced </think>, then x_t
    assert rows.thought_mask[0].nonzero().flatten().tolist() == [3, 4]  # labels 7 and the sampled </think>
    assert rows.thought_mask[1].nonzero().flatten().tolist() == [3, 4, 5]  # 8 9 10: the forced close is not one
    assert rows.thought_mask[2].nonzero().flatten().tolist() == [1]  # after context [4]: label 11
    assert rows.target_index.tolist() == [5, 7, 3, 4]
    assert all(rows.labels[i, rows.target_index[i]] == (5 if i < 2 else 6) for i in range(4))


def test_positions_depend_on_the_sample_not_on_its_batch():
    samples = torch.randint(0, 200, (4, 33))
    together = rlp.draw_positions(samples, count=3, low=4, high=25, seed=1, step=2)
    alone = torch.cat([rlp.draw_positions(samples[i:i + 1], count=3, low=4, high=25, seed=1, step=2)
                       for i in range(4)])
    assert torch.equal(together, alone) and together.min() >= 4 and together.max() <= 25
    assert not torch.equal(together, rlp.draw_positions(samples, count=3, low=4, high=25, seed=1, step=3))


# ----------------------------------------------------------------------------- the trainer's objective


def test_the_reward_is_a_log_softmax_of_a_full_forward_without_gradient(tmp_path, tiny_corpus):
    trainer = Trainer(rlp_config(tmp_path, tiny_corpus))
    objective = trainer.rlp
    batch = trainer.next_micro_batches()[0]
    rollout = objective.rollout(batch, step=1, micro_batch=0)
    objective.loss(rollout)
    assert not rollout.rewards.requires_grad
    rows, group = rollout.rows, 4
    model, teacher = trainer.model, objective.teacher.model
    with torch.no_grad():
        for i in range(rows.ids.shape[0]):
            n = int(rows.target_index[i]) + 1
            logits = model(rows.ids[i:i + 1, :n])[0, -1]  # [x_<t, <think>, c, </think>] -> x_t
            s_pred = torch.log_softmax(logits.float(), -1)[rows.labels[i, n - 1]]
            context = rows.ids[i, :int(rows.thought_mask[i].nonzero()[0])]  # up to <think>
            s_ema = torch.log_softmax(teacher(context[None])[0, -1].float(), -1)[rows.labels[i, n - 1]]
            torch.testing.assert_close(rollout.rewards[i], s_pred - s_ema, rtol=1e-5, atol=1e-5)
    assert rows.ids.shape[0] == 2 * 2 * group  # 2 samples x 2 positions x G


def test_the_teacher_is_the_exact_moving_average(tmp_path, tiny_corpus):
    trainer = Trainer(rlp_config(tmp_path, tiny_corpus, "objective.rlp.tau=0.9"))
    teacher = trainer.rlp.teacher
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    assert all(torch.equal(p, start[n]) for n, p in teacher.model.named_parameters())  # phi <- theta
    phi = dict(start)
    for _ in range(2):
        trainer.train_step()
        for name, theta in trainer.model.named_parameters():
            phi[name] = 0.9 * phi[name] + (1 - 0.9) * theta.detach()
            # exact up to the rounding of one multiply-add (foreach kernels may fuse it)
            torch.testing.assert_close(dict(teacher.model.named_parameters())[name], phi[name], rtol=3e-7,
                                       atol=1e-9)
    assert not all(torch.equal(p, start[n]) for n, p in teacher.model.named_parameters())
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in teacher.model.parameters())


def _record_thoughts(trainer: Trainer) -> dict:
    """Wrap the sampler so that it records each prompt's thoughts (the rollouts a layout will replay)."""
    table, sample = {}, trainer.rlp.sample_thoughts

    def recording(prompts, **kwargs):
        thoughts, stopped, seconds = sample(prompts, **kwargs)
        g = trainer.cfg.objective.rlp.group_size
        for i, prompt in enumerate(prompts):
            table[tuple(prompt)] = (thoughts[i * g:(i + 1) * g], stopped[i * g:(i + 1) * g])
        return thoughts, stopped, seconds

    trainer.rlp.sample_thoughts = recording
    return table


def _replay(trainer: Trainer, table: dict) -> None:
    def replaying(prompts, **kwargs):
        thoughts, stopped = [], []
        for prompt in prompts:
            t, s = table[tuple(prompt)]
            thoughts += t
            stopped += s
        return thoughts, stopped, 0.0

    trainer.rlp.sample_thoughts = replaying


def _one_step(rank, world, cfg, table):
    trainer = Trainer(cfg, world, rank)
    recorded = _record_thoughts(trainer) if table is None else _replay(trainer, table)
    loss = trainer.forward_backward()
    return loss, full_gradients(trainer), recorded, trainer.rlp.metrics()


RLP_LAYOUTS = {
    "TP2 SP": ["parallel.tensor=2", "parallel.sequence_parallel=true"],
    "DP2": [],
    "DP2 distributed optimizer": ["optimizer.distributed=true"],
}
MOE = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.ffn_hidden_size=32"]


@pytest.mark.parametrize("layout", list(RLP_LAYOUTS) + ["EP2 MoE", "ETP2 x TP2 SP MoE"])
def test_layouts_equal_one_rank_on_the_same_rollouts(tmp_path, tiny_corpus, layout):
    """One RLP step's loss and gradients, the thoughts of the one-rank run replayed (the sampler's stream depends on
    the layout: DP splits the batch); everything else (positions, the teacher, the scored forward, the reduction
    over DP) runs for real. fp32; tolerances as in test_parallel_equivalence."""
    moe = "MoE" in layout
    overrides = {"EP2 MoE": MOE + ["parallel.expert=2"],
                 "ETP2 x TP2 SP MoE": MOE + ["parallel.tensor=2", "parallel.sequence_parallel=true",
                                             "parallel.expert_tensor=2"]}.get(layout, RLP_LAYOUTS.get(layout))
    base = MOE if moe else []
    (one,) = run_ranks(1, _one_step, rlp_config(tmp_path / "one", tiny_corpus, *base), None)
    loss, grads, table, metrics = one
    results = run_ranks(2, _one_step, rlp_config(tmp_path / "two", tiny_corpus, *overrides), table)
    for got_loss, got_grads, _, got_metrics in results:
        assert got_loss == pytest.approx(loss, rel=1e-5, abs=1e-7)
        for name, grad in grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-7)
        assert got_metrics["rlp_reward"] == pytest.approx(metrics["rlp_reward"], rel=1e-5, abs=1e-6)
    assert abs(loss) > 0 and any(g.abs().sum() > 0 for g in grads.values())


def _gathered(module, topology) -> dict[str, torch.Tensor]:
    full = {}
    for name, p in module.named_parameters():
        t = p.detach().clone()
        for piece in placement_of(p).splits:
            if piece.size > 1:
                t = all_gather_dim(t, piece.dim, topology.groups[piece.group])
        full[name] = t
    return full


def _one_update(rank, world, cfg, table):
    """One optimizer step (its rollouts recorded, or replayed from `table`): the full tensors of the teacher
    before and after it and of the policy after it."""
    trainer = Trainer(cfg, world, rank)
    recorded = _record_thoughts(trainer) if table is None else _replay(trainer, table)
    before = _gathered(trainer.rlp.teacher.model, trainer.topology)
    trainer.train_step()
    return (before, _gathered(trainer.rlp.teacher.model, trainer.topology), _gathered(trainer.model, trainer.topology),
            recorded)


def test_the_teacher_on_tp2_holds_the_slices_of_the_one_rank_teacher(tmp_path, tiny_corpus):
    """TP2's teacher starts as one rank's, bitwise, and each rank's shard follows its own policy shard; the policy
    after one step equals one rank's up to Adam's first step, which turns a 1e-4 relative gradient difference
    on an entry near zero into up to 2 lr of weight."""
    (one,) = run_ranks(1, _one_update, rlp_config(tmp_path / "one", tiny_corpus, "objective.rlp.tau=0.5"), None)
    two = run_ranks(2, _one_update, rlp_config(tmp_path / "two", tiny_corpus, "objective.rlp.tau=0.5",
                                               "parallel.tensor=2", "parallel.sequence_parallel=true"), one[3])
    for before, after, policy, _ in two:
        for name in one[0]:
            assert torch.equal(before[name], one[0][name]), name
            torch.testing.assert_close(after[name], 0.5 * before[name] + 0.5 * policy[name], rtol=3e-7, atol=1e-9)
            off = ((after[name] - one[1][name]).abs() > 1e-6).float().mean()
            assert off < 0.01, (name, off)  # the few entries whose gradient is near zero


def test_an_rlp_run_resumes_bitwise(tmp_path, tiny_corpus):
    """Stopped after 2 of 4 steps and resumed: the same losses, weights and teacher as straight through."""
    straight = Trainer(rlp_config(tmp_path / "a", tiny_corpus, "train.iters=4"))
    straight.run()
    train(rlp_config(tmp_path / "b", tiny_corpus, "train.iters=4", "train.stop_at_step=2"))
    resumed = Trainer(rlp_config(tmp_path / "b", tiny_corpus, "train.iters=4"))
    assert resumed.step == 2 and not resumed.teacher_afresh
    resumed.run()
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
    for p, q in zip(straight.rlp.teacher.model.parameters(), resumed.rlp.teacher.model.parameters()):
        assert torch.equal(p, q)
    assert straight.metrics.last_loss == resumed.metrics.last_loss


def _train_ranks(rank, world, cfg):
    return train(cfg, world, rank)


def test_an_rlp_checkpoint_of_tp2_resumes_on_one_rank_with_its_teacher(tmp_path, tiny_corpus):
    """The EMA teacher moves between layouts like the weights: TP2's `ema.*` boxes, read on one rank, are the
    checkpoint's whole tensors (and differ from the weights, so it is the teacher that was read)."""
    run_ranks(2, _train_ranks, rlp_config(tmp_path, tiny_corpus, "train.iters=4", "train.stop_at_step=2",
                                          "parallel.tensor=2", "parallel.sequence_parallel=true"))
    resumed = Trainer(rlp_config(tmp_path, tiny_corpus, "train.iters=4"))
    assert resumed.step == 2 and not resumed.teacher_afresh and resumed.resharded_from["tp"] == 2
    folder = resumed.resume_from
    teacher = dict(resumed.rlp.teacher.model.named_parameters())
    saved = checkpoint.read_tensors(folder, [f"ema.{name}" for name in teacher])
    assert all(torch.equal(teacher[name], saved[f"ema.{name}"]) for name in teacher)
    weights = dict(resumed.model.named_parameters())
    assert any(not torch.equal(weights[name], teacher[name]) for name in teacher)
    resumed.run()


def test_rlp_starts_from_a_pretraining_run_with_its_teacher_at_the_weights(tmp_path, tiny_corpus):
    train(tiny_config(tmp_path / "pre", tiny_corpus, "model.seq_length=32", "train.iters=2", "checkpoint.interval=0"))
    trainer = Trainer(rlp_config(tmp_path / "rlp", tiny_corpus,
                                 f"checkpoint.init_from={tmp_path}/pre/run/checkpoints"))
    assert trainer.teacher_afresh and trainer.step == 0
    for p, q in zip(trainer.model.parameters(), trainer.rlp.teacher.model.parameters()):
        assert torch.equal(p, q)
    loss, grad_norm = trainer.train_step()
    assert grad_norm > 0
    record = trainer.step_record(grad_norm, None)
    for key in ("rlp_reward", "rlp_positive_fraction", "rlp_advantage_std", "rlp_thought_length",
                "rlp_thought_hit_max", "rlp_policy_logp", "rlp_teacher_logp", "rlp_generated_tokens_per_s"):
        assert key in record, key
    assert 1 <= record["rlp_thought_length"] <= 6 and record["rlp_policy_logp"] < 0


def test_ppo_epochs_reuse_the_rollouts_and_move_the_ratio(tmp_path, tiny_corpus):
    trainer = Trainer(rlp_config(tmp_path, tiny_corpus, "objective.rlp.ppo_epochs=3", "optimizer.lr=1e-2"))
    sample, calls = trainer.rlp.sample_thoughts, []
    trainer.rlp.sample_thoughts = lambda prompts, **kw: calls.append(1) or sample(prompts, **kw)
    updates = []
    trainer.rlp.end_update = (lambda update: lambda: updates.append(1) or update())(trainer.rlp.end_update)
    trainer.train_step()
    assert len(calls) == 2 and len(updates) == 3 and trainer.step == 1  # 2 micro-batches rolled out once


@pytest.mark.parametrize("overrides, fragment", [
    (["objective.rlp.group_size=1"], "objective.rlp.group_size=1"),
    (["objective.rlp.max_thought_tokens=40"], "objective.rlp.max_thought_tokens=40"),
    (["parallel.pipeline=2"], "objective.name=rlp with parallel.pipeline=2"),
    (["parallel.context=2"], "objective.name=rlp with parallel.context=2"),
    (["objective.rlp.think_token_ids=[3,3]"], "objective.rlp.think_token_ids=[3, 3]"),
    (["model.vocab_size=258"], "raise model.vocab_size"),
])
def test_bad_rlp_configs_are_refused_in_one_line(tmp_path, tiny_corpus, overrides, fragment):
    cfg = rlp_config(tmp_path, tiny_corpus, *overrides)
    with pytest.raises(ConfigError) as err:
        Trainer(cfg, world_size=2 if any("parallel" in o for o in overrides) else 1)
    assert fragment in str(err.value) and "\n" not in str(err.value)
