"""tools.bench_train: a complete table and JSON on the CPU (no timing is asserted), and a baseline of the same shape."""

import importlib.util
import json
import os
import re
import sys

import pytest
import torch

from conftest import ROOT, tiny_config
from parallel.topology import Topology
from pretrain.config_loading import load_config
from pretrain.model import GPT
from tools import bench_train

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
KEYS = {"params", "tokens_per_sec", "tflops_per_device", "mfu", "peak_memory_gib", "data_wait_fraction", "step_ms",
        "first_loss", "last_loss"}


def config_file(tmp_path, corpus, *overrides) -> str:
    path = tmp_path / "bench.yaml"
    path.write_text(tiny_config(tmp_path, corpus, *overrides).to_yaml())
    return str(path)


def rows_of(out: str) -> dict[str, list[str]]:
    """The table's rows by their first cell; every row has all the columns."""
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["params", "tokens/s"])
    rows = {}
    for line in lines[header + 1:]:
        cells = line.split()
        if cells[0] in ("foldtron", "baseline") and len(cells) > 2:
            rows[cells[0]] = cells
    assert all(len(cells) == len(bench_train.COLUMNS) for cells in rows.values()), rows
    return rows


@pytest.mark.parametrize("data", ["synthetic", "tiny_corpus"])
def test_the_table_and_the_json_are_complete(tmp_path, tiny_corpus, capsys, data):
    extra = ["data.synthetic=true"] if data == "synthetic" else []
    out_json = tmp_path / "bench.json"
    code = bench_train.main([config_file(tmp_path, tiny_corpus), *extra, "precision.dtype=bf16", "--warmup", "1",
                             "--steps", "2", "--json", str(out_json)])
    out = capsys.readouterr().out
    assert code == 0
    rows = rows_of(out)
    assert set(rows) == ({"foldtron", "baseline"} if HAS_TRANSFORMERS else {"foldtron"})
    for cells in rows.values():  # params, tokens/s, TFLOP/s, MFU and peak memory ("-" on the CPU), data wait, step
        assert cells[4:6] == ["-", "-"] and cells[6].endswith("%")
        assert all(float(c.replace(",", "").rstrip("%")) > 0 for c in cells[1:4] + cells[7:])
    report = json.loads(out_json.read_text())
    assert KEYS <= set(report["foldtron"]) and report["foldtron"]["params"] == int(rows["foldtron"][1].replace(",", ""))
    assert report["foldtron"]["mfu"] is None and report["foldtron"]["peak_memory_gib"] is None
    assert report["timed_steps"] == 2 and report["dtype"] == "bf16" and report["tokens_per_step"] == 4 * 16
    if HAS_TRANSFORMERS:
        assert KEYS <= set(report["baseline"]) and report["baseline_note"] is None
        assert rows["baseline"][1] == rows["foldtron"][1]  # the same parameters
    else:
        assert report["baseline"] is None and "transformers is not installed" in out
    assert ("(data.synthetic)" in out) == (data == "synthetic")


def test_peak_tflops_gives_the_mfu_and_a_config_it_cannot_represent_has_no_baseline(tmp_path, tiny_corpus, capsys):
    code = bench_train.main([config_file(tmp_path, tiny_corpus), "data.synthetic=true", "model.moe.num_experts=4",
                             "--warmup", "0", "--steps", "1", "--peak-tflops", "1.5"])
    out = capsys.readouterr().out
    assert code == 0
    assert set(rows_of(out)) == {"foldtron"} and rows_of(out)["foldtron"][4].endswith("%")
    assert "baseline: not comparable (MoE)" in out and "MFU against 1.5 TFLOP/s per device" in out


@pytest.mark.parametrize("overrides, reason", [
    ([], None),
    (["model.activation=gelu", "model.norm=layernorm"], "GELU, LayerNorm"),
    (["model.gpas.enabled=true"], "GPAS"),
    (["model.recompute=selective"], "model.recompute=selective"),
])
def test_configs_the_baseline_cannot_represent_are_named(overrides, reason):
    assert bench_train.baseline_problem(load_config(None, overrides), 1) == reason
    assert "2 ranks" in bench_train.baseline_problem(load_config(None, overrides), 2)


@pytest.mark.parametrize("overrides", [
    [],  # multi-head attention, untied
    ["model.num_query_groups=2", "model.tie_embeddings=true", "model.ffn_hidden_size=200"],
])
def test_the_llama_baseline_has_foldtrons_parameter_count(overrides):
    pytest.importorskip("transformers")
    from transformers import LlamaForCausalLM

    cfg = load_config(None, ["model.num_layers=3", "model.hidden_size=64", "model.num_attention_heads=4",
                             *overrides]).resolved(384)
    with torch.device("meta"):
        foldtron = GPT(cfg.model, 384, Topology.single()).num_parameters()
        baseline = LlamaForCausalLM(bench_train.llama_config(cfg.model, 384))
    assert sum(p.numel() for p in baseline.parameters()) == foldtron
    llama = baseline.config
    assert (llama.num_key_value_heads, llama.intermediate_size, llama.tie_word_embeddings) == (
        cfg.model.query_groups, cfg.model.ffn_size, cfg.model.tie_embeddings)
    assert llama._attn_implementation == "sdpa"


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0", "x.yaml"], "timed steps at least 1"),
    ([], "expected one config file"),
    (["a.yaml", "b.yaml"], "expected one config file"),
])
def test_usage_errors(capsys, argv, message):
    assert bench_train.main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_input_is_one_line(tmp_path, tiny_corpus, capsys):
    assert bench_train.main([config_file(tmp_path, tiny_corpus), "train.compile=true", "--warmup", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bench_train: error: --warmup 0 with train.compile=true") and err.count("\n") == 1
    assert bench_train.main([str(tmp_path / "missing.yaml")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_without_transformers_foldtron_still_gets_its_row(tmp_path, tiny_corpus, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    assert bench_train.main([config_file(tmp_path, tiny_corpus), "--warmup", "0", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert set(rows_of(out)) == {"foldtron"}
    assert 'baseline: skipped: transformers is not installed (pip install -e ".[bench]")' in out


PRESETS = ["gpt2_small", "llama_1b", "moe_1b"]


@pytest.mark.parametrize("name", PRESETS)
def test_the_presets_state_their_dry_run(name):
    """The parameters and the dry-run memory in each preset's comment header are what launch --dry-run says."""
    from launch.__main__ import dry_run

    path = os.path.join(ROOT, "examples", f"{name}.yaml")
    report = dry_run(path, [], 1)
    with open(path, encoding="utf-8") as f:
        header = " ".join(line.lstrip("# ").rstrip() for line in f if line.startswith("#"))
    (params,) = re.findall(r"parameters: ([\d,]+) in the model", report)
    (memory,) = re.findall(r"tp rank 0: (weights .* = [\d.]+ [GM]iB)", report)
    assert f"{params} parameters" in header and memory in header


@pytest.mark.parametrize("name", PRESETS)
def test_the_presets_run_shrunk_on_the_cpu(name, capsys):
    shrink = ["model.num_layers=1", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
              "model.ffn_hidden_size=128", "model.moe.ffn_hidden_size=64", "model.seq_length=32",
              "model.vocab_size=512", "train.global_batch_size=4", "train.micro_batch_size=2"]
    path = os.path.join(ROOT, "examples", f"{name}.yaml")
    assert bench_train.main([path, *shrink, "--warmup", "0", "--steps", "1"]) == 0
    rows = rows_of(capsys.readouterr().out)
    assert set(rows) == ({"foldtron"} if name == "moe_1b" or not HAS_TRANSFORMERS else {"foldtron", "baseline"})


def test_fp8_rows_next_to_bf16_and_a_backend_that_cannot_run_gets_a_note(tmp_path, tiny_corpus, capsys):
    out_json = tmp_path / "bench.json"
    code = bench_train.main([config_file(tmp_path, tiny_corpus), "data.synthetic=true", "precision.dtype=bf16",
                             "--warmup", "1", "--steps", "2", "--no-baseline", "--fp8", "torch,te",
                             "--json", str(out_json)])
    out = capsys.readouterr().out
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("foldtron FP8 torch"))
    assert len(row.split()) == len(bench_train.COLUMNS) + 2  # the name is three words
    assert re.search(r"FP8 torch: \d+\.\d\dx the tokens/s of foldtron bf16, last loss [+-]\d+\.\d\d%", out)
    assert "FP8 te: not measured (precision.fp8.enabled=true with backend=te: Transformer Engine runs on CUDA" in out
    report = json.loads(out_json.read_text())
    assert KEYS <= set(report["fp8"]["torch"]) and set(report["fp8_notes"]) == {"te"}
    assert report["fp8"]["torch"]["params"] == report["foldtron"]["params"]


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="the baseline needs transformers")
def test_a_crash_after_foldtrons_row_keeps_it_and_fails_the_run(tmp_path, tiny_corpus, capsys, monkeypatch):
    """A kernel or memory failure in the baseline or FP8 measurement (not bad input) becomes that row's note and
    exit status 1; foldtron's row was already in the JSON before either started (a time limit keeps it)."""
    out_json = tmp_path / "bench.json"
    seen = []

    def broken(*args, **kwargs):
        seen.append(json.loads(out_json.read_text()))  # what a run killed here would leave
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")

    monkeypatch.setattr(bench_train, "run_baseline", broken)
    real = bench_train.measure_foldtron
    monkeypatch.setattr(bench_train, "measure_foldtron", lambda args, overrides, *rest: (
        broken() if "precision.fp8.enabled=true" in overrides else real(args, overrides, *rest)))
    code = bench_train.main([config_file(tmp_path, tiny_corpus), "data.synthetic=true", "precision.dtype=bf16",
                             "--warmup", "1", "--steps", "1", "--fp8", "torch", "--json", str(out_json)])
    captured = capsys.readouterr()
    assert code == 1
    assert "FP8 torch: not measured (failed: CUDA error: an illegal memory access was encountered more)" in captured.out
    assert "baseline: failed: CUDA error" in captured.out and "Traceback" in captured.err
    assert KEYS <= set(seen[0]["foldtron"]) and seen[0]["fp8_notes"] == {"torch": "not measured yet"}
    assert seen[1]["baseline_note"].startswith("failed: ")  # the baseline, the comparison, is measured before FP8
    report = json.loads(out_json.read_text())
    assert KEYS <= set(report["foldtron"]) and report["baseline"] is None
    assert report["baseline_note"].startswith("failed: CUDA error") and report["fp8"] == {}
