"""FP8 GEMMs of the torch backend (parallel/fp8.py): quantization, the kernel's rules, the three GEMMs against
fp32, and the scales of a tensor-parallel layer equal to one rank's."""

import pytest
import torch

from multirank import run_ranks
from parallel import fp8
from parallel.fp8 import E4M3, E5M2, Fp8Error, Fp8GroupedLinear, Fp8Linear, Fp8Recipe


def dequantized(q, scale):
    return q.float() / scale


# ----------------------------------------------------------------------------- quantization


def test_scales_map_the_amax_onto_the_largest_value_and_saturate_beyond_it():
    x = torch.tensor([0.5, -2.0, 1.0])
    for dtype, largest in ((E4M3, 448.0), (E5M2, 57344.0)):
        scale = fp8.scale_from_amax(fp8.amax(x), dtype)
        assert scale.item() == pytest.approx(largest / 2.0)
        q = fp8.quantize(x, scale, dtype)
        assert q.dtype == dtype and q.float().abs().max().item() == largest
        # beyond the amax (a stale delayed scale): saturated at the largest value, never inf
        over = fp8.quantize(torch.tensor([4.0, -1e9, float("inf")]), scale, dtype)
        assert over.float().tolist() == [largest, -largest, largest]
    assert fp8.quantize(torch.tensor([float("nan")]), torch.tensor(1.0), E4M3).float().isnan().all()
    assert fp8.scale_from_amax(torch.tensor(0.0), E4M3).item() == 1.0  # an all-zero tensor keeps scale 1
    assert fp8.scale_from_amax(torch.tensor(2.0), E4M3, margin=2).item() == pytest.approx(448.0 / 2.0 / 4.0)


def test_formats_give_gradients_e5m2_in_hybrid_and_e4m3_otherwise():
    assert Fp8Recipe(format="hybrid").gradient_dtype == E5M2
    assert Fp8Recipe(format="e4m3").gradient_dtype == E4M3
    seen = []
    original = fp8.quantize

    def spy(x, scale, dtype):
        seen.append(dtype)
        return original(x, scale, dtype)

    for recipe, expected in ((Fp8Recipe(), [E4M3, E4M3, E5M2]), (Fp8Recipe(format="e4m3"), [E4M3, E4M3, E4M3]),
                             (Fp8Recipe(scaling="rowwise", format="e4m3"), [E4M3, E4M3, E4M3, E4M3])):
        seen.clear()
        layer = Fp8Linear(recipe, kind="column", weight_group=None, batch_group=None, name="t")
        fp8.quantize = spy
        try:
            x = torch.randn(16, 32, requires_grad=True)
            layer(x, torch.randn(16, 32, requires_grad=True)).float().sum().backward()
        finally:
            fp8.quantize = original
        # weight (tensorwise: one copy; rowwise: by rows and by columns), input, gradient
        assert sorted(seen, key=str) == sorted(expected, key=str), recipe


def test_rowwise_scales_follow_rows_and_tensorwise_one_scale():
    torch.manual_seed(0)
    w = torch.randn(32, 16)
    w[3] *= 1e6  # one large row: tensorwise lets it set every row's scale (the others go subnormal), rowwise only
    # its own
    tensor = Fp8Linear(Fp8Recipe(), kind="column", weight_group=None, batch_group=None, name="t")
    rows = Fp8Linear(Fp8Recipe(scaling="rowwise", format="e4m3"), kind="column", weight_group=None,
                     batch_group=None, name="t")
    _, inv_tensor, _, _ = tensor.weight_forms(w)
    forward, inv_rows, dgrad, inv_columns = rows.weight_forms(w)
    assert inv_tensor.numel() == 1 and inv_rows.shape == (1, 32) and inv_columns.shape == (1, 16)
    torch.testing.assert_close(inv_rows[0], w.abs().amax(1) / 448.0)
    torch.testing.assert_close(inv_columns[0], w.abs().amax(0) / 448.0)
    small = torch.arange(32) != 3
    err = lambda inv, q: ((q.float() * inv - w.t())[:, small].norm() / w.t()[:, small].norm()).item()  # noqa: E731
    assert err(inv_rows, forward) < 0.05 < 0.5 < err(inv_tensor, tensor.weight_forms(w)[0])


def test_delayed_scaling_uses_the_history_with_its_algorithm_and_margin():
    for algo, margin in (("max", 0), ("most_recent", 1)):
        recipe = Fp8Recipe(scaling="delayed", amax_history_len=3, amax_compute_algo=algo, margin=margin)
        layer = Fp8Linear(recipe, kind="column", weight_group=None, batch_group=None, name="t")
        assert not layer.has_history  # the first step scales by the current amax
        for step_amax in (4.0, 8.0, 2.0, 1.0):
            layer.activation_scale(torch.tensor([[step_amax, -0.5]]), "input", E4M3)  # recorded, not yet used
            layer.push_history(layer.amaxes())
        assert layer.history["input"].tolist() == [1.0, 2.0, 8.0]  # newest first; 4.0 fell out
        basis = 8.0 if algo == "max" else 1.0
        assert layer.scales["input"].item() == pytest.approx(448.0 / basis / 2 ** margin)
        assert layer.step_amax["input"].item() == 0.0  # cleared for the next step


def test_cuda_rules_are_enforced_on_the_cpu():
    a = torch.randn(8, 32).to(E4M3)
    b = torch.randn(16, 32).to(E4M3)
    one = torch.tensor(1.0)
    fp8.scaled_mm(a, b.t(), one, one, out_dtype=torch.bfloat16, what="ok")  # row-major x column-major
    cases = {
        "column-major": (a, b.t().contiguous(), one, one),  # a row-major second operand
        "row-major": (a.t().contiguous().t(), b.t(), one, one),
        "multiples of 16": (torch.randn(8, 24).to(E4M3), torch.randn(16, 24).to(E4M3).t(), one, one),
        "fp32": (a, b.t(), one.bfloat16(), one),
        "e5m2 x e5m2": (a.float().to(E5M2), b.float().to(E5M2).t(), one, one),
        "rowwise scales": (a, b.t(), torch.ones(8), torch.ones(16)),
    }
    for rule, (x, y, sa, sb) in cases.items():
        with pytest.raises(Fp8Error, match=rule):
            fp8.scaled_mm(x, y, sa, sb, out_dtype=torch.bfloat16, what="case")
    with pytest.raises(Fp8Error, match="e4m3 operands only"):
        fp8.scaled_grouped_mm(a.float().to(E5M2), torch.randn(2, 16, 32).to(E4M3).transpose(1, 2), torch.ones(8),
                              torch.ones(2, 16), torch.tensor([4, 8], dtype=torch.int32), what="grouped")


def test_rowwise_without_a_cpu_kernel_multiplies_the_dequantized_operands(monkeypatch):
    """Before torch 2.13 the CPU `_scaled_mm` is tensorwise only: the fallback must give what the kernel gives (here
    checked against the kernel where this torch has it, else against the fp32 product of the dequantized values)."""
    torch.manual_seed(0)
    a, b = torch.randn(32, 48).to(E4M3), torch.randn(16, 48).to(E4M3).t()
    inv_a, inv_b = torch.rand(32, 1) + 0.5, torch.rand(1, 16) + 0.5
    monkeypatch.setattr(fp8, "cpu_rowwise_kernel", lambda: False)
    fallback = fp8.scaled_mm(a, b, inv_a, inv_b, out_dtype=torch.bfloat16, what="fallback")
    monkeypatch.undo()
    if fp8.cpu_rowwise_kernel():
        expected = fp8.scaled_mm(a, b, inv_a, inv_b, out_dtype=torch.bfloat16, what="kernel")
    else:
        expected = ((a.double() * inv_a.double()) @ (b.double() * inv_b.double())).to(torch.bfloat16)
    assert fallback.dtype == torch.bfloat16
    torch.testing.assert_close(fallback, expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------- the GEMMs against fp32

RECIPES = [Fp8Recipe(), Fp8Recipe(format="e4m3"), Fp8Recipe(scaling="rowwise", format="e4m3"),
           Fp8Recipe(scaling="delayed")]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r.scaling}-{r.format}")
def test_the_three_gemms_against_fp32_matmuls(recipe):
    """Tight: each GEMM equals the fp32 product of the operands as quantized (the kernel multiplies exactly and
    accumulates in fp32; the output is rounded to bf16). Loose: against the unquantized operands, the error of
    3-bit (e4m3) and 2-bit (e5m2) mantissas: a few percent of the result's norm."""
    torch.manual_seed(0)
    x = torch.randn(64, 48, requires_grad=True)
    w = (torch.randn(32, 48) * 0.05).requires_grad_()
    g = torch.randn(64, 32).bfloat16().float()  # what the layer receives: a bf16 gradient
    layer = Fp8Linear(recipe, kind="column", weight_group=None, batch_group=None, name="t")
    y = layer(x, w)
    y.backward(g.bfloat16())
    rowwise, grad_dtype = recipe.scaling == "rowwise", E4M3 if recipe.scaling == "rowwise" else recipe.gradient_dtype
    # the operands as the layer quantized them
    if rowwise:
        sx, sw, sg = (fp8.scale_from_amax(t.abs().amax(1, keepdim=True), E4M3) for t in (x.detach(), w.detach(), g))
        sw_columns = fp8.scale_from_amax(w.detach().abs().amax(0, keepdim=True), E4M3)
    else:  # delayed: the first step, without a history, scales like tensorwise
        sx, sw, sg = (fp8.scale_from_amax(t.abs().amax(), d) for t, d in ((x.detach(), E4M3), (w.detach(), E4M3),
                                                                           (g, grad_dtype)))
        sw_columns = sw
    qx = dequantized(fp8.quantize(x.detach(), sx, E4M3), sx)
    qw = dequantized(fp8.quantize(w.detach(), sw, E4M3), sw)
    qw_columns = dequantized(fp8.quantize(w.detach(), sw_columns, E4M3), sw_columns)
    qg = dequantized(fp8.quantize(g, sg, grad_dtype), sg)
    torch.testing.assert_close(y.float(), (qx @ qw.t()).bfloat16().float(), rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(x.grad, qg @ qw_columns, rtol=1e-2 if rowwise else 1e-5, atol=1e-5)
    wgrad = g.t() @ x.detach().bfloat16().float() if rowwise else qg.t() @ qx
    torch.testing.assert_close(w.grad, wgrad, rtol=1e-2 if rowwise else 1e-5, atol=1e-5)
    relative = lambda a, b: ((a.float() - b).norm() / b.norm()).item()  # noqa: E731
    exact_x, exact_w = x.detach(), w.detach()
    assert relative(y, exact_x @ exact_w.t()) < 0.08
    assert relative(x.grad, g @ exact_w) < 0.08
    assert relative(w.grad, g.t() @ exact_x) < 0.08


def test_grouped_gemms_against_fp32_matmuls_of_the_quantized_operands():
    torch.manual_seed(0)
    x = torch.randn(40, 32, requires_grad=True)
    w = (torch.randn(3, 16, 32) * 0.05).requires_grad_()
    ends = torch.tensor([8, 8, 40], dtype=torch.int32)  # the second expert gets no token
    g = torch.randn(40, 16)
    layer = Fp8GroupedLinear(kind="column", weight_group=None, name="experts")
    y = layer(x, w, ends)
    y.backward(g.bfloat16())
    sx = fp8.scale_from_amax(x.detach().abs().amax(1, keepdim=True), E4M3)
    sw = fp8.scale_from_amax(w.detach().abs().amax(2, keepdim=True), E4M3)
    sg = fp8.scale_from_amax(g.bfloat16().float().abs().amax(1, keepdim=True), E4M3)
    sw_columns = fp8.scale_from_amax(w.detach().abs().amax(1, keepdim=True), E4M3)
    qx, qw = dequantized(fp8.quantize(x.detach(), sx, E4M3), sx), dequantized(fp8.quantize(w.detach(), sw, E4M3), sw)
    qg = dequantized(fp8.quantize(g.bfloat16().float(), sg, E4M3), sg)
    qw_columns = dequantized(fp8.quantize(w.detach(), sw_columns, E4M3), sw_columns)
    groups = [(0, 0, 8), (2, 8, 40)]
    for e, a, b in groups:
        torch.testing.assert_close(y[a:b].float(), (qx[a:b] @ qw[e].t()).bfloat16().float(), rtol=1e-2, atol=1e-5)
        torch.testing.assert_close(x.grad[a:b], (qg[a:b] @ qw_columns[e]).bfloat16().float(), rtol=1e-2, atol=1e-5)
        wgrad = g[a:b].bfloat16().float().t() @ x.detach()[a:b].bfloat16().float()
        torch.testing.assert_close(w.grad[e], wgrad, rtol=1e-2, atol=1e-4)
    assert (w.grad[1] == 0).all()


def test_weights_are_quantized_once_until_refreshed():
    layer = Fp8Linear(Fp8Recipe(), kind="column", weight_group=None, batch_group=None, name="t")
    w = torch.randn(16, 32)
    first = layer.weight_forms(w)
    with torch.no_grad():
        w.mul_(2.0)  # an optimizer step
    assert layer.weight_forms(w) is first  # every micro-batch of the step reuses the quantized copy
    layer.refresh(w)
    assert layer.weight_forms(w)[1].item() == pytest.approx(2.0 * first[1].item())


# ----------------------------------------------------------------------------- scales under tensor parallelism


def _tp_layers(rank: int, world: int, recipe: Fp8Recipe, kind: str):
    """A column- or row-parallel FP8 GEMM on TP2 and on one rank with the same full operands: the pieces of
    this rank, to be compared with the one-rank results."""
    torch.manual_seed(0)
    x = torch.randn(32, 64)
    w = torch.randn(64, 64) * 0.05
    g = torch.randn(32, 64).bfloat16()
    group = torch.distributed.group.WORLD
    piece = lambda t, dim: t.chunk(world, dim)[rank]  # noqa: E731
    outputs = {}
    for name, layer_group in (("one", None), ("tp", group)):
        layer = Fp8Linear(recipe, kind=kind, weight_group=layer_group, batch_group=layer_group, name=kind)
        xs = x if kind == "column" or name == "one" else piece(x, 1)
        ws = w if name == "one" else piece(w, 0 if kind == "column" else 1)
        gs = g if kind == "row" or name == "one" else piece(g, 1)
        xs, ws = xs.clone().requires_grad_(), ws.clone().requires_grad_()
        y = layer(xs, ws)
        y.backward(gs)
        outputs[name] = (y.float(), xs.grad, ws.grad)
    return outputs


@pytest.mark.parametrize("recipe", RECIPES[:3], ids=lambda r: f"{r.scaling}-{r.format}")
@pytest.mark.parametrize("kind", ["column", "row"])
def test_a_tensor_parallel_layer_quantizes_like_one_rank(recipe, kind):
    """With the amaxes reduced over TP, each rank's shard is quantized with the scale of the whole tensor, so
    the pieces a rank computes on its own equal one rank's bit for bit; only the row layer's output (partial
    sums, added over TP by the layer around it) and the column layer's input gradient (likewise) are sums."""
    results = run_ranks(2, _tp_layers, recipe, kind)
    for rank, out in enumerate(results):
        (y1, dx1, dw1), (y2, dx2, dw2) = out["one"], out["tp"]
        piece = lambda t, dim: t.chunk(2, dim)[rank]  # noqa: E731
        if kind == "column":
            assert torch.equal(y2, piece(y1, 1)) and torch.equal(dw2, piece(dw1, 0))
        else:
            assert torch.equal(dx2, piece(dx1, 1)) and torch.equal(dw2, piece(dw1, 1))
    if kind == "column":  # fp32 partial input gradients (rowwise: bf16, the kernel's only output)
        tight = recipe.scaling != "rowwise"
        torch.testing.assert_close(results[0]["tp"][1] + results[1]["tp"][1], results[0]["one"][1],
                                   rtol=1e-5 if tight else 2e-2, atol=1e-6 if tight else 1e-2)
    else:
        torch.testing.assert_close(results[0]["tp"][0] + results[1]["tp"][0], results[0]["one"][0], rtol=2e-2,
                                   atol=1e-2)  # bf16 partial outputs, each rounded once
