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
from pretrain.trainer import Trainer

STEPS = 10


def layout_config(tmp_path, corpus, *overrides):
    return tiny_config(
        tmp_path, corpus, "model.seq_length=32", "model.num_layers=4", "train.global_batch_size=8", "train.micro_batch_size=2",
        f"train.iters={STEPS}", "eval.interval=0", "checkpoint.interval=0", "checkpoint.save_at_end=false",
        "data.prefetch=0", *overrides,
    )


def full_gradients(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every parameter's reduced gradient (gathered from the DP x CP shards with the distributed optimizer),
    gathered over TP into the full tensor."""
    buffer, reduced = trainer.grads, trainer.grads.grad
    if buffer.shard:
        reduced = torch.empty_like(buffer.grad)
        for bucket in buffer.buckets:
            all_gather_into(reduced[bucket.start:bucket.end], buffer._shard_view(bucket), buffer.group)
    out = {}
    for name, p in trainer.model.named_parameters():
        a, b = buffer.bucket_of[p].ranges[p]
        g = reduced[a:b].view_as(p).clone()
        if getattr(p, "partition_dim", None) is not None and trainer.topology.tp > 1:
            g = all_gather_dim(g, p.partition_dim, trainer.topology.tp_group)
        out[name] = g
    return out


def run_layout(rank: int, world: int, cfg):
    trainer = Trainer(cfg, world, rank)
    first_loss = trainer.forward_backward()
    grads = full_gradients(trainer)
    losses = [first_loss]
    trainer.loader = type(trainer.loader)(trainer.data, cfg.train.global_batch_size, cfg.train.micro_batch_size,
                                          trainer.topology.dp_rank, trainer.topology.dp)  # back to sample 0
    for _ in range(STEPS):
        losses.append(trainer.train_step()[0])
    return {"first_loss": first_loss, "grads": grads, "losses": losses[1:], "in_flight": trainer.most_in_flight}


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
    "PP2xCP2xDP2 distributed optimizer": (8, ["parallel.pipeline=2", "parallel.context=2", "optimizer.distributed=true"]),
    "TP2xCP2xDP2 SP distributed optimizer, small buckets": (8, [
        "parallel.tensor=2", "parallel.context=2", "parallel.sequence_parallel=true", "optimizer.distributed=true",
        "parallel.grad_bucket_mb=0.005"]),
}
MODELS = {"": (), "tied+gpas+gelu": ("model.tie_embeddings=true", "model.gpas.enabled=true", "model.activation=gelu")}


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_one_rank(tmp_path, tiny_corpus, reference, layout, model):
    if model and layout not in ("TP2+SP", "TP2xCP2xDP2 SP", "PP2", "PP2 interleaved, 2 chunks", "PP2xTP2xDP2 SP"):
        pytest.skip("the model variants run on the layouts that exercise every replicated or tied weight")
    world, overrides = LAYOUTS[layout]
    expected = reference(*MODELS[model])
    cfg = layout_config(tmp_path, tiny_corpus, *MODELS[model], *overrides)
    results = run_ranks(world, run_layout, cfg)
    got = results[0]
    assert math.isclose(got["first_loss"], expected["first_loss"], rel_tol=1e-5)
    seen = set()
    for result in results:  # pipeline stages hold different layers; the tied embedding is on two of them
        for name, grad in result["grads"].items():
            torch.testing.assert_close(grad, expected["grads"][name], rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")
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
