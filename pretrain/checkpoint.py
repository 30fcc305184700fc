"""Sharded checkpoints through torch.distributed.checkpoint, written so that a crash never costs the last good one.

Layout of `checkpoint.dir`:

    step_00000100/      one complete checkpoint: DCP shards + .metadata, meta.json, rng_rank<r>.pt
    latest              the name of the newest complete checkpoint

A save writes `.tmp-step_.../`, renames it when every file is in place, then replaces
`latest` (write + rename), and only then prunes old checkpoints beyond `keep_last`.
The learning-rate schedule is a pure function of the step, so `meta.json`'s step is
the scheduler's whole state.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import warnings
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from parallel.errors import FoldtronError
from parallel.placement import placement_of
from pretrain.distributed import barrier

LATEST = "latest"
META = "meta.json"


class CheckpointError(FoldtronError, RuntimeError):
    """A checkpoint that cannot be written or used; the message says which and why."""


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def check_writable(ckpt_dir: str) -> None:
    """Fail before training starts if checkpoints could not be written."""
    probe = os.path.join(ckpt_dir, f".write-probe-{os.getpid()}")
    try:
        os.makedirs(ckpt_dir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise CheckpointError(f"checkpoint.dir={ckpt_dir!r} is not writable ({err.strerror}): "
                              "choose another folder") from None


def _sharded_state(model: torch.nn.Module, optimizer, topology, *, saving: bool, fp8=None, teacher=None) -> dict:
    """Keys name the shard they hold, so every rank writes (and reads) only its own part:
    `model.pp<p>.tp<t>` (written by the first rank of the DP x CP group: the others hold the same weights;
    layers keep their global numbers), `optim.pp<p>.tp<t>` for the plain optimizer (likewise replicated)
    or `optim.pp<p>.tp<t>.dpcp<d>` for the distributed one (each rank its slice; (tp, dpcp) names a rank
    of the stage). Expert weights, and their plain-optimizer states, are replicated over EDP instead:
    they go under `experts.pp<p>.ep<e>.etp<t>` and `optim_experts.pp<p>.ep<e>.etp<t>`, written by EDP rank 0.
    FP8 state (`fp8`, the feature of pretrain/model/fp8.py: amax histories, TE's extra state) is the same on
    every rank of a stage (its amaxes are reduced over the stage): `fp8.pp<p>`, keyed by module name,
    written by the stage's first rank. RLP's EMA teacher (`teacher`, a model of the same shards) goes beside
    the weights, under `ema.` and `ema_experts.`."""
    keys = _keys(topology, saving=saving)
    parts = {}
    for prefix, module in (("", model), ("ema_", teacher)):
        if module is None:
            continue
        experts = {n for n, p in module.named_parameters() if placement_of(p).expert}
        weights = module.state_dict()
        parts[prefix + "weights"] = {k: v for k, v in weights.items() if k not in experts}
        if experts:
            parts[prefix + "expert_weights"] = {k: v for k, v in weights.items() if k in experts}
    if optimizer is not None:  # None: the weights only (checkpoint.init_from)
        parts.update(optimizer.state_parts())
    if fp8 is not None and (fp8_state := fp8.state_dict()):
        parts["fp8"] = fp8_state
    return {keys[part][0]: value for part, value in parts.items() if keys[part][1]}


def _keys(topology, *, saving: bool) -> dict[str, tuple[str, bool]]:
    """Each part of a rank's state (its dense and expert weights, the optimizer's parts: see
    parallel/optimizer.py) -> (its key, whether this rank writes it)."""
    dense = f"pp{topology.pp_rank}.tp{topology.tp_rank}"
    expert = f"pp{topology.pp_rank}.ep{topology.coords['ep']}.etp{topology.coords['etp']}"
    dense_writer = topology.coords["dp_cp"] == 0 or not saving
    expert_writer = topology.coords["edp"] == 0 or not saving
    return {"weights": (f"model.{dense}", dense_writer), "expert_weights": (f"experts.{expert}", expert_writer),
            "ema_weights": (f"ema.{dense}", dense_writer),
            "ema_expert_weights": (f"ema_experts.{expert}", expert_writer),
            "dense": (f"optim.{dense}", dense_writer), "experts": (f"optim_experts.{expert}", expert_writer),
            "own": (f"optim.{dense}.dpcp{topology.coords['dp_cp']}", True),
            "fp8": (f"fp8.pp{topology.pp_rank}", topology.index_in("tp-dp-cp") == 0 or not saving)}


def save(
    ckpt_dir: str, step: int, *, model: torch.nn.Module, optimizer, topology, meta: dict, keep_last: int, fp8=None,
    teacher=None,
) -> str:
    """Write checkpoint `step` atomically (every rank its shards); return its folder."""
    rank = topology.rank
    final = os.path.join(ckpt_dir, step_name(step))
    tmp = os.path.join(ckpt_dir, ".tmp-" + step_name(step))
    if rank == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)  # left by a save that crashed
    barrier()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(_sharded_state(model, optimizer, topology, saving=True, fp8=fp8, teacher=teacher), checkpoint_id=tmp)
    torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
    barrier()  # every rank's files are in place before the folder is renamed
    if rank == 0:
        with open(os.path.join(tmp, META), "w") as f:
            json.dump({"step": step, **meta}, f, indent=1)
        stale = None
        if os.path.exists(final):  # the same step saved before: move it aside, never delete it first
            stale = final + ".old"
            os.replace(final, stale)
        os.rename(tmp, final)
        _write_latest(ckpt_dir, step_name(step))
        if stale:
            shutil.rmtree(stale)
        _prune(ckpt_dir, keep_last)
    barrier()
    return final


def _write_latest(ckpt_dir: str, name: str) -> None:
    tmp = os.path.join(ckpt_dir, LATEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(name + "\n")
    os.replace(tmp, os.path.join(ckpt_dir, LATEST))


def _complete(ckpt_dir: str) -> list[str]:
    names = [
        n for n in os.listdir(ckpt_dir)
        if n.startswith("step_") and not n.endswith(".old") and os.path.isfile(os.path.join(ckpt_dir, n, META))
    ]
    return sorted(names)


def check_no_later_checkpoints(ckpt_dir: str, start_step: int) -> None:
    """Refuse to write into a folder that holds checkpoints ahead of this run: pruning would mix two runs."""
    if not os.path.isdir(ckpt_dir):
        return
    later = [n for n in _complete(ckpt_dir) if int(n[len("step_"):]) > start_step]
    if later:
        raise CheckpointError(
            f"checkpoint.dir={ckpt_dir!r} already holds {later[-1]}, ahead of step {start_step} where this run "
            "starts: use another run.dir or checkpoint.dir, or checkpoint.resume=auto to continue that run"
        )


def _prune(ckpt_dir: str, keep_last: int) -> None:
    for name in _complete(ckpt_dir)[:-keep_last]:
        shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)


def resolve(resume: str, ckpt_dir: str) -> Optional[str]:
    """The checkpoint folder to resume from: `none`, `auto` (the latest in ckpt_dir, if any) or a path."""
    if resume == "none":
        return None
    if resume != "auto":
        if not os.path.isdir(resume):
            raise CheckpointError(f"checkpoint.resume={resume!r}: no such checkpoint folder")
        return resume
    if not os.path.isdir(ckpt_dir):
        return None
    pointer = os.path.join(ckpt_dir, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            name = f.read().strip()
        if os.path.isfile(os.path.join(ckpt_dir, name, META)):
            return os.path.join(ckpt_dir, name)
    complete = _complete(ckpt_dir)  # no pointer, or it names a folder that is gone: take the newest complete one
    return os.path.join(ckpt_dir, complete[-1]) if complete else None


def read_meta(path: str) -> dict:
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{path}: not a complete foldtron checkpoint (no {META})")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        int(meta["step"]), int(meta["consumed_samples"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{meta_path} is corrupt ({type(err).__name__}: {err}); "
                              "resume from another checkpoint") from None
    return meta


def check_compatible(path: str, meta: dict, *, model_signature: dict, layout: dict) -> None:
    """Refuse a checkpoint of another model, or of another parallel layout, before anything is loaded."""
    if meta.get("layout") != layout:
        raise CheckpointError(
            f"{path} was saved with the parallel layout {meta.get('layout')}, this run is {layout}: loading into "
            "another layout is not supported yet; resume with the layout it was saved with"
        )
    check_model(path, meta, model_signature=model_signature)


WEIGHT_LAYOUT = ("tp", "pp", "ep", "etp", "pipeline_layers")  # what the weights' shards depend on (not DP or CP)


def resolve_init(path: str, *, label: str | None = None) -> str:
    """The checkpoint `checkpoint.init_from` names: a checkpoint folder, or a checkpoint.dir (its latest).
    `label`: how an error names the path (default `checkpoint.init_from='PATH'`; a tool: its argument)."""
    if os.path.isfile(os.path.join(path, META)):
        return path
    latest = resolve("auto", path) if os.path.isdir(path) else None
    if latest is None:
        raise CheckpointError(f"{label or f'checkpoint.init_from={path!r}'}: no foldtron checkpoint there (a step_* "
                              f"folder with {META}, or a checkpoint.dir holding one)")
    return latest


def check_weights_compatible(path: str, meta: dict, *, model_signature: dict, layout: dict) -> None:
    """What `checkpoint.init_from` needs of a checkpoint: the same model, and the same sharding of the weights
    (the same TP, PP and its layers per stage, and for experts EP and ETP; any DP, CP, optimizer or objective)."""
    keys = WEIGHT_LAYOUT if model_signature.get("moe") else tuple(k for k in WEIGHT_LAYOUT if k not in ("ep", "etp"))
    saved = {k: meta.get("layout", {}).get(k) for k in keys}
    wanted = {k: layout[k] for k in keys}
    if saved != wanted:
        different = ", ".join(f"{k} {saved[k]!r} (checkpoint) vs {wanted[k]!r}" for k in keys if saved[k] != wanted[k])
        raise CheckpointError(f"checkpoint.init_from={path}: its weights are sharded otherwise ({different}); "
                              "initialise with the same tensor, pipeline and expert layout (loading into another "
                              "layout is not supported yet)")
    check_model(f"checkpoint.init_from={path}:", meta, model_signature=model_signature,
                fix="configure the model it holds (its config.yaml beside the checkpoints says which)")


def check_model(path: str, meta: dict, *, model_signature: dict,
                fix: str = "resume with the model it was trained with, or start a new run.dir") -> None:
    """Refuse a checkpoint of another model (shape, vocabulary, MoE, GPAS: `model_signature`); `fix` says what to
    do instead."""
    saved = meta.get("model_signature", {})
    different = [f"{k} {saved.get(k)!r} (checkpoint) vs {v!r} (config)"
                 for k, v in model_signature.items() if saved.get(k) != v]
    if different:
        raise CheckpointError(
            f"{path} holds a different model: " + "; ".join(different)
            + f"; {fix}"
        )


def load(path: str, *, model: torch.nn.Module, optimizer, topology, fp8=None, teacher=None) -> dict:
    """Restore model, optimizer and RNG from `path` (checked with `check_compatible` first), the FP8 state
    when `fp8` is given (the caller checks that the checkpoint holds the same kind) and RLP's EMA teacher when
    `teacher` is (the caller checks that the checkpoint holds one); return its meta."""
    meta = read_meta(path)
    optimizer.materialize_state()
    failure = f"{path}: cannot load the checkpoint"
    with _labelled(failure):
        rng = torch.load(os.path.join(path, f"rng_rank{topology.rank}.pt"), weights_only=False)
    parts = _read_into(model, _sharded_state(model, optimizer, topology, saving=False, fp8=fp8, teacher=teacher),
                       path, topology, failure=failure)
    teacher_state = {**parts.pop("ema_weights", {}), **parts.pop("ema_expert_weights", {})}
    if teacher is not None:
        teacher.load_state_dict(teacher_state)
    if "fp8" in parts:
        fp8.load_state_dict(parts.pop("fp8"))
    optimizer.load_state_parts(parts)
    _set_rng_state(rng)
    return meta


def load_weights(path: str, *, model: torch.nn.Module, topology, label: str | None = None) -> None:
    """Only the model's weights from `path` (checked with `check_weights_compatible` first), for a fresh run:
    no optimizer state, step, data position or random state. `label`: how an error names the path."""
    _read_into(model, _sharded_state(model, None, topology, saving=False), path, topology,
               failure=f"{label or f'checkpoint.init_from={path}'}: cannot load its weights")


@contextlib.contextmanager
def _labelled(failure: str):
    """Reading errors as one CheckpointError line; only reading is labelled: a mismatch after the compatibility
    checks is a bug and keeps its traceback."""
    try:
        yield
    except (CheckpointException, OSError, EOFError, pickle.UnpicklingError, RuntimeError) as err:
        raise CheckpointError(f"{failure} ({_reason(err)})") from err


def _read_into(model: torch.nn.Module, state: dict, path: str, topology, *, failure: str) -> dict:
    """Read `state` (the keys of `_sharded_state`) from `path`, put its weights into `model`; return its other
    parts (the optimizer's, fp8)."""
    with _labelled(failure), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=path)
    parts = _parts(state, topology)
    model.load_state_dict({**parts.pop("weights", {}), **parts.pop("expert_weights", {})})
    return parts


def _parts(state: dict, topology) -> dict:
    """A loaded state by part (weights, expert_weights, the optimizer's, fp8), as `_keys` names them."""
    return {part: state[key] for part, (key, _) in _keys(topology, saving=False).items() if key in state}


def _reason(err: BaseException) -> str:
    """The first line of what went wrong (for DCP: of the first rank's failure, which it wraps)."""
    if isinstance(err, CheckpointException) and err.failures:
        failure = next(iter(err.failures.values()))
        err = failure[0] if isinstance(failure, tuple) else failure
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
