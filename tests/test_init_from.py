"""`checkpoint.init_from`: a fresh run that starts from another run's weights, with its own optimizer, schedule
and data position (pretraining continued, or RLP started from a pretrained model)."""

import pytest
import torch

from conftest import tiny_config
from multirank import run_ranks
from pretrain.checkpoint import CheckpointError
from pretrain.run_description import describe
from pretrain.trainer import Trainer, train
from test_parallel_equivalence import full_gradients, layout_config


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def test_a_fresh_run_starts_from_the_weights_and_nothing_else(tmp_path, tiny_corpus, capsys):
    source = tiny_config(tmp_path / "source", tiny_corpus, "train.stop_at_step=3", "checkpoint.interval=0")
    train(source)
    saved = Trainer(tiny_config(tmp_path / "source", tiny_corpus))  # resumes: the weights at step 3
    assert saved.step == 3
    for init_from in (f"{tmp_path}/source/run/checkpoints/step_00000003",  # a checkpoint folder
                      f"{tmp_path}/source/run/checkpoints"):  # or a checkpoint.dir: its latest
        fresh = Trainer(tiny_config(tmp_path / "fresh", tiny_corpus, f"checkpoint.init_from={init_from}",
                                    "optimizer.lr=1e-3"))
        assert fresh.step == 0 and fresh.loader.consumed_samples == 0 and fresh.init_from.endswith("step_00000003")
        weights, expected = _weights(fresh), _weights(saved)
        assert all(torch.equal(weights[name], expected[name]) for name in expected)
        assert fresh.optimizer.state_pieces() == []  # no Adam moments yet
        assert "initialised from" in describe(fresh)
    fresh.train_step()
    assert fresh.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 / 2)  # its own warm-up, from step 1


def test_a_run_that_resumes_its_own_checkpoint_ignores_init_from(tmp_path, tiny_corpus):
    train(tiny_config(tmp_path / "source", tiny_corpus, "train.stop_at_step=2", "checkpoint.interval=0"))
    init = f"checkpoint.init_from={tmp_path}/source/run/checkpoints"
    train(tiny_config(tmp_path / "run", tiny_corpus, init, "train.stop_at_step=3", "checkpoint.interval=0"))
    again = Trainer(tiny_config(tmp_path / "run", tiny_corpus, init))
    assert again.step == 3 and again.init_from is None  # its own step 3, not the source's weights


def first_gradients(rank: int, world: int, cfg):
    """The first global batch's mean loss and full gradients on this rank (a function for `run_ranks`)."""
    trainer = Trainer(cfg, world, rank)
    return trainer.forward_backward(), full_gradients(trainer)


def test_weights_load_into_another_data_parallel_layout_and_optimizer(tmp_path, tiny_corpus):
    """The weights' shards do not depend on DP, CP or the optimizer: a one-rank checkpoint starts DP2 with the
    distributed optimizer, which then computes one rank's first loss and gradients."""
    train(layout_config(tmp_path / "source", tiny_corpus, "train.stop_at_step=2", "checkpoint.save_at_end=true"))
    init = f"checkpoint.init_from={tmp_path}/source/run/checkpoints"
    (one,) = run_ranks(1, first_gradients, layout_config(tmp_path / "one", tiny_corpus, init))
    two = run_ranks(2, first_gradients, layout_config(tmp_path / "two", tiny_corpus, init,
                                                       "optimizer.distributed=true"))
    assert two[0][0] == pytest.approx(one[0], rel=1e-5)
    for name, grad in one[1].items():
        torch.testing.assert_close(two[0][1][name], grad, rtol=1e-4, atol=1e-7)


def test_another_model_is_refused_in_one_line(tmp_path, tiny_corpus):
    train(tiny_config(tmp_path / "source", tiny_corpus, "train.stop_at_step=1", "checkpoint.interval=0"))
    cfg = tiny_config(tmp_path / "run", tiny_corpus, f"checkpoint.init_from={tmp_path}/source/run/checkpoints",
                      "model.hidden_size=64")
    with pytest.raises(CheckpointError, match="checkpoint.init_from") as err:
        Trainer(cfg)
    message = str(err.value)
    assert "holds a different model: hidden_size 32 (checkpoint) vs 64 (config)" in message and "\n" not in message


def test_weights_load_into_another_tensor_and_pipeline_layout(tmp_path, tiny_corpus):
    """A one-rank checkpoint initialises TP2 x PP2 (tied embeddings: both copies loaded), which then computes
    one rank's first loss and gradients."""
    model = ("model.tie_embeddings=true",)
    train(layout_config(tmp_path / "source", tiny_corpus, *model, "train.stop_at_step=2",
                        "checkpoint.save_at_end=true"))
    init = f"checkpoint.init_from={tmp_path}/source/run/checkpoints"
    (one,) = run_ranks(1, first_gradients, layout_config(tmp_path / "one", tiny_corpus, *model, init))
    four = run_ranks(4, first_gradients, layout_config(tmp_path / "four", tiny_corpus, *model, init,
                                                        "parallel.tensor=2", "parallel.pipeline=2"))
    assert [r[0] for r in four] == pytest.approx([one[0]] * 4, rel=1e-5)  # every stage reports the loss
    merged = {name: grad for _, grads in four for name, grad in grads.items()}
    assert merged.keys() == one[1].keys()
    for name, grad in one[1].items():
        torch.testing.assert_close(merged[name], grad, rtol=1e-4, atol=1e-7)


def _refusal(rank: int, world: int, cfg) -> str:
    try:
        Trainer(cfg, world, rank)
    except CheckpointError as err:
        return str(err)
    return "not refused"


def test_a_missing_init_checkpoint_is_one_line(tmp_path, tiny_corpus):
    with pytest.raises(CheckpointError, match="checkpoint.init_from=.*no foldtron checkpoint there"):
        Trainer(tiny_config(tmp_path, tiny_corpus, f"checkpoint.init_from={tmp_path}/nothing"))
