"""Checkpoints through torch.distributed.checkpoint: layout-free, checked, and written so that a crash never
costs the last good one.

Layout of `checkpoint.dir`:

    step_00000100/        one complete checkpoint: DCP files + .metadata, rng_rank<r>.pt, meta.json (last)
    step_00000090.damaged a checkpoint found damaged on resume, set aside (never deleted)
    latest                the name of the newest complete checkpoint

Keys name tensors, never ranks (pretrain/checkpoint_state.py), so a checkpoint loads into any other parallel
layout; only another model is refused. A save writes `.tmp-step_.../`, checksums every file in it (the
ranks share the reading), writes `meta.json` with the files' sizes and CRC-32s last, renames the folder
when every file is in place, then replaces `latest` (write + rename), and only then prunes old checkpoints
beyond `keep_last`. A resume verifies the files against `meta.json` before reading any; with
`resume: auto` a damaged checkpoint is set aside and the newest intact one is taken. The learning-rate
schedule is a pure function of the step, so `meta.json`'s step is the scheduler's whole state.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import pickle
import re
import shutil
import warnings
import zlib
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from parallel.errors import FoldtronError
from pretrain.checkpoint_state import checkpoint_state

LATEST = "latest"
META = "meta.json"
FORMAT = 2  # 1: keys per shard (model.pp<p>.tp<t>, optimizer states by position), loadable only into its layout
_STEP = re.compile(r"step_\d{8}")


class CheckpointError(FoldtronError, RuntimeError):
    """A checkpoint that cannot be written or used; the message says which and why."""


class _CorruptMeta(CheckpointError):
    """A meta.json that does not parse: with `resume: auto`, its checkpoint counts as damaged."""

    def __init__(self, meta_path: str, reason: str):
        super().__init__(f"{meta_path} is corrupt ({reason}); resume from another checkpoint")
        self.reason = reason


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


class Background:
    """Where checkpoints are written in the background (`checkpoint.async_save`): one writer thread, and a gloo
    process group of its own for DCP's coordination (so that it never shares a communicator with the
    training's collectives, which run meanwhile on the main thread). Create it on every rank together."""

    def __init__(self):
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() and dist.get_world_size() > 1 else None


class PendingSave:
    """A checkpoint being written (and checksummed) in the background. Training goes on; `finish()` (on every
    rank together) waits for the write, and only then does rank 0 rename the folder and move `latest`."""

    def __init__(self, future: concurrent.futures.Future, publish: Callable[[dict], str], path: str):
        self.future, self.publish, self.path = future, publish, path

    def done(self) -> bool:
        return self.future.done()

    def finish(self) -> str:
        with _labelled(f"checkpoint {self.path} could not be written; the previous checkpoints are intact"):
            files = self.future.result()
        return self.publish(files)


def save(
    ckpt_dir: str, step: int, *, model: torch.nn.Module, optimizer, topology, meta: dict, keep_last: int, fp8=None,
    teacher=None, background: Background | None = None,
) -> str | PendingSave:
    """Write checkpoint `step` atomically (every rank its boxes); return its folder. With `background`, the
    state is first copied to CPU memory (the part the caller waits for) and the background thread writes and
    checksums it: a `PendingSave` is returned, whose `finish()` publishes it (rank 0 renames the folder and
    moves `latest`, two small collectives)."""
    rank = topology.rank
    final = os.path.join(ckpt_dir, step_name(step))
    tmp = os.path.join(ckpt_dir, ".tmp-" + step_name(step))
    _on_rank0(lambda: shutil.rmtree(tmp, ignore_errors=True))  # left by a save that crashed
    os.makedirs(tmp, exist_ok=True)
    torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
    state = checkpoint_state(model, optimizer.state_pieces(), fp8=fp8, teacher=teacher, staged=background is not None)
    group = background.group if background is not None else None

    def write() -> dict:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(state, checkpoint_id=tmp, process_group=group)
        return manifest(tmp, group=group)  # DCP returns once every rank's files are written

    def publish(files: dict) -> str:
        def rename() -> None:
            seal(tmp, {"step": step, **meta}, files=files)
            if os.path.exists(final):
                _replace_folder(tmp, final)
            else:
                os.replace(tmp, final)
            _write_latest(ckpt_dir, step_name(step))
            _prune(ckpt_dir, keep_last)

        _on_rank0(rename)
        return final

    if background is not None:
        return PendingSave(background.executor.submit(write), publish, final)
    return publish(write())


def _replace_folder(new: str, old: str) -> None:
    """Put folder `new` where `old` is, `old` moved aside first and deleted only once `new` is in place."""
    aside = old + ".old"
    shutil.rmtree(aside, ignore_errors=True)  # a leftover of an earlier replacement: `old` is whole
    os.replace(old, aside)
    os.replace(new, old)
    shutil.rmtree(aside)


def _on_rank0(work: Callable[[], None]) -> None:
    """Do `work` on rank 0 while the others wait; a failure there is raised on every rank (as a CheckpointError
    naming it), so that no rank waits for one that has given up."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        work()
        return
    failure = None
    if dist.get_rank() == 0:
        try:
            work()
        except OSError as err:
            failure = f"{type(err).__name__}: {err}"
    shared = [failure]
    dist.broadcast_object_list(shared, src=0)
    if shared[0] is not None:
        raise CheckpointError(f"rank 0 could not finish the checkpoint ({shared[0]})")


def _shared(names: list[str], work: Callable[[str], object], *, group=None) -> dict:
    """work(name) for every name, the names dealt out over the ranks of `group` (default: all; each file read
    by one rank); every rank gets all the results. An OSError on any rank is raised on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return {name: work(name) for name in names}
    rank, world = dist.get_rank(), dist.get_world_size()
    mine, failures = {}, []
    for name in names[rank::world]:
        try:
            mine[name] = work(name)
        except OSError as err:
            failures.append(f"{name}: {type(err).__name__}: {err}")
    everyone: list = [None] * world
    dist.all_gather_object(everyone, (mine, failures), group=group)
    failed = [f for _, part in everyone for f in part]
    if failed:
        raise CheckpointError(f"cannot read the checkpoint's files ({'; '.join(failed[:3])})")
    return {k: v for part, _ in everyone for k, v in part.items()}


def _file_record(path: str) -> dict:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return {"bytes": os.path.getsize(path), "crc32": f"{crc:08x}"}


def manifest(folder: str, *, group=None) -> dict:
    """{file: {"bytes", "crc32"}} for every file in `folder` but meta.json (shared out over the ranks of `group`
    when a process group runs: call it on every rank)."""
    names = sorted(n for n in os.listdir(folder) if n != META and os.path.isfile(os.path.join(folder, n)))
    return _shared(names, lambda name: _file_record(os.path.join(folder, name)), group=group)


def seal(folder: str, meta: dict, *, files: dict | None = None) -> None:
    """Write `folder`'s meta.json, last, with the format and the manifest of its files (`files` from
    `manifest`; by default computed here, by this process alone). A checkpoint without it is incomplete."""
    record = {**meta, "format": FORMAT, "files": manifest(folder) if files is None else files}
    _write_durably(os.path.join(folder, META), json.dumps(record, indent=1))


def _write_durably(path: str, text: str) -> None:
    """Replace file `path` by `text` atomically, on disk before the rename (a power loss leaves the old file or the
    new one, never an empty one)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def damage(path: str, meta: dict) -> Optional[str]:
    """What is wrong with the files of checkpoint `path` against its manifest (None: all intact). Call on every
    rank when a process group runs: the ranks share the reading."""
    files = meta.get("files", {})

    def check(name: str) -> Optional[str]:
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            return f"{name} is missing"
        try:
            size, written = os.path.getsize(full), files[name]
            if size != written["bytes"]:
                return f"{name} has {size} bytes, {written['bytes']} were written"
            if _file_record(full)["crc32"] != written["crc32"]:
                return f"{name} does not have the checksum it was written with"
        except OSError as err:
            return f"{name} cannot be read ({type(err).__name__}: {err})"
        except (KeyError, TypeError):
            return f"{META} records {name} without its size and checksum"
        return None

    problems = [p for p in _shared(sorted(files), check).values() if p]
    return "; ".join(problems[:3]) if problems else None


def _write_latest(ckpt_dir: str, name: str) -> None:
    _write_durably(os.path.join(ckpt_dir, LATEST), name + "\n")


def _complete(ckpt_dir: str) -> list[str]:
    names = [n for n in os.listdir(ckpt_dir) if _STEP.fullmatch(n) and os.path.isfile(os.path.join(ckpt_dir, n, META))]
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
        os.remove(os.path.join(ckpt_dir, name, META))  # first: a folder half deleted is then not "complete"
        shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)


def resolve(resume: str, ckpt_dir: str, *, announce: Callable[[str], None] = print) -> Optional[str]:
    """The checkpoint folder to resume from: `none`, `auto` (the newest intact one in ckpt_dir, if any) or a
    path (refused if damaged). With `auto`, a damaged checkpoint is renamed `<name>.damaged` (kept, never
    deleted) and `announce` says so and which one is taken instead. Call on every rank together."""
    if resume == "none":
        return None
    if resume != "auto":
        if not os.path.isdir(resume):
            raise CheckpointError(f"checkpoint.resume={resume!r}: no such checkpoint folder")
        _check_intact(resume, label=f"checkpoint.resume={resume!r}",
                      fix="resume from another checkpoint (checkpoint.resume=auto takes the newest intact one)")
        return resume
    if not os.path.isdir(ckpt_dir):
        return None
    set_aside = False
    for name in reversed(_complete(ckpt_dir)):
        path = os.path.join(ckpt_dir, name)
        try:
            problem = damage(path, read_meta(path))
        except _CorruptMeta as err:  # a crash while it was written, say: as damaged as a file
            problem = f"its {META} is unreadable: {err.reason}"
        if problem is None:
            if set_aside:
                _on_rank0(lambda: _write_latest(ckpt_dir, name))
            return path
        kept = _free_name(path + ".damaged")
        _on_rank0(lambda: os.replace(path, kept))  # after every rank has looked at it
        set_aside = True
        announce(f"checkpoint {path} is damaged ({problem}): kept as {os.path.basename(kept)}, trying an older one")
    if set_aside:
        raise CheckpointError(f"checkpoint.resume=auto: no intact checkpoint is left in {ckpt_dir} (the damaged "
                              "ones are kept as *.damaged); start a new run.dir, or set checkpoint.resume=none")
    return None


def _free_name(path: str) -> str:
    """`path`, or `path-2`, `path-3`...: the first that does not exist (a step damaged twice keeps both)."""
    candidate, n = path, 1
    while os.path.exists(candidate):
        n += 1
        candidate = f"{path}-{n}"
    return candidate


def _check_intact(path: str, *, label: str, fix: str) -> dict:
    """The meta of checkpoint `path`, after checking its files (one CheckpointError naming the damaged file)."""
    meta = read_meta(path)
    problem = damage(path, meta)
    if problem:
        raise CheckpointError(f"{label}: the checkpoint is damaged ({problem}); {fix}")
    return meta


def read_meta(path: str) -> dict:
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{path}: not a complete foldtron checkpoint (no {META})")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        int(meta["step"]), int(meta["consumed_samples"])
    except (ValueError, KeyError, TypeError) as err:
        raise _CorruptMeta(meta_path, f"{type(err).__name__}: {err}") from None
    if meta.get("format", 1) != FORMAT:
        raise CheckpointError(
            f"{path} is in checkpoint format {meta.get('format', 1)} (keys per shard, written before checkpoints "
            f"moved between layouts); this foldtron reads format {FORMAT}: continue that run with the foldtron "
            "version that wrote it, or start a new run.dir")
    return meta


def resolve_init(path: str, *, label: str | None = None) -> str:
    """The checkpoint `checkpoint.init_from` names: a checkpoint folder, or a checkpoint.dir (its newest), its
    files checked. `label`: how an error names the path (default `checkpoint.init_from='PATH'`; a tool: its
    argument). Call on every rank together."""
    label = label or f"checkpoint.init_from={path!r}"
    found = path if os.path.isfile(os.path.join(path, META)) else None
    if found is None and os.path.isdir(path):
        complete = _complete(path)
        found = os.path.join(path, complete[-1]) if complete else None
    if found is None:
        raise CheckpointError(f"{label}: no foldtron checkpoint there (a step_* folder with {META}, or a "
                              "checkpoint.dir holding one)")
    _check_intact(found, label=label, fix="use another checkpoint")
    return found


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


def load(path: str, *, model: torch.nn.Module, optimizer, rank: int, fp8=None, teacher=None,
         restore_rng: bool = True) -> dict:
    """Restore model, optimizer and RNG from `path` (the caller has checked its model with `check_model`), into
    whatever layout this run has; the FP8 state when `fp8` is given (the caller checks that the checkpoint holds the
    same kind) and RLP's EMA teacher when `teacher` is (the caller checks that the checkpoint holds one).
    `restore_rng`: this rank's random state is that of rank `rank` of the saving run (meaningful in the same
    layout only: the caller reseeds otherwise). Returns its meta."""
    meta = read_meta(path)
    optimizer.materialize_state()
    failure = f"{path}: cannot load the checkpoint"
    adam = optimizer.state_pieces()
    state = checkpoint_state(model, adam, fp8=fp8, teacher=teacher)
    _read(state, path, failure=failure)
    if fp8 is not None and "fp8" in state:
        fp8.load_state_dict(state["fp8"])
    optimizer.load_state_pieces(adam)
    if restore_rng:
        with _labelled(failure):
            _set_rng_state(torch.load(os.path.join(path, f"rng_rank{rank}.pt"), weights_only=False))
    return meta


def load_weights(path: str, *, model: torch.nn.Module, label: str | None = None) -> None:
    """Only the model's weights from `path` (the caller has checked its model with `check_model`), for a fresh run
    in any layout:
    no optimizer state, step, data position or random state. `label`: how an error names the path."""
    _read(checkpoint_state(model), path, failure=f"{label or f'checkpoint.init_from={path}'}: cannot load its weights")


def saved_tensors(path: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor key of checkpoint `path` with its global shape and dtype (from DCP's metadata alone)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    with _labelled(f"{path}: cannot read the checkpoint's index"):
        metadata = dcp.FileSystemReader(path).read_metadata()
    return {key: (tuple(md.size), md.properties.dtype) for key, md in metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata)}


def read_tensors(path: str, keys: list[str], *, index: dict | None = None) -> dict[str, torch.Tensor]:
    """The whole global tensors `keys` of checkpoint `path`, in this process alone, whatever layout wrote them
    (offline tools: export, tests). Read a few keys at a time to bound memory; `index`: `saved_tensors(path)`,
    when the caller has it already (else it is read here)."""
    shapes = index if index is not None else saved_tensors(path)
    state = {key: torch.empty(shapes[key][0], dtype=shapes[key][1]) for key in keys}
    _read(state, path, failure=f"{path}: cannot read {', '.join(keys[:3])}", alone=True)
    return state


@contextlib.contextmanager
def _labelled(failure: str):
    """Reading errors as one CheckpointError line; only reading is labelled: a mismatch after the compatibility
    checks is a bug and keeps its traceback."""
    try:
        yield
    except (CheckpointException, OSError, EOFError, pickle.UnpicklingError, RuntimeError) as err:
        raise CheckpointError(f"{failure} ({_reason(err)})") from err


def _read(state: dict, path: str, *, failure: str, alone: bool = False) -> None:
    """Read `state` (from `checkpoint_state`: views of the weights and states) from `path`, in place; `alone`:
    in this process only, even where a process group runs."""
    with _labelled(failure), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=path, no_dist=alone)


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
