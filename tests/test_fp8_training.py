"""FP8 in training (pretrain/model/fp8.py): layouts against one FP8 rank, convergence against bf16, exact resume,
and the bad inputs, each one line.

Tolerances of the layouts. Where a layout changes no arithmetic of the model (DP2, PP2: every rank computes
whole micro-batches and whole layers), FP8 gives one rank's numbers up to fp32 summation order, as fp32
does, and is held to the fp32 layout tolerances. Where it changes the order of bf16 sums (TP2 with SP: partial
outputs added over TP; EP2: each expert's tokens gathered in another order), bf16 itself differs from one
rank by ~3e-3 of a gradient's norm (measured), and FP8 amplifies that: a value moved by one bf16 step can
cross to the next e5m2 value (2 mantissa bits, 12-25% apart), so gradients differ by up to ~5e-2 of their
norm (measured 4.6e-2 on TP2 SP, 1.9e-3 on EP2) while losses stay within ~2e-4. The scales themselves are
one rank's exactly: tests/test_fp8.py shows a TP2 layer's pieces equal to one rank's bit for bit.
"""

import math

import pytest
import torch

from conftest import tiny_config
from multirank import run_ranks
from pretrain.config import ConfigError
from pretrain.run_description import describe
from pretrain.trainer import Trainer, train
from test_init_from import first_gradients
from test_parallel_equivalence import MOE, layout_config, run_layout
from test_trainer import read_metrics

FP8 = ("precision.dtype=bf16", "precision.fp8.enabled=true")
EXACT = {"first": 1e-5, "grad": 1e-4, "loss": 1e-4}  # the fp32 layout tests' tolerances (elementwise)
REORDERED = {"first": 1e-5, "grad": 0.1, "loss": 1e-3}  # gradients: relative to each tensor's norm

LAYOUTS = {
    "TP2 SP": (2, (), ["parallel.tensor=2", "parallel.sequence_parallel=true"], REORDERED),
    "DP2 distributed optimizer": (2, (), ["optimizer.distributed=true"], EXACT),
    "PP2": (2, (), ["parallel.pipeline=2"], EXACT),
    "MoE EP2": (2, MOE, ["parallel.expert=2"], REORDERED),
    # delayed scaling: the histories are reduced over the stage's ranks, so DP and PP keep one rank's scales
    "DP2 delayed": (2, ("precision.fp8.recipe=delayed",), [], EXACT),
    "PP2 delayed": (2, ("precision.fp8.recipe=delayed",), ["parallel.pipeline=2"], EXACT),
    "TP2 SP rowwise": (2, ("precision.fp8.recipe=rowwise", "precision.fp8.format=e4m3"),
                       ["parallel.tensor=2", "parallel.sequence_parallel=true"], REORDERED),
    "CP2": (2, (), ["parallel.context=2"], REORDERED),  # attention's blocks merged in another order
    "MoE ETP2": (2, MOE, ["parallel.expert_tensor=2"], REORDERED),
}


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, tiny_corpus):
    cache = {}

    def get(model):
        if model not in cache:
            cfg = layout_config(tmp_path_factory.mktemp("fp8ref"), tiny_corpus, *FP8, *model)
            cache[model] = run_layout(0, 1, cfg)
        return cache[model]

    return get


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_an_fp8_layout_matches_one_fp8_rank(tmp_path, tiny_corpus, one_rank, layout):
    world, model, overrides, tol = LAYOUTS[layout]
    expected = one_rank(model)
    results = run_ranks(world, run_layout, layout_config(tmp_path, tiny_corpus, *FP8, *model, *overrides))
    assert math.isclose(results[0]["first_loss"], expected["first_loss"], rel_tol=tol["first"])
    seen = set()
    for result in results:
        for name, grad in result["grads"].items():
            want = expected["grads"][name]
            if tol is EXACT:
                torch.testing.assert_close(grad, want, rtol=tol["grad"], atol=1e-7, msg=lambda m: f"{name}: {m}")
            else:
                assert (grad - want).norm() <= tol["grad"] * want.norm() + 1e-7, name
            seen.add(name)
    assert seen == set(expected["grads"])
    for k, (a, b) in enumerate(zip(results[0]["losses"], expected["losses"])):
        assert math.isclose(a, b, rel_tol=tol["loss"]), f"step {k + 1}: {a} vs {b}"


def test_fp8_trains_a_small_model_like_bf16(tmp_path):
    """120 steps of a small model on the embedded corpus (2 layers, hidden 64, 64 tokens x 8 sequences in 2
    micro-batches): the mean loss of steps 101-120 in FP8 is within 0.5% of bf16's with the same seed.

    Measured: 8e-5 apart here (7.6e-4 with hidden 128 and 128 tokens); with the quantization's scales left out
    (`quantize` without `* scale`) 2.5%. The model is this small because a CPU without native bf16 (AVX2 only)
    multiplies bf16 matrices ~100x slower than fp32: the quickstart's model took 27 s a step there."""
    from pretrain.config_loading import load_config

    model = ("model.num_layers=2", "model.hidden_size=64", "model.seq_length=64", "train.global_batch_size=8",
             "train.micro_batch_size=4")
    means = {}
    for name, extra in (("bf16", ()), ("fp8", ("precision.fp8.enabled=true",))):
        cfg = load_config(None, [f"run.dir={tmp_path / name}", "train.iters=120", "eval.interval=0",
                                 "checkpoint.interval=0", "checkpoint.save_at_end=false", "logging.interval=1",
                                 "logging.tensorboard=false", "precision.dtype=bf16", *model, *extra])
        train(cfg)
        losses = [r["loss"] for r in read_metrics(cfg) if 101 <= r["step"] <= 120]
        assert len(losses) == 20
        means[name] = sum(losses) / len(losses)
    assert means["fp8"] == pytest.approx(means["bf16"], rel=0.005), means


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_an_fp8_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, tiny_corpus, recipe):
    extra = (*FP8, f"precision.fp8.recipe={recipe}", "precision.fp8.amax_history_len=4")
    full = tiny_config(tmp_path / "full", tiny_corpus, *extra)
    train(full)
    train(tiny_config(tmp_path / "part", tiny_corpus, *extra, "train.stop_at_step=3", "checkpoint.interval=0"))
    rest = Trainer(tiny_config(tmp_path / "part", tiny_corpus, *extra, "checkpoint.interval=0"))
    if recipe == "delayed":  # the histories came back from the checkpoint, not from zeros
        histories = [g.history["input"] for g in rest.fp8.gemms.values()]
        assert all(h[:3].gt(0).all() and h[3] == 0 for h in histories), histories
    rest.run()
    expected = [(r["step"], r["loss"], r["grad_norm"], r.get("val_loss")) for r in read_metrics(full)]
    got = [(r["step"], r["loss"], r["grad_norm"], r.get("val_loss")) for r in read_metrics(rest.cfg)]
    assert got == expected  # bitwise
    assert {r["precision"] for r in read_metrics(full)} == {f"fp8 torch {recipe} hybrid"}


def _train_ranks(rank, world, cfg):
    return train(cfg, world, rank)


def test_delayed_histories_of_a_pp2_checkpoint_resume_on_one_rank(tmp_path, tiny_corpus):
    """FP8 state is keyed by the GEMM's name: each stage saved its layers' histories, and one rank reads all."""
    extra = (*FP8, "precision.fp8.recipe=delayed", "precision.fp8.amax_history_len=4")
    run_ranks(2, _train_ranks, tiny_config(tmp_path, tiny_corpus, *extra, "parallel.pipeline=2",
                                           "train.stop_at_step=3", "checkpoint.interval=0"))
    rest = Trainer(tiny_config(tmp_path, tiny_corpus, *extra, "checkpoint.interval=0"))
    assert rest.step == 3 and not rest.fp8_afresh and rest.resharded_from["pp"] == 2
    histories = {name: g.history["input"] for name, g in rest.fp8.gemms.items()}
    assert {name.split(".")[1] for name in histories} == {"0", "1"}  # both stages' layers
    assert all(h[:3].gt(0).all() and h[3] == 0 for h in histories.values()), histories
    rest.run()


def test_a_bf16_checkpoint_resumes_in_fp8_with_fresh_histories(tmp_path, tiny_corpus, capsys):
    train(tiny_config(tmp_path, tiny_corpus, "precision.dtype=bf16", "train.stop_at_step=3"))
    trainer = Trainer(tiny_config(tmp_path, tiny_corpus, *FP8, "precision.fp8.recipe=delayed"))
    assert trainer.step == 3
    assert all(g.history["input"].eq(0).all() for g in trainer.fp8.gemms.values())
    trainer.run()
    out = capsys.readouterr().out
    assert "| fp8 torch delayed hybrid" in out  # the console line names the precision
    assert "holds no torch/delayed/hybrid/1024 (bf16 layers 0+0, min 0) state; the amax histories start afresh" \
        in out
    # other layers in FP8: afresh too (their names are not the checkpoint's), not a missing-key error
    again = Trainer(tiny_config(tmp_path, tiny_corpus, *FP8, "precision.fp8.recipe=delayed",
                                "precision.fp8.bf16_last_layers=1", "train.iters=8"))
    assert again.fp8_afresh and again.step == 6 and set(again.fp8.gemms) == {
        f"layers.0.{g}" for g in ("attention.qkv", "attention.out", "mlp.gate", "mlp.up", "mlp.down")}


def test_what_stays_in_bf16(tmp_path, tiny_corpus):
    """The output layer, the embedding and the router always; the first / last layers and small GEMMs on request."""
    cfg = tiny_config(tmp_path, tiny_corpus, *FP8, "model.num_layers=4", "precision.fp8.bf16_first_layers=1",
                      "precision.fp8.bf16_last_layers=1", "precision.fp8.min_weight_elements=2048", *MOE)
    trainer = Trainer(cfg)
    names = set(trainer.fp8.gemms)
    # layers 1 and 2 only; attention.out [32, 32] = 1024 elements is below the threshold; qkv [64, 32] is not
    assert names == {f"layers.{i}.{g}" for i in (1, 2) for g in (
        "attention.qkv", "mlp.experts.gate", "mlp.experts.up", "mlp.experts.down")}
    assert trainer.model.output.fp8 is None and "fp8 torch tensorwise hybrid: " in describe(trainer)


BAD = {
    "precision.dtype=fp32": ((), "needs precision.dtype=bf16"),
    "rowwise with hybrid": (("precision.fp8.recipe=rowwise",), "set precision.fp8.format=e4m3"),
    "a TE recipe on torch": (("precision.fp8.recipe=blockwise", "precision.fp8.format=e4m3"),
                             "not a recipe of precision.fp8.backend=torch"),
    "a weight not a multiple of 16": (("model.ffn_hidden_size=72",), "layers.*.mlp.up (and gate) is [72, 32]"),
    "tokens not a multiple of 16": (("model.seq_length=12",), "= 24 tokens per rank"),
    "every layer in bf16": (("precision.fp8.bf16_first_layers=2",), "keeps all 2 layers in bf16"),
}


def test_a_model_without_dense_mlps_is_not_held_to_their_shape(tmp_path, tiny_corpus):
    tiny_config(tmp_path, tiny_corpus, *FP8, *MOE, "model.ffn_hidden_size=72").validate()  # every layer MoE


@pytest.mark.parametrize("case", list(BAD))
def test_bad_fp8_configs_name_the_field(tmp_path, tiny_corpus, case):
    extra, fragment = BAD[case]
    base = ("precision.fp8.enabled=true",) if case == "precision.dtype=fp32" else FP8
    with pytest.raises(ConfigError, match="precision.fp8") as err:
        tiny_config(tmp_path, tiny_corpus, *base, *extra).validate()
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_a_gpu_without_fp8_tensor_cores_is_refused(monkeypatch):
    from pretrain.model import fp8 as fp8_model

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    problem = fp8_model.device_problem(torch.device("cuda", 0))
    assert "A100, compute capability 8.0" in problem and "8.9" in problem
    assert fp8_model.device_problem(torch.device("cpu")) is None


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_recomputation_in_fp8_gives_the_gradients_bitwise(tmp_path, tiny_corpus, recipe):
    """A recomputed layer quantizes exactly as its forward did (the weights are cached, the amaxes the same)."""
    extra = (*FP8, f"precision.fp8.recipe={recipe}", "eval.interval=0", "checkpoint.interval=0",
             "checkpoint.save_at_end=false")
    loss, grads = first_gradients(0, 1, tiny_config(tmp_path / "none", tiny_corpus, *extra))
    for policy in ("full", "selective"):
        got_loss, got = first_gradients(0, 1, tiny_config(tmp_path / policy, tiny_corpus, *extra,
                                                     f"model.recompute={policy}"))
        assert got_loss == loss
        assert all(torch.equal(got[name], grads[name]) for name in grads), policy


def test_compiled_fp8_matches_eager_fp8(tmp_path, tiny_corpus):
    """Inductor fuses the bf16 work around the FP8 GEMMs in another order, which FP8's rounding amplifies as it
    does a layout's (see the module docstring): measured 1.3e-5 of the loss and 5.3e-2 of a gradient's norm."""
    extra = (*FP8, "eval.interval=0", "checkpoint.interval=0", "checkpoint.save_at_end=false")
    loss, grads = first_gradients(0, 1, tiny_config(tmp_path / "eager", tiny_corpus, *extra))
    compiled = tiny_config(tmp_path / "compiled", tiny_corpus, *extra, "train.compile=true")
    got_loss, got = first_gradients(0, 1, compiled)
    assert got_loss == pytest.approx(loss, rel=1e-4)
    for name, grad in grads.items():
        assert (got[name] - grad).norm() <= 0.1 * grad.norm() + 1e-7, name


def _histories(rank: int, world: int, cfg):
    trainer = Trainer(cfg, world, rank)
    for _ in range(3):
        trainer.train_step()
    return {name: (g.history["input"].clone(), g.history["grad"].clone()) for name, g in trainer.fp8.gemms.items()}


@pytest.mark.parametrize("layout", ["DP2", "PP2", "TP2 SP"])
def test_delayed_histories_are_reduced_over_the_stage(tmp_path, tiny_corpus, layout):
    """The amaxes of a step are the maximum over the stage's ranks: every rank keeps one rank's histories (the
    gradients' scaled by DP, whose ranks divide their loss by their own micro-batches: a power of two, the
    same FP8 values), on DP and PP exactly; on TP2 SP the two ranks' are the same, near one rank's."""
    extra = (*FP8, "precision.fp8.recipe=delayed", "precision.fp8.amax_history_len=4")
    overrides = {"DP2": [], "PP2": ["parallel.pipeline=2"],
                 "TP2 SP": ["parallel.tensor=2", "parallel.sequence_parallel=true"]}[layout]
    (expected,) = run_ranks(1, _histories, layout_config(tmp_path / "one", tiny_corpus, *extra))
    results = run_ranks(2, _histories, layout_config(tmp_path / "two", tiny_corpus, *extra, *overrides))
    dp = 2 if layout == "DP2" else 1
    seen = set()
    for result in results:
        for name, (inputs, grads) in result.items():
            want_inputs, want_grads = expected[name]
            assert inputs[:3].gt(0).all(), name
            if layout == "TP2 SP":  # the inputs' amaxes close to one rank's; the gradients' are single extreme
                torch.testing.assert_close(inputs, want_inputs, rtol=5e-2, atol=0)  # values of reordered sums
            else:
                assert torch.equal(inputs, want_inputs) and torch.equal(grads, dp * want_grads), name
            seen.add(name)
    assert seen == set(expected)
    if layout != "PP2":  # one stage: every rank holds the same histories
        assert all(torch.equal(a, b) for name in results[0] for a, b in zip(results[0][name], results[1][name]))


def _graphs(cfg) -> int:
    import torch._dynamo.utils

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    trainer = Trainer(cfg)
    for _ in range(3):
        trainer.train_step()
    trainer.evaluate()
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_compiled_fp8_layers_share_their_graphs(tmp_path, tiny_corpus):
    """9 layers (more than dynamo's 8 recompilations), 3 steps and an evaluation: FP8 compiles the graphs bf16
    compiles (one for training, one for evaluation), not one per layer; delayed scaling one more, when the
    histories begin. (Quantizing weights inside the compiled code, or naming the layer there, made every
    layer its own graph until the limit, after which layers ran eager.)"""
    base = ("model.num_layers=9", "precision.dtype=bf16", "train.compile=true", "checkpoint.interval=0",
            "checkpoint.save_at_end=false", "eval.interval=0")
    bf16 = _graphs(tiny_config(tmp_path / "bf16", tiny_corpus, *base))
    assert _graphs(tiny_config(tmp_path / "fp8", tiny_corpus, *base, "precision.fp8.enabled=true")) == bf16
    delayed = _graphs(tiny_config(tmp_path / "delayed", tiny_corpus, *base, "precision.fp8.enabled=true",
                                  "precision.fp8.recipe=delayed"))
    assert delayed <= bf16 + 1


def _groups(rank: int, world: int, cfg):
    """Whether every FP8 GEMM reduces its amaxes over the groups the module docstring of parallel/fp8.py names."""
    from parallel.fp8 import Fp8GroupedLinear, Fp8Linear

    trainer = Trainer(cfg, world, rank)
    tp = trainer.topology
    checks = []
    for gemm in trainer.fp8.gemms.values():
        if isinstance(gemm, Fp8GroupedLinear):
            checks.append(gemm.weight_group is tp.groups["etp"])
        else:
            assert isinstance(gemm, Fp8Linear)
            split, whole = tp.groups["tp-cp"], tp.cp_group  # the TP-split role, and the one the same on TP ranks
            inputs, grads = (split, whole) if gemm.kind == "row" else (whole, split)
            checks.append(gemm.weight_group is tp.tp_group and gemm.groups["input"] is inputs
                          and gemm.groups["grad"] is grads)
    return checks


def test_each_gemm_reduces_its_amaxes_over_its_groups(tmp_path, tiny_corpus):
    cfg = layout_config(tmp_path, tiny_corpus, *FP8, *MOE, "model.moe.layer_freq=2", "parallel.tensor=2",
                        "parallel.context=2", "parallel.sequence_parallel=true", "parallel.expert=2",
                        "parallel.expert_tensor=2")
    for checks in run_ranks(4, _groups, cfg):
        assert len(checks) == 2 * 5 + 2 * 3 + 2 * 2 and all(checks)  # dense MLPs, expert stacks, attention


def test_evaluation_after_a_step_uses_the_stepped_weights(tmp_path, tiny_corpus):
    """The weights are quantized again right after the optimizer step, so an evaluation between two steps sees
    the new ones (their quantized forms equal a fresh quantization of the current weights)."""
    trainer = Trainer(tiny_config(tmp_path, tiny_corpus, *FP8))
    trainer.train_step()
    for name, gemm in trainer.fp8.gemms.items():
        fresh = gemm._quantize_weight(trainer.fp8.weights[name].detach())
        assert all(torch.equal(a.float(), b.float()) for a, b in zip(gemm.weight_forms(None), fresh)), name
