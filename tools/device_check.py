"""`python -m tools.device_check OUT_DIR`: everything that needs a GPU, in one command, sized for one H100/H200.

1. The test files with tests that need CUDA (skipped on the CPU): bf16 autocast, FP8 on the real kernels, the
   grouped expert matmul in bf16, the fused attention kernels under context parallelism, recomputation's memory,
   compilation, the sync-free dense and MoE steps, NCCL at one rank, gloo with CUDA tensors on two ranks of the
   one GPU, apex's kernels.
2. `tools.bench_train` on the GPU presets (examples/gpt2_small.yaml, llama_1b.yaml, moe_1b.yaml) against the Hugging
   Face Llama baseline, compiled, one micro-batch per step; the 1B preset again with `model.recompute=full`
   (not compiled) and a 4x larger micro-batch; the compiled 1B preset in FP8 too (`--fp8 torch,te`: each
   backend that runs here), next to its bf16 row, and the 125M one with `--fp8 torch` (the loss after the
   same steps, next to bf16's).
3. The memory estimate of `python -m launch --dry-run` next to the measured peak of each benchmark.

Writes OUT_DIR/device_check.json (every number) and OUT_DIR/report.txt (the tables), and prints the report. Each
step runs in its own process with a time limit, so one failure or hang costs only its own part (a benchmark
stopped at its limit keeps the rows it had measured); the limits add up to under 10 minutes, the expected time
is under 8 (`--steps`, `--presets` and `--skip-*` make it shorter).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ("gpt2_small", "llama_1b", "moe_1b")
# Time limits: the tests and the four benchmarks add up to less than the device's 10 minutes per command, at
# worst (expected: well under 8); each estimate runs on the CPU beside its benchmark. The compiled benchmarks
# compile foldtron and the baseline (the 1B one FP8 too, a third model); the tests spawn CUDA ranks and compile.
TESTS_SECONDS, ESTIMATE_SECONDS = 150, 30
BENCH_SECONDS = {"gpt2_small": 120, "llama_1b": 150, "moe_1b": 90, "llama_1b_recompute": 70}
FIRST = ("test_cuda.py", "test_fp8_cuda.py", "test_devices.py", "test_context_parallel.py")
# setup.py's install_requires, by the module each provides. A bare CUDA image may lack some (megatron-core and
# zstandard, say); the tests that read data then fail, so the report names what is missing before anything else.
CORE_MODULES = {"torch": "torch", "megatron-core": "megatron.core", "numpy": "numpy", "pyyaml": "yaml",
                "tensorboard": "tensorboard", "tqdm": "tqdm", "tokenizers": "tokenizers",
                "sentencepiece": "sentencepiece", "zstandard": "zstandard", "safetensors": "safetensors"}


class Started(NamedTuple):
    process: subprocess.Popen
    begun: float  # time.perf_counter() at its start
    log: Path  # where its stdout and stderr go


def start(command: list[str], *, log: Path) -> Started:
    """Start `command` from the repository root, its output (stdout and stderr) going to `log`."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "w") as f:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    return Started(process, time.perf_counter(), log)


def wait(started: Started, *, timeout: float) -> dict:
    """Wait for a started command at most `timeout` seconds from its start (then kill it); its status and time."""
    process, begun, log = started
    try:
        code = process.wait(timeout=max(0.0, timeout - (time.perf_counter() - begun)))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        code = "timeout"
    output = log.read_text(errors="replace")
    return {"command": " ".join(process.args), "returncode": code, "seconds": round(time.perf_counter() - begun, 1),
            "log": log.name, "tail": output.strip().splitlines()[-3:]}


def run(command: list[str], *, timeout: float, log: Path) -> dict:
    """Run `command` from the repository root; keep its output in `log`; return its status and time."""
    return wait(start(command, log=log), timeout=timeout)


def cuda_test_files() -> list[str]:
    """The test files that hold tests skipped without CUDA (they say `torch.cuda.is_available()`); their CPU tests
    run too, which is cheap. The files of `FIRST` come first, in that order: a run stopped at its limit has run
    the CUDA training steps, NCCL and the fused attention kernels."""
    files = [str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
             if "cuda.is_available()" in p.read_text()]
    first = [f"tests/{name}" for name in FIRST]
    return sorted(files, key=lambda f: (first.index(f) if f in first else len(first), f))


def environment() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "date": time.strftime("%Y-%m-%d"),
            "missing": missing_dependencies()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), device_count=torch.cuda.device_count())
    for module in ("transformers", "apex", "transformer_engine"):
        try:
            info[module] = getattr(__import__(module), "__version__", "installed")
        except Exception as err:  # noqa: BLE001 - transformer_engine raises RuntimeError without its CUDA core
            info[module] = f"unavailable ({type(err).__name__})"
    return info


def missing_dependencies() -> list[str]:
    """The core dependencies that are not installed (found without importing them: megatron-core takes seconds)."""
    missing = []
    for package, module in CORE_MODULES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # the parent package of a dotted name is absent
            found = False
        if not found:
            missing.append(package)
    return missing


def micro_batch(preset: str) -> int:
    import yaml

    with open(ROOT / "examples" / f"{preset}.yaml") as f:
        return yaml.safe_load(f)["train"]["micro_batch_size"]


def benchmarks(presets: list[str], *, steps: int, out: Path) -> list[dict]:
    """(name, config, overrides) of each benchmark: the presets compiled, one micro-batch per step (the throughput
    of a step of many micro-batches is the same per token, and the check must stay short), and the 1B one with
    full recomputation (not compiled: the two do not combine yet) and a 4x larger micro-batch, what
    recomputation is for: fitting it."""
    runs = [(name, f"examples/{name}.yaml", ["train.compile=true", f"train.global_batch_size={micro_batch(name)}"])
            for name in presets]
    # bf16 and FP8 on the same preset: speed on 1B (each backend that runs), the losses side by side on 125M
    fp8 = {"llama_1b": ["--fp8", "torch,te"], "gpt2_small": ["--fp8", "torch"]}
    if "llama_1b" in presets:
        micro = 4 * micro_batch("llama_1b")
        runs.append(("llama_1b_recompute", "examples/llama_1b.yaml",
                     ["model.recompute=full", f"train.micro_batch_size={micro}", f"train.global_batch_size={micro}"]))
    results = []
    for name, config, overrides in runs:
        bench_json, estimate_json = out / f"bench_{name}.json", out / f"estimate_{name}.json"
        estimating = start([sys.executable, "-m", "launch", "--dry-run", config, *overrides, "--world-size", "1",
                            "--json", str(estimate_json)], log=out / f"estimate_{name}.log")
        step = run([sys.executable, "-m", "tools.bench_train", config, *overrides, *fp8.get(name, []), "--warmup",
                    "3", "--steps", str(steps), "--json", str(bench_json)], timeout=BENCH_SECONDS[name],
                   log=out / f"bench_{name}.log")
        wait(estimating, timeout=ESTIMATE_SECONDS)
        step.update(name=name, bench=_load(bench_json), estimate=_load(estimate_json))
        results.append(step)
    return results


def _load(path: Path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def report(results: dict) -> str:
    env = results["environment"]
    lines = [f"device check, {env.get('date')}: {env.get('device', 'no CUDA device')}, torch {env['torch']} "
             f"(CUDA {env['cuda']}), transformers {env['transformers']}, apex {env['apex']}"]
    if env.get("missing"):
        lines.append(f"MISSING core dependencies: {', '.join(env['missing'])} (pip install them; the tests that need "
                     "them fail)")
    lines.append("")
    tests = results.get("tests")
    if tests:
        lines += [f"CUDA tests: {' | '.join(tests['tail'])} ({tests['seconds']} s)", ""]
    rows = [("benchmark", "model", "params", "tokens/s", "TFLOP/s", "MFU", "peak GiB", "estimate GiB", "data wait")]
    for b in results.get("benchmarks", []):
        bench, estimate = b["bench"] or {}, b["estimate"] or {}
        guess = estimate.get("memory_per_rank", [{}])[0].get("total")
        fp8 = {f"FP8 {backend}": row for backend, row in bench.get("fp8", {}).items()}
        for who in ("foldtron", *fp8, "baseline"):
            row = fp8[who] if who in fp8 else bench.get(who)
            if not row:
                if who == "foldtron":
                    rows.append((b["name"], who, "-", f"failed ({b['returncode']}, see {b['log']})", "", "", "", "",
                                 ""))
                continue
            rows.append((b["name"], who, f"{row.get('params', 0) / 1e6:.0f}M", f"{row.get('tokens_per_sec', 0):,.0f}",
                         _num(row.get("tflops_per_device"), "{:.1f}"), _num(row.get("mfu"), "{:.1%}"),
                         _num(row.get("peak_memory_gib"), "{:.1f}"),
                         _num(guess / 2**30 if guess and who == "foldtron" else None, "{:.1f}"),
                         _num(row.get("data_wait_fraction"), "{:.2%}")))
        for backend, why in bench.get("fp8_notes", {}).items():
            rows.append((b["name"], f"FP8 {backend}: {why}", "", "", "", "", "", "", ""))
        if bench.get("baseline_note"):
            rows.append((b["name"], f"baseline: {bench['baseline_note']}", "", "", "", "", "", "", ""))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def _num(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.device_check", description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder for device_check.json, report.txt and the logs")
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated, from " + ", ".join(PRESETS))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per benchmark (after 3 warm-up)")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    presets = [p for p in args.presets.split(",") if p]
    unknown = sorted(set(presets) - set(PRESETS))
    if unknown:
        print(f"device_check: error: unknown preset(s) {unknown}: choose from {', '.join(PRESETS)}", file=sys.stderr)
        return 2
    results = {"environment": environment()}
    if not args.skip_tests:
        # -v names each test as it ends, so a run stopped at its limit still says which passed; a test that hangs
        # (a collective) has its threads' stacks dumped into the log after 45 s
        results["tests"] = run([sys.executable, "-m", "pytest", "-v", "-rs", "-p", "no:cacheprovider", "-o",
                                "faulthandler_timeout=45", *cuda_test_files()], timeout=TESTS_SECONDS,
                               log=out / "tests.log")
    if not args.skip_bench:
        results["benchmarks"] = benchmarks(presets, steps=args.steps, out=out)
    (out / "device_check.json").write_text(json.dumps(results, indent=1))
    text = report(results)
    (out / "report.txt").write_text(text + "\n")
    print(text)
    failed = (results.get("tests", {}).get("returncode") not in (0, None)
              or any(b["returncode"] != 0 for b in results.get("benchmarks", [])))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
