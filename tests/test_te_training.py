"""The Transformer Engine backend wired into training, against the fake TE (tests/fake_te.py) on the CPU: which
layers it takes, the amax group its autocast gets, the weight-caching sequence over micro-batches and steps,
and its extra state through a checkpoint and a resume. (The adapter's own calls: tests/test_te_backend.py.)"""

import pytest
import torch

import fake_te
from conftest import tiny_config
from multirank import run_ranks
from parallel import te_backend
from parallel.te_backend import TeLinear
from pretrain.config import ConfigError
from pretrain.model import fp8 as fp8_model
from pretrain.trainer import Trainer, train
from test_trainer import read_metrics

TE = ("precision.dtype=bf16", "precision.fp8.enabled=true", "precision.fp8.backend=te")


@pytest.fixture
def fake(monkeypatch):
    """Every `load()` finds the fake; the CPU counts as a device TE runs on."""
    module = fake_te.make()
    original_load, original_problem = te_backend.load, fp8_model.device_problem
    monkeypatch.setattr(te_backend, "load", lambda module_=None: original_load(module_ or module))
    monkeypatch.setattr(fp8_model, "device_problem", lambda device, backend="torch": original_problem(device))
    monkeypatch.setenv(fake_te.UNSAFE_PICKLE, "1")
    return module


def _two_steps(rank: int, world: int, cfg, module):
    trainer = Trainer(cfg, world, rank)
    for _ in range(2):
        trainer.train_step()
    qkv = trainer.model.layers["0"].attention.qkv.fp8
    stage = trainer.topology.groups["tp-dp-cp"]
    return {"flags": qkv.module.first_microbatch_flags,
            "groups": [call["amax_reduction_group"] is stage for call in module.calls.autocast],
            "kinds": {type(g).__name__ for g in trainer.fp8.gemms.values()},
            "stage": trainer.topology.members["tp-dp-cp"]}


def test_te_layers_get_the_stage_group_and_quantize_weights_once_per_step(tmp_path, tiny_corpus, fake):
    cfg = tiny_config(tmp_path, tiny_corpus, *TE, "precision.fp8.recipe=delayed", "parallel.tensor=2",
                      "train.global_batch_size=4", "train.micro_batch_size=2", "eval.interval=0",
                      "checkpoint.interval=0", "checkpoint.save_at_end=false")
    results = run_ranks(2, _two_steps, cfg, fake)
    for result in results:
        assert result["kinds"] == {"TeLinear"}  # every dense GEMM of the decoder layers
        assert result["stage"] == [0, 1]  # TP2 x DP1: the amax group is the stage
        assert result["groups"] and all(result["groups"])
        # two steps of two micro-batches: TE quantizes the weight at the first of each step only
        assert result["flags"] == [True, False, True, False]


def test_te_extra_state_survives_a_checkpoint_and_the_resume_is_exact(tmp_path, tiny_corpus, fake):
    extra = (*TE, "precision.fp8.recipe=delayed", "precision.fp8.amax_history_len=8")
    full = tiny_config(tmp_path / "full", tiny_corpus, *extra)
    train(full)
    train(tiny_config(tmp_path / "part", tiny_corpus, *extra, "train.stop_at_step=3", "checkpoint.interval=0"))
    rest = Trainer(tiny_config(tmp_path / "part", tiny_corpus, *extra, "checkpoint.interval=0"))
    histories = [g.module.amax_history for g in rest.fp8.gemms.values()]
    assert all(h is not None and h.gt(0).any() for h in histories)  # restored from the checkpoint's bytes
    assert all(isinstance(g, TeLinear) for g in rest.fp8.gemms.values())
    rest.run()
    expected = [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(full)]
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(rest.cfg)] == expected


def test_te_that_cannot_run_is_one_line_before_any_work(tmp_path, tiny_corpus, monkeypatch):
    with pytest.raises(ConfigError, match="Transformer Engine runs on CUDA devices only") as err:
        Trainer(tiny_config(tmp_path, tiny_corpus, *TE))  # raised before the data or the model is built
    assert "\n" not in str(err.value)
    reason = "transformer_engine is installed but its CUDA core is missing or did not load (RuntimeError: x)"
    monkeypatch.setattr(te_backend, "load", lambda module=None: te_backend.TeStatus(None, reason))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8_model.device_problem(torch.device("cuda", 0), "te") == reason


@pytest.mark.parametrize("extra, fragment", [(("model.recompute=full",), "outside Transformer Engine's autocast"),
                                             (("train.compile=true",), "graph break")])
def test_te_with_recompute_or_compile_is_refused(tmp_path, tiny_corpus, extra, fragment):
    with pytest.raises(ConfigError, match=fragment):
        tiny_config(tmp_path, tiny_corpus, *TE, *extra).validate()
