"""Every layout trains the same model as one rank: same seed, same global batch, same losses and gradients.

Tolerances (fp32): the first-step loss to 1e-5 relative, gradients to 1e-4 relative (plus 1e-7 absolute
for entries near zero), the loss after 10 optimizer steps to 1e-4 relative. They are not bitwise because
the layouts add the same numbers in another order: partial matmuls summed over TP, losses and gradients
averaged over DP x CP, attention over gathered keys.
"""

import math

import pytest
import torch

from conftest import tiny_config
from multirank import run_ranks
from parallel.collectives import all_gather_dim, all_gather_into
from parallel.placement import placement_of
from pretrain.trainer import Trainer

STEPS = 10


def layout_config(tmp_path, corpus, *overrides):
    return tiny_config(
        tmp_path, corpus,
        "model.seq_length=32", "model.num_layers=4", "train.global_batch_size=8", "train.micro_batch_size=2",
        f"train.iters={STEPS}", "eval.interval=0", "checkpoint.interval=0", "checkpoint.save_at_end=false",
        "data.prefetch=0", *overrides,
    )


def full_gradients(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every parameter's reduced gradient (gathered from the DP x CP shards with the distributed optimizer),
    gathered over TP into the full tensor."""
    grads, reduced = trainer.grads, trainer.grads.grad
    if grads.sharded:
        reduced = torch.empty_like(grads.grad)
        for bucket in grads.layout.buckets:
            if bucket.replicas == 1:
                reduced[bucket.start:bucket.end] = grads.shard_view(bucket)
            else:
                all_gather_into(reduced[bucket.start:bucket.end], grads.shard_view(bucket), grads.group_of(bucket))
    out, topology = {}, trainer.topology
    ranges = {p: (a, b) for _, p, a, b in grads.layout.places()}
    for name, p in trainer.model.named_parameters():
        a, b = ranges[p]
        g = reduced[a:b].view_as(p).clone()
        for piece in placement_of(p).splits:  # this rank's piece, split over TP (experts: over ETP and EP)
            if piece.size > 1:
                g = all_gather_dim(g, piece.dim, topology.groups[piece.group])
        out[name] = g
    return out


def count_in_flight(trainer: Trainer) -> list[int]:
    """[now, most]: micro-batch chunks whose forward has run and whose backward has not, counted as the pipeline
    runner calls them (what it keeps alive), not read from the schedule's plan."""
    live = [0, 0]
    forward, before_backward = trainer.stage_forward, trainer.grads.start_micro_batch

    def counted_forward(*args, **kwargs):
        if torch.is_grad_enabled():
            live[0] += 1
            live[1] = max(live)
        return forward(*args, **kwargs)

    def counted_backward(*args, **kwargs):
        live[0] -= 1
        return before_backward(*args, **kwargs)

    trainer.stage_forward, trainer.grads.start_micro_batch = counted_forward, counted_backward
    return live


def run_layout(rank: int, world: int, cfg):
    trainer = Trainer(cfg, world, rank)
    in_flight = count_in_flight(trainer)
    first_loss = trainer.forward_backward()
    grads = full_gradients(trainer)
    moe = {k: v for feature in trainer.features for k, v in feature.metrics().items()}
    losses = [first_loss]
    trainer.loader = type(trainer.loader)(trainer.data, cfg.train.global_batch_size, cfg.train.micro_batch_size,
                                          dp_rank=trainer.topology.dp_rank, dp_size=trainer.topology.dp)  # sample 0
    for _ in range(STEPS):
        losses.append(trainer.train_step()[0])
    return {"first_loss": first_loss, "grads": grads, "losses": losses[1:], "in_flight": in_flight[1],
            "moe_aux_loss": moe.get("moe_aux_loss"), "moe_load_imbalance": moe.get("moe_load_imbalance"),
            "moe_dropped_fraction": moe.get("moe_dropped_fraction")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_corpus):
    """The single-rank run of each model variant, computed once."""
    cache = {}

    def get(*model_overrides):
        if model_overrides not in cache:
            cfg = layout_config(tmp_path_factory.mktemp("ref"), tiny_corpus, *model_overrides)
            cache[model_overrides] = run_layout(0, 1, cfg)
        return cache[model_overrides]

    return get


LAYOUTS = {
    "TP2": (2, ["parallel.tensor=2"]),
    "TP2+SP": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "CP2": (2, ["parallel.context=2"]),
    "DP2": (2, []),
    "DP2 distributed optimizer": (2, ["optimizer.distributed=true"]),
    "TP2xCP2xDP2 SP": (8, ["parallel.tensor=2", "parallel.context=2", "parallel.sequence_parallel=true"]),
    # 5 KB buckets: dozens of them, reduced while backward runs, sharded with padding between them
    "DP2 distributed optimizer, small buckets": (2, ["optimizer.distributed=true", "parallel.grad_bucket_mb=0.005"]),
    "PP2": (2, ["parallel.pipeline=2"]),
    "PP4": (4, ["parallel.pipeline=4"]),
    "PP3 uneven 1+2+1": (3, ["parallel.pipeline=3", "parallel.first_stage_layers=1", "parallel.last_stage_layers=1"]),
    "PP2 interleaved, 2 chunks": (2, ["parallel.pipeline=2", "parallel.virtual_pipeline=2"]),
    "PP2xDP2 interleaved, distributed optimizer, small buckets": (4, [
        "parallel.pipeline=2", "parallel.virtual_pipeline=2", "optimizer.distributed=true",
        "parallel.grad_bucket_mb=0.005"]),
    "PP2xTP2xDP2 SP": (8, ["parallel.pipeline=2", "parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "PP2xCP2xDP2 distributed optimizer": (8, [
        "parallel.pipeline=2", "parallel.context=2", "optimizer.distributed=true"]),
    # with tied embeddings: the first and the last stage each hold a copy of the table, each copy sharded over DP;
    # both must be stepped alike and all-gathered, or the copies drift apart and from the one-rank model
    "PP2xDP2 distributed optimizer": (4, ["parallel.pipeline=2", "optimizer.distributed=true"]),
    "TP2xCP2xDP2 SP distributed optimizer, small buckets": (8, [
        "parallel.tensor=2", "parallel.context=2", "parallel.sequence_parallel=true", "optimizer.distributed=true",
        "parallel.grad_bucket_mb=0.005"]),
}
MODELS = {"": (), "tied+gpas+gelu": ("model.tie_embeddings=true", "model.gpas.enabled=true", "model.activation=gelu"),
          # Qwen3's q/k norms: each TP rank normalises its own heads, so their gradients are partial sums over TP
          "qk_norm+head_dim+llama3 rope": ("model.qk_norm=true", "model.head_dim=16", "model.rope_scaling.type=llama3",
                                           "model.rope_scaling.original_max_position_embeddings=16")}
# the layouts each model variant runs on: those that exercise its replicated, tied or partial weights
VARIANT_LAYOUTS = {
    "tied+gpas+gelu": ("TP2+SP", "TP2xCP2xDP2 SP", "PP2", "PP2 interleaved, 2 chunks", "PP2xTP2xDP2 SP",
                       "PP2xDP2 distributed optimizer"),
    "qk_norm+head_dim+llama3 rope": ("TP2", "TP2+SP"),  # the sum over TP of a sharded optimizer: the SP norms
}

# MoE: 8 experts, top-2, dropless; attention and experts laid out differently over the same ranks
MOE = ("model.moe.num_experts=8", "model.moe.top_k=2", "model.moe.ffn_hidden_size=64")
MOE_MODELS = {
    "": MOE,
    "shared expert, sigmoid, z-loss, seq aux": MOE + (
        "model.moe.shared_expert_ffn_hidden_size=64", "model.moe.router.score=sigmoid",
        "model.moe.router.z_loss_coeff=1e-3", "model.moe.router.load_balancing=seq_aux_loss"),
    # the global loss counts over DP and the micro-batches so far, so it is layout-free only without DP
    "global aux loss, allgather dispatcher": MOE + (
        "model.moe.router.load_balancing=global_aux_loss", "model.moe.dispatcher=allgather"),
}
MOE_LAYOUTS = {
    "EP2 over DP2": (2, ["parallel.expert=2"]),
    "EP4 over DP4": (4, ["parallel.expert=4"]),
    "attention TP2 SP x DP2, experts ETP1 x EP4": (4, [
        "parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert=4", "parallel.expert_tensor=1"]),
    "EP1 with ETP2, TP1": (2, ["parallel.expert_tensor=2"]),
    "TP2 SP x CP2 x DP2, EP8": (8, [
        "parallel.tensor=2", "parallel.context=2", "parallel.sequence_parallel=true", "parallel.expert=8",
        "parallel.expert_tensor=1"]),
    "PP2 x DP2, EP2": (4, ["parallel.pipeline=2", "parallel.expert=2"]),
    "TP2 SP x CP2, EP4": (4, [
        "parallel.tensor=2", "parallel.context=2", "parallel.sequence_parallel=true", "parallel.expert=4",
        "parallel.expert_tensor=1"]),
    "PP2 x TP2 SP, EP2": (4, [
        "parallel.pipeline=2", "parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert=2",
        "parallel.expert_tensor=1"]),
    # EDP2: every expert on two ranks, its gradient summed over them, its Adam states sharded over them
    "DP4, experts EP2 x EDP2 distributed optimizer": (4, ["parallel.expert=2", "optimizer.distributed=true"]),
    "PP2 interleaved x DP2, EP2": (4, ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "parallel.expert=2"]),
    "TP2 SP x DP2, ETP2 x EP2 distributed optimizer": (4, [
        "parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert=2", "optimizer.distributed=true"]),
}


@pytest.mark.parametrize("model", list(MOE_MODELS))
@pytest.mark.parametrize("layout", list(MOE_LAYOUTS))
def test_moe_layout_matches_one_rank(tmp_path, tiny_corpus, reference, layout, model):
    without_dp = ("TP2 SP x CP2, EP4", "PP2 x TP2 SP, EP2")
    if model.startswith("global") != (layout in without_dp):
        pytest.skip("the global balancing loss runs on the layouts without DP, and only there")
    if model.startswith("shared") and layout not in ("attention TP2 SP x DP2, experts ETP1 x EP4",
                                                     "TP2 SP x CP2 x DP2, EP8"):
        pytest.skip("the router and shared-expert variants run on the folded layouts")
    world, overrides = MOE_LAYOUTS[layout]
    _compare(tmp_path, tiny_corpus, reference(*MOE_MODELS[model]), world, MOE_MODELS[model], overrides)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_one_rank(tmp_path, tiny_corpus, reference, layout, model):
    if model and layout not in VARIANT_LAYOUTS[model]:
        pytest.skip("the model variants run on the layouts that exercise every replicated, tied or partial weight")
    if not model and layout == "PP2xDP2 distributed optimizer":
        pytest.skip("this layout is for the tied embedding; PP2xCP2xDP2 runs the distributed optimizer untied")
    world, overrides = LAYOUTS[layout]
    _compare(tmp_path, tiny_corpus, reference(*MODELS[model]), world, MODELS[model], overrides)


DROPPING = {
    "probs policy, EP4 over DP4": (4, MOE + ("model.moe.capacity_factor=1.0",), ["parallel.expert=4"]),
    "position policy, padded, PP2 x DP2 x EP2": (4, MOE + (
        "model.moe.capacity_factor=1.0", "model.moe.drop_policy=position", "model.moe.pad_to_capacity=true"),
        ["parallel.pipeline=2", "parallel.expert=2"]),
}


@pytest.mark.parametrize("case", list(DROPPING))
def test_moe_token_dropping_matches_one_rank_making_the_same_drops(tmp_path, tiny_corpus, reference, case):
    """An expert's capacity counts the tokens of one rank's micro-batch. With experts spread over DP (and PP)
    only, every rank's micro-batches are micro-batches of the one-rank run, so the same tokens are dropped."""
    world, model, overrides = DROPPING[case]
    expected = reference(*model)
    assert expected["moe_dropped_fraction"] > 0.05  # the capacity really drops tokens here
    _compare(tmp_path, tiny_corpus, expected, world, model, overrides)


def _compare(tmp_path, corpus, expected, world, model_overrides, overrides):
    cfg = layout_config(tmp_path, corpus, *model_overrides, *overrides)
    results = run_ranks(world, run_layout, cfg)
    got = results[0]
    assert math.isclose(got["first_loss"], expected["first_loss"], rel_tol=1e-5)
    if expected["moe_aux_loss"] is not None:  # the balancing loss and the loads do not depend on the layout
        assert all(math.isclose(r["moe_aux_loss"], expected["moe_aux_loss"], rel_tol=1e-5) for r in results)
        assert all(math.isclose(r["moe_load_imbalance"], expected["moe_load_imbalance"], rel_tol=1e-6) for r in results)
        assert all(r["moe_dropped_fraction"] == expected["moe_dropped_fraction"] for r in results)
    seen = set()
    for result in results:  # pipeline stages hold different layers; the tied embedding is on two of them
        for name, grad in result["grads"].items():
            torch.testing.assert_close(grad, expected["grads"][name], rtol=1e-4, atol=1e-7,
                                       msg=lambda m: f"{name}: {m}")
            seen.add(name)
    assert seen == set(expected["grads"])
    for k, (a, b) in enumerate(zip(got["losses"], expected["losses"])):
        assert math.isclose(a, b, rel_tol=1e-4), f"step {k + 1}: {a} vs {b}"
    assert all(r["losses"] == got["losses"] for r in results)  # every rank reports the same loss


@pytest.mark.parametrize("stages, chunks", [(2, 1), (4, 1), (2, 2)])
def test_1f1b_bounds_the_micro_batches_in_flight(tmp_path, tiny_corpus, stages, chunks):
    """Activation memory is bounded: stage s of p keeps at most p - s micro-batches alive (8 per step here);
    interleaved over v chunks, at most p - s + (v - 1) p micro-batch chunks, each 1/v of the stage."""
    cfg = layout_config(tmp_path, tiny_corpus, f"parallel.pipeline={stages}", f"parallel.virtual_pipeline={chunks}",
                        "train.micro_batch_size=1")
    results = run_ranks(stages, run_layout, cfg)
    assert [r["in_flight"] for r in results] == [stages - s + (chunks - 1) * stages for s in range(stages)]
