"""`python -m tools.generate`: text sampled from a trained tiny model's checkpoint, against `generate` on the same
weights loaded by the trainer (one rank, TP2 with SP on two gloo ranks, an FP8 run in bf16), the seed, the JSON
output, and bad input in one line each."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_config
from data.tokenizers import ByteTokenizer, TokenizerError
from multirank import run_ranks
from pretrain.config_loading import load_config
from pretrain.generation import Sampling, generate
from pretrain.trainer import Trainer, train
from tools import generate as tool

PROMPTS = ["hello wor", "ab c"]
TP2 = ("parallel.tensor=2", "parallel.sequence_parallel=true")
FP8 = ("precision.dtype=bf16", "precision.fp8.enabled=true")


def _train(rank: int, world: int, cfg) -> None:
    train(cfg, world, rank)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_corpus):
    """Tiny runs, trained for 2 steps on first use: 'one' (one rank), 'tp2' (TP2 SP), 'fp8'; by name, the config
    that resumes it (its trainer loads the checkpoint), that checkpoint's folder and the run's folder."""
    made = {}

    def get(name: str):
        if name not in made:
            extra = {"one": (), "tp2": TP2, "fp8": FP8}[name]
            folder = tmp_path_factory.mktemp(name)
            cfg = tiny_config(folder, tiny_corpus, "train.stop_at_step=2", "checkpoint.interval=0", *extra)
            if name == "tp2":
                run_ranks(2, _train, cfg)
            else:
                train(cfg)
            made[name] = (tiny_config(folder, tiny_corpus, *extra), f"{folder}/run/checkpoints/step_00000002", folder)
        return made[name]

    return get


def run_tool(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()  # what came before (a run trained on first use)
    code = tool.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *args: str) -> dict:
    code, out, err = run_tool(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def reference(trainer: Trainer, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """Greedy tokens of `generate` on the trainer's model (the weights of the checkpoint it resumed)."""
    encoded = [list(ByteTokenizer().encode(p)) for p in prompts]
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=0.0, stop_ids=(256,), vocab_limit=260)
    return generate(trainer.model, encoded, sampling, autocast=trainer.autocast).tokens


def test_each_prompt_is_printed_with_its_samples(capsys, runs):
    _, ckpt, _ = runs("one")
    code, out, _ = run_tool(capsys, ckpt, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--samples", "2",
                            "--max-new-tokens", "6", "--seed", "1")
    assert code == 0
    assert "=== prompt 1 (9 tokens) ===\nhello wor\n--- sample 1: " in out
    assert "=== prompt 2 (4 tokens) ===\nab c\n--- sample 1: " in out
    assert out.count("--- sample ") == 4 and "step 2" in out and "byte tokenizer" in out and "tokens/s" in out


def test_greedy_text_equals_generate_on_the_weights_the_trainer_loads(capsys, runs):
    cfg, ckpt, _ = runs("one")
    args = (ckpt, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--temperature", "0", "--max-new-tokens", "12")
    first, again = run_json(capsys, *args), run_json(capsys, *args)
    assert first["samples"] == again["samples"]  # greedy: the same text every time
    expected = reference(Trainer(cfg), PROMPTS, 12)
    assert [s["completion_ids"] for s in first["samples"]] == expected
    decoded = [ByteTokenizer().decode(t) for t in expected]
    assert [s["completion"] for s in first["samples"]] == decoded


def test_a_seed_draws_the_same_text_again(capsys, runs):
    _, ckpt, _ = runs("one")
    args = (ckpt, "--prompt", PROMPTS[0], "--samples", "3", "--max-new-tokens", "16")
    fresh = run_json(capsys, *args)  # no --seed: a fresh one, reported
    seed = fresh["sampling"]["seed"]
    completions = lambda report: [s["completion_ids"] for s in report["samples"]]  # noqa: E731
    assert completions(run_json(capsys, *args, "--seed", seed)) == completions(fresh)
    assert completions(run_json(capsys, *args, "--seed", seed + 1)) != completions(fresh)
    assert len(set(map(tuple, completions(fresh)))) == 3  # the samples of one prompt differ


def test_the_json_report(capsys, runs):
    _, ckpt, _ = runs("one")
    report = run_json(capsys, ckpt, "--prompt", "ab", "--max-new-tokens", "5", "--stop", "\\n", "--stop-id", "33",
                      "--top-p", "0.5", "--temperature", "1.5")
    assert report["step"] == 2 and report["tokenizer"] == "byte" and report["precision"] == "fp32"
    assert report["sampling"] == {"max_new_tokens": 5, "temperature": 1.5, "top_p": 0.5, "stop_ids": [256, 10, 33],
                                  "vocab_limit": 260, "samples": 1, "seed": report["sampling"]["seed"]}
    (sample,) = report["samples"]
    assert sample["prompt"] == "ab" and sample["prompt_ids"] == [97, 98] and sample["prompt_index"] == 0
    assert 1 <= len(sample["completion_ids"]) <= 5 and isinstance(sample["stopped"], bool)
    assert sample["completion"] == ByteTokenizer().decode(sample["completion_ids"])
    assert report["new_tokens"] == len(sample["completion_ids"]) and report["tokens_per_second"] > 0


def test_no_id_beyond_the_tokenizer_but_its_think_ids(capsys, runs):
    """The model's vocabulary is padded to 320; nearly uniform draws (temperature 50) reach the byte tokenizer's
    think ids 258 and 259 but nothing above."""
    _, ckpt, _ = runs("one")
    report = run_json(capsys, ckpt, "--prompt", "a", "--samples", "8", "--max-new-tokens", "64", "--temperature", "50",
                      "--top-p", "1", "--seed", "0")
    drawn = {i for s in report["samples"] for i in s["completion_ids"]}
    assert max(drawn) < 260 and drawn & {258, 259}

    class NoThink:
        vocab_size, think_ids = 1000, None
    assert tool.vocab_limit(NoThink(), 1024) == 1000 and tool.vocab_limit(ByteTokenizer(), 259) == 259


def test_prompts_from_a_json_lines_file(capsys, runs, tmp_path):
    _, ckpt, _ = runs("one")
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "ab\\ncd"}\n\n{"prompt": "x", "id": 7}\n')
    report = run_json(capsys, ckpt, "--prompts-file", path, "--prompt", "first", "--max-new-tokens", "2")
    assert [s["prompt"] for s in report["samples"]] == ["first", "ab\ncd", "x"]


def test_a_tensor_parallel_checkpoint_generates_on_its_ranks(runs):
    """TP2 with SP, two gloo ranks: the tool's greedy text is `generate`'s on the weights the TP2 trainer resumes
    (3 prompts: the rows are padded to a multiple of TP)."""
    cfg, ckpt, _ = runs("tp2")
    prompts = PROMPTS + ["z"]
    expected, report = run_ranks(2, _tool_beside_trainer, cfg, ckpt, prompts)[0]
    assert report["world_size"] == 2 and [s["completion_ids"] for s in report["samples"]] == expected


def _tool_beside_trainer(rank: int, world: int, cfg, ckpt: str, prompts: list[str]):
    import contextlib
    import io

    expected = reference(Trainer(cfg, world, rank), prompts, 10)
    out = io.StringIO()
    args = [ckpt, "--temperature", "0", "--max-new-tokens", "10", "--json"]
    args += [a for p in prompts for a in ("--prompt", p)]
    with contextlib.redirect_stdout(out):
        assert tool.main(args) == 0  # it ends the process group
    return expected, (json.loads(out.getvalue()) if rank == 0 else out.getvalue())


def test_a_tensor_parallel_checkpoint_generates_on_one_rank(capsys, runs):
    """Checkpoints are layout-free: the TP2 run's weights, read whole on one rank, give the same greedy text."""
    cfg, ckpt, _ = runs("tp2")
    expected, _ = run_ranks(2, _tool_beside_trainer, cfg, ckpt, PROMPTS)[0]
    report = run_json(capsys, ckpt, "--temperature", "0", "--max-new-tokens", "10",
                      *[a for p in PROMPTS for a in ("--prompt", p)])
    assert report["world_size"] == 1 and [s["completion_ids"] for s in report["samples"]] == expected


def test_an_fp8_checkpoint_generates_in_bf16(capsys, runs, tiny_corpus):
    _, ckpt, folder = runs("fp8")
    report = run_json(capsys, ckpt, "--prompt", PROMPTS[0], "--temperature", "0", "--max-new-tokens", "8")
    assert report["precision"] == "bf16" and report["trained_fp8"]
    bf16 = Trainer(tiny_config(folder, tiny_corpus, "precision.dtype=bf16"))
    assert bf16.fp8 is None and bf16.step == 2  # the FP8 run's weights, no FP8 layers
    assert [s["completion_ids"] for s in report["samples"]] == reference(bf16, PROMPTS[:1], 8)
    code, out, _ = run_tool(capsys, "--help")
    assert code == 0 and "FP8 run" in out and "generates in bf16" in out


@pytest.mark.parametrize("case, fragment", [
    ("missing", "nothing: no such file or folder"),
    ("not a checkpoint", "no foldtron checkpoint there"),
    ("empty prompt", "prompt 2 is empty"),
    ("top-p", "--top-p 0.0: must be in (0, 1]"),
    ("temperature", "--temperature -1.0: must be >= 0"),
    ("max-new-tokens", "--max-new-tokens 0: generate at least one token"),
    ("stop", "--stop 'ab' is 2 tokens (97 98)"),
    ("prompts file", "line 1: not JSON"),
    ("no config", "its meta.json holds no config"),
    ("no weights", "copy: the checkpoint is damaged (__0_0.distcp has 0 bytes"),
])
def test_bad_input_is_one_line(capsys, runs, tmp_path, case, fragment):
    _, ckpt, _ = runs("one")
    (tmp_path / "bad.jsonl").write_text("hello\n")
    copy = shutil.copytree(ckpt, tmp_path / "copy")
    if case == "no config":
        meta = json.loads((copy / "meta.json").read_text())
        (copy / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "config"}))
    if case == "no weights":
        for shard in copy.glob("*.distcp"):
            shard.write_bytes(b"")
    args = {
        "missing": [tmp_path / "nothing", "--prompt", "a"],
        "not a checkpoint": [tmp_path, "--prompt", "a"],
        "empty prompt": [ckpt, "--prompt", "a", "--prompt", ""],
        "top-p": [ckpt, "--prompt", "a", "--top-p", "0"],
        "temperature": [ckpt, "--prompt", "a", "--temperature", "-1"],
        "max-new-tokens": [ckpt, "--prompt", "a", "--max-new-tokens", "0"],
        "stop": [ckpt, "--prompt", "a", "--stop", "ab"],
        "prompts file": [ckpt, "--prompts-file", tmp_path / "bad.jsonl"],
        "no config": [copy, "--prompt", "a"],
        "no weights": [copy, "--prompt", "a"],
    }[case]
    code, out, err = run_tool(capsys, *args)
    assert code == 1 and out == "" and err.startswith("generate: error: ") and err.count("\n") == 1
    assert fragment in err


def test_usage_errors(capsys, runs):
    _, ckpt, _ = runs("one")
    code, _, err = run_tool(capsys, ckpt)
    assert code == 2 and err.startswith("generate: error: no prompt: pass --prompt TEXT (repeatable) or --prompts-file "
                                        "FILE\nusage: python -m tools.generate ")
    code, _, err = run_tool(capsys, ckpt, "--prompt", "a", "--samples", "0")
    assert code == 2 and err.startswith("generate: error: --samples 0: draw at least one")


def test_the_entry_point_exits_with_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-m", "tools.generate", str(tmp_path / "nothing"), "--prompt", "a"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"generate: error: {tmp_path / 'nothing'}: no such file or folder\n"


def test_the_layout_of_generation(capsys, runs):
    """Tensor parallelism over every rank (experts: ETP = TP), nothing else; a rank count that does not divide
    the model is refused in one line."""
    sizes = tool.generation_sizes(2)
    assert (sizes.tp, sizes.cp, sizes.ep, sizes.expert_tp, sizes.dp, sizes.sp) == (2, 1, 1, 2, 1, False)
    _, ckpt, _ = runs("one")
    results = run_ranks(3, _tool_error, ckpt)
    err = "".join(e for _, _, e in results)  # printed once, by the first rank to get there
    assert [code for code, _, _ in results] == [1, 1, 1] and err.count("\n") == 1
    assert "cannot be split over 3 ranks" in err and "parallel.tensor=3" in err


def _tool_error(rank: int, world: int, ckpt: str):
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = tool.main([ckpt, "--prompt", "a"])
    return code, out.getvalue(), err.getvalue()


def test_a_relative_tokenizer_path_is_looked_for_where_the_run_started(tmp_path):
    cfg = load_config(None, ["data.tokenizer=hf", "data.tokenizer_path=tok/tokenizer.json", "run.name=x"]).resolved(512)
    folder = str(tmp_path / "runs" / "x" / "checkpoints" / "step_00000001")
    assert cfg.checkpoint.dir == os.path.join("runs", "x", "checkpoints")
    assert tool.tokenizer_candidates("tok/tokenizer.json", cfg, folder) == [
        str(tmp_path / "tok" / "tokenizer.json"), os.path.abspath("tok/tokenizer.json")]
    with pytest.raises(TokenizerError, match="data.tokenizer_path='tok/tokenizer.json' \\(hf\\), is not at .*"
                                             "pass --tokenizer-path"):
        tool.load_tokenizer(cfg, folder, None)
