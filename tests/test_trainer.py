import json
import os
import time

import pytest
import torch

from conftest import tiny_config
from pretrain import checkpoint
from pretrain.checkpoint import CheckpointError
from data.indexed import DatasetError
from pretrain.trainer import NonFiniteError, Trainer, train


def read_metrics(cfg):
    with open(os.path.join(cfg.run.dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_loss_falls_and_metrics_are_written(tmp_path, tiny_corpus):
    cfg = tiny_config(tmp_path, tiny_corpus, "train.iters=30", "checkpoint.interval=0", "logging.tensorboard=true")
    summary = train(cfg)
    records = read_metrics(cfg)
    assert [r["step"] for r in records] == list(range(1, 31))
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_sec", "consumed_samples"):
        assert key in records[0]
    assert records[-1]["consumed_samples"] == 30 * 4
    assert "val_loss" in records[2] and "val_loss" not in records[1]
    assert summary["last_loss"] < summary["first_loss"] - 1.0
    assert os.listdir(os.path.join(cfg.run.dir, "tensorboard"))
    assert os.path.isfile(os.path.join(cfg.run.dir, "config.yaml"))
    assert checkpoint.resolve("auto", cfg.checkpoint_dir).endswith("step_00000030")  # saved at the end


def test_same_seed_same_losses(tmp_path, tiny_corpus):
    a = tiny_config(tmp_path / "a", tiny_corpus)
    b = tiny_config(tmp_path / "b", tiny_corpus)
    train(a), train(b)
    assert [r["loss"] for r in read_metrics(a)] == [r["loss"] for r in read_metrics(b)]


MOE = ("model.moe.num_experts=4", "model.moe.capacity_factor=1.0", "model.moe.drop_policy=position")


@pytest.mark.parametrize("precision, distributed, model", [
    ("fp32", "false", ()), ("bf16", "false", ()), ("fp32", "true", ()), ("bf16", "true", MOE)])
def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, tiny_corpus, precision, distributed, model):
    extra = (f"precision.dtype={precision}", "model.gpas.enabled=true", f"optimizer.distributed={distributed}", *model)
    full = tiny_config(tmp_path / "full", tiny_corpus, *extra)
    train(full)
    part = tiny_config(tmp_path / "part", tiny_corpus, *extra, "train.stop_at_step=3", "checkpoint.interval=0")
    train(part)  # stops after step 3 and saves: the schedule still plans for 6 steps
    # the second half reads the same run folder and resumes from its latest checkpoint (step 3)
    rest = tiny_config(tmp_path / "part", tiny_corpus, *extra, "checkpoint.interval=0")
    trainer = Trainer(rest)
    assert trainer.step == 3 and trainer.loader.consumed_samples == 12
    trainer.run()
    expected = [(r["step"], r["loss"], r["grad_norm"], r.get("val_loss")) for r in read_metrics(full)]
    got = [(r["step"], r["loss"], r["grad_norm"], r.get("val_loss")) for r in read_metrics(rest)]
    assert got == expected  # bitwise: same floats


def test_keep_last_prunes_old_checkpoints(tmp_path, tiny_corpus):
    cfg = tiny_config(tmp_path, tiny_corpus, "train.iters=8", "checkpoint.interval=2", "checkpoint.keep_last=2")
    train(cfg)
    names = sorted(n for n in os.listdir(cfg.checkpoint_dir) if n.startswith("step_"))
    assert names == ["step_00000006", "step_00000008"]
    with open(os.path.join(cfg.checkpoint_dir, "latest")) as f:
        assert f.read().strip() == "step_00000008"


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, tiny_corpus, monkeypatch):
    cfg = tiny_config(tmp_path, tiny_corpus, "checkpoint.interval=2")
    trainer = Trainer(cfg)
    original = trainer.model.forward

    def poisoned(ids, positions=None, chunk=0, labels=None):
        out = original(ids, positions, chunk, labels=labels)  # with labels: the per-token losses
        return out * float("nan") if trainer.step >= 4 else out

    monkeypatch.setattr(trainer.model, "forward", poisoned)
    with pytest.raises(NonFiniteError, match="at step 5"):
        trainer.run()
    assert checkpoint.resolve("auto", cfg.checkpoint_dir).endswith("step_00000004")


def test_crash_during_save_keeps_the_last_good_checkpoint(tmp_path, tiny_corpus, monkeypatch):
    cfg = tiny_config(tmp_path, tiny_corpus, "train.iters=3", "checkpoint.interval=3")
    train(cfg)
    good = checkpoint.resolve("auto", cfg.checkpoint_dir)
    before = sorted(os.listdir(good))

    def crash(state_dict, checkpoint_id, **kwargs):
        os.makedirs(checkpoint_id, exist_ok=True)
        with open(os.path.join(checkpoint_id, "__0_0.distcp"), "wb") as f:
            f.write(b"half a shard")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.dcp, "save", crash)
    more = tiny_config(tmp_path, tiny_corpus, "train.iters=6", "checkpoint.interval=3")
    with pytest.raises(OSError, match="disk full"):
        train(more)
    monkeypatch.undo()
    assert checkpoint.resolve("auto", cfg.checkpoint_dir) == good
    assert sorted(os.listdir(good)) == before
    resumed = Trainer(tiny_config(tmp_path, tiny_corpus, "train.iters=6"))  # and it still loads
    assert resumed.step == 3


def test_checkpoint_of_another_model_is_refused(tmp_path, tiny_corpus):
    train(tiny_config(tmp_path, tiny_corpus, "train.iters=3"))
    with pytest.raises(CheckpointError, match="hidden_size 32 .checkpoint. vs 64 .config."):
        Trainer(tiny_config(tmp_path, tiny_corpus, "model.hidden_size=64"))
    with pytest.raises(CheckpointError, match="moe None .checkpoint."):
        Trainer(tiny_config(tmp_path, tiny_corpus, "model.moe.num_experts=4"))


def test_evaluation_reads_every_validation_batch(tmp_path, tiny_corpus):
    from data.loader import eval_batches

    trainer = Trainer(tiny_config(tmp_path, tiny_corpus, "eval.iters=3", "train.micro_batch_size=2"))
    stream, t = trainer.data.validation[0], trainer.cfg.train
    batches = list(eval_batches(stream, t.global_batch_size, t.micro_batch_size, iters=3, dp_rank=0, dp_size=1))
    assert len(batches) == 6
    trainer.model.eval()
    with torch.no_grad():
        expected = sum(float(trainer.stage_forward(b, None)) for b in batches) / len(batches)
    (got,) = trainer.evaluate().values()
    assert got == pytest.approx(expected, rel=1e-6)


def test_missing_checkpoint_path_is_an_error(tmp_path, tiny_corpus):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        Trainer(tiny_config(tmp_path, tiny_corpus, f"checkpoint.resume={tmp_path / 'nope'}"))


def test_unwritable_checkpoint_folder_fails_before_training(tmp_path, tiny_corpus):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(CheckpointError, match="not writable"):
        Trainer(tiny_config(tmp_path, tiny_corpus, f"checkpoint.dir={blocker / 'ckpt'}"))


def test_gpas_gate_gradient_clipping_is_separate(tmp_path, tiny_corpus):
    cfg = tiny_config(tmp_path, tiny_corpus, "model.gpas.enabled=true", "model.gpas.gate_grad_clip=1e-6",
                      "train.grad_clip=0")
    trainer = Trainer(cfg)
    trainer.forward_backward()
    trainer.clip_gradients()
    gates = torch.stack([p.main_grad for n, p in trainer.model.named_parameters() if n.endswith("gate")])
    assert 0 < gates.norm() <= 1e-6 * (1 + 1e-4)
    others = [p.main_grad for n, p in trainer.model.named_parameters() if not n.endswith("gate")]
    assert torch.nn.utils.get_total_norm(others) > 1e-3  # not clipped with the gates


def test_time_limit_saves_and_stops(tmp_path, tiny_corpus):
    cfg = tiny_config(tmp_path, tiny_corpus, "train.time_limit_minutes=1e-9", "checkpoint.interval=0",
                      "checkpoint.save_at_end=false")
    assert train(cfg)["step"] == 1
    assert checkpoint.resolve("auto", cfg.checkpoint_dir).endswith("step_00000001")


def test_resume_mid_logging_window_logs_the_same_records(tmp_path, tiny_corpus):
    extra = ("logging.interval=4", "eval.interval=0", "checkpoint.interval=0", "train.iters=8")
    full = tiny_config(tmp_path / "full", tiny_corpus, *extra)
    train(full)
    part = tiny_config(tmp_path / "part", tiny_corpus, *extra, "train.stop_at_step=3")
    train(part)
    with open(os.path.join(part.run.dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 5, "loss": 0.0}) + "\n")  # a record past the checkpoint: must go
    train(tiny_config(tmp_path / "part", tiny_corpus, *extra))
    strip = lambda records: [(r["step"], r["loss"], r["grad_norm"]) for r in records]  # noqa: E731
    assert strip(read_metrics(part)) == strip(read_metrics(full))
    assert [r["step"] for r in read_metrics(full)] == [4, 8]


def test_fresh_run_over_a_folder_with_checkpoints_is_refused(tmp_path, tiny_corpus):
    cfg = tiny_config(tmp_path, tiny_corpus, "train.iters=6")
    train(cfg)
    with pytest.raises(CheckpointError, match="already holds step_00000006, ahead of step 0"):
        Trainer(tiny_config(tmp_path, tiny_corpus, "checkpoint.resume=none"))
    older = os.path.join(cfg.checkpoint_dir, "step_00000003")
    with pytest.raises(CheckpointError, match="ahead of step 3"):
        Trainer(tiny_config(tmp_path, tiny_corpus, f"checkpoint.resume={older}"))
    assert sorted(os.listdir(cfg.checkpoint_dir)) == ["latest", "step_00000003", "step_00000006"]


def test_a_corrupt_meta_is_damage_auto_resume_goes_past(tmp_path, tiny_corpus, capsys):
    """A meta.json cut short (a crash while it was written): an explicit resume is refused in one line; auto
    sets the checkpoint aside and takes the one before, and with none left says so."""
    cfg = tiny_config(tmp_path, tiny_corpus, "train.iters=6", "checkpoint.interval=3", "checkpoint.keep_last=2")
    train(cfg)
    newest = os.path.join(cfg.checkpoint_dir, "step_00000006")
    with open(os.path.join(newest, "meta.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(CheckpointError, match="step_00000006/meta.json is corrupt"):
        Trainer(tiny_config(tmp_path, tiny_corpus, "train.iters=9", f"checkpoint.resume={newest}"))
    capsys.readouterr()
    trainer = Trainer(tiny_config(tmp_path, tiny_corpus, "train.iters=9"))
    assert trainer.step == 3 and "step_00000006 is damaged (its meta.json is unreadable: " in capsys.readouterr().out
    with open(os.path.join(cfg.checkpoint_dir, "step_00000003", "meta.json"), "w") as f:
        f.write("")
    with pytest.raises(CheckpointError, match="no intact checkpoint is left"):
        Trainer(tiny_config(tmp_path, tiny_corpus, "train.iters=9"))
    assert sorted(os.listdir(cfg.checkpoint_dir)) == ["latest", "step_00000003.damaged", "step_00000006.damaged"]


def test_a_step_damaged_twice_keeps_both_copies(tmp_path, tiny_corpus):
    cfg = tiny_config(tmp_path, tiny_corpus, "train.iters=6", "checkpoint.interval=3", "checkpoint.keep_last=3")
    train(cfg)
    for _ in range(2):
        newest = os.path.join(cfg.checkpoint_dir, "step_00000006")
        (shard,) = [n for n in os.listdir(newest) if n.endswith(".distcp")]
        with open(os.path.join(newest, shard), "r+b") as f:
            f.truncate(10)
        train(tiny_config(tmp_path, tiny_corpus, "train.iters=6", "checkpoint.interval=3", "checkpoint.keep_last=3"))
    assert sorted(n for n in os.listdir(cfg.checkpoint_dir) if "damaged" in n) == [
        "step_00000006.damaged", "step_00000006.damaged-2"]


def test_a_checkpoint_of_the_old_format_is_refused_in_one_line(tmp_path, tiny_corpus):
    cfg = tiny_config(tmp_path, tiny_corpus, "train.iters=3")
    train(cfg)
    meta_path = os.path.join(cfg.checkpoint_dir, "step_00000003", "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    with open(meta_path, "w") as f:  # as format 1 wrote it: no format, no manifest
        json.dump({k: v for k, v in meta.items() if k not in ("format", "files")}, f)
    with pytest.raises(CheckpointError, match="step_00000003 is in checkpoint format 1 .* reads format 2") as err:
        Trainer(tiny_config(tmp_path, tiny_corpus, "train.iters=6"))
    assert "\n" not in str(err.value)


def test_a_damaged_checkpoint_is_named_and_auto_resume_takes_the_newest_intact_one(tmp_path, tiny_corpus, capsys):
    """What a new user does: truncate the latest checkpoint's shard file and resume. The run says which file of
    which checkpoint is damaged, sets it aside (never deletes it) and resumes from the one before; an explicit
    resume from a damaged checkpoint is refused in one line, and so is a flipped byte of the same size."""
    cfg = tiny_config(tmp_path, tiny_corpus, "train.iters=6", "checkpoint.interval=3", "checkpoint.keep_last=2")
    train(cfg)
    latest = os.path.join(cfg.checkpoint_dir, "step_00000006")
    (shard,) = [n for n in os.listdir(latest) if n.endswith(".distcp")]
    size = os.path.getsize(os.path.join(latest, shard))
    with open(os.path.join(latest, shard), "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match=f"checkpoint.resume=.*step_00000006.*damaged .{shard} has 100 bytes, "
                                              f"{size} were written"):
        Trainer(tiny_config(tmp_path, tiny_corpus, "train.iters=9", f"checkpoint.resume={latest}"))
    capsys.readouterr()
    trainer = Trainer(tiny_config(tmp_path, tiny_corpus, "train.iters=9"))
    assert f"step_00000006 is damaged ({shard} has 100 bytes" in capsys.readouterr().out
    assert trainer.step == 3 and trainer.resume_from.endswith("step_00000003")
    assert os.path.getsize(os.path.join(latest + ".damaged", shard)) == 100  # kept as it was
    with open(os.path.join(cfg.checkpoint_dir, "latest")) as f:
        assert f.read().strip() == "step_00000003"
    trainer.run()
    assert sorted(os.listdir(cfg.checkpoint_dir)) == ["latest", "step_00000006", "step_00000006.damaged",
                                                      "step_00000009"]  # pruning never takes the damaged one
    meta_path = os.path.join(cfg.checkpoint_dir, "step_00000009")
    with open(os.path.join(meta_path, shard), "r+b") as f:  # the same size, one byte changed
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(CheckpointError, match=f"{shard} does not have the checksum it was written with"):
        Trainer(tiny_config(tmp_path, tiny_corpus, "train.iters=12", f"checkpoint.resume={meta_path}"))


def test_an_unreadable_checkpoint_is_one_line_and_a_bug_is_not(tmp_path, tiny_corpus, monkeypatch):
    """A shard that DCP cannot read though its manifest agrees (written so by something else) is bad input (one
    line); an error in the code that uses what was read is a bug and keeps its own type and traceback, not
    relabelled 'cannot load the checkpoint'."""
    cfg = tiny_config(tmp_path, tiny_corpus, "train.iters=3")
    train(cfg)
    folder = os.path.join(cfg.checkpoint_dir, "step_00000003")
    shards = [os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".distcp")]
    backup = {path: open(path, "rb").read() for path in shards}
    for path in shards:
        with open(path, "r+b") as f:
            f.truncate(100)
    meta = checkpoint.read_meta(folder)
    checkpoint.seal(folder, {k: v for k, v in meta.items() if k != "files"})  # the truncated files, recorded
    with pytest.raises(CheckpointError, match="step_00000003: cannot load the checkpoint"):
        Trainer(tiny_config(tmp_path, tiny_corpus, "train.iters=6"))
    for path, data in backup.items():
        with open(path, "wb") as f:
            f.write(data)
    checkpoint.seal(folder, meta, files=meta["files"])

    def broken(self, pieces):
        raise KeyError("a bug")

    monkeypatch.setattr("parallel.optimizer.PlainAdamW.load_state_pieces", broken)
    with pytest.raises(KeyError, match="a bug"):
        Trainer(tiny_config(tmp_path, tiny_corpus, "train.iters=6"))


def test_infinite_gradient_stops_before_the_update(tmp_path, tiny_corpus):
    trainer = Trainer(tiny_config(tmp_path, tiny_corpus))
    before = trainer.model.embedding.weight.detach().clone()
    trainer.model.embedding.weight.register_hook(lambda g: g * float("inf"))
    with pytest.raises(NonFiniteError, match="gradient norm is .* at step 1"):
        trainer.train_step()
    assert torch.equal(trainer.model.embedding.weight, before)


def test_token_ids_outside_the_vocabulary_are_a_data_error(tmp_path, tiny_corpus):
    import numpy as np

    from data.indexed import write_indexed_dataset

    prefix = str(tmp_path / "gpt2ish")  # ids from a larger vocabulary than the byte tokenizer's
    write_indexed_dataset(prefix, [np.arange(i, i + 60) * 97 % 50000 for i in range(40)], np.uint16)
    trainer = Trainer(tiny_config(tmp_path, prefix))
    with pytest.raises(DatasetError, match="outside the model's 320 ids"):
        trainer.train_step()


def test_saved_config_is_resolved(tmp_path, tiny_corpus):
    cfg = tiny_config(tmp_path, tiny_corpus, "train.iters=2")
    train(cfg)
    from pretrain.config_loading import load_config

    saved = load_config(os.path.join(cfg.run.dir, "config.yaml"))
    assert saved.model.vocab_size == 320 and saved.model.num_query_groups == 2 and saved.model.ffn_hidden_size == 128


def two_phase(tmp_path, corpus, *extra):
    sources = f"data.sources={{one: {{prefixes: [{corpus}]}}, two: {{prefixes: [{corpus}], weights: [1]}}}}"
    phases = "data.phases=[{name: early, fraction: 0.5, weights: {one: 3, two: 1}}, {name: late, weights: {two: 1}}]"
    return tiny_config(tmp_path, corpus, sources, phases, *extra)


def test_phase_and_tokens_by_source_are_logged(tmp_path, tiny_corpus):
    cfg = two_phase(tmp_path, tiny_corpus)
    train(cfg)
    records = read_metrics(cfg)
    assert [r["phase"] for r in records] == ["early"] * 3 + ["late"] * 3
    assert [r["phase_index"] for r in records] == [0] * 3 + [1] * 3
    assert records[2]["tokens_by_source"] == {"one": 9 * 16, "two": 3 * 16}
    assert records[5]["tokens_by_source"] == {"one": 9 * 16, "two": 15 * 16}
    assert set(records[2]["val_loss_by_source"]) == {"one", "two"}


def test_resume_inside_the_second_phase_is_exact(tmp_path, tiny_corpus):
    full = two_phase(tmp_path / "full", tiny_corpus, "checkpoint.interval=0")
    train(full)
    train(two_phase(tmp_path / "part", tiny_corpus, "checkpoint.interval=0", "train.stop_at_step=4"))
    rest = two_phase(tmp_path / "part", tiny_corpus, "checkpoint.interval=0")
    train(rest)
    keys = ("step", "loss", "grad_norm", "phase", "tokens_by_source", "val_loss")
    assert [[r.get(k) for k in keys] for r in read_metrics(rest)] == [
        [r.get(k) for k in keys] for r in read_metrics(full)]


def test_resume_with_other_data_settings_is_refused(tmp_path, tiny_corpus):
    train(tiny_config(tmp_path, tiny_corpus, "train.iters=3"))
    with pytest.raises(CheckpointError, match="other data settings"):
        Trainer(tiny_config(tmp_path, tiny_corpus, "train.iters=6", "run.seed=99"))
    Trainer(tiny_config(tmp_path, tiny_corpus, "train.iters=6"))  # one phase: a longer run reads the same stream


def _saved(folder: str) -> dict:
    return checkpoint.read_tensors(folder, sorted(checkpoint.saved_tensors(folder)))


def test_async_save_writes_what_a_blocking_save_writes_and_resumes_exactly(tmp_path, tiny_corpus, monkeypatch):
    """Saves written in the background while the next steps change the weights hold the weights of their step
    (they were copied first): the same tensors as blocking saves, and a resume from them continues bitwise."""
    extra = ("train.iters=6", "checkpoint.interval=2", "checkpoint.keep_last=3", "eval.interval=0")
    blocking = tiny_config(tmp_path / "blocking", tiny_corpus, *extra)
    train(blocking)
    background = tiny_config(tmp_path / "background", tiny_corpus, *extra, "checkpoint.async_save=true")
    real = checkpoint.dcp.save

    def slow(state, **kwargs):  # the writer starts only once the next step has changed the weights
        time.sleep(0.5)
        return real(state, **kwargs)

    monkeypatch.setattr(checkpoint.dcp, "save", slow)
    train(background)
    monkeypatch.setattr(checkpoint.dcp, "save", real)
    for step in ("step_00000002", "step_00000004", "step_00000006"):
        one, other = (_saved(os.path.join(c.checkpoint_dir, step)) for c in (blocking, background))
        assert one.keys() == other.keys() and all(torch.equal(one[k], other[k]) for k in one), step
    with open(os.path.join(background.checkpoint_dir, "latest")) as f:
        assert f.read().strip() == "step_00000006"
    for folder, more in (("blocking", ()), ("background", ("checkpoint.async_save=true",))):
        train(tiny_config(tmp_path / folder, tiny_corpus, *extra[1:], *more, "train.iters=8"))
    def losses(cfg):
        return [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(cfg)]

    assert losses(blocking) == losses(background) and len(losses(blocking)) == 8


def test_a_failed_background_write_keeps_the_last_good_checkpoint(tmp_path, tiny_corpus, monkeypatch):
    cfg = tiny_config(tmp_path, tiny_corpus, "train.iters=4", "checkpoint.interval=2", "checkpoint.async_save=true")
    real, calls = checkpoint.dcp.save, []

    def failing(state, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(state, **kwargs)

    monkeypatch.setattr(checkpoint.dcp, "save", failing)
    with pytest.raises(CheckpointError, match="step_00000004 could not be written; the previous checkpoints are "
                                              "intact .OSError: .Errno 28. No space left on device"):
        train(cfg)
    assert checkpoint.resolve("auto", cfg.checkpoint_dir).endswith("step_00000002")
