"""`python -m tools.convert_checkpoint`: Hugging Face model folders to foldtron checkpoints and back.

    python -m tools.convert_checkpoint import HF_FOLDER OUT [--recipe YAML] [--dtype float32] [--seq-length N]
    python -m tools.convert_checkpoint export CHECKPOINT OUT_FOLDER [--max-shard-size 5GB] [--dtype auto]

Import reads `config.json` and the safetensors files of HF_FOLDER and writes OUT/step_00000000 (a foldtron
checkpoint of one rank's layout, every tensor whole, which any layout loads), OUT/latest and OUT/config.yaml (the
recipe's sections with the model of config.json, the folder's tokenizer and `checkpoint.init_from: OUT`), so that
`python -m pretrain OUT/config.yaml` continues training the model. Tensors are read lazily (`safe_open` slices)
and written one at a time, each into its own file: `torch.distributed.checkpoint` asks the planner for each tensor
when it writes it (`resolve_data`), and only then are its HF tensors read and converted, so a model larger than
memory converts (the peak is about the largest tensor with its sources, tested; a 254M-parameter Llama imported
with 182 MiB of heap). The vocabulary is padded with zero rows to a multiple of `model.vocab_multiple` (the
recipe's, default 128).

Export reads a foldtron checkpoint of any layout one whole tensor at a time (the policy `model.*`; optimizer
states, RLP's EMA teacher and FP8 state are not read), trims the vocabulary, splits the fused query/key/value
weight and the expert stacks, and writes `config.json` and safetensors files of at most `--max-shard-size`
(with `model.safetensors.index.json` when there are several; its memory is one shard and one tensor), plus the
run's tokenizer files, into a temporary folder renamed at the end. The vocabulary kept is
`--vocab-size`, else the one recorded at import, else the run's tokenizer's (with RLP's think ids).

Bad input ends with one line (`convert_checkpoint: error: ...`) and leaves nothing behind: an unsupported
architecture or config field (named), missing or extra tensors (named), a shape that differs, a tokenizer with
more ids than the model's vocabulary, a truncated safetensors file, an output folder that holds another model.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from typing import Callable, Optional

import torch
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.planner import WriteItemType

from data.tokenizers import TokenizerError, build_tokenizer
from parallel.placement import placement_of
from parallel.topology import Topology
from pretrain import checkpoint
from pretrain.cli import USER_ERRORS, ArgumentParser, parse_command, print_error
from pretrain.config import Config, ModelConfig
from pretrain.config_loading import config_from_dict
from pretrain.model import GPT, model_signature
from tools import hf
from tools.hf import ConversionError

PROGRAM = "convert_checkpoint"
FIRST = checkpoint.step_name(0)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


# ----------------------------------------------------------------------------- the model's own tensors


def expected_tensors(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """name -> global shape of every tensor of a foldtron model `m` (resolved: vocab_size set), as one rank's
    `state_dict()` names it; built on the meta device (no memory)."""
    with torch.device("meta"):
        model = GPT(m, m.vocab_size, Topology.single())
    shapes = {name: tuple(placement_of(p).global_shape) for name, p in model.named_parameters()}
    for name, buffer in model.named_buffers():
        shapes[name] = tuple(buffer.shape)
    return shapes


def check_map(mappings: list[hf.Mapping], expected: dict[str, tuple[int, ...]]) -> None:
    """The name map covers exactly the model's tensors (a bug here, not bad input)."""
    ours = {mp.ours for mp in mappings}
    if ours != set(expected):
        raise RuntimeError(f"tools/hf.py maps {sorted(ours ^ set(expected))} wrongly")


def named(names, limit: int = 6) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ----------------------------------------------------------------------------- a Hugging Face folder


class SafetensorsFolder:
    """The tensors of a Hugging Face model folder: which file holds each (the index, else the files' headers),
    read one at a time through `safe_open(...).get_slice`. Headers are checked when the files are opened, so a
    truncated file is found before anything is written."""

    def __init__(self, folder: str):
        import safetensors
        from safetensors import safe_open

        index_path = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            weight_map = _read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index_path}: no weight_map")
            files = sorted(set(weight_map.values()))
        else:
            weight_map = None
            files = sorted(os.path.basename(f) for f in glob.glob(os.path.join(folder, "*.safetensors")))
        if not files:
            bins = glob.glob(os.path.join(folder, "*.bin")) + glob.glob(os.path.join(folder, "*.pth"))
            hint = " (it holds PyTorch .bin files: save the model with safe_serialization=True)" if bins else ""
            raise ConversionError(f"{folder}: no *.safetensors files{hint}")
        self.handles, self.where = {}, {}
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                raise ConversionError(f"{index_path} names {name}, which is not in {folder}")
            try:
                handle = safe_open(path, framework="pt")
            except safetensors.SafetensorError as err:
                raise ConversionError(f"{path}: not a complete safetensors file ({err}): truncated or damaged; "
                                      "download it again") from None
            self.handles[name] = handle
            for key in handle.keys():
                self.where[key] = name
        if weight_map is not None:
            wrong = [k for k, f in weight_map.items() if self.where.get(k) != f]
            if wrong:
                raise ConversionError(f"{index_path} names tensors its files do not hold: {named(wrong)}")

    def names(self) -> set[str]:
        return set(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.handles[self.where[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self.handles[self.where[name]].get_slice(name).get_dtype()

    def read(self, name: str) -> torch.Tensor:
        return self.handles[self.where[name]].get_slice(name)[:]


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{path} must hold a JSON object")
    return value


def find_tokenizer(folder: str) -> Optional[tuple[str, str]]:
    """(data.tokenizer, data.tokenizer_path) of the tokenizer a HF folder holds, if foldtron reads it."""
    for kind, name in (("hf", "tokenizer.json"), ("sentencepiece", "tokenizer.model")):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return kind, os.path.abspath(path)
    return None


def check_tensors(source: SafetensorsFolder, mappings: list[hf.Mapping], expected: dict, m: ModelConfig, *,
                  hf_vocab: int, folder: str) -> None:
    """Every HF tensor the model needs is there, with its shape and a floating dtype, and nothing else."""
    needed = {name for mp in mappings for name in mp.theirs}
    present = {n for n in source.names() if not n.endswith(hf.IGNORED_SUFFIXES)}
    if m.tie_embeddings:
        present.discard("lm_head.weight")  # some tied checkpoints store the table twice
    missing, extra = needed - present, present - needed
    if missing or extra:
        parts = ([f"missing {named(missing)}"] if missing else []) + ([f"unexpected {named(extra)}"] if extra else [])
        raise ConversionError(f"{folder}: the tensors are not those of its config.json: " + "; ".join(parts))
    wrong = []
    for mp in mappings:
        for name, shape in zip(mp.theirs, hf.hf_shapes(mp, expected[mp.ours], m, hf_vocab)):
            if source.shape(name) != shape:
                wrong.append(f"{name} is {list(source.shape(name))}, config.json makes it {list(shape)}")
            elif source.dtype(name) not in SAFETENSORS_DTYPES:
                wrong.append(f"{name} has dtype {source.dtype(name)} (foldtron imports "
                             f"{', '.join(SAFETENSORS_DTYPES)})")
    if wrong:
        more = f"; and {len(wrong) - 4} more" if len(wrong) > 4 else ""
        raise ConversionError(f"{folder}: " + "; ".join(wrong[:4]) + more)


# ----------------------------------------------------------------------------- writing a foldtron checkpoint


class LazySavePlanner(DefaultSavePlanner):
    """DCP's default planner over a state dict of meta tensors (shapes and dtypes, no data): each tensor is made
    by its producer only when the writer asks for it. DCP's FileSystemWriter keeps every tensor of a file until
    the file is closed (torch 2.13 gathers them for its safetensors format, whatever the format), so the writer
    must put each tensor in a file of its own (`single_file_per_rank=False`) and run one thread: then one tensor
    at a time is alive."""

    def __init__(self, producers: dict[str, Callable[[], torch.Tensor]]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.producers = producers

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        return self.producers[write_item.index.fqn]()


def write_checkpoint(folder: str, producers: dict[str, Callable[[], torch.Tensor]],
                     shapes: dict[str, tuple[tuple[int, ...], torch.dtype]], meta: dict) -> None:
    """A foldtron checkpoint (format 2) of step 0 in the new folder `folder`: DCP keys `model.<name>`, each the
    whole tensor `producers[name]()` of `shapes[name]` (shape, dtype), then meta.json and its file manifest."""
    state = {f"model.{n}": torch.empty(shape, dtype=dtype, device="meta") for n, (shape, dtype) in shapes.items()}
    planner = LazySavePlanner({f"model.{n}": make for n, make in producers.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ...: saving in a single process"
        dcp.save(state, storage_writer=FileSystemWriter(folder, single_file_per_rank=False, thread_count=1),
                 planner=planner, no_dist=True)
    checkpoint.seal(folder, meta)  # meta.json, last, with the manifest of the files (sizes, CRC-32s)


def checkpoint_meta(cfg: Config, **extra) -> dict:
    return {"step": 0, "consumed_samples": 0, "model_signature": model_signature(cfg.model),
            "layout": {}, "config": cfg.to_dict(), **extra}


@dataclasses.dataclass
class Staged:
    """A folder written under a temporary name next to `final` and renamed into place by `commit`; removed if
    anything fails first."""
    final: str

    def __post_init__(self):
        parent, name = os.path.split(os.path.abspath(self.final))
        self.path = os.path.join(parent, f".{name}.tmp-{os.getpid()}")

    def __enter__(self) -> "Staged":
        shutil.rmtree(self.path, ignore_errors=True)
        os.makedirs(self.path)
        return self

    def __exit__(self, kind, *_):
        if kind is not None:
            shutil.rmtree(self.path, ignore_errors=True)

    def commit(self) -> None:
        """Rename into place (over an empty folder); into a folder that holds other files, file by file, the
        files that say a folder is complete last."""
        if os.path.isdir(self.final) and not os.listdir(self.final):
            os.rmdir(self.final)
        if not os.path.exists(self.final):
            os.rename(self.path, self.final)
            return
        names = sorted(os.listdir(self.path), key=lambda n: n in ("config.json", checkpoint.LATEST))  # these last
        for name in names:
            os.replace(os.path.join(self.path, name), os.path.join(self.final, name))
        os.rmdir(self.path)


# ----------------------------------------------------------------------------- import


def import_hf(folder: str, out: str, *, recipe: Optional[str] = None, dtype: torch.dtype = torch.float32,
              seq_length: Optional[int] = None) -> dict:
    """HF_FOLDER -> OUT (see the module docstring); returns a summary."""
    started = time.monotonic()
    if not os.path.isdir(folder):
        raise ConversionError(f"{folder}: no such folder")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConversionError(f"{out} already exists and is not empty: import into a new folder")
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise ConversionError(f"{folder}: no config.json (a Hugging Face model folder holds one)")
    source_config = _read_json(config_path)
    arch = hf.architecture_of(source_config)
    raw = _read_recipe(recipe)
    recipe_model = raw.get("model") or {}
    section = hf.model_section(source_config, vocab_multiple=recipe_model.get("vocab_multiple", 128),
                               seq_length=seq_length or recipe_model.get("seq_length"))
    raw["model"] = _model_of(recipe, recipe_model, section)
    raw.setdefault("run", {}).setdefault("name", _run_name(out))
    tokenizer = find_tokenizer(folder)
    if tokenizer is not None:
        raw["data"] = {**(raw.get("data") or {}), "tokenizer": tokenizer[0], "tokenizer_path": tokenizer[1]}
    raw["checkpoint"] = {**(raw.get("checkpoint") or {}), "init_from": os.path.abspath(out)}
    cfg = config_from_dict(raw)
    Config(model=cfg.model).validate()  # the model on its own; the trainer checks the whole config and layout
    hf_vocab = source_config["vocab_size"]
    notes = _check_tokenizer(tokenizer, hf_vocab)
    cfg = cfg.resolved(cfg.model.vocab_size)
    m = cfg.model
    expected = expected_tensors(m)
    mappings = hf.tensor_map(arch, m)
    check_map(mappings, expected)
    source = SafetensorsFolder(folder)
    check_tensors(source, mappings, expected, m, hf_vocab=hf_vocab, folder=folder)

    def producer(mp: hf.Mapping) -> Callable[[], torch.Tensor]:
        return lambda: hf.to_ours(mp, [source.read(n).to(dtype) for n in mp.theirs], m,
                                  vocab_size=m.vocab_size).contiguous()

    source_dtypes = sorted({source.dtype(n) for mp in mappings for n in mp.theirs})
    record = {"architecture": arch.name, "vocab_size": hf_vocab, "source": os.path.abspath(folder),
              "dtype": str(SAFETENSORS_DTYPES[source_dtypes[0]]).removeprefix("torch.") if len(source_dtypes) == 1
              else None, "config": source_config}
    with Staged(out) as staged:
        write_checkpoint(os.path.join(staged.path, FIRST), {mp.ours: producer(mp) for mp in mappings},
                         {name: (shape, dtype) for name, shape in expected.items()}, checkpoint_meta(cfg, hf=record))
        with open(os.path.join(staged.path, "config.yaml"), "w") as f:
            f.write(f"# python -m tools.convert_checkpoint import {folder} {out}" + (f" --recipe {recipe}" if recipe
                                                                                    else "") + "\n")
            f.write("# train from the imported weights: python -m pretrain THIS_FILE [section.key=value ...]\n")
            yaml.safe_dump(raw, f, sort_keys=False)
        with open(os.path.join(staged.path, checkpoint.LATEST), "w") as f:
            f.write(FIRST + "\n")
        staged.commit()
    parameters = sum(math.prod(shape) for shape in expected.values())
    return {"architecture": arch.name, "tensors": len(mappings), "parameters": parameters, "dtype": dtype,
            "checkpoint": os.path.join(out, FIRST), "config": os.path.join(out, "config.yaml"), "notes": notes,
            "seconds": time.monotonic() - started}


def _read_recipe(recipe: Optional[str]) -> dict:
    if recipe is None:
        return {}
    from pretrain.config_loading import load_config

    load_config(recipe)  # names and types, with the loader's errors
    with open(recipe, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


# what a recipe may set in the model section of an import: how it trains, not what it computes (config.json says that)
RECIPE_MODEL = {"seq_length", "vocab_multiple", "recompute", "recompute_layers", "loss_chunk_tokens", "norm_impl"}
RECIPE_MOE = {"dispatcher", "capacity_factor", "drop_policy", "pad_to_capacity", "experts"}
RECIPE_ROUTER = {"load_balancing", "aux_loss_coeff", "z_loss_coeff"}


def _model_of(recipe: Optional[str], recipe_model: dict, section: dict) -> dict:
    """The imported model section with the recipe's training fields merged in (an MoE's too, field by field);
    a recipe field that would change what the model computes is refused by name."""
    moe = dict(recipe_model.get("moe") or {})
    router = dict(moe.pop("router", None) or {})
    refused = [f"model.{k}" for k in recipe_model if k not in RECIPE_MODEL | {"moe"}]
    refused += [f"model.moe.{k}" for k in moe if k not in RECIPE_MOE]
    refused += [f"model.moe.router.{k}" for k in router if k not in RECIPE_ROUTER]
    if (moe or router) and "moe" not in section:
        refused.append("model.moe (config.json describes a dense model)")
    if refused:
        raise ConversionError(f"--recipe {recipe}: {', '.join(refused)} would change the imported model, which "
                              "config.json describes: remove them from the recipe")
    merged = {**{k: v for k, v in recipe_model.items() if k != "moe"}, **section}
    if "moe" in section:
        merged["moe"] = {**section["moe"], **moe, "router": {**section["moe"].get("router", {}), **router}}
    return merged


def _run_name(out: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(os.path.abspath(out))) or "imported"


def _check_tokenizer(tokenizer: Optional[tuple[str, str]], hf_vocab: int) -> list[str]:
    """The folder's tokenizer must fit the model's vocabulary; one foldtron cannot read is noted, not refused."""
    if tokenizer is None:
        return ["no tokenizer.json or tokenizer.model in the folder: set data.tokenizer and data.tokenizer_path in "
                "config.yaml"]
    try:
        loaded = build_tokenizer(tokenizer[0], tokenizer[1])
    except TokenizerError as err:
        return [f"the folder's tokenizer does not load in foldtron ({err}): set data.tokenizer in config.yaml"]
    if loaded.vocab_size > hf_vocab:
        raise ConversionError(f"{tokenizer[1]}: the tokenizer has {loaded.vocab_size} ids, more than the model's "
                              f"vocabulary of {hf_vocab} (config.json vocab_size): its last ids have no embedding")
    return []


# ----------------------------------------------------------------------------- export


def open_checkpoint(path: str) -> tuple[str, dict, Config]:
    """The checkpoint folder `path` names (a step_* folder or a checkpoint.dir), its meta and its run's config."""
    if not os.path.exists(path):
        raise ConversionError(f"{path}: no such file or folder")
    folder = checkpoint.resolve_init(path, label=path)  # its files checked against its manifest
    meta = checkpoint.read_meta(folder)  # refuses a checkpoint of another format
    if not isinstance(meta.get("config"), dict):
        raise ConversionError(f"{folder}: its meta.json holds no config")
    cfg = config_from_dict(meta["config"])
    if cfg.model.vocab_size is None:
        raise ConversionError(f"{folder}: its saved config has no model.vocab_size (not a resolved config)")
    return folder, meta, cfg


def unpadded_vocab(cfg: Config, meta: dict, requested: Optional[int]) -> int:
    """The vocabulary to export (see the module docstring)."""
    padded = cfg.model.vocab_size
    if requested is not None:
        if not 0 < requested <= padded:
            raise ConversionError(f"--vocab-size {requested}: the model's vocabulary has {padded} rows; choose at "
                                  "most that many")
        return requested
    if (meta.get("hf") or {}).get("vocab_size"):
        return int(meta["hf"]["vocab_size"])
    try:
        tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path)
    except TokenizerError:
        return padded
    think = cfg.objective.rlp.think_token_ids or tokenizer.think_ids or ()  # RLP's delimiters may lie beyond it
    return min(max([tokenizer.vocab_size, *(i + 1 for i in think)]), padded)


def parse_size(text: str) -> int:
    """'5GB' -> 5 * 10**9, '500MiB' -> 500 * 2**20, '1000' -> 1000 bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ConversionError(f"--max-shard-size {text!r}: give a size such as 5GB or 500MiB")
    unit = (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    size = int(float(match.group(1)) * scale)
    if size <= 0:
        raise ConversionError(f"--max-shard-size {text!r}: must be positive")
    return size


def shard_plan(mappings: list[hf.Mapping], sizes: dict[str, int], max_bytes: int) -> list[list[hf.Mapping]]:
    """Consecutive foldtron tensors grouped into shards of at most `max_bytes` of HF tensors (one tensor larger
    than that makes a shard of its own)."""
    shards: list[list[hf.Mapping]] = [[]]
    used = 0
    for mp in mappings:
        if shards[-1] and used + sizes[mp.ours] > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(mp)
        used += sizes[mp.ours]
    return shards


def holds_model(folder: str) -> bool:
    if not os.path.isdir(folder):
        return False
    return os.path.exists(os.path.join(folder, "config.json")) or bool(glob.glob(os.path.join(folder, "*.safetensors")))


def export_hf(path: str, out: str, *, max_shard_bytes: int = 5 * 10**9, dtype: str = "auto",
              vocab_size: Optional[int] = None) -> dict:
    """CHECKPOINT -> OUT_FOLDER (see the module docstring); returns a summary."""
    from safetensors.torch import save_file

    started = time.monotonic()
    folder, meta, cfg = open_checkpoint(path)
    m = cfg.model
    arch = hf.export_architecture(m)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConversionError(f"{out} is a file: export into a folder")
    if holds_model(out):
        raise ConversionError(f"{out} already holds a model (config.json or safetensors files): export into a new "
                              "or empty folder")
    expected = expected_tensors(m)
    index = checkpoint.saved_tensors(folder)
    saved = {k[len("model."):]: v for k, v in index.items() if k.startswith("model.")}
    missing, extra = set(expected) - set(saved), set(saved) - set(expected)
    if missing or extra:
        parts = ([f"missing model.{named(missing)}"] if missing else []) + (
            [f"unexpected model.{named(extra)}"] if extra else [])
        raise ConversionError(f"{folder}: its tensors are not those of its config's model: " + "; ".join(parts))
    wrong = [f"model.{n} is {list(saved[n][0])}, the model's is {list(s)}" for n, s in expected.items()
             if saved[n][0] != s]
    if wrong:
        raise ConversionError(f"{folder}: " + "; ".join(wrong[:4]))
    hf_vocab = unpadded_vocab(cfg, meta, vocab_size)
    record = meta.get("hf") or {}
    target = DTYPES[dtype] if dtype != "auto" else DTYPES.get(record.get("dtype") or "float32", torch.float32)
    mappings = hf.tensor_map(arch, m)
    check_map(mappings, expected)
    sizes = {mp.ours: sum(math.prod(s) for s in hf.hf_shapes(mp, expected[mp.ours], m, hf_vocab))
             * target.itemsize for mp in mappings}
    shards = shard_plan(mappings, sizes, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    weight_map = {}
    with Staged(out) as staged:
        for name, shard in zip(names, shards):
            tensors = {}
            for mp in shard:
                whole = checkpoint.read_tensors(folder, [f"model.{mp.ours}"], index=index)[f"model.{mp.ours}"]
                for theirs, t in zip(mp.theirs, hf.to_theirs(mp, whole, m, hf_vocab=hf_vocab)):
                    tensors[theirs] = t.to(target, copy=True).contiguous()
                    weight_map[theirs] = name
                del whole
            save_file(tensors, os.path.join(staged.path, name), metadata={"format": "pt"})
            del tensors
        if len(shards) > 1:
            with open(os.path.join(staged.path, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}, f, indent=2)
        copied = _copy_tokenizer(cfg, staged.path)
        base = record.get("config") if isinstance(record.get("config"), dict) else None
        config = hf.hf_config(m, vocab_size=hf_vocab, dtype=target, base=base)
        with open(os.path.join(staged.path, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        staged.commit()
    return {"architecture": arch.name, "checkpoint": folder, "out": out, "files": len(names),
            "bytes": sum(sizes.values()),
            "vocab_size": hf_vocab, "padded_vocab_size": m.vocab_size, "dtype": target, "tokenizer_files": copied,
            "seconds": time.monotonic() - started}


def _copy_tokenizer(cfg: Config, out: str) -> list[str]:
    """The run's Hugging Face tokenizer files (beside its tokenizer.json) into the exported folder."""
    if cfg.data.tokenizer != "hf" or not cfg.data.tokenizer_path or not os.path.isfile(cfg.data.tokenizer_path):
        return []
    source = os.path.dirname(os.path.abspath(cfg.data.tokenizer_path))
    copied = []
    for name in TOKENIZER_FILES:
        path = os.path.join(source, name) if name != "tokenizer.json" else cfg.data.tokenizer_path
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(out, name))
            copied.append(name)
    return copied


# ----------------------------------------------------------------------------- command line


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=f"python -m tools.{PROGRAM}", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    i = commands.add_parser("import", help="a Hugging Face model folder -> a foldtron checkpoint")
    i.add_argument("hf_folder", help="config.json + safetensors (Llama, Qwen3, Mixtral, Qwen3-MoE)")
    i.add_argument("out", help="a new folder: OUT/step_00000000, OUT/latest, OUT/config.yaml")
    i.add_argument("--recipe", metavar="YAML", help="the training sections of OUT/config.yaml (e.g. "
                   "examples/continue_hf.yaml); its model section gives seq_length and vocab_multiple")
    i.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="of the written tensors (default: float32, what foldtron trains)")
    i.add_argument("--seq-length", type=int, metavar="N",
                   help="model.seq_length of config.yaml (default: the recipe's, else min(max_position_embeddings, "
                        "4096))")
    e = commands.add_parser("export", help="a foldtron checkpoint -> a Hugging Face model folder")
    e.add_argument("checkpoint", help="a step_* checkpoint folder, or a checkpoint.dir (its latest)")
    e.add_argument("out", help="the Hugging Face folder to write (new, or without a model)")
    e.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="per safetensors file (default: 5GB)")
    e.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="auto: the dtype imported from, else float32")
    e.add_argument("--vocab-size", type=int, metavar="N", help="rows of the exported vocabulary")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if any(a in ("-h", "--help") for a in argv):  # argparse prints the help of the command asked about
        try:
            parser.parse_args(argv)
        except SystemExit as done:
            return done.code or 0
        except USER_ERRORS:
            print(parser.format_help())
        return 0
    args = parse_command(argv, parser.parse_args, program=PROGRAM, usage=parser.format_usage().strip())
    if isinstance(args, int):
        return args
    try:
        if args.command == "import":
            r = import_hf(args.hf_folder, args.out, recipe=args.recipe, dtype=DTYPES[args.dtype],
                          seq_length=args.seq_length)
            for note in r["notes"]:
                print(f"{PROGRAM}: note: {note}", file=sys.stderr)
            print(f"imported {r['architecture']}: {r['tensors']} tensors, {r['parameters']:,} parameters as "
                  f"{str(r['dtype']).removeprefix('torch.')} into {r['checkpoint']} in {r['seconds']:.1f} s\n"
                  f"train from it: python -m pretrain {r['config']} [section.key=value ...]")
        else:
            r = export_hf(args.checkpoint, args.out, max_shard_bytes=parse_size(args.max_shard_size),
                          dtype=args.dtype, vocab_size=args.vocab_size)
            print(f"exported {r['checkpoint']} as {r['architecture']} ({r['bytes'] / 1e9:.2f} GB of "
                  f"{str(r['dtype']).removeprefix('torch.')} in {r['files']} file(s), vocabulary {r['vocab_size']} "
                  f"of {r['padded_vocab_size']}) to {r['out']} in {r['seconds']:.1f} s")
    except USER_ERRORS as err:
        print_error(PROGRAM, err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
