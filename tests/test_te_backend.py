"""The Transformer Engine adapter (parallel/te_backend.py), on the CPU against tests/fake_te.py.

Finding TE (each way an import fails gives its reason), the TE module the adapter builds (a local GEMM on our
parameter, nothing registered on our layer, no random draws), the FP8 weight caching sequence, the arithmetic
and the gradient reaching our weight, the recipe mapping and its refusals, the autocast and its amax group, and
TE's extra state through bytes. Where TE imports (a CUDA machine), the keywords the adapter passes are checked
against the installed TE's signatures; elsewhere the same check runs against the fake.
"""

import ast
import inspect
import pickle
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fake_te
from parallel import te_backend
from parallel.errors import FoldtronError
from parallel.fp8 import E4M3, quantize, scale_from_amax

N, K = 32, 16


def weight(seed: int = 0) -> nn.Parameter:
    return nn.Parameter(torch.randn(N, K, generator=torch.Generator().manual_seed(seed)))


def inputs(seed: int = 1, *, requires_grad: bool = False) -> torch.Tensor:
    return torch.randn(2, 8, K, generator=torch.Generator().manual_seed(seed)).requires_grad_(requires_grad)


def recipe(te, name="tensorwise", fmt="hybrid", **delayed):
    options = dict(amax_history_len=4, amax_compute_algo="max", margin=0) | delayed
    return te_backend.make_recipe(te, recipe=name, format=fmt, **options)


def fp8(te, name="tensorwise"):
    return te_backend.autocast(te, recipe=recipe(te, name), amax_group=None)


def quantize_dequantize(t):
    scale = scale_from_amax(t.detach().abs().amax(), E4M3)
    return quantize(t.detach(), scale, E4M3).float() / scale


class Layer(nn.Module):
    """A layer as the tensor-parallel ones hold their GEMM: a weight and an `fp8` attribute."""

    def __init__(self):
        super().__init__()
        self.weight = weight()
        self.fp8 = None

    def forward(self, x):
        return F.linear(x, self.weight) if self.fp8 is None else self.fp8(x, self.weight)


# ----------------------------------------------------------------------------- finding TE


@pytest.fixture
def te_modules():
    """Import transformer_engine afresh in the test, and leave sys.modules as it was."""
    saved = {name: module for name, module in sys.modules.items() if name.split(".")[0] == "transformer_engine"}
    for name in saved:
        del sys.modules[name]
    yield
    for name in [name for name in sys.modules if name.split(".")[0] == "transformer_engine"]:
        del sys.modules[name]
    sys.modules.update(saved)


def fake_package(tmp_path, monkeypatch, *, init="", pytorch=""):
    package = tmp_path / "transformer_engine"
    (package / "pytorch").mkdir(parents=True)
    (package / "common" / "recipe").mkdir(parents=True)
    (package / "__init__.py").write_text(init)
    (package / "pytorch" / "__init__.py").write_text(pytorch)
    (package / "common" / "__init__.py").write_text("")
    (package / "common" / "recipe" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))


def test_not_installed(te_modules, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # what a missing package raises
    status = te_backend.load()
    assert status.te is None and not status.available
    assert status.reason.startswith("transformer_engine is not installed (pip install transformer-engine[pytorch]")


@pytest.mark.parametrize("init, pytorch, reason", [
    ("raise RuntimeError('Found empty transformer-engine meta package installed.\\nmore')", "",
     "transformer_engine is installed but its CUDA core is missing or did not load (RuntimeError: Found empty "
     "transformer-engine meta package installed.)"),
    ("raise OSError('libcudnn.so.9: cannot open shared object file')", "",
     "transformer_engine could not load a shared library (OSError: libcudnn.so.9: cannot open shared object file)"),
    ("", "import transformer_engine_torch",
     "transformer_engine is installed without transformer_engine_torch (pip install transformer-engine[pytorch] "
     "on a CUDA machine builds it)"),
    ("", "raise ImportError('cannot import name fused_attn')",
     "transformer_engine failed to import (ImportError: cannot import name fused_attn)"),
])
def test_a_failed_import_gives_its_reason(te_modules, tmp_path, monkeypatch, init, pytorch, reason):
    fake_package(tmp_path, monkeypatch, init=init, pytorch=pytorch)
    monkeypatch.delitem(sys.modules, "transformer_engine_torch", raising=False)
    assert te_backend.load() == te_backend.TeStatus(None, reason)
    with pytest.raises(te_backend.TeError, match=r"^precision\.fp8\.backend=te: transformer_engine ") as err:
        te_backend.require()
    assert isinstance(err.value, FoldtronError) and "\n" not in str(err.value)


def test_an_importable_package_and_a_stand_in(te_modules, tmp_path, monkeypatch):
    fake_package(tmp_path, monkeypatch)
    status = te_backend.load()
    assert status.available and status.te.__name__ == "transformer_engine" and status.reason == ""
    te = fake_te.make()
    assert te_backend.load(te) == te_backend.TeStatus(te) and te_backend.require(te) is te


def test_te_is_imported_in_functions_only():
    tree = ast.parse(inspect.getsource(te_backend))
    top = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    names = [alias.name for node in top for alias in node.names] + [node.module or "" for node in top
                                                                     if isinstance(node, ast.ImportFrom)]
    assert not [name for name in names if name.startswith("transformer_engine")]


# ----------------------------------------------------------------------------- the TE module


def test_te_runs_a_local_gemm_on_our_parameter():
    te, layer = fake_te.make(), Layer()
    names = [name for name, _ in layer.named_parameters()]
    keys, modules = list(layer.state_dict()), list(layer.modules())
    rng = torch.random.get_rng_state()
    layer.fp8 = te_backend.TeLinear(te, layer.weight, name="layers.0.mlp.up")
    assert torch.equal(torch.random.get_rng_state(), rng)  # TE's own initialisation drew nothing
    kwargs = layer.fp8.module.init_kwargs
    assert (kwargs["in_features"], kwargs["out_features"]) == (K, N)
    assert {k: kwargs[k] for k in ("parallel_mode", "tp_group", "tp_size", "sequence_parallel", "bias")} == {
        "parallel_mode": None, "tp_group": None, "tp_size": 1, "sequence_parallel": False, "bias": False}
    assert kwargs["params_dtype"] == torch.float32 and kwargs["device"] == layer.weight.device
    assert kwargs["name"] == "layers.0.mlp.up" and not kwargs["fuse_wgrad_accumulation"]
    assert layer.fp8.module.weight is layer.weight
    assert [name for name, _ in layer.named_parameters()] == names  # nothing registered on our layer
    assert list(layer.state_dict()) == keys and list(layer.modules()) == modules

    x = inputs()
    layer(x).sum().backward()
    assert layer.weight.grad is not None  # on OUR parameter
    torch.testing.assert_close(layer.weight.grad, torch.ones(2, 8, N).flatten(0, 1).t() @ x.flatten(0, 1))


def test_a_replaced_parameter_is_the_one_computed_with():
    te, layer = fake_te.make(), Layer()
    layer.fp8 = te_backend.TeLinear(te, layer.weight, name="layer")
    layer(inputs())
    layer.weight = weight(seed=5)
    x = inputs()
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight))
    assert layer.fp8.module.weight is layer.weight and layer.fp8.module.first_microbatch_flags == [True, True]


def test_the_weight_is_quantized_once_per_step():
    te, w = fake_te.make(), weight()
    gemm, x = te_backend.TeLinear(te, w, name="layer"), inputs()
    with fp8(te):
        first = gemm(x, w)
        with torch.no_grad():
            w.mul_(2)  # as an optimizer step would, but without refresh(): the cached FP8 weight is used
        again = gemm(x, w)
        gemm(x, w)
        gemm.refresh(w)
        fresh = gemm(x, w)
    assert gemm.module.first_microbatch_flags == [True, False, False, True]
    assert torch.equal(again, first) and not torch.equal(fresh, first)


def test_forward_and_backward_of_the_quantized_operands():
    te, w = fake_te.make(), weight()
    gemm, x = te_backend.TeLinear(te, w, name="layer"), inputs(requires_grad=True)
    grad = torch.randn(2, 8, N, generator=torch.Generator().manual_seed(3))
    with fp8(te):
        y = gemm(x, w)
    y.backward(grad)
    qx, qw = quantize_dequantize(x), quantize_dequantize(w)
    assert not torch.equal(qx, x) and not torch.equal(qw, w)
    torch.testing.assert_close(y, F.linear(qx, qw), rtol=0, atol=0)
    torch.testing.assert_close(x.grad, grad @ qw)
    torch.testing.assert_close(w.grad, grad.flatten(0, 1).t() @ qx.flatten(0, 1))


def test_outside_the_autocast_te_computes_in_high_precision():
    te, w = fake_te.make(), weight()
    x = inputs()
    assert torch.equal(te_backend.TeLinear(te, w, name="layer")(x, w), F.linear(x, w))


def test_the_protocol_of_parallel_fp8():
    gemm = te_backend.TeLinear(fake_te.make(), weight(), name="layer")
    assert gemm.amaxes() == [] and gemm.push_history([]) is None


# ----------------------------------------------------------------------------- recipes and autocast


@pytest.mark.parametrize("fmt, format_name", [("hybrid", "HYBRID"), ("e4m3", "E4M3")])
def test_recipes_map_to_te(fmt, format_name):
    te = fake_te.make()
    r = te.common.recipe
    delayed = recipe(te, "delayed", fmt, amax_history_len=16, amax_compute_algo="most_recent", margin=2)
    assert delayed == r.DelayedScaling(fp8_format=getattr(r.Format, format_name), margin=2, amax_history_len=16,
                                       amax_compute_algo="most_recent")
    assert recipe(te, "tensorwise", fmt) == r.Float8CurrentScaling(fp8_format=getattr(r.Format, format_name))
    assert recipe(te, "blockwise", fmt) == r.Float8BlockScaling(fp8_format=getattr(r.Format, format_name))


@pytest.mark.parametrize("name, fmt, options, message", [
    ("rowwise", "e4m3", {}, r"^precision\.fp8\.recipe=rowwise is not a Transformer Engine recipe"),
    ("delayed", "e5m2", {}, r"^precision\.fp8\.format=e5m2 is not a Transformer Engine format"),
    ("delayed", "hybrid", {"amax_compute_algo": "mean"}, r"^precision\.fp8\.amax_compute_algo=mean: choose"),
])
def test_recipes_te_has_not_are_refused(name, fmt, options, message):
    with pytest.raises(te_backend.TeError, match=message):
        recipe(fake_te.make(), name, fmt, **options)


def test_autocast_passes_the_recipe_and_the_group():
    te, group = fake_te.make(), object()
    r = recipe(te, "delayed")
    with te_backend.autocast(te, recipe=r, amax_group=group):
        assert te.state.stack[-1]["recipe"] is r
    assert te.calls.autocast == [{"enabled": True, "recipe": r, "amax_reduction_group": group}]
    assert te.calls.fp8_autocast == [] and te.state.stack == []


def test_autocast_before_te_2_9():
    te, group = fake_te.make(autocast=False), object()
    r = recipe(te)
    with te_backend.autocast(te, recipe=r, amax_group=group):
        pass
    assert te.calls.fp8_autocast == [{"enabled": True, "fp8_recipe": r, "fp8_group": group}]


def test_a_single_rank_stage_in_a_larger_world_reduces_nothing(monkeypatch):
    te = fake_te.make()
    r = recipe(te, "delayed")
    with te_backend.autocast(te, recipe=r, amax_group=None):
        pass  # no process group: TE reduces nothing anyway
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 4)
    with te_backend.autocast(te, recipe=r, amax_group=None):
        pass  # TE would reduce over the whole world, across pipeline stages
    stateless = recipe(te, "tensorwise")
    with te_backend.autocast(te, recipe=stateless, amax_group=None):
        pass
    first, second, third = (call["recipe"] for call in te.calls.autocast)
    assert first is r and r.reduce_amax
    assert second == te.common.recipe.DelayedScaling(**{**vars(r), "reduce_amax": False})
    assert third is stateless


# ----------------------------------------------------------------------------- checkpoints


def trained(te, seed=0):
    """An adapter after a few FP8 forwards with delayed scaling (its amax history filled)."""
    w = weight(seed)
    gemm = te_backend.TeLinear(te, w, name="layers.1.attention.out")
    with fp8(te, "delayed"):
        for i in range(3):
            gemm(inputs(10 + i) * (i + 1), w)
    return gemm, w


def test_extra_state_through_bytes(monkeypatch):
    te = fake_te.make()
    gemm, w = trained(te)
    state = gemm.state_dict()
    assert list(state) == ["extra_state"] and isinstance(state["extra_state"], bytes)
    history = gemm.module.amax_history
    assert history[:3].gt(0).all()

    monkeypatch.setenv(fake_te.UNSAFE_PICKLE, "1")
    fresh = te_backend.TeLinear(te, weight(7), name="layers.1.attention.out")
    fresh.load_state_dict(pickle.loads(pickle.dumps(state)))  # as a checkpoint stores it
    assert torch.equal(fresh.module.amax_history, history)
    assert fresh.module.recipe == gemm.module.recipe
    assert pickle.loads(fresh.state_dict()["extra_state"]).keys() == pickle.loads(state["extra_state"]).keys()
    x = inputs(20)
    with fp8(te, "delayed"):  # the loaded history scales the next input as the saved one does
        assert torch.equal(fresh(x, w), gemm(x, w))


def test_stateless_recipes_save_nothing():
    te, w = fake_te.make(), weight()
    gemm = te_backend.TeLinear(te, w, name="layer")
    assert gemm.state_dict() == {}
    with fp8(te, "tensorwise"):
        gemm(inputs(), w)
    assert gemm.state_dict() == {}
    gemm.load_state_dict({})
    # a delayed recipe names its state before TE holds any: the template a resume loads into
    assert te_backend.TeLinear(te, w, name="layer", stateful=True).state_dict() == {"extra_state": b""}


def test_refused_checkpoint_states(monkeypatch):
    te = fake_te.make()
    state = trained(te)[0].state_dict()
    fresh = te_backend.TeLinear(te, weight(), name="layers.1.attention.out")
    monkeypatch.delenv(fake_te.UNSAFE_PICKLE, raising=False)
    with pytest.raises(te_backend.TeError, match=r"refused the checkpoint's FP8 state of layers\.1\.attention\.out "
                                                 rf"\(RuntimeError: .*{fake_te.UNSAFE_PICKLE}=1"):
        fresh.load_state_dict(state)
    torch_backend = {"input_amax_history": torch.zeros(4), "grad_amax_history": torch.zeros(4)}
    with pytest.raises(te_backend.TeError, match="holds grad_amax_history, input_amax_history, not Transformer"):
        fresh.load_state_dict(torch_backend)


# ----------------------------------------------------------------------------- signature drift


def check_signatures(te) -> None:
    """Every keyword the adapter passes exists in the signature of the TE callable it goes to."""
    missing, found = [], set()
    for path, keywords in te_backend.passed_keywords().items():
        target = te
        for part in path.split("."):
            target = getattr(target, part, None)
        if target is None:
            missing.append(f"{path} does not exist")
            continue
        found.add(path)
        parameters = inspect.signature(target).parameters
        missing += [f"{path}({k}=)" for k in keywords if k not in parameters]
    optional = {"pytorch.autocast", "pytorch.fp8_autocast"}  # one of the two is used
    missing = [m for m in missing if m.split(" ")[0] not in optional or not found & optional]
    assert not missing, f"keywords the adapter passes but this TE does not take: {missing}"


def test_the_keywords_exist_in_the_fake():
    check_signatures(fake_te.make())
    check_signatures(fake_te.make(autocast=False))


def test_the_keywords_exist_in_the_installed_te():
    status = te_backend.load()
    if not status.available:
        pytest.skip(status.reason)
    check_signatures(status.te)
