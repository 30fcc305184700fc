"""Hugging Face import and export (tools/hf.py, tools/convert_checkpoint.py) against transformers itself.

Tiny random models of each architecture are built locally from their transformers configs (no hub), with large
weights and random norm weights so that a misplaced head, norm or expert shows in the logits. foldtron's logits
after import equal transformers' (fp32, 1e-5) on one rank, under TP2 (with and without sequence parallelism)
and with the experts on EP2; export then import is byte-identical; a trained foldtron model exported loads in
transformers with the same logits; every kind of bad input is one line and leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from multirank import run_ranks
from parallel.collectives import all_gather_dim
from parallel.placement import placement_of
from parallel.topology import Sizes, Topology
from pretrain.config_loading import config_from_dict, load_config
from pretrain.model import GPT
from tools import convert_checkpoint as cc
from tools import hf
from tools.hf import ConversionError

transformers = pytest.importorskip("transformers")

VOCAB = 100  # padded to 128 on import
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, initializer_range=0.25, max_position_embeddings=64, rms_norm_eps=1e-6)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
ARCHS = {
    # llama3 rope scaling, untied
    "llama": ("LlamaConfig", dict(rope_parameters=LLAMA3_ROPE, max_position_embeddings=512)),
    # head_dim 16 != 32 / 4, q/k norms, tied embeddings
    "qwen3": ("Qwen3Config", dict(head_dim=16, tie_word_embeddings=True)),
    # softmax, top-2, renormalised
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    # the top-2 of the softmax kept as they are (norm_topk_prob false), layer 1 dense, head_dim 16
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, head_dim=16,
                                         norm_topk_prob=False, mlp_only_layers=[1])),
}
IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))


def hf_model(arch: str, seed: int = 0):
    config_class, extra = ARCHS[arch]
    config = getattr(transformers, config_class)(**{**COMMON, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # norms: not all ones, so that each must land in its place
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model.eval()


def hf_logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """Each architecture saved by transformers, with its logits of IDS."""
    out = {}
    for arch in ARCHS:
        folder = str(tmp_path_factory.mktemp(arch))
        model = hf_model(arch)
        model.save_pretrained(folder)
        out[arch] = (folder, hf_logits(model))
    return out


@pytest.fixture(scope="module")
def imported(hf_folders, tmp_path_factory):
    """Each architecture imported once: arch -> the checkpoint folder."""
    out = {}
    for arch, (folder, _) in hf_folders.items():
        target = str(tmp_path_factory.mktemp("imported") / arch)
        cc.import_hf(folder, target)
        out[arch] = os.path.join(target, cc.FIRST)
    return out


def load_model(folder: str, topology: Topology) -> GPT:
    """The model of a format-2 checkpoint on `topology`: each weight read whole, this rank's piece kept."""
    with open(os.path.join(folder, "meta.json")) as f:
        m = config_from_dict(json.load(f)["config"]).model
    model = GPT(m, m.vocab_size, topology)
    with torch.no_grad():
        for name, p in model.named_parameters():
            placement = placement_of(p)
            whole = cc.checkpoint.read_tensors(folder, [f"model.{name}"])[f"model.{name}"]
            p.copy_(whole[placement.local_slices()])
    return model.eval()


def our_logits(model: GPT, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        logits = model(ids)
    if model.topology.tp > 1:
        logits = all_gather_dim(logits, -1, model.topology.tp_group)
    return logits[..., :VOCAB]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_imported_logits_equal_transformers(hf_folders, imported, arch):
    logits = our_logits(load_model(imported[arch], Topology.single()))
    torch.testing.assert_close(logits, hf_folders[arch][1], rtol=1e-5, atol=1e-5)


LAYOUTS = {"llama": Sizes(world=2, tp=2), "qwen3": Sizes(world=2, tp=2, sp=True),
           "mixtral": Sizes(world=2, ep=2), "qwen3_moe": Sizes(world=2, tp=2, sp=True, ep=2, etp=1)}


def _logits_on_ranks(rank: int, world: int, imported: dict) -> dict:
    return {arch: our_logits(load_model(folder, Topology.build(LAYOUTS[arch], rank)))
            for arch, folder in imported.items()}


def test_imported_logits_equal_transformers_under_tp2_and_ep2(hf_folders, imported):
    """Llama on TP2, Qwen3 on TP2 with sequence parallelism, Mixtral's experts on EP2 over DP2, Qwen3-MoE on TP2
    with SP and its experts on EP2 (ETP1)."""
    for result in run_ranks(2, _logits_on_ranks, imported):
        for arch, logits in result.items():
            torch.testing.assert_close(logits, hf_folders[arch][1], rtol=1e-5, atol=1e-5, msg=lambda m: f"{arch}: {m}")


def test_llama3_rope_scaling_is_transformers(tmp_path):
    """Llama-3.1's own settings (head_dim 128, theta 5e5, factor 8 over 8192 positions): every frequency, in each
    of the three bands (kept, blended, stretched), and the cos/sin tables at positions up to 100k."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from pretrain.config import RopeScalingConfig
    from pretrain.model.gpt import llama3_inv_freq, rotary_cos_sin

    config = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                                      rope_parameters={**LLAMA3_ROPE, "original_max_position_embeddings": 8192})
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    scaling = RopeScalingConfig(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=8192)
    plain = 1.0 / 500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128)
    ours = llama3_inv_freq(plain, scaling)
    assert torch.equal(ours, theirs)
    kept, stretched = ours == plain, ours == plain / 8
    assert kept.sum() > 0 and stretched.sum() > 0 and (~kept & ~stretched).sum() > 0  # all three bands
    positions = torch.tensor([[0, 1, 4095, 8191, 8192, 65535, 100000]])
    cos, sin = rotary_cos_sin(positions, 128, 500000.0, scaling)
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    their_cos, their_sin = rotary(torch.zeros(1, 7, 128), positions)
    torch.testing.assert_close(cos[:, 0], their_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[:, 0], their_sin, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_export_then_import_is_byte_identical(hf_folders, imported, tmp_path, arch):
    """The exported folder holds transformers' tensors exactly (fp32, as saved), and importing it again writes the
    same checkpoint file byte for byte. Exported in shards of 20 kB, with an index."""
    from safetensors import safe_open

    source, expected = hf_folders[arch]
    cc.export_hf(imported[arch], str(tmp_path / "hf"), max_shard_bytes=20_000)
    exported = cc.SafetensorsFolder(str(tmp_path / "hf"))
    assert len(exported.handles) > 1 and os.path.isfile(tmp_path / "hf" / "model.safetensors.index.json")
    original = cc.SafetensorsFolder(source)
    assert exported.names() == original.names()
    assert all(torch.equal(exported.read(n), original.read(n)) for n in original.names())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert torch.equal(hf_logits(reloaded), expected)
    cc.import_hf(str(tmp_path / "hf"), str(tmp_path / "again"))
    again = tmp_path / "again" / cc.FIRST
    for name in os.listdir(imported[arch]):
        if name.endswith(".distcp"):
            assert (again / name).read_bytes() == open(os.path.join(imported[arch], name), "rb").read()
    with safe_open(os.path.join(tmp_path / "hf", exported.where["model.norm.weight"]), "pt") as f:
        assert f.metadata() == {"format": "pt"}


TRAINED = {  # foldtron models trained a few steps, and the architecture each exports as
    "LlamaForCausalLM": (),
    "Qwen3ForCausalLM": ("model.qk_norm=true", "model.head_dim=16", "model.tie_embeddings=true",
                         "model.rope_scaling.type=llama3", "model.rope_scaling.original_max_position_embeddings=8"),
    "MixtralForCausalLM": ("model.moe.num_experts=4", "model.moe.ffn_hidden_size=48"),
    "Qwen3MoeForCausalLM": ("model.moe.num_experts=4", "model.moe.ffn_hidden_size=48", "model.moe.layer_freq=[0,1]",
                            "model.moe.router.pre_softmax=true", "model.qk_norm=true"),
}


def trained(tmp_path, corpus, *overrides, steps: int = 2):
    from conftest import tiny_config
    from pretrain.trainer import Trainer

    trainer = Trainer(tiny_config(tmp_path, corpus, "data.prefetch=0", *overrides))
    try:
        for _ in range(steps):
            trainer.train_step()
    finally:
        trainer.loader.close()
        trainer.metrics.close()
    return trainer


def save_whole(trainer, folder: str) -> None:
    """The trainer's one-rank model as a format-2 checkpoint (what the trainer writes once checkpoints are
    layout-free)."""
    state = {name: t.detach().clone() for name, t in trainer.model.state_dict().items()}
    cc.write_checkpoint(folder, {n: (lambda t=t: t) for n, t in state.items()},
                        {n: (tuple(t.shape), t.dtype) for n, t in state.items()}, cc.checkpoint_meta(trainer.cfg))


@pytest.mark.parametrize("arch", list(TRAINED))
def test_a_trained_model_exported_loads_in_transformers_with_the_same_logits(tmp_path, tiny_corpus, arch):
    trainer = trained(tmp_path, tiny_corpus, *TRAINED[arch])
    save_whole(trainer, str(tmp_path / "ckpt"))
    summary = cc.export_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    assert summary["architecture"] == arch and summary["vocab_size"] == 260  # bytes, eod, pad and the 2 think ids
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert type(model).__name__ == arch
    with torch.no_grad():
        ours = trainer.model.eval()(IDS)[..., :260]
    torch.testing.assert_close(hf_logits(model), ours, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- bad input


def write_tokenizer(folder: str, ids: int) -> None:
    """A tokenizer.json of `ids` word-level tokens, the last one `</s>` (its end of document)."""
    from tokenizers import Tokenizer, models

    vocab = {f"w{i}": i for i in range(ids - 1)} | {"</s>": ids - 1}
    Tokenizer(models.WordLevel(vocab, unk_token="w0")).save(os.path.join(folder, "tokenizer.json"))


def edit_config(**changes):
    def edit(folder):
        path = os.path.join(folder, "config.json")
        config = json.load(open(path))
        config.update(changes)
        json.dump(config, open(path, "w"))
    return edit


def edit_tensors(drop=(), add=None):
    def edit(folder):
        from safetensors.torch import load_file, save_file

        path = os.path.join(folder, "model.safetensors")
        tensors = {k: v for k, v in load_file(path).items() if k not in drop}
        save_file({**tensors, **(add or {})}, path)
    return edit


def truncate(folder):
    path = os.path.join(folder, "model.safetensors")
    os.truncate(path, os.path.getsize(path) - 100)


BAD_IMPORTS = {
    "an unknown architecture": ("llama", edit_config(architectures=["GPT2LMHeadModel"]),
                                "architectures=['GPT2LMHeadModel']: foldtron converts one of LlamaForCausalLM"),
    "unsupported fields, all named": ("llama", edit_config(attention_bias=True, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "cannot convert: attention_bias=True (foldtron's "
        "linear layers have no biases); rope_scaling.rope_type='yarn' (foldtron implements llama3 rope scaling only)"),
    "a sliding window": ("mixtral", edit_config(sliding_window=4096), "sliding_window=4096"),
    "a missing tensor": ("llama", edit_tensors(drop=["model.layers.1.self_attn.k_proj.weight"]),
                         "missing model.layers.1.self_attn.k_proj.weight"),
    "an extra tensor": ("llama", edit_tensors(add={"model.layers.0.self_attn.q_proj.bias": torch.zeros(32)}),
                        "unexpected model.layers.0.self_attn.q_proj.bias"),
    "a shape the config does not make": ("llama", edit_config(num_key_value_heads=4),
                                         "model.layers.0.self_attn.k_proj.weight is [16, 32], config.json makes it "
                                         "[32, 32]"),
    "a tokenizer larger than the vocabulary": ("llama", lambda folder: write_tokenizer(folder, 120),
                                               "the tokenizer has 120 ids, more than the model's vocabulary of 100"),
    "a truncated safetensors file": ("llama", truncate, "not a complete safetensors file"),
}


def run_cli(capsys, *argv) -> str:
    assert cc.main(list(argv)) == 1
    err = capsys.readouterr().err
    assert err.startswith("convert_checkpoint: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("case", list(BAD_IMPORTS))
def test_bad_hugging_face_folders_are_refused_in_one_line_leaving_nothing(hf_folders, tmp_path, capsys, case):
    import shutil

    arch, edit, fragment = BAD_IMPORTS[case]
    source = str(tmp_path / "source")
    shutil.copytree(hf_folders[arch][0], source)
    edit(source)
    assert fragment in run_cli(capsys, "import", source, str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["source"]  # no output, no temporary folder


def test_bad_outputs_and_checkpoints_are_refused_in_one_line(hf_folders, imported, tmp_path, capsys):
    import shutil

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    assert "already exists and is not empty" in run_cli(capsys, "import", hf_folders["llama"][0],
                                                        str(tmp_path / "full"))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert "already holds a model" in run_cli(capsys, "export", imported["llama"], str(tmp_path / "model"))
    assert os.listdir(tmp_path / "model") == ["config.json"]
    meta = json.load(open(os.path.join(imported["llama"], "meta.json")))
    old = tmp_path / "old" / "step_00000001"
    old.mkdir(parents=True)
    json.dump({**meta, "format": 1, "files": {}}, open(old / "meta.json", "w"))
    assert "is in checkpoint format 1" in run_cli(capsys, "export", str(old), str(tmp_path / "hf"))
    gpas = tmp_path / "gpas"
    gpas.mkdir()
    meta["config"]["model"]["gpas"]["enabled"] = True
    json.dump({**meta, "files": {}}, open(gpas / "meta.json", "w"))
    damaged = tmp_path / "damaged"
    shutil.copytree(imported["llama"], damaged)
    os.truncate(damaged / "__0_0.distcp", 1000)
    assert "the checkpoint is damaged (__0_0.distcp has 1000 bytes" in run_cli(
        capsys, "export", str(damaged), str(tmp_path / "hf"))
    assert "no Hugging Face architecture computes this model: model.gpas.enabled=true" in run_cli(
        capsys, "export", str(gpas), str(tmp_path / "hf"))
    assert "--vocab-size 200: the model's vocabulary has 128 rows" in run_cli(
        capsys, "export", imported["llama"], str(tmp_path / "hf"), "--vocab-size", "200")
    assert not (tmp_path / "hf").exists() and not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_the_import_writes_a_config_to_train_from(hf_folders, tmp_path, capsys):
    """OUT/config.yaml: the recipe's sections, the model of config.json, the folder's tokenizer, init_from OUT."""
    import shutil

    source = str(tmp_path / "source")
    shutil.copytree(hf_folders["llama"][0], source)
    write_tokenizer(source, VOCAB)
    out = str(tmp_path / "out")
    assert cc.main(["import", source, out, "--recipe", os.path.join(os.path.dirname(__file__), "..", "examples",
                                                                      "continue_hf.yaml")]) == 0
    assert "train from it: python -m pretrain" in capsys.readouterr().out
    cfg = load_config(os.path.join(out, "config.yaml"), ["data.sources={x: {prefixes: [x]}}"]).validate()
    assert cfg.checkpoint.init_from == out and cfg.data.tokenizer == "hf"
    assert cfg.data.tokenizer_path == os.path.join(source, "tokenizer.json")
    m = cfg.model
    assert (m.vocab_size, m.hidden_size, m.num_query_groups, m.head_dim, m.rope_theta) == (128, 32, 2, 8, 500000.0)
    assert m.rope_scaling.type == "llama3" and m.rope_scaling.original_max_position_embeddings == 256
    assert m.seq_length == load_config(cfg_path := os.path.join(os.path.dirname(__file__), "..", "examples",
                                                                "continue_hf.yaml")).model.seq_length
    assert cfg.optimizer.lr == load_config(cfg_path).optimizer.lr  # the recipe's
    assert open(os.path.join(out, "latest")).read() == "step_00000000\n"


def test_the_import_holds_one_tensor_at_a_time(tmp_path, monkeypatch):
    """A 12-layer model: the tensors alive at any moment of its import (those read from safetensors and those made
    of them) never exceed two of the largest foldtron tensor with its sources (the padded table and the table
    read), an eighth of the model: DCP asks the planner for each tensor as it writes it and drops it after (its
    loop makes the next tensor before it lets go of the last). Storages are counted, whichever tensors hold them:
    DCP detaches what it writes, and before each tensor got a file of its own the peak was the whole model."""
    import weakref

    config = transformers.LlamaConfig(**{**COMMON, "num_hidden_layers": 12})
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path / "deep"))
    live = {"now": 0, "peak": 0}
    alive: set[int] = set()

    def gone(pointer: int, n: int) -> None:
        alive.discard(pointer)
        live["now"] -= n

    def track(t: torch.Tensor) -> torch.Tensor:
        """Count `t`'s storage until it is freed (whichever tensors share it: DCP detaches what it writes)."""
        storage = t.untyped_storage()
        if storage.data_ptr() not in alive:
            alive.add(storage.data_ptr())
            live["now"] += storage.nbytes()
            live["peak"] = max(live["peak"], live["now"])
            weakref.finalize(storage, gone, storage.data_ptr(), storage.nbytes())
        return t

    read, to_ours = cc.SafetensorsFolder.read, hf.to_ours
    monkeypatch.setattr(cc.SafetensorsFolder, "read", lambda self, name: track(read(self, name)))
    monkeypatch.setattr(hf, "to_ours", lambda *args, **kwargs: track(to_ours(*args, **kwargs)))
    summary = cc.import_hf(str(tmp_path / "deep"), str(tmp_path / "out"))
    model_bytes = 4 * summary["parameters"]
    embedding = 4 * (VOCAB + 128) * 32  # the largest: the table read, and padded to 128 rows
    assert 0 < live["peak"] <= 2 * embedding < model_bytes / 8, (live, model_bytes)
    assert live["now"] == 0


# ----------------------------------------------------------------------------- with the trainer's own checkpoints

def trainer_overrides(tmp_path) -> list[str]:
    return [f"run.dir={tmp_path / 'run'}", "data.synthetic=true", "model.seq_length=16", "train.iters=2",
            "train.global_batch_size=2", "train.micro_batch_size=1", "scheduler.warmup_iters=1", "eval.interval=0",
            "checkpoint.interval=0", "logging.tensorboard=false", "data.prefetch=0", "precision.dtype=fp32",
            "model.recompute=none"]


def _trainer_logits(rank: int, world: int, cfg) -> torch.Tensor:
    from pretrain.trainer import Trainer

    trainer = Trainer(cfg, world, rank)
    try:
        assert trainer.init_from.endswith(cc.FIRST) and trainer.step == 0
        return our_logits(trainer.model.eval())
    finally:
        trainer.loader.close()
        trainer.metrics.close()


@pytest.mark.parametrize("arch, layout", [("llama", "parallel.tensor=2"), ("mixtral", "parallel.expert=2")])
def test_training_starts_from_an_import_with_transformers_logits(hf_folders, tmp_path, arch, layout):
    """checkpoint.init_from (OUT/config.yaml says it): the trainer's model is transformers' on one rank, and on
    TP2 (Llama) or with the experts on EP2 (Mixtral), from the same one-rank checkpoint."""
    import shutil

    source = str(tmp_path / "source")
    shutil.copytree(hf_folders[arch][0], source)
    write_tokenizer(source, VOCAB)
    cc.import_hf(source, str(tmp_path / "out"), recipe=os.path.join(os.path.dirname(__file__), "..", "examples",
                                                                     "continue_hf.yaml"))
    config = str(tmp_path / "out" / "config.yaml")
    for world, extra in ((1, []), (2, [layout, "parallel.sequence_parallel=true"])):
        cfg = load_config(config, trainer_overrides(tmp_path / str(world)) + extra)
        for logits in run_ranks(world, _trainer_logits, cfg):
            torch.testing.assert_close(logits, hf_folders[arch][1], rtol=1e-5, atol=1e-5)


def test_a_run_from_an_import_keeps_its_origin_for_export(hf_folders, tmp_path):
    """The import's record (the HF vocabulary size, dtype, config.json) goes into the checkpoints of a run
    started from it, so that their export restores the HF vocabulary, not the tokenizer's."""
    import shutil

    source = str(tmp_path / "source")
    shutil.copytree(hf_folders["llama"][0], source)
    write_tokenizer(source, VOCAB)
    cc.import_hf(source, str(tmp_path / "out"))
    cfg = load_config(str(tmp_path / "out" / "config.yaml"), trainer_overrides(tmp_path / "run"))
    _train(0, 1, cfg)
    imported = cc.checkpoint.read_meta(str(tmp_path / "out" / cc.FIRST))["hf"]
    trained = cc.checkpoint.read_meta(cc.checkpoint.resolve_init(cfg.checkpoint_dir))
    assert trained["step"] == 2 and trained["hf"] == imported


def _train(rank: int, world: int, cfg) -> None:
    from pretrain.trainer import train

    train(cfg, world, rank)


def test_a_checkpoint_the_trainer_wrote_on_tp2_exports(tmp_path, tiny_corpus):
    """A Qwen3-style run trained on TP2 with sequence parallelism, exported from its own checkpoint: transformers
    computes what the checkpoint's weights compute."""
    from conftest import tiny_config

    cfg = tiny_config(tmp_path, tiny_corpus, "model.qk_norm=true", "model.head_dim=16", "train.iters=2",
                      "checkpoint.interval=0", "eval.interval=0", "parallel.tensor=2",
                      "parallel.sequence_parallel=true")
    run_ranks(2, _train, cfg)
    cc.export_hf(cfg.checkpoint_dir, str(tmp_path / "hf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    folder = cc.checkpoint.resolve_init(cfg.checkpoint_dir)
    ours = load_model(folder, Topology.single())
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(model), ours(IDS)[..., :260], rtol=1e-5, atol=1e-5)


def test_config_fields_map_both_ways():
    """transformers v4's rope fields as well as v5's; Qwen3-MoE's sparse-layer rule as a layer list; a config.json
    made of the foldtron model gives the foldtron model back."""
    v4 = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
          "vocab_size": 1000, "intermediate_size": 128, "rope_theta": 5e5, "max_position_embeddings": 8192,
          "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 1024}}
    section = hf.model_section(v4)
    assert section["vocab_size"] == 1024 and section["rope_theta"] == 5e5 and section["seq_length"] == 4096
    assert section["rope_scaling"] == {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}
    qwen = {"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 4, "vocab_size": 256, "intermediate_size": 128, "moe_intermediate_size": 32,
            "num_experts": 8, "num_experts_per_tok": 2, "decoder_sparse_step": 2, "mlp_only_layers": [3],
            "norm_topk_prob": True, "head_dim": 32}
    moe = hf.model_section(qwen)["moe"]
    assert moe["layer_freq"] == [0, 1, 0, 0] and "pre_softmax" not in moe["router"]
    for source in (v4, qwen):
        m = config_from_dict({"model": hf.model_section(source)}).resolved(1024).model
        back = hf.hf_config(m, vocab_size=source["vocab_size"], dtype=torch.bfloat16)
        again = config_from_dict({"model": hf.model_section(back)}).resolved(1024).model
        assert dataclasses.replace(again, max_position_embeddings=m.max_position_embeddings) == m
        assert back["torch_dtype"] == "bfloat16"
    with pytest.raises(ConversionError, match=r"hidden_act='gelu' .*; mlp_bias=True"):
        hf.model_section({**v4, "mlp_bias": True, "hidden_act": "gelu"})


def test_routing_and_rope_fields_are_mapped_or_refused_by_name():
    """Qwen3-MoE top-1: unnormalised (norm_topk_prob false) is the top-1 of the full softmax, which foldtron
    computes; renormalised gives weight 1 and no router gradient, refused by HF's field. A llama3 rope scaling
    that lacks a key is refused by the key's name (transformers also needs it)."""
    qwen = {"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 2, "vocab_size": 256, "intermediate_size": 128, "moe_intermediate_size": 32,
            "num_experts": 8, "num_experts_per_tok": 1, "norm_topk_prob": False, "head_dim": 32}
    assert hf.model_section(qwen)["moe"]["router"]["pre_softmax"] is True
    config_from_dict({"model": hf.model_section(qwen)}).validate()
    with pytest.raises(ConversionError, match="norm_topk_prob=True .with num_experts_per_tok=1"):
        hf.model_section({**qwen, "norm_topk_prob": True})
    llama = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
             "num_hidden_layers": 2, "vocab_size": 1000, "intermediate_size": 128,
             "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}}
    with pytest.raises(ConversionError, match="rope_scaling.original_max_position_embeddings=None"):
        hf.model_section(llama)


def test_a_recipe_sets_how_the_import_trains_not_what_it_computes(hf_folders, tmp_path):
    """An MoE recipe's training fields merge field by field into the imported model.moe; a field that would change
    the model (rope scaling on a dense Llama, MoE on a dense model) is refused by name, nothing written."""
    recipe = tmp_path / "moe.yaml"
    recipe.write_text("model:\n  seq_length: 16\n  moe:\n    capacity_factor: 1.5\n    router:\n"
                      "      z_loss_coeff: 0.001\n")
    cc.import_hf(hf_folders["mixtral"][0], str(tmp_path / "out"), recipe=str(recipe))
    cfg = load_config(str(tmp_path / "out" / "config.yaml"))
    moe = cfg.model.moe
    assert (moe.num_experts, moe.capacity_factor, moe.router.z_loss_coeff) == (4, 1.5, 0.001), moe
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  rope_scaling: {type: llama3}\n  moe: {capacity_factor: 1.0}\n")
    with pytest.raises(ConversionError, match="model.rope_scaling, model.moe .config.json describes a dense model. "
                                              "would change the imported model"):
        cc.import_hf(hf_folders["llama"][0], str(tmp_path / "dense"), recipe=str(bad))
    assert not os.path.exists(tmp_path / "dense")


def test_export_takes_the_policy_not_the_teacher_or_the_optimizer(imported, tmp_path):
    """An RLP checkpoint also holds ema.* (the EMA teacher) and optim.*: export reads model.* alone."""
    import torch.distributed.checkpoint as dcp

    folder = imported["llama"]
    meta = json.load(open(os.path.join(folder, "meta.json")))
    policy = cc.checkpoint.read_tensors(folder, sorted(cc.checkpoint.saved_tensors(folder)))
    state = {**policy, **{k.replace("model.", "ema.", 1): torch.full_like(t, 7.0) for k, t in policy.items()},
             "optim.embedding.weight.exp_avg": torch.ones(128, 32)}
    with pytest.warns(UserWarning, match="single process"):  # DCP's note that no process group runs
        dcp.save(state, checkpoint_id=str(tmp_path / "rlp"), no_dist=True)
    cc.checkpoint.seal(str(tmp_path / "rlp"), {**meta, "rlp_teacher": True})
    cc.export_hf(str(tmp_path / "rlp"), str(tmp_path / "hf"))
    exported = cc.SafetensorsFolder(str(tmp_path / "hf"))
    assert torch.equal(exported.read("model.norm.weight"), policy["model.final_norm.weight"])
