"""The engine's other promises on several gloo ranks: the global gradient norm, the sharded optimizer step,
the vocabulary-parallel cross-entropy, the communication volume of a step, and checkpoints of a parallel run."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from multirank import run_ranks
from parallel.placement import placement_of
from pretrain.trainer import Trainer, train
from test_parallel_equivalence import layout_config

TP2_CP2_DP2 = ["parallel.tensor=2", "parallel.context=2", "parallel.sequence_parallel=true"]


def norm_of_ones(rank, world, cfg):
    from parallel.topology import Topology
    from pretrain.model import GPT

    trainer = Trainer(cfg, world, rank)
    trainer.grads.grad.fill_(1.0)
    if trainer.grads.sharded:
        trainer.grads.grad_shard.fill_(1.0)
    with torch.device("meta"):  # the whole model, as one rank would hold it
        whole = GPT(trainer.cfg.model, trainer.vocab_size, Topology.single()).num_parameters()
    return trainer.grads.grad_norm(), whole


@pytest.mark.parametrize("layout", [
    TP2_CP2_DP2, TP2_CP2_DP2 + ["optimizer.distributed=true"],
    ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "parallel.tensor=2", "model.tie_embeddings=true",
     "optimizer.distributed=true"],
    # MoE folding: experts over EP4 x ETP1 on attention TP2 x DP2 (the dedup must use ETP, not TP), and ETP2 x EP2
    ["parallel.pipeline=2", "parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert=4",
     "parallel.expert_tensor=1", "model.moe.num_experts=8", "model.moe.shared_expert_ffn_hidden_size=64"],
    ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert=2", "model.moe.num_experts=4",
     "optimizer.distributed=true"],
])
def test_gradient_norm_counts_every_parameter_once(tmp_path, tiny_corpus, layout):
    cfg = layout_config(tmp_path, tiny_corpus, *layout, "model.gpas.enabled=true")
    for norm, count in run_ranks(8, norm_of_ones, cfg):
        assert math.isclose(norm, math.sqrt(count), rel_tol=1e-12)


def state_after_steps(rank, world, cfg, steps=3):
    """The weights after `steps` steps, and each weight's Adam first moment as (offset, values) pieces:
    the whole tensor for plain AdamW, this rank's slices with the distributed optimizer."""
    trainer = Trainer(cfg, world, rank)
    for _ in range(steps):
        trainer.train_step()
    names = {p: n for n, p in trainer.model.named_parameters()}
    moments = {}
    if trainer.cfg.optimizer.distributed:
        starts = {p: a for _, p, a, _ in trainer.grads.layout.places()}
        for p, master, _ in trainer.optimizer.pieces:
            offset = master.storage_offset() - starts[p]  # masters are views of the flat weight buffer
            moments.setdefault(names[p], []).append((offset, trainer.optimizer.inner.state[master]["exp_avg"].clone()))
    else:
        for p in trainer.model.parameters():
            moments[names[p]] = [(0, trainer.optimizer.inner.state[p]["exp_avg"].flatten().clone())]
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}, moments


def test_distributed_optimizer_step_equals_plain_adamw(tmp_path, tiny_corpus):
    """Weights and Adam moments after 3 steps. The moments are linear in the gradients, so a wrong scale of the
    reduced or clipped gradients shows there even though Adam's update itself is scale-invariant."""
    small = "parallel.grad_bucket_mb=0.005"
    plain = run_ranks(2, state_after_steps, layout_config(tmp_path / "plain", tiny_corpus))
    sharded = run_ranks(2, state_after_steps, layout_config(tmp_path / "sharded", tiny_corpus,
                                                           "optimizer.distributed=true", small))
    weights, moments = plain[0]
    covered = {name: 0 for name in weights}
    for rank_weights, rank_moments in sharded:
        for name, value in weights.items():  # every rank holds all the weights after the all-gather
            torch.testing.assert_close(rank_weights[name], value, rtol=1e-6, atol=1e-8, msg=lambda m: f"{name}: {m}")
        for name, pieces in rank_moments.items():
            full = moments[name][0][1]
            for offset, piece in pieces:
                torch.testing.assert_close(piece, full[offset:offset + len(piece)], rtol=1e-5, atol=1e-9)
                covered[name] += len(piece)
    assert covered == {name: value.numel() for name, value in weights.items()}  # the shards tile every weight once


# large logits: exp overflows fp32 past 88.7, which about one token in ten has among its 64 logits at std 30;
# every logit at +1000
LARGE_LOGITS = {"std 30": (30.0, 0.0), "std 1, +1000": (1.0, 1000.0), "std 30, +1000": (30.0, 1000.0)}


def cross_entropy_on_tp2(rank, world, cases):
    """Per case: this rank's per-token losses and the gradient of its vocabulary half of the logits, on TP2."""
    from parallel.tensor_parallel import vocab_parallel_cross_entropy
    from parallel.topology import Sizes, Topology

    topology = Topology.build(Sizes(world=2, tp=2), rank)
    out = {}
    for case, (logits, labels, upstream) in cases.items():
        half = logits.shape[-1] // 2
        local = logits[..., rank * half:(rank + 1) * half].clone().requires_grad_()
        losses = vocab_parallel_cross_entropy(local, labels, topology)
        (losses * upstream).sum().backward()
        out[case] = losses.detach(), local.grad
    return out


def test_vocab_parallel_cross_entropy_matches_the_full_one_at_large_logits():
    """Each TP rank holds half the vocabulary; the per-token losses and the gradient of the logits equal
    F.cross_entropy on the gathered logits even where exp(logit) overflows fp32: the parallel version must
    subtract the global maximum, as F.cross_entropy does. The gradient (softmax - onehot) is taken under
    per-token upstream weights. fp32, the same maximum subtracted on both sides: 1e-5 relative, plus 1e-6
    absolute for entries near 0 (a loss near 0 is the log of a sum of exponentials near 1, summed in another
    order: observed 1.2e-7 off, one fp32 step of 1; gradients near 0 at most 5e-8)."""
    generator = torch.Generator().manual_seed(7)
    cases = {}
    for case, (std, shift) in LARGE_LOGITS.items():
        logits = torch.randn(4, 512, 64, generator=generator) * std + shift
        labels = torch.randint(0, 64, (4, 512), generator=generator)  # targets in both halves of the vocabulary
        cases[case] = logits, labels, torch.rand(4, 512, generator=generator)
    results = run_ranks(2, cross_entropy_on_tp2, cases)
    for case, (logits, labels, upstream) in cases.items():
        full = logits.clone().requires_grad_()
        expected = F.cross_entropy(full.flatten(0, 1), labels.flatten(), reduction="none").view(4, 512)
        (expected * upstream).sum().backward()
        for rank, result in enumerate(results):
            losses, grad = result[case]
            torch.testing.assert_close(losses, expected.detach(), rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{case}, rank {rank} losses: {m}")
            torch.testing.assert_close(grad, full.grad[..., rank * 32:(rank + 1) * 32], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{case}, rank {rank} gradient: {m}")


def count_collectives(rank, world, cfg):
    """Bytes each kind of collective takes in on this rank during one training step."""
    trainer = Trainer(cfg, world, rank)
    moved = {"all_reduce": 0, "all_gather": 0, "reduce_scatter": 0}

    def counting(name, fn, position):
        def wrapped(*args, **kwargs):
            moved[name] += args[position].numel() * args[position].element_size()
            return fn(*args, **kwargs)
        return wrapped

    import parallel.collectives as coll

    originals = (dist.all_reduce, coll._all_gather_single, coll._reduce_scatter_single)
    try:
        dist.all_reduce = counting("all_reduce", originals[0], 0)
        coll._all_gather_single = counting("all_gather", originals[1], 1)
        coll._reduce_scatter_single = counting("reduce_scatter", originals[2], 1)
        trainer.train_step()
    finally:
        dist.all_reduce, coll._all_gather_single, coll._reduce_scatter_single = originals
    sequence_parallel = sum(v.numel() for _, v in trainer.grads.owned(lambda p: placement_of(p).partial_over_tp))
    return moved, trainer.grads.grad.numel(), sequence_parallel


def test_communication_volume_of_a_step_is_the_analytic_one(tmp_path, tiny_corpus):
    """TP2 x CP2 x DP2 with SP and the distributed optimizer: the bytes every rank puts into collectives in one
    step equal the formula, so no activation is gathered twice and no gradient or weight moved twice."""
    cfg = layout_config(tmp_path, tiny_corpus, *TP2_CP2_DP2, "optimizer.distributed=true")
    m, f32 = cfg.model, 4
    micro, b = 2, 2  # micro-batches per rank per step (8 sequences / DP2 / micro-batch 2), sequences in each
    h, layers = m.hidden_size, m.num_layers
    s_cp = m.seq_length // 2  # tokens of a sequence on a CP rank
    s_sp = s_cp // 2  # ... on one TP rank of it, between layers (sequence parallelism)
    kv = (m.query_groups // 2) * (h // m.num_attention_heads)  # key (or value) width on a TP rank
    sp_gathers = 2 * layers + 1  # attention and MLP inputs of each layer, the output layer's input
    sp_scatters = 2 * layers + 1  # the embedding, attention-out and MLP-down outputs
    activation_gathers = (sp_gathers * b * s_sp * h  # forward: SP all-gathers
                          + layers * 2 * b * s_cp * kv  # forward: CP all-gathers of keys and values
                          + sp_scatters * b * s_sp * h)  # backward of each reduce-scatter
    activation_scatters = (sp_scatters * b * s_cp * h  # forward: SP reduce-scatters
                           + sp_gathers * b * s_cp * h  # backward of each SP all-gather
                           + layers * 2 * b * 2 * s_cp * kv)  # backward of the CP key/value gathers
    for moved, buffer, sequence_parallel in run_ranks(8, count_collectives, cfg):
        assert moved["all_gather"] == (micro * activation_gathers + buffer // 4) * f32  # + this rank's weight slices
        assert moved["reduce_scatter"] == (micro * activation_scatters + buffer) * f32  # + the gradient buckets
        assert moved["all_reduce"] == (
            micro * 3 * b * s_cp * f32  # vocab-parallel loss: max, then (target logit, sum of exp) per token
            + sequence_parallel * f32  # this rank's slices of the sequence-parallel weights, over TP
            + f32  # the token-range check, decided by all ranks together
            + f32  # the reported loss
            + 8  # the squared gradient norm (fp64)
        )


def train_and_report(rank, world, cfg):
    return train(cfg, world, rank)


@pytest.mark.parametrize("layout", [
    TP2_CP2_DP2[:2] + ["optimizer.distributed=true"],
    ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "parallel.tensor=2", "model.tie_embeddings=true",
     "model.gpas.enabled=true"],
    # MoE folding with the plain optimizer: expert weights and states saved per EP rank, the expert bias kept
    ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert=4", "parallel.expert_tensor=1",
     "model.moe.num_experts=8", "model.moe.router.score=sigmoid", "model.moe.router.expert_bias_update_rate=0.01"],
])
def test_parallel_checkpoint_resumes_exactly_in_its_layout(tmp_path, tiny_corpus, layout):
    extra = ("train.iters=6", "logging.interval=1", "eval.interval=3", "eval.iters=1")
    full = layout_config(tmp_path / "full", tiny_corpus, *layout, *extra)
    run_ranks(8, train_and_report, full)
    part = layout_config(tmp_path / "part", tiny_corpus, *layout, *extra, "train.stop_at_step=3")
    run_ranks(8, train_and_report, part)
    saved = os.listdir(os.path.join(part.checkpoint_dir, "step_00000003"))
    assert sum(n.startswith("rng_rank") for n in saved) == 8
    run_ranks(8, train_and_report, layout_config(tmp_path / "part", tiny_corpus, *layout, *extra))

    def records(cfg):
        import json

        with open(os.path.join(cfg.run.dir, "metrics.jsonl")) as f:
            return [(r["step"], r["loss"], r["grad_norm"], r.get("val_loss")) for r in map(json.loads, f)]

    assert records(part) == records(full)  # bitwise: the same ranks add the same numbers in the same order


def test_time_limit_stops_every_rank_at_the_same_step(tmp_path, tiny_corpus):
    cfg = layout_config(tmp_path, tiny_corpus, "train.time_limit_minutes=1e-9", "parallel.context=2")
    assert [r["step"] for r in run_ranks(2, train_and_report, cfg)] == [1, 1]
