"""`python -m pretrain` on bad input: one line naming the problem, a non-zero exit, no traceback."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT


def run(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "pretrain", *args], capture_output=True, text=True, env=env,
                          cwd=cwd or ROOT, timeout=300)


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("foldtron: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def tiny_args(tmp_path, corpus):
    return [f"run.dir={tmp_path}/run", "model.num_layers=1", "model.hidden_size=32", "model.seq_length=16",
            "train.iters=2", "train.global_batch_size=2", "train.micro_batch_size=2", "scheduler.warmup_iters=1",
            f"data.sources={{tiny: {{prefixes: [{corpus}]}}}}", "logging.tensorboard=false", "eval.interval=0"]


def test_missing_config_file(tmp_path):
    assert_one_line_error(run(str(tmp_path / "nope.yaml")), "nope.yaml", "does not exist")


def test_yaml_syntax_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  iters: [3\n")
    assert_one_line_error(run(str(path)), "not valid YAML", "line")


def test_unknown_key_and_range_error():
    assert_one_line_error(run("train.iter=5"), "unknown config key train.iter", "did you mean train.iters")
    assert_one_line_error(run("train.iters=-5"), "train.iters=-5: must be a positive number")


def test_missing_dataset_prefix(tmp_path):
    assert_one_line_error(run(*tiny_args(tmp_path, tmp_path / "absent")), "absent", "does not exist")


def test_corrupt_index(tmp_path, tiny_corpus):
    import shutil

    prefix = str(tmp_path / "copy")
    shutil.copy(tiny_corpus + ".bin", prefix + ".bin")
    with open(tiny_corpus + ".idx", "rb") as f:
        data = f.read()
    with open(prefix + ".idx", "wb") as f:
        f.write(data[: len(data) // 2])
    assert_one_line_error(run(*tiny_args(tmp_path, prefix)), "copy.idx", "truncated")


@pytest.mark.parametrize("debug", [False, True])
def test_debug_shows_the_traceback(tmp_path, debug):
    result = run(str(tmp_path / "nope.yaml"), f"run.debug={str(debug).lower()}")
    assert result.returncode != 0
    assert ("Traceback" in result.stderr) == debug


def test_a_short_run_end_to_end(tmp_path, tiny_corpus):
    result = run(*tiny_args(tmp_path, tiny_corpus))
    assert result.returncode == 0, result.stderr
    assert "step 2/2" in result.stdout and "done in" in result.stdout
    assert os.path.isfile(tmp_path / "run" / "checkpoints" / "step_00000002" / "meta.json")


def torchrun(nproc, *args):
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run([shutil.which("torchrun"), "--standalone", "--nproc-per-node", str(nproc), "-m", "pretrain",
                           *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def foldtron_lines(result):
    """The lines of foldtron's own (torchrun adds its summary of the failed ranks, with its own traceback)."""
    assert "pretrain/__main__.py" not in result.stderr and "pretrain/trainer.py" not in result.stderr  # no traceback
    return [line for line in result.stderr.splitlines() if line.startswith("foldtron")]


def test_a_layout_error_under_torchrun_is_printed_once():
    """A layout that needs 4 ranks on 3: rank 0 says it (the same error on every rank, before the process group)."""
    result = torchrun(3, os.path.join("examples", "quickstart_5d.yaml"))
    assert result.returncode != 0
    lines = foldtron_lines(result)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("foldtron: error: parallel.tensor x parallel.context x parallel.pipeline = 2 x 2 x 1")
    assert "does not divide the world size 3" in lines[0]


def test_a_later_error_under_torchrun_is_printed_once(tmp_path):
    """A missing dataset is found after the process group starts, by every rank: the first to report it says it."""
    result = torchrun(2, *tiny_args(tmp_path, tmp_path / "absent"), "train.micro_batch_size=1")
    assert result.returncode != 0
    lines = foldtron_lines(result)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("foldtron (rank ") and "absent.idx does not exist" in lines[0]


def test_before_the_process_group_ranks_other_than_0_leave_the_error_to_rank_0(capsys, monkeypatch):
    """Rank 0 prints; another rank waits for the launcher to stop it, and prints only if it is still running after
    (an error rank 0 did not have)."""
    from pretrain import __main__ as entry
    from pretrain.config import ConfigError

    slept = []
    monkeypatch.setattr(entry.time, "sleep", slept.append)
    entry.report(ConfigError("bad\n  layout"), 4, 0)
    assert capsys.readouterr().err == "foldtron: error: bad layout\n" and slept == []
    entry.report(ConfigError("bad layout"), 4, 2)
    assert capsys.readouterr().err == "foldtron (rank 2/4): error: bad layout\n"
    assert slept == [entry.QUIET_WAIT_SECONDS]


def test_torchrun_matches_one_rank(tmp_path, tiny_corpus):
    """The real launcher: 4 ranks (2 interleaved pipeline stages of 2 chunks x CP2, distributed optimizer sharded
    over CP) under torchrun write the losses of one rank."""
    import json
    import shutil

    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    args = tiny_args(tmp_path, tiny_corpus) + ["train.iters=4", "train.global_batch_size=4", "logging.interval=1",
                                               "model.num_attention_heads=4", "model.num_query_groups=2",
                                               "model.num_layers=4", "train.micro_batch_size=2"]
    single = run(*args, f"run.dir={tmp_path}/one")
    assert single.returncode == 0, single.stderr
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "4", "-m", "pretrain", *args, f"run.dir={tmp_path}/four",
         "parallel.pipeline=2", "parallel.virtual_pipeline=2", "parallel.context=2", "optimizer.distributed=true"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("step 4/4") == 1  # only rank 0 prints the console line

    def losses(folder):
        with open(tmp_path / folder / "metrics.jsonl") as f:
            return [json.loads(line)["loss"] for line in f]

    assert losses("four") == pytest.approx(losses("one"), rel=1e-5)


def test_fp8_that_cannot_run_here_is_one_line(tmp_path, tiny_corpus):
    result = run(*tiny_args(tmp_path, tiny_corpus), "precision.dtype=bf16", "precision.fp8.enabled=true",
                 "precision.fp8.backend=te")
    assert_one_line_error(result, "precision.fp8.enabled=true with backend=te", "Transformer Engine runs on CUDA")
    result = run(*tiny_args(tmp_path, tiny_corpus), "precision.fp8.enabled=true")
    assert_one_line_error(result, "needs precision.dtype=bf16")
