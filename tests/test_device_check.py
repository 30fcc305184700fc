"""tools.device_check on the CPU: it writes its JSON and report, and the report table holds every benchmark row
(the GPU run itself is what the tool is for; here it only checks its own plumbing)."""

import ast
import json
import re
import sys
from pathlib import Path

from tools import device_check


def test_writes_the_environment_and_an_empty_report_without_a_gpu(tmp_path, capsys):
    code = device_check.main([str(tmp_path), "--skip-tests", "--skip-bench"])
    assert code == 0
    results = json.loads((tmp_path / "device_check.json").read_text())
    assert {"torch", "cuda_available", "transformers", "apex", "transformer_engine"} <= set(results["environment"])
    assert (tmp_path / "report.txt").read_text().startswith("device check, ")
    assert capsys.readouterr().out.startswith("device check, ")


def test_core_modules_are_setup_py_install_requires():
    """CORE_MODULES must name every dependency of setup.py, so that a device without one is told."""
    tree = ast.parse((Path(device_check.ROOT) / "setup.py").read_text())
    requires = next(k.value for node in ast.walk(tree) if isinstance(node, ast.Call)
                    for k in node.keywords if k.arg == "install_requires")
    names = {re.split(r"[<>=!\[ ]", ast.literal_eval(e))[0] for e in requires.elts}
    assert names == set(device_check.CORE_MODULES)
    assert device_check.missing_dependencies() == []  # the test environment has them all


def test_a_missing_dependency_is_named_in_the_report(monkeypatch):
    monkeypatch.setitem(device_check.CORE_MODULES, "megatron-core", "megatron_not_there.core")
    env = device_check.environment()
    assert env["missing"] == ["megatron-core"]
    text = device_check.report({"environment": env})
    assert text.splitlines()[1].startswith("MISSING core dependencies: megatron-core")


def test_the_cuda_test_files_are_found():
    files = device_check.cuda_test_files()
    assert {"tests/test_cuda.py", "tests/test_devices.py", "tests/test_context_parallel.py"} <= set(files)
    assert "tests/test_blend.py" not in files
    assert files[:4] == [f"tests/{name}" for name in device_check.FIRST]  # the CUDA steps, NCCL, the kernels first


def test_unknown_preset_is_refused(tmp_path, capsys):
    assert device_check.main([str(tmp_path), "--presets", "gpt3"]) == 2
    assert "unknown preset(s) ['gpt3']" in capsys.readouterr().err


def test_report_lists_foldtron_baseline_and_the_memory_estimate():
    row = {"params": 124_000_000, "tokens_per_sec": 400_000.0, "tflops_per_device": 300.0, "mfu": 0.303,
           "peak_memory_gib": 20.5, "data_wait_fraction": 0.001}
    results = {
        "environment": {"date": "2026-12-01", "device": "NVIDIA H200", "torch": "2.11", "cuda": "12.8",
                        "transformers": "5.0", "apex": "unavailable"},
        "tests": {"tail": ["12 passed"], "seconds": 60.0},
        "benchmarks": [
            {"name": "gpt2_small", "returncode": 0, "log": "bench_gpt2_small.log",
             "bench": {"foldtron": row, "baseline": {**row, "tokens_per_sec": 300_000.0}, "baseline_note": None,
                       "fp8": {"torch": {**row, "tokens_per_sec": 520_000.0}},
                       "fp8_notes": {"te": "transformer_engine is not installed"}},
             "estimate": {"memory_per_rank": [{"total": 19.0 * 2**30}]}},
            {"name": "moe_1b", "returncode": 1, "log": "bench_moe_1b.log", "bench": None, "estimate": None},
        ],
    }
    text = device_check.report(results)
    assert "NVIDIA H200" in text and "CUDA tests: 12 passed (60.0 s)" in text
    lines = text.splitlines()
    foldtron = next(line for line in lines if line.startswith("gpt2_small") and "foldtron" in line)
    assert "124M" in foldtron and "400,000" in foldtron and "30.3%" in foldtron and "20.5" in foldtron
    assert "19.0" in foldtron and "0.10%" in foldtron
    assert any(line.startswith("gpt2_small") and "baseline" in line and "300,000" in line for line in lines)
    assert any(line.startswith("gpt2_small") and "FP8 torch" in line and "520,000" in line for line in lines)
    assert any(line.startswith("gpt2_small") and "FP8 te: transformer_engine is not installed" in line
               for line in lines)
    assert any(line.startswith("moe_1b") and "failed (1, see bench_moe_1b.log)" in line for line in lines)


def test_the_time_limits_fit_one_device_command():
    """The device runs one command for at most 10 minutes: the tests and every benchmark (each estimate runs beside
    its benchmark, within the benchmark's time), with 20 s to spare for the start."""
    benchmarks = device_check.BENCH_SECONDS
    assert set(benchmarks) == {*device_check.PRESETS, "llama_1b_recompute"}
    assert device_check.TESTS_SECONDS + sum(benchmarks.values()) <= 580
    assert device_check.ESTIMATE_SECONDS <= min(benchmarks.values())


def test_a_step_past_its_limit_is_killed_and_keeps_its_output(tmp_path):
    log = tmp_path / "slow.log"
    step = device_check.run([sys.executable, "-c", "import time; print('measured', flush=True); time.sleep(30)"],
                            timeout=2, log=log)
    assert step["returncode"] == "timeout" and step["seconds"] < 20
    assert step["tail"] == ["measured"] and log.read_text() == "measured\n"
    done = device_check.run([sys.executable, "-c", "print('ok')"], timeout=30, log=tmp_path / "quick.log")
    assert done["returncode"] == 0 and done["tail"] == ["ok"]
