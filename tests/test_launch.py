"""`python -m launch --dry-run`, its estimates, and the torchrun and Slurm scripts (with stand-in commands)."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from launch.__main__ import main
from launch.estimate import (
    activation_bytes, activation_terms, chunk_recomputation, count_parameters, human_bytes, parameters_per_tp_rank,
    peak_activation_bytes, routed_pairs, state_bytes,
)
from parallel.topology import Topology
from pretrain.config import ModelConfig
from pretrain.config_moe import MoEConfig
from pretrain.config_loading import load_config
from pretrain.model import GPT

QUICKSTART = os.path.join(ROOT, "examples", "quickstart.yaml")
QUICKSTART_5D = os.path.join(ROOT, "examples", "quickstart_5d.yaml")  # TP2 x CP2: 4 ranks or a multiple
TP2_CP2 = ["parallel.tensor=2", "parallel.context=2"]


def dry_run(capsys, *argv):
    code = main(["--dry-run", QUICKSTART, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_rank_map_of_tp2_cp2_dp2_matches_megatron(capsys):
    code, out, err = dry_run(capsys, *TP2_CP2, "--world-size", "8")
    assert code == 0, err
    assert "dense view TP2 x CP2 x DP2 x PP1" in out
    assert "tp groups: [0, 1] [2, 3] [4, 5] [6, 7]" in out
    assert "cp groups: [0, 2] [1, 3] [4, 6] [5, 7]" in out
    assert "dp groups: [0, 4] [1, 5] [2, 6] [3, 7]" in out
    assert "tp rank 0:" in out and "tp rank 1:" in out and "tp rank 2:" not in out
    assert "memory per rank, an estimate" in out
    assert out.count("weights") == 3 and "activations" in out  # the header and one line per tp rank


def test_parameters_per_tp_rank_add_up_to_the_single_rank_model():
    cfg = load_config(QUICKSTART, TP2_CP2)
    with torch.device("meta"):
        whole = GPT(cfg.model, 384, Topology.single())
    counts = parameters_per_tp_rank(cfg.model, 384, cfg.sizes(8))
    assert [c.tp_rank for c in counts] == [0, 1]
    assert counts[0].replicated == counts[1].replicated > 0
    assert sum(c.split for c in counts) + counts[0].replicated == sum(count_parameters(whole)) == whole.num_parameters()


def test_nnodes_times_nproc_per_node_is_the_world(capsys):
    code, out, err = dry_run(capsys, *TP2_CP2, "--nnodes", "2", "--nproc-per-node", "4")
    assert code == 0, err
    assert "valid for 8 ranks" in out and "dense view TP2 x CP2 x DP2" in out


@pytest.mark.parametrize("argv", [
    ["--world-size", "8", "--nnodes", "2", "--nproc-per-node", "4"],
    ["--nnodes", "2"],
    [],
    ["--world-size", "0"],
])
def test_exactly_one_form_of_the_world_size(capsys, argv):
    code, _, err = dry_run(capsys, *argv)
    assert code == 2 and err.startswith("launch: error: ") and "usage:" in err


def test_without_dry_run_is_a_usage_error(capsys):
    assert main([QUICKSTART, "--world-size", "2"]) == 2
    assert "only --dry-run" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, world, fields", [
    (["parallel.tensor=3"], 8, ["parallel.tensor", "world size 8"]),
    (["model.num_attention_heads=2", "parallel.tensor=4"], 8, ["model.num_attention_heads=2", "parallel.tensor=4"]),
    (TP2_CP2 + ["model.seq_length=12"], 8, ["model.seq_length=12", "2 x parallel.context x parallel.tensor = 8"]),
    (["parallel.tensor=2", "model.vocab_size=385"], 2, ["parallel.tensor=2", "model.vocab_size=385"]),
])
def test_impossible_layouts_name_the_fields(capsys, overrides, world, fields):
    code, out, err = dry_run(capsys, *overrides, "--world-size", str(world))
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launch: error: ")
    for field in fields:
        assert field in lines[0], lines[0]


def test_dry_run_shards_optimizer_states_over_dp_x_cp_with_the_distributed_optimizer(capsys):
    code, out, err = dry_run(capsys, *TP2_CP2, "optimizer.distributed=true", "--world-size", "8")
    assert code == 0, err
    assert "sharded over DP x CP = 4 ranks" in out
    assert "weights 6.0 MiB + gradients 6.0 MiB + optimizer 3.0 MiB" in out  # 1,575,168 x 8 bytes / 4


def test_distributed_optimizer_shards_only_the_optimizer_states():
    plain = state_bytes(1000, weight_bytes=4)
    assert plain == {"weights": 4000, "gradients": 4000, "optimizer": 8000}  # Adam m and v
    assert state_bytes(1000, weight_bytes=2) == {"weights": 2000, "gradients": 4000, "optimizer": 12000}  # + master
    assert state_bytes(1000, weight_bytes=2, optimizer_shards=4)["optimizer"] == 3000


def test_activation_bytes_by_hand():
    # s=4 tokens, b=1 (T=4), h=8, a=2 heads (d=4), g=1 query group, f=16 (SwiGLU), vocab 16, one layer, in bytes.
    # fp32 (e=r=4): each RMSNorm 2*4*4*8 (input, normalised) + 4*4 (rstd) = 272, two: 544;
    # attention 4*4*8=128 (qkv input) + 4*4*(8+2*4)=256 (qkv) + 4*4*(8+4)=192 (rotated q, k) + 128 (output)
    # + 4*4*2=32 (log-sum-exp) = 736; MLP 128 (input) + 4*4*4*16=1024 = 1152: the layer 2432.
    # After it: final norm 272 + its output 128 + 16*4=64 (labels, statistics) + 8*4*4=128 (rotary) = 592,
    # and the logits chunk 4*16*4 = 256: 3280.
    m = ModelConfig(num_layers=1, hidden_size=8, num_attention_heads=2, num_query_groups=1, ffn_hidden_size=16,
                    seq_length=4)
    assert activation_bytes(m, 1, 16, element_bytes=4) == 3280
    # bf16 autocast (e=2, r=4): norms 544; attention 64 + 128 + 96 + 64 + 32 = 384; MLP 2*64 (gate and up cast
    # the input each) + 4*2*4*16=512 = 640; bf16 weight copies 2*(8*16 + 8*8 + 3*8*16) = 1152; output terms 592;
    # logits 4*16*(4+2) = 384 plus the loss's bf16 output weight 2*16*8 = 256: 1568 + 1152 + 592 + 640 = 3952.
    assert activation_bytes(m, 1, 16, element_bytes=2) == 3952
    # CP2 (fp32): T=2, keys and values gathered over S=4: norms 2*(2*4*2*8 + 8) = 272; attention 64 + 128 + 96
    # + 64 + 16 + 2*4*4*4=128 (gathered k, v) = 496; MLP 64 + 512 = 576; output 136 + 64 + 32 + 64 = 296;
    # logits 2*16*4 = 128: 1768.
    assert activation_bytes(m, 1, 16, cp=2, element_bytes=4) == 1768
    # TP2 (g=2, fp32): norms and the linears' inputs stay replicated, the rest halves: norms 544; attention
    # 128 + (4*4*24=384 + 4*4*16=256 + 128 + 32) / 2 = 528; MLP 128 + 1024/2 = 640; output 592; logits 256/2:
    # 1712 + 592 + 128 = 2432.
    m2 = ModelConfig(num_layers=1, hidden_size=8, num_attention_heads=2, num_query_groups=2, ffn_hidden_size=16,
                     seq_length=4)
    assert activation_bytes(m2, 1, 16, tp=2, element_bytes=4) == 2432
    # + sequence parallelism: the norms halve (272 for both, 136 the final one), the linears keep their gathered
    # inputs (528 as without SP; the MLP 640 + 128: gate and up each copy the non-contiguous gathered input),
    # and so does the loss (its input 128, labels 64, rotary 128): 272 + 528 + 768 + 136 + 128 + 64 + 128 + 128.
    assert activation_bytes(m2, 1, 16, tp=2, sequence_parallel=True, element_bytes=4) == 2152
    # GELU (fp32): the MLP keeps 128 + 2*4*4*16 = 640 instead of 1152.
    assert activation_bytes(dataclasses.replace(m, activation="gelu"), 1, 16, element_bytes=4) == 3280 - 512
    # the fused loss keeps one chunk of logits: 2 tokens x 16 instead of 4 x 16, 4 bytes each
    assert activation_bytes(dataclasses.replace(m, loss_chunk_tokens=2), 1, 16, element_bytes=4) == 3280 - 128


def test_activation_bytes_of_an_moe_layer_by_hand():
    # The model above (fp32) with 2 experts of width 16, top-1: N = 4 routed pairs. The MoE block keeps the
    # router's input 4*4*8=128, the experts' input 4*4*8=128, SwiGLU's five 5*4*4*16=1280, the combined outputs
    # 128, the indices 32*4=128 and the router's scores 4*4*(2*2 + 3*1)=112: 1904 instead of the MLP's 1152.
    m = ModelConfig(num_layers=1, hidden_size=8, num_attention_heads=2, num_query_groups=1, ffn_hidden_size=16,
                    seq_length=4, moe=MoEConfig(num_experts=2, top_k=1, ffn_hidden_size=16))
    assert activation_bytes(m, 1, 16, element_bytes=4) == 3280 - 1152 + 1904
    # top-2 with capacity factor 0.5: each expert keeps ceil(4*2/2*0.5) = 2 tokens, N = 4 of the 8 pairs
    capped = dataclasses.replace(m, moe=MoEConfig(num_experts=2, top_k=2, ffn_hidden_size=16, capacity_factor=0.5))
    assert routed_pairs(capped, 4) == 4 and routed_pairs(m, 4) == 4  # top-1 dropless: 4 too
    assert routed_pairs(dataclasses.replace(m, moe=MoEConfig(num_experts=2, top_k=2)), 4) == 8
    # the same N, but the router keeps top-2 scores: 4*4*3*2 instead of 4*4*3*1, 48 more
    assert activation_bytes(capped, 1, 16, element_bytes=4) == 3280 - 1152 + 1904 + 48


def test_activation_bytes_with_recomputation_by_hand():
    """The same one-layer model (fp32: the layer 2432, output terms 592, logits chunk 256)."""
    m = ModelConfig(num_layers=1, hidden_size=8, num_attention_heads=2, num_query_groups=1, ffn_hidden_size=16,
                    seq_length=4)
    # selective keeps: input 4*4*8=128, q/k/v projection 4*4*(8+2*4)=256, attention output 128 + log-sum-exp 32,
    # two row-parallel outputs 2*128, gate and up 2*4*4*16=512: 1312, + output terms 592 = 1904. While the layer
    # is recomputed in backward: 2432 - 1312 (its recomputed tensors) + 128 (its output) - 592 (the output
    # terms, freed by then) = 656, more than the logits chunk (256): 2560.
    assert activation_bytes(dataclasses.replace(m, recompute="selective"), 1, 16, element_bytes=4) == 1904 + 656
    # full, every layer: each layer's input (4 x 128) + output terms 592, then one whole layer while it is
    # recomputed: 2432 - 128 + 128 - 592 = 1840
    four = dataclasses.replace(m, num_layers=4, recompute="full")
    assert activation_bytes(four, 1, 16, element_bytes=4) == 4 * 128 + 592 + 1840
    # full, 1 of 4: three plain layers, one input, one layer recomputed at a time
    one = dataclasses.replace(four, recompute_layers=1)
    assert activation_bytes(one, 1, 16, element_bytes=4) == 3 * 2432 + 128 + 592 + 1840
    # two micro-batches in flight hold twice what one keeps; the transient counts once
    assert activation_bytes(one, 1, 16, element_bytes=4, in_flight=2) == 2 * (3 * 2432 + 128 + 592) + 1840


def test_recompute_layers_counts_per_stage_under_interleaving():
    """`model.recompute_layers` recomputes the first layers of a stage (chunk 0's first, as the model does); the peak
    walks the stage's order, each micro-batch chunk holding its own chunk's terms."""
    m = ModelConfig(num_layers=8, hidden_size=8, num_attention_heads=2, num_query_groups=1, ffn_hidden_size=16,
                    seq_length=4, recompute="full", recompute_layers=3)
    chunks = chunk_recomputation(m, [2, 2])
    assert [(c.num_layers, c.recompute, c.recompute_layers) for c in chunks] == [(2, "full", 2), (2, "full", 1)]
    none = chunk_recomputation(dataclasses.replace(m, recompute_layers=2), [2, 2])
    assert [(c.recompute, c.recompute_layers) for c in none] == [("full", 2), ("none", None)]
    assert [c.recompute for c in chunk_recomputation(dataclasses.replace(m, recompute="selective"), [2, 2])] == [
        "selective", "selective"]
    # kept 1 and 10 by chunks 0 and 1; the transients 5 (chunk 0) and 3 (chunk 1)
    terms = [{"kept": 1.0, "forward": 5.0, "backward": 0.0}, {"kept": 10.0, "forward": 0.0, "backward": 3.0}]
    order = [(0, False), (0, False), (1, False), (1, True), (1, False), (0, True), (1, True), (0, True)]
    assert peak_activation_bytes(terms, order) == 12 + 5  # 1 + 1 + 10 alive after the third forward
    # one chunk in flight n times is activation_bytes' kept * n + transient
    one = dataclasses.replace(m, num_layers=4, recompute_layers=1)
    t = activation_terms(one, 1, 16, element_bytes=4)
    assert peak_activation_bytes([t], [(0, False)] * 3) == activation_bytes(one, 1, 16, element_bytes=4, in_flight=3)


def test_dry_run_recomputes_the_first_layers_of_an_interleaved_stage(capsys, tmp_path):
    """PP2 x VP2 of 8 layers: 2 chunks of 2 layers per stage. recompute_layers=2 recomputes chunk 0 only, so the
    estimate lies between recomputing all 4 and none (it used to count 2 of each chunk: all of them)."""
    def activations(*overrides):
        code = main(["--dry-run", QUICKSTART, "parallel.pipeline=2", "parallel.virtual_pipeline=2",
                     "model.num_layers=8", *overrides, "--world-size", "2", "--json", str(path)])
        capsys.readouterr()
        assert code == 0
        return json.loads(path.read_text())["memory_per_rank"][0]["activations"]

    path = tmp_path / "estimate.json"
    every, half = activations("model.recompute=full"), activations("model.recompute=full", "model.recompute_layers=2")
    assert every < half < activations("model.recompute=none")


def test_human_bytes():
    assert [human_bytes(n) for n in (512, 1536, 3 * 2**20, 2.5 * 2**30)] == ["512 B", "1.5 KiB", "3.0 MiB", "2.5 GiB"]


# ----------------------------------------------------------------------------- the scripts


def stub(folder, name, body):
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def script(name, *args, env=None):
    base = {k: v for k, v in os.environ.items() if k not in ("GPUS_PER_NODE", "SLURM_GPUS_ON_NODE")}
    return subprocess.run(["bash", os.path.join(ROOT, "launch", name), *args], capture_output=True, text=True,
                          env={**base, "PYTHON": sys.executable, **(env or {})}, timeout=60)


def assert_one_line_refusal(result, *fragments):
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("launch: error: ") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("name", ["torchrun.sh", "slurm.sbatch"])
def test_scripts_are_valid_bash_and_executable(name):
    path = os.path.join(ROOT, "launch", name)
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    assert os.access(path, os.X_OK)
    result = script(name)
    assert result.returncode != 0 and "usage:" in result.stderr


def test_torchrun_sh_passes_config_and_overrides(tmp_path):
    stub(tmp_path, "torchrun", 'echo "PYTHONPATH=$PYTHONPATH"; echo "torchrun $*"\n')
    result = script("torchrun.sh", "4", QUICKSTART_5D, "train.iters=50",
                    env={"PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # the check's report stays out of the way
    assert f"torchrun --standalone --nproc-per-node 4 -m pretrain {QUICKSTART_5D} train.iters=50" in result.stdout
    assert f"PYTHONPATH={ROOT}" in result.stdout
    assert script("torchrun.sh", "four", "my.yaml").returncode != 0


def test_torchrun_sh_refuses_a_layout_before_any_rank_starts(tmp_path):
    """A layout that needs 4 ranks, on 3: the error of `python -m launch --dry-run` once, and torchrun not run."""
    stub(tmp_path, "torchrun", f'touch {tmp_path}/started\n')
    result = script("torchrun.sh", "3", QUICKSTART_5D, env={"PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert_one_line_refusal(result, "does not divide the world size 3")
    assert result.stdout == "" and not (tmp_path / "started").exists()


def slurm_env(folder, **extra):
    stub(folder, "scontrol", 'echo node-a; echo node-b\n')
    stub(folder, "srun", f'echo "srun $*"; touch {folder}/started\n')
    return {"PATH": f"{folder}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "node-[a-b]",
            "SLURM_NNODES": "2", "SLURM_CPUS_PER_TASK": "16", "SLURM_SUBMIT_DIR": ROOT, **extra}


def test_slurm_sbatch_runs_one_torchrun_per_node_with_c10d_on_the_first_node(tmp_path):
    result = script("slurm.sbatch", QUICKSTART_5D, "train.iters=50", env=slurm_env(tmp_path, GPUS_PER_NODE="4"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "srun --ntasks-per-node=1 --cpus-per-task=16 --kill-on-bad-exit=1 torchrun --nnodes 2 --nproc-per-node 4 "
        f"--rdzv-backend c10d --rdzv-endpoint node-a:29500 --rdzv-id 42 -m pretrain {QUICKSTART_5D} train.iters=50"
    )
    assert result.stderr.strip() == "foldtron: 2 nodes x 4 ranks, rendezvous at node-a:29500"


def test_slurm_sbatch_starts_as_many_ranks_per_node_as_slurm_gave_gpus(tmp_path):
    result = script("slurm.sbatch", QUICKSTART_5D, env=slurm_env(tmp_path, SLURM_GPUS_ON_NODE="2"))
    assert result.returncode == 0, result.stderr
    assert "torchrun --nnodes 2 --nproc-per-node 2 " in result.stdout
    override = script("slurm.sbatch", QUICKSTART_5D, env=slurm_env(tmp_path, SLURM_GPUS_ON_NODE="8", GPUS_PER_NODE="2"))
    assert "torchrun --nnodes 2 --nproc-per-node 2 " in override.stdout


def test_slurm_sbatch_refuses_a_layout_before_srun(tmp_path):
    """2 nodes x 3 GPUs = 6 ranks for a layout of 4: the dry-run's error once, on the batch host, and no srun."""
    result = script("slurm.sbatch", QUICKSTART_5D, env=slurm_env(tmp_path, SLURM_GPUS_ON_NODE="3"))
    assert_one_line_refusal(result, "does not divide the world size 6")
    assert result.stdout == "" and not (tmp_path / "started").exists()


@pytest.mark.parametrize("extra, message", [
    ({}, "Slurm gave this node no GPUs (SLURM_GPUS_ON_NODE=unset)"),
    ({"SLURM_GPUS_ON_NODE": "0"}, "set GPUS_PER_NODE to the ranks per node"),
    ({"GPUS_PER_NODE": "eight"}, "GPUS_PER_NODE=eight"),
])
def test_slurm_sbatch_needs_gpus_or_gpus_per_node(tmp_path, extra, message):
    result = script("slurm.sbatch", QUICKSTART_5D, env=slurm_env(tmp_path, **extra))
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "started").exists()


def test_dry_run_shows_pipeline_stages_and_the_bubble(capsys):
    code, out, err = dry_run(capsys, "parallel.pipeline=2", "parallel.tensor=2", "model.num_layers=6",
                             "parallel.first_stage_layers=2", "train.global_batch_size=32", "--world-size", "8")
    assert code == 0, err
    assert "pipeline: stage 0: layers 0-1, stage 1: layers 2-5" in out
    assert "bubble fraction (p-1)/(m+p-1) = 33.3%" in out  # 32 sequences / (8 x DP2) = 2 micro-batches: 1/3
    stage_lines = [line for line in out.splitlines() if line.startswith("  stage ") and "replicated" in line]
    assert len(stage_lines) == 4


def test_dry_run_shows_interleaved_chunks_and_their_bubble(capsys):
    code, out, err = dry_run(capsys, "parallel.pipeline=2", "parallel.virtual_pipeline=2", "model.num_layers=8",
                             "train.global_batch_size=128", "--world-size", "8")
    assert code == 0, err
    assert "pipeline: stage 0: layers 0-1 + 4-5, stage 1: layers 2-3 + 6-7" in out
    assert ("interleaved 1F1B, 2 chunks per stage, 4 micro-batches per step: bubble fraction (p-1)/(v*m+p-1) = 11.1%"
            in out)


def test_dry_run_refuses_interleaving_with_too_few_micro_batches(capsys):
    code, _, err = dry_run(capsys, "parallel.pipeline=2", "parallel.virtual_pipeline=2", "model.num_layers=8",
                           "train.global_batch_size=96", "--world-size", "8")
    assert code == 1 and "gives 3 micro-batches per data-parallel rank" in err and "parallel.pipeline=2" in err


def test_dry_run_refuses_layers_that_do_not_split_into_stages(capsys):
    code, _, err = dry_run(capsys, "parallel.pipeline=4", "model.num_layers=6", "--world-size", "8")
    assert code == 1 and "model.num_layers=6 is not divisible by parallel.pipeline=4" in err


def test_dry_run_writes_the_memory_estimate_as_json(capsys, tmp_path):
    """The numbers of the printed estimate, per (stage, tp rank), for tools such as tools.device_check."""
    path = tmp_path / "estimate.json"
    code, out, err = dry_run(capsys, "parallel.pipeline=2", "parallel.tensor=2", "--world-size", "4",
                             "--json", str(path))
    assert code == 0, err
    with open(path) as f:
        estimate = json.load(f)
    ranks = estimate["memory_per_rank"]
    assert estimate["world_size"] == 4 and [(r["stage"], r["tp_rank"]) for r in ranks] == [(0, 0), (0, 1), (1, 0),
                                                                                         (1, 1)]
    for r in ranks:
        parts = ("weights", "gradients", "optimizer", "activations")
        assert r["total"] == sum(r[k] for k in parts) and r["weights"] == 4 * r["parameters"]
        shown = f"stage {r['stage']} tp rank {r['tp_rank']}: weights {human_bytes(r['weights'])}"
        assert shown in out and out.split(shown)[1].split("\n")[0].endswith(f"= {human_bytes(r['total'])}")


def test_dry_run_validates_fp8_and_says_how_it_counts_it(capsys):
    code, out, err = dry_run(capsys, "precision.dtype=bf16", "precision.fp8.enabled=true", "--world-size", "1")
    assert code == 0, err
    assert "FP8 counted as bf16: an over-estimate" in out
    code, out, err = dry_run(capsys, "precision.fp8.enabled=true", "--world-size", "1")  # fp32: refused
    assert code != 0 and "needs precision.dtype=bf16" in err


def test_dry_run_counts_rlp_rows_teacher_and_cache(capsys, tmp_path):
    """RLP's forward with gradients runs micro x positions x G rows; its teacher is one more fp32 copy of the
    weights; the cache holds keys and values of those rows (2 x layers x rows x groups x head_dim x seq)."""
    path = tmp_path / "estimate.json"
    rlp = ("objective.name=rlp", "objective.rlp.group_size=4", "objective.rlp.max_thought_tokens=64",
           "objective.rlp.positions_per_sequence=2")
    code, out, err = dry_run(capsys, *rlp, "--world-size", "1", "--json", str(path))
    assert code == 0, err
    with open(path) as f:
        (r,) = json.load(f)["memory_per_rank"]
    code, _, err = dry_run(capsys, "train.micro_batch_size=64", "train.global_batch_size=64", "--world-size", "1",
                           "--json", str(tmp_path / "n"))
    assert code == 0, err
    with open(tmp_path / "n") as f:
        (ntp,) = json.load(f)["memory_per_rank"]
    cfg = load_config(QUICKSTART, [])
    m = cfg.model
    assert cfg.train.micro_batch_size * 2 * 4 == 64 and "64 x 128 tokens (RLP: 8 samples x 2 positions" in out
    assert r["activations"] == ntp["activations"] and r["teacher"] == r["weights"]
    assert r["kv_cache"] == 2 * m.num_layers * 64 * m.query_groups * (m.hidden_size // m.num_attention_heads) * 128 * 4
    assert r["total"] == sum(r[k] for k in ("weights", "gradients", "optimizer", "activations", "teacher",
                                            "kv_cache"))
