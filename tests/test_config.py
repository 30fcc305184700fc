import re

import pytest

from pretrain.config import Config, ConfigError, ModelConfig, ceil_to
from pretrain.config_loading import load_config


def test_defaults_are_valid():
    assert load_config(None).validate() is not None


def test_sizes_rounded_up_to_a_multiple():
    from pretrain.model import padded_vocab_size

    assert [ceil_to(x, 64) for x in (0, 1, 63, 64, 65)] == [0, 64, 64, 64, 128]
    assert ModelConfig(hidden_size=256).ffn_size == 704  # 8 x 256 // 3 = 682, up to a multiple of 64
    assert padded_vocab_size(258, 64) == 320 and padded_vocab_size(384, 128) == 384


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  hidden_size: 128\noptimizer:\n  lr: 3e-4\n")
    cfg = load_config(str(path), ["train.iters=7", "model.gpas.enabled=true", "data.sources.web.prefixes=a"])
    assert cfg.model.hidden_size == 128
    assert cfg.optimizer.lr == pytest.approx(3e-4)  # YAML 1.1 reads 3e-4 as a string; it must become a float
    assert cfg.train.iters == 7 and cfg.model.gpas.enabled is True
    assert cfg.data.sources["web"].prefixes == ["a"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.hiden_size=64", "did you mean model.hidden_size"),
        ("modle.hidden_size=64", "did you mean model"),
        ("model.hidden_size=abc", "model.hidden_size='abc': expected an integer"),
        ("model.hidden_size=1.5", "expected an integer"),
        ("model.norm=rmsnrom", "did you mean 'rmsnorm'"),
        ("train.grad_clip=yes", "expected a number"),
        ("model.gpas=3", "model.gpas must be a mapping"),
        ("trainiters=3", "must look like section.key=value"),
    ],
)
def test_name_and_type_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.iters=0"], "train.iters=0: must be a positive number"),
        (["optimizer.beta2=1.5"], r"optimizer.beta2=1.5: must be in \[0, 1\)"),
        (["model.hidden_size=100", "model.num_attention_heads=3"], "not divisible by model.num_attention_heads=3"),
        (["model.num_query_groups=3"], "model.num_query_groups=3 does not divide"),
        (["model.head_dim=7"], "model.head_dim=7 is odd: rotary embeddings need an even head dimension"),
        (["model.hidden_size=100", "model.num_attention_heads=4", "model.head_dim=0"], "model.head_dim=0: must be"),
        (["model.rope_scaling.type=llama3", "model.rope_scaling.high_freq_factor=1"],
         "model.rope_scaling.high_freq_factor=1.0 must exceed low_freq_factor=1.0"),
        (["model.rope_scaling.type=yarn"], "model.rope_scaling.type='yarn': expected one of 'llama3' or null"),
        (["train.global_batch_size=12", "train.micro_batch_size=8"], "use a global batch of 8"),
        (["scheduler.warmup_iters=500"], "exceeds train.iters=300"),
        (["scheduler.min_lr=1.0"], "above optimizer.lr"),
        (["data.split=98"], "data.split='98'"),
        (["model.moe.num_experts=8", "model.moe.top_k=1"], "set model.moe.router.pre_softmax=true"),
        (["model.moe.num_experts=8", "model.moe.top_k=9"], "model.moe.top_k=9 exceeds model.moe.num_experts=8"),
        (["model.moe.num_experts=8", "model.moe.layer_freq=[1,0]"], "per layer, 4 in all"),
        (["model.moe.num_experts=8", "model.moe.pad_to_capacity=true"], "needs model.moe.capacity_factor"),
        (["model.moe.num_experts=8", "model.moe.router.num_groups=3", "model.moe.router.group_top_k=1"],
         "num_groups must divide num_experts=8"),
        (["model.moe.num_experts=8", "model.moe.router.expert_bias_update_rate=1e-3"], "needs router.score=sigmoid"),
        (["model.moe.num_experts=8", "model.moe.router.num_groups=4"], "num_groups and group_top_k go together"),
        (["model.moe.num_experts=8", "model.moe.top_k=4", "model.moe.router.num_groups=4",
          "model.moe.router.group_top_k=1"],
         "must supply top_k / group_top_k = 4 experts but holds only num_experts / num_groups = 2"),
        (["model.moe.num_experts=8", "model.moe.dispatcher=all2all"], "did you mean 'alltoall'"),
        (["parallel.tensor=3"], "does not divide the world size 1"),
        (["parallel.expert=4"], "parallel.expert_tensor x parallel.expert x parallel.pipeline = 1 x 4 x 1 = 4"),
        (["parallel.order=tp-dp-pp"], "parallel.order='tp-dp-pp': name each of tp, cp, ep, dp, pp once"),
        (["parallel.virtual_pipeline=0"], "parallel.virtual_pipeline=0"),
        (["optimizer.lr=.nan"], "optimizer.lr=nan: must be a positive number"),
        (["model.init_std=.inf"], "model.init_std=inf"),
        (["model.gpas.gate_grad_clip=0.01"], "model.gpas.enabled=false"),
        (["train.stop_at_step=400"], "beyond train.iters=300"),
        (["model.loss_chunk_tokens=0"], "model.loss_chunk_tokens=0: must be a positive number"),
    ],
)
def test_value_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides).validate()


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.iters=0", "optimizer.lr=-1"]).validate()
    assert "train.iters" in str(err.value) and "optimizer.lr" in str(err.value)


@pytest.mark.parametrize(
    "world, overrides, message",
    [
        (8, ["parallel.tensor=3"], "3 x 1 x 1 = 3 does not divide the world size 8"),
        (8, ["parallel.tensor=8", "model.num_query_groups=4"],
         "model.num_attention_heads=4 is not divisible by parallel.tensor=8"),
        (4, ["parallel.tensor=4", "model.num_query_groups=2"],
         "model.num_query_groups=2 is not divisible by parallel.tensor=4"),
        (8, ["parallel.tensor=2", "parallel.context=2", "model.seq_length=100"],
         "2 x parallel.context x parallel.tensor = 8"),
        (2, ["parallel.tensor=2", "parallel.sequence_parallel=true", "model.seq_length=101"], "(sequence parallelism)"),
        (2, ["parallel.pipeline=2", "model.num_layers=3"],
         "model.num_layers=3 is not divisible by parallel.pipeline=2"),
        (2, ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "model.num_layers=6"],
         "model.num_layers=6 is not divisible by parallel.pipeline x parallel.virtual_pipeline = 2 x 2 = 4 chunks"),
        (1, ["parallel.virtual_pipeline=2"], "parallel.virtual_pipeline=2 needs parallel.pipeline > 1"),
        (4, ["parallel.pipeline=4", "parallel.first_stage_layers=3"], "leaves 1 layers for 3 middle piece(s)"),
        (8, ["parallel.expert=4"], "set model.moe.num_experts"),
        (8, ["model.moe.num_experts=6", "parallel.expert=4"],
         "model.moe.num_experts=6 is not divisible by parallel.expert=4"),
        (8, ["model.moe.num_experts=8", "parallel.tensor=2"], "needs parallel.sequence_parallel=true"),
        (8, ["model.moe.num_experts=8", "parallel.expert_tensor=3"], "3 x 1 x 1 = 3 does not divide the world size 8"),
        (2, ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "model.num_layers=4",
             "parallel.first_stage_layers=2"],
         "leaves 2 layers for 3 middle piece(s) of parallel.pipeline x parallel.virtual_pipeline"),
    ],
)
def test_impossible_layouts_name_the_fields(world, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides + ["train.global_batch_size=64"]).validate(world_size=world)


def test_interleaving_needs_micro_batches_in_groups_of_stages():
    base = ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "model.num_layers=4", "train.micro_batch_size=2"]
    load_config(None, base + ["train.global_batch_size=8"]).validate(world_size=4)  # 2 micro-batches per DP rank
    with pytest.raises(ConfigError, match=re.escape("gives 3 micro-batches per data-parallel rank")) as err:
        load_config(None, base + ["train.global_batch_size=12"]).validate(world_size=4)
    assert "parallel.pipeline=2" in str(err.value) and "use a global batch of 16" in str(err.value)
    # plain 1F1B: any count
    load_config(None, base[:1] + base[2:] + ["train.global_batch_size=12"]).validate(world_size=4)


def test_global_batch_checked_against_data_parallel_size():
    cfg = load_config(None, ["train.global_batch_size=16", "train.micro_batch_size=8"])
    cfg.validate(world_size=2)
    with pytest.raises(ConfigError, match="data-parallel size 4"):
        cfg.validate(world_size=4)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(str(bad))
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("run:\n  name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(str(latin))
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(str(scalar))


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["model.gpas.enabled=true", "data.sources={a: {prefixes: [x, y], max_epochs: 2}}",
                             "data.phases=[{fraction: 0.5, weights: {a: 1}}, {name: two, weights: {a: 2}}]"])
    path = tmp_path / "saved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(str(path)) == cfg
    assert isinstance(cfg, Config)


def test_resolved_config_writes_out_derived_values():
    cfg = load_config(None, ["model.hidden_size=96", "model.num_attention_heads=4"]).resolved(384)
    assert cfg.model.num_query_groups == 4 and cfg.model.vocab_size == 384
    assert cfg.model.ffn_hidden_size == 256  # 8/3 * 96 rounded up to 64
    assert cfg.parallel.expert_tensor == 1 and cfg.checkpoint.dir == "runs/quickstart/checkpoints"


def test_run_name_names_the_run_folder():
    assert load_config(None, ["run.name=gpas"]).run.dir == "runs/gpas"
    assert load_config(None, ["run.name=gpas", "run.dir=elsewhere"]).run.dir == "elsewhere"
    with pytest.raises(ConfigError, match="run.name='a/b': name the run with one folder name"):
        load_config(None, ["run.name=a/b"]).validate()


def test_head_dim_may_differ_from_hidden_over_heads():
    """Qwen3-30B-A3B: hidden 2048 and 32 heads of 128 (4096 wide); here 100 wide with 3 heads of 32."""
    cfg = load_config(None, ["model.hidden_size=100", "model.num_attention_heads=3", "model.num_query_groups=1",
                             "model.head_dim=32"]).validate()
    assert cfg.model.head_size == 32 and cfg.resolved(384).model.head_dim == 32
    assert load_config(None, []).resolved(384).model.head_dim == 64  # null: 256 / 4, written out
