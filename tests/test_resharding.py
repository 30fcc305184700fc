"""Checkpoints that move between layouts (pretrain/checkpoint_state.py, pretrain/boxes.py).

Each case trains in one layout, saves at step 2, and resumes in another. Two things are checked:
- the loaded state, gathered from every rank of the new layout into global tensors, equals the checkpoint
  read whole in one process, element by element and bitwise (weights and both Adam moments): a reshard is a
  copy, so nothing may differ;
- the resumed run's losses equal those of the uninterrupted run in the saving layout, within the fp32
  tolerances of the layout tests (tests/test_parallel_equivalence.py): the two layouts add the same numbers
  in other orders.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from multirank import run_ranks
from parallel.placement import placement_of
from pretrain import checkpoint
from pretrain.boxes import flat_boxes
from pretrain.run_description import describe
from pretrain.trainer import Trainer, train
from test_parallel_equivalence import MOE, layout_config

EXTRA = ("train.iters=4", "logging.interval=1")
TIED = ("model.tie_embeddings=true",)
MOE_BIAS = (*MOE, "model.moe.router.score=sigmoid", "model.moe.router.expert_bias_update_rate=0.01")

CASES = {  # name: (model, (world, layout) saving, (world, layout) resuming)
    "TP2xPP2 SP -> one rank": ((), (4, ["parallel.tensor=2", "parallel.pipeline=2", "parallel.sequence_parallel=true"]),
                               (1, [])),
    "one rank -> TP2xDP2 distributed optimizer": ((), (1, []),
                                                  (4, ["parallel.tensor=2", "optimizer.distributed=true"])),
    "DP2 -> DP4 distributed, other buckets": ((), (2, ["optimizer.distributed=true"]),
                                              (4, ["optimizer.distributed=true", "parallel.grad_bucket_mb=0.005"])),
    "EP4 distributed -> EP2xETP2": (MOE_BIAS, (4, ["parallel.expert=4", "parallel.expert_tensor=1",
                                                   "optimizer.distributed=true"]),
                                    (4, ["parallel.expert=2", "parallel.expert_tensor=2"])),
    "TP2xDP2 distributed, saved in the background -> DP2": ((), (4, ["parallel.tensor=2", "optimizer.distributed=true",
                                                                  "checkpoint.async_save=true"]), (2, [])),
    "PP2 interleaved, tied -> CP2": (TIED, (2, ["parallel.pipeline=2", "parallel.virtual_pipeline=2"]),
                                     (2, ["parallel.context=2"])),
}


def _train(rank: int, world: int, cfg):
    return train(cfg, world, rank)


def _resume(rank: int, world: int, cfg):
    """This rank's boxes of every weight and Adam moment just after the load, then the resumed run."""
    trainer = Trainer(cfg, world, rank)
    names = {p: name for name, p in trainer.model.named_parameters()}
    pieces = []
    for name, p in trainer.model.named_parameters():
        where = placement_of(p)
        pieces.append((f"model.{name}", tuple(s.start for s in where.local_slices()), p.detach().clone()))
    for p, lo, hi, state in trainer.optimizer.state_pieces():
        where = placement_of(p)
        start = tuple(s.start for s in where.local_slices())
        for moment in ("exp_avg", "exp_avg_sq"):
            flat, at = state[moment].reshape(-1), 0
            for offsets, sizes in flat_boxes(where.local_shape, lo, hi):
                n = torch.Size(sizes).numel()
                pieces.append((f"optim.{names[p]}.{moment}", tuple(o + s for o, s in zip(offsets, start)),
                               flat[at:at + n].view(sizes).clone()))
                at += n
    described = describe(trainer)
    trainer.run()
    return pieces, described


def _records(cfg) -> list[tuple[int, float]]:
    with open(os.path.join(cfg.run.dir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f)]


def _run(world: int, fn, cfg):
    return run_ranks(world, fn, cfg) if world > 1 else [fn(0, 1, cfg)]


@pytest.mark.parametrize("case", list(CASES))
def test_a_checkpoint_resumes_in_another_layout(tmp_path, tiny_corpus, case):
    model, (world_a, saving), (world_b, resuming) = CASES[case]
    full = layout_config(tmp_path / "full", tiny_corpus, *model, *saving, *EXTRA)
    _run(world_a, _train, full)
    part = layout_config(tmp_path / "part", tiny_corpus, *model, *saving, *EXTRA, "train.stop_at_step=2",
                         "checkpoint.save_at_end=true")
    _run(world_a, _train, part)
    saved = os.path.join(part.checkpoint_dir, "step_00000002")
    rest = layout_config(tmp_path / "rest", tiny_corpus, *model, *resuming, *EXTRA, f"checkpoint.resume={saved}")
    results = _run(world_b, _resume, rest)
    assert "resharded on load" in results[0][1]

    # the loaded state is the checkpoint, element by element
    keys = sorted({key for pieces, _ in results for key, _, _ in pieces})
    whole = checkpoint.read_tensors(saved, keys)
    covered = {key: torch.zeros(t.shape, dtype=torch.bool) for key, t in whole.items()}
    for pieces, _ in results:
        for key, offsets, piece in pieces:
            where = tuple(slice(o, o + n) for o, n in zip(offsets, piece.shape))
            assert torch.equal(piece, whole[key][where]), key
            covered[key][where] = True
    assert all(mask.all() for mask in covered.values())
    assert any(k.endswith("exp_avg_sq") for k in keys) and any(k.startswith("model.") for k in keys)

    # and the run goes on as if it had not stopped
    expected, resumed = dict(_records(full)), _records(rest)
    assert [step for step, _ in resumed] == [3, 4]
    assert resumed[0][1] == pytest.approx(expected[3], rel=1e-5)
    assert resumed[1][1] == pytest.approx(expected[4], rel=1e-4)


def test_the_checkpoint_holds_each_tensor_once_under_its_name(tmp_path, tiny_corpus):
    """TP2 x PP2 with tied embeddings: keys name tensors, not ranks; the tied table is saved once, whole."""
    cfg = layout_config(tmp_path, tiny_corpus, *TIED, "parallel.tensor=2", "parallel.pipeline=2", *EXTRA,
                        "train.stop_at_step=1", "checkpoint.save_at_end=true")
    run_ranks(4, _train, cfg)
    saved = checkpoint.saved_tensors(os.path.join(cfg.checkpoint_dir, "step_00000001"))
    assert "model.embedding.weight" in saved and "model.output.weight" not in saved
    assert saved["model.layers.3.attention.qkv.weight"][0] == (cfg.model.hidden_size * 2, cfg.model.hidden_size)
    assert not [k for k in saved if ".pp" in k or ".tp" in k or k.startswith("optim.") and k.count(".") < 3]
    assert {k.rsplit(".", 1)[1] for k in saved if k.startswith("optim.")} == {"exp_avg", "exp_avg_sq", "step"}


def _resume_step(rank: int, world: int, cfg):
    return Trainer(cfg, world, rank).step


def test_a_damaged_checkpoint_of_two_ranks_is_set_aside_by_all_of_them(tmp_path, tiny_corpus):
    """DP2: rank 1's shard of the newest checkpoint truncated. Every rank of a TP2 resume agrees to take the
    checkpoint before (the files are checked by the ranks together)."""
    cfg = layout_config(tmp_path, tiny_corpus, *EXTRA, "checkpoint.interval=2", "checkpoint.keep_last=2")
    run_ranks(2, _train, cfg)
    newest = os.path.join(cfg.checkpoint_dir, "step_00000004")
    with open(os.path.join(newest, "__1_0.distcp"), "r+b") as f:
        f.truncate(10)
    again = layout_config(tmp_path, tiny_corpus, *EXTRA, "parallel.tensor=2", "train.iters=6")
    assert run_ranks(2, _resume_step, again) == [2, 2]
    assert os.path.isdir(newest + ".damaged")


def _save_failing_on_rank0(rank: int, world: int, cfg):
    def fail(*args):
        raise OSError(28, "No space left on device")

    if rank == 0:
        checkpoint._write_latest = fail  # in this forked rank only
    try:
        train(cfg, world, rank)
    except checkpoint.CheckpointError as err:
        return str(err)
    return "no error"


def test_a_failure_of_rank_0_while_publishing_is_raised_on_every_rank(tmp_path, tiny_corpus):
    """Rank 0 alone renames and moves `latest`: when that fails, the others must not wait for it forever."""
    cfg = layout_config(tmp_path, tiny_corpus, *EXTRA, "checkpoint.interval=2")
    messages = run_ranks(2, _save_failing_on_rank0, cfg, timeout=120)
    assert all("rank 0 could not finish the checkpoint (OSError: [Errno 28] No space left on device)" in m
               for m in messages), messages
