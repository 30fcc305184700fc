"""NVIDIA apex behind model.norm_impl and optimizer.impl (parallel/apex_backend.py).

On the CPU with a fake apex (tests/fake_apex.py): detection in every case, `auto` falling back to torch,
an explicit `apex` refused with its reason, and, with the fake taken for usable, the model and the optimizer
calling it, training to torch's losses and checkpoints crossing implementations. On CUDA with the real
apex: its kernels and a short training run against torch's.
"""

import dataclasses
import json
import os
import sys
import types

import pytest
import torch

import fake_apex
from conftest import ROOT, tiny_config
from parallel import apex_backend
from parallel.placement import placement_of
from parallel.topology import Topology
from pretrain.config import ConfigError, ModelConfig
from pretrain.model import GPT
from pretrain.run_description import describe
from pretrain.trainer import Trainer, choose_kernels, train
from tools import bench_norm_optim

DEVICE = "apex fused kernels need a CUDA device"


def problems(device="cuda"):
    return apex_backend.norm_problem(device), apex_backend.adam_problem(device)


def cpu_config(tmp_path, corpus, *overrides):
    """The tests' tiny run, on the CPU even where a GPU is: there apex's device check is what is tested."""
    return tiny_config(tmp_path, corpus, "run.device=cpu", *overrides)


def losses(cfg):
    with open(os.path.join(cfg.run.dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


# ----------------------------------------------------------------------------- detection


def test_the_fake_nvidia_apex_is_usable(monkeypatch):
    fake_apex.install(monkeypatch)
    assert problems() == (None, None)


def test_the_device_is_checked_first_and_a_cpu_run_never_imports_apex(tmp_path, monkeypatch):
    (tmp_path / "apex").mkdir()
    (tmp_path / "apex" / "__init__.py").write_text("raise RuntimeError('apex was imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "apex", raising=False)
    assert problems("cpu") == (DEVICE, DEVICE)
    assert "apex" not in sys.modules
    fake_apex.install(monkeypatch, usable_on_cpu=False)
    assert problems("cpu") == (DEVICE, DEVICE)


def test_missing_apex(monkeypatch):
    monkeypatch.setitem(sys.modules, "apex", None)  # what the import system reads as "not installed"
    monkeypatch.setattr(apex_backend, "cuda_device", lambda device: True)
    assert problems() == ("apex is not installed", "apex is not installed")


def test_an_unrelated_apex_already_imported(monkeypatch):
    monkeypatch.setitem(sys.modules, "apex", types.ModuleType("apex"))  # PyPI's apex is no NVIDIA package
    monkeypatch.setattr(apex_backend, "cuda_device", lambda device: True)
    assert problems() == ("the installed apex is not NVIDIA apex (no apex.normalization)",
                          "the installed apex is not NVIDIA apex (no apex.optimizers)")
    fake_apex.install(monkeypatch, normalization=False)  # a package, but without apex.normalization
    assert problems() == ("the installed apex is not NVIDIA apex (no apex.normalization)", None)


def test_an_unrelated_apex_on_disk_is_recognised_without_running_it(tmp_path, monkeypatch):
    (tmp_path / "apex").mkdir()
    (tmp_path / "apex" / "__init__.py").write_text("raise RuntimeError('the unrelated apex ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "apex", raising=False)
    monkeypatch.setattr(apex_backend, "cuda_device", lambda device: True)
    assert problems()[0] == "the installed apex is not NVIDIA apex (no apex.normalization)"
    assert "apex" not in sys.modules


def test_an_nvidia_apex_that_fails_to_import_is_a_reason_not_a_crash(tmp_path, monkeypatch):
    for folder in ("apex", "apex/normalization", "apex/optimizers"):
        (tmp_path / folder).mkdir()
    (tmp_path / "apex" / "__init__.py").write_text("")
    (tmp_path / "apex" / "normalization" / "__init__.py").write_text("raise OSError('libcudart.so: not found')\n")
    (tmp_path / "apex" / "optimizers" / "__init__.py").write_text("FusedAdam = object\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("apex", "apex.normalization", "apex.optimizers"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    for name in (apex_backend.NORM_EXTENSION, apex_backend.ADAM_EXTENSION):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setattr(apex_backend, "cuda_device", lambda device: True)
    assert problems() == ("importing apex.normalization.fused_layer_norm failed (OSError: libcudart.so: not found)",
                          None)


def test_nvidia_apex_without_its_cuda_extensions(monkeypatch):
    fake_apex.install(monkeypatch, extensions=())
    assert problems() == ("NVIDIA apex without its CUDA extensions (fused_layer_norm_cuda)",
                          "NVIDIA apex without its CUDA extensions (amp_C)")
    fake_apex.install(monkeypatch, extensions=("fused_layer_norm_cuda",))
    assert problems() == (None, "NVIDIA apex without its CUDA extensions (amp_C)")


# ----------------------------------------------------------------------------- selection


def test_auto_keeps_torch_on_the_cpu_and_says_why(tmp_path, tiny_corpus, monkeypatch):
    calls = fake_apex.install(monkeypatch, usable_on_cpu=False)  # installed, but this is the CPU
    trainer = Trainer(cpu_config(tmp_path, tiny_corpus, "train.iters=2", "eval.interval=0"))
    assert (trainer.cfg.model.norm_impl, trainer.cfg.optimizer.impl) == ("torch", "torch")
    assert type(trainer.optimizer.inner) is torch.optim.AdamW
    assert f"kernels: norm torch, optimizer torch AdamW (fused); auto kept torch: {DEVICE}" in describe(trainer)
    trainer.run()
    assert (calls.rms_norm, calls.adam_steps) == (0, 0)


@pytest.mark.parametrize("field", ["model.norm_impl", "optimizer.impl"])
def test_explicit_apex_that_cannot_run_is_refused_with_the_reason(tmp_path, tiny_corpus, monkeypatch, field):
    with pytest.raises(ConfigError, match=rf"^{field}=apex: {DEVICE}; use auto or torch$"):
        Trainer(cpu_config(tmp_path, tiny_corpus, f"{field}=apex"))
    fake_apex.install(monkeypatch, extensions=())
    extension = "fused_layer_norm_cuda" if field == "model.norm_impl" else "amp_C"
    with pytest.raises(ConfigError, match=rf"^{field}=apex: NVIDIA apex without its CUDA extensions \({extension}\)"):
        Trainer(cpu_config(tmp_path, tiny_corpus, f"{field}=apex"))


def test_a_gpu_run_with_apex_can_be_planned_anywhere(capsys):
    """Config.validate does not look for apex: `launch --dry-run` runs on login nodes without a GPU."""
    from launch.__main__ import main

    quickstart = os.path.join(ROOT, "examples", "quickstart.yaml")
    outputs = []
    for kernels in ([], ["model.norm_impl=apex", "optimizer.impl=apex"]):
        assert main(["--dry-run", quickstart, *kernels, "--world-size", "2"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]  # the same parameters and memory


def test_the_trainer_checks_again_on_the_device_it_got(tmp_path, tiny_corpus):
    cfg = cpu_config(tmp_path, tiny_corpus)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, norm_impl="apex"))  # past validate
    with pytest.raises(ConfigError, match=f"^model.norm_impl=apex: {DEVICE}"):
        choose_kernels(cfg, torch.device("cpu"))


def test_optimizer_fused_goes_with_torch(tmp_path, tiny_corpus, monkeypatch):
    fake_apex.install(monkeypatch)
    with pytest.raises(ConfigError, match="^optimizer.fused=true is an option of torch's AdamW"):
        cpu_config(tmp_path, tiny_corpus, "optimizer.impl=apex", "optimizer.fused=true").validate()
    cfg, kept = choose_kernels(cpu_config(tmp_path, tiny_corpus, "optimizer.fused=false"), torch.device("cpu"))
    assert (cfg.model.norm_impl, cfg.optimizer.impl) == ("apex", "torch")
    assert kept == ["optimizer.fused=false asks for torch's unfused AdamW"]


# ----------------------------------------------------------------------------- the fake, taken for usable


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_the_norm_keeps_its_parameters_and_placements_and_computes_the_same(monkeypatch, norm):
    calls = fake_apex.install(monkeypatch)
    topology = Topology.single()
    args = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, norm=norm)
    models = {impl: GPT(ModelConfig(**args, norm_impl=impl), 64, topology) for impl in ("torch", "apex")}
    for model in models.values():
        model.init_parameters(0)
    named = {impl: dict(m.named_parameters()) for impl, m in models.items()}
    assert list(named["torch"]) == list(named["apex"])
    for name, p in named["torch"].items():
        assert placement_of(p) == placement_of(named["apex"][name]), name
    assert models["torch"].state_dict().keys() == models["apex"].state_dict().keys()
    ids = torch.randint(0, 64, (2, 16))
    assert torch.equal(models["torch"](ids), models["apex"](ids))  # the fake is torch underneath
    assert (calls.rms_norm, calls.layer_norm) == ((5, 0) if norm == "rmsnorm" else (0, 5))  # 2 per layer, final


@pytest.mark.parametrize("extra, rel", [((), 1e-5), (("precision.dtype=bf16", "optimizer.distributed=true"), 1e-4),
                                        (("model.norm=layernorm", "model.recompute=selective"), 1e-5)])
def test_the_fake_apex_trains_to_torchs_losses(tmp_path, tiny_corpus, monkeypatch, extra, rel):
    reference = cpu_config(tmp_path / "torch", tiny_corpus, "model.norm_impl=torch", "optimizer.impl=torch", *extra)
    train(reference)
    calls = fake_apex.install(monkeypatch)
    cfg = cpu_config(tmp_path / "apex", tiny_corpus, *extra)  # auto
    trainer = Trainer(cfg)
    assert "kernels: norm apex, optimizer apex FusedAdam" in describe(trainer)
    assert isinstance(trainer.optimizer.inner, fake_apex.FusedAdam) and calls.adam_w_modes == [True]
    trainer.run()
    assert calls.rms_norm + calls.layer_norm > 0 and calls.adam_steps == cfg.train.iters
    # the norms are torch's exactly; FusedAdam's update is AdamW's, computed in another order (which bf16 amplifies)
    assert losses(cfg)[0] == losses(reference)[0]
    assert losses(cfg) == pytest.approx(losses(reference), rel=rel)


@pytest.mark.parametrize("distributed", ["false", "true"])
@pytest.mark.parametrize("first, then", [("torch", "apex"), ("apex", "torch")])
def test_a_checkpoint_resumes_under_the_other_implementation(tmp_path, tiny_corpus, monkeypatch, distributed,
                                                             first, then):
    fake_apex.install(monkeypatch)
    extra = (f"optimizer.distributed={distributed}", "checkpoint.interval=0")
    full = cpu_config(tmp_path / "full", tiny_corpus, *extra, "model.norm_impl=torch", "optimizer.impl=torch")
    train(full)
    part = Trainer(cpu_config(tmp_path / "part", tiny_corpus, *extra, f"optimizer.impl={first}",
                               f"model.norm_impl={first}", "train.stop_at_step=3"))
    part.run()
    saved = part.optimizer.state_pieces()
    rest_cfg = cpu_config(tmp_path / "part", tiny_corpus, *extra, f"optimizer.impl={then}",
                           f"model.norm_impl={then}")
    rest = Trainer(rest_cfg)
    assert rest.step == 3 and rest.cfg.optimizer.impl == then
    loaded = rest.optimizer.state_pieces()  # both in torch AdamW's layout
    assert [(lo, hi) for _, lo, hi, _ in saved] == [(lo, hi) for _, lo, hi, _ in loaded]
    for (_, _, _, state), (_, _, _, again) in zip(saved, loaded):
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
        for key, value in state.items():
            assert torch.equal(value.cpu(), again[key].cpu()), key
    if then == "torch":
        assert all(g["fused"] for g in rest.optimizer.param_groups)  # this run's choice, not the checkpoint's
    else:
        assert all(g["step"] == 3 for g in rest.optimizer.param_groups)
    rest.run()
    assert losses(rest_cfg) == pytest.approx(losses(full), rel=1e-5)


def test_the_state_layout_conversion_round_trips():
    p = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    adam = torch.optim.AdamW([{"params": [p[0]], "weight_decay": 0.1}, {"params": [p[1]], "weight_decay": 0.0}])
    for t in p:
        t.grad = torch.randn_like(t)
    adam.step(), adam.step()
    torch_layout = adam.state_dict()
    apex_layout = apex_backend.from_torch_state(torch_layout)
    assert [g["step"] for g in apex_layout["param_groups"]] == [2, 2]
    assert all(set(s) == {"exp_avg", "exp_avg_sq"} for s in apex_layout["state"].values())
    back = apex_backend.to_torch_state(apex_layout)
    assert back["param_groups"] == torch_layout["param_groups"]  # the keys DCP will look for, and their values
    for i, state in torch_layout["state"].items():
        assert {k: float(v) if k == "step" else v.tolist() for k, v in back["state"][i].items()} == \
            {k: float(v) if k == "step" else v.tolist() for k, v in state.items()}
    torch_layout["state"][1]["step"] = torch.tensor(5.0)
    both = {"state": torch_layout["state"], "param_groups": [{**torch_layout["param_groups"][0], "params": [0, 1]}]}
    with pytest.raises(apex_backend.ApexError, match="different steps"):
        apex_backend.from_torch_state(both)


# ----------------------------------------------------------------------------- the benchmark

BENCH = ["--device", "cpu", "--tokens", "64", "--hidden", "32", "--params", "20000", "--iters", "2", "--warmup", "1"]


def test_the_benchmark_without_apex_times_torch_only(capsys):
    assert bench_norm_optim.main(BENCH) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == f"apex fused norm: unavailable ({DEVICE}); torch only"
    assert lines[2] == f"apex FusedAdam: unavailable ({DEVICE}); torch only"
    assert lines[3].split() == ["kernel", "impl", "size", "ms/iter", "apex/torch", "max", "|diff|"]
    assert [line.split()[:3] for line in lines[4:]] == [["rmsnorm", "fwd+bwd", "torch"], ["adamw", "step", "torch"]]


def test_the_benchmark_with_apex_puts_both_in_one_table(capsys, monkeypatch):
    calls = fake_apex.install(monkeypatch)
    assert bench_norm_optim.main(BENCH + ["--dtype", "fp32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:3] == ["apex fused norm: usable", "apex FusedAdam: usable"]
    rows = [line.split() for line in lines[4:]]
    assert [r[:3] for r in rows] == [["rmsnorm", "fwd+bwd", "torch"], ["rmsnorm", "fwd+bwd", "apex"],
                                     ["adamw", "step", "torch"], ["adamw", "step", "apex"]]
    assert rows[1][-2].endswith("x") and float(rows[1][-1]) == 0.0  # the fake norm is torch's
    assert float(rows[3][-1]) < 1e-5 and calls.adam_steps > 0


# ----------------------------------------------------------------------------- the real apex, on CUDA


def _real_apex_problem():
    if not torch.cuda.is_available():
        return "no CUDA device"
    return apex_backend.norm_problem("cuda") or apex_backend.adam_problem("cuda")


real_apex = pytest.mark.skipif(_real_apex_problem() is not None, reason=f"needs NVIDIA apex on CUDA "
                               f"({_real_apex_problem()})")


@real_apex
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_real_apex_norms_match_torch(dtype, tolerance, kind):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4, 128, 512, device="cuda", generator=g).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(512, device="cuda", generator=g)).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(512, device="cuda", generator=g)).to(dtype).requires_grad_()
    inputs = (x, w, b) if kind == "layernorm" else (x, w)
    dy = torch.randn_like(x)
    outputs = []
    for fn in (bench_norm_optim.torch_norm(kind), apex_backend.norm_function(kind)):
        y = fn(x, w, b if kind == "layernorm" else None, 1e-5)
        outputs.append((y, *torch.autograd.grad(y, inputs, dy)))
    for t, a in zip(*outputs):
        assert a.dtype == t.dtype
        torch.testing.assert_close(a.float(), t.float(), atol=tolerance * 10, rtol=tolerance)


@real_apex
def test_real_fused_adam_matches_torch_adamw():
    start = [torch.randn(256, 64, device="cuda"), torch.randn(64, device="cuda")]
    grads = [[torch.randn_like(p) for p in start] for _ in range(5)]
    results = []
    for make in (lambda groups: torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, fused=True),
                 lambda groups: apex_backend.fused_adam(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8)):
        params = [p.clone() for p in start]
        optimizer = make([{"params": [params[0]], "weight_decay": 0.1}, {"params": [params[1]], "weight_decay": 0.0}])
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g
            optimizer.step()
        results.append(params)
    for t, a in zip(*results):
        torch.testing.assert_close(a, t, atol=1e-6, rtol=1e-5)


@real_apex
@pytest.mark.parametrize("precision, rel, more", [("fp32", 1e-4, ()), ("bf16", 1e-2, ()),
                                                  ("bf16", 1e-2, ("model.recompute=selective",
                                                                  "optimizer.distributed=true")),
                                                  ("bf16", 1e-2, ("train.compile=true",))])
def test_real_apex_trains_to_torchs_losses_and_resumes_across(tmp_path, tiny_corpus, precision, rel, more):
    extra = ("run.device=cuda", f"precision.dtype={precision}", "checkpoint.interval=0", *more)
    reference = tiny_config(tmp_path / "torch", tiny_corpus, *extra, "model.norm_impl=torch", "optimizer.impl=torch")
    train(reference)
    cfg = tiny_config(tmp_path / "apex", tiny_corpus, *extra, "train.stop_at_step=3")
    trainer = Trainer(cfg)
    assert "kernels: norm apex, optimizer apex FusedAdam" in describe(trainer)
    trainer.run()
    rest = tiny_config(tmp_path / "apex", tiny_corpus, *extra, "model.norm_impl=torch", "optimizer.impl=torch")
    train(rest)  # resumes apex's checkpoint under torch
    assert losses(rest) == pytest.approx(losses(reference), rel=rel)
