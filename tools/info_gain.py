"""`python -m tools.info_gain CONFIG.yaml [section.key=value ...] --checkpoint PATH`: how much a checkpoint's own
thoughts help it predict held-out text, the quantity RLP trains.

On the held-out documents of the config's data (its validation sets), at positions drawn as RLP draws them, the
model samples G thoughts per context with the config's `objective.rlp` settings and the tool reports
log p(x_t | x_<t, <think> c </think>) - log p(x_t | x_<t), both under the checkpoint's weights, averaged over
positions and thoughts (in nats): positive where thinking helps. It is RLP's reward with the teacher set to
the model itself, on data the run did not train on. Run it on the checkpoints of a run before and after RLP,
and after continued next-token pretraining, to compare them (examples/rlp.yaml shows how).

`--batches N`: validation global batches per validation set (default: the config's eval.iters). `--json PATH`:
also write the numbers as JSON. One rank, on the config's device.
"""

from __future__ import annotations

import json
import sys
import tempfile

import torch

from data.loader import eval_batches
from pretrain.cli import ArgumentParser, config_and_overrides, parse_command, run_tool
from pretrain.config import ConfigError
from pretrain.config_loading import load_config
from pretrain.trainer import Trainer

USAGE = ("usage: python -m tools.info_gain CONFIG.yaml [section.key=value ...] --checkpoint PATH [--batches N] "
         "[--json PATH]")


def _parse(argv: list[str]):
    parser = ArgumentParser(add_help=False)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--batches", type=int)
    parser.add_argument("--json")
    args, rest = parser.parse_known_args(argv)
    args.config, args.overrides = config_and_overrides(rest)
    return args


@torch.no_grad()
def information_gain(trainer: Trainer, *, batches: int) -> dict:
    """The mean over held-out positions and sampled thoughts of log p(x_t | x_<t, c) - log p(x_t | x_<t), with the
    trainer's weights for both (its RLP teacher is set to them), and its parts."""
    objective, t = trainer.rlp, trainer.cfg.train
    objective.teacher.reset()
    rewards, with_thought, without, lengths = [], [], [], []
    for stream in trainer.data.validation:
        held_out = eval_batches(stream, t.global_batch_size, t.micro_batch_size, iters=batches, dp_rank=0, dp_size=1)
        for i, batch in enumerate(held_out):
            rollout = objective.rollout(batch, step=0, micro_batch=i)
            objective.loss(rollout)  # fills the rewards (no gradients here)
            rewards.append(rollout.rewards)
            with_thought.append(rollout.rewards + rollout.teacher_logp.repeat_interleave(objective.cfg.group_size))
            without.append(rollout.teacher_logp)
            lengths.append(rollout.rows.thought_mask.sum(-1).float())
    objective.metrics()  # drop the statistics the rollouts recorded
    if not rewards:
        raise ConfigError("the config's data has no held-out documents (data.split or data.validation): the gain is "
                          "measured on text the run did not train on")
    r = torch.cat(rewards)
    return {"information_gain": float(r.mean()), "positive_fraction": float((r > 0).float().mean()),
            "logp_with_thought": float(torch.cat(with_thought).mean()),
            "logp_without": float(torch.cat(without).mean()),
            "thought_length": float(torch.cat(lengths).mean()), "positions": int(torch.cat(without).numel()),
            "thoughts": int(r.numel())}


def measure(config: str | None, overrides: list[str], checkpoint: str, *, batches: int | None = None) -> dict:
    """`information_gain` of `checkpoint` under the config's RLP settings and validation data, and the config."""
    with tempfile.TemporaryDirectory() as scratch:  # the trainer's run folder: nothing is trained or saved
        cfg = load_config(config, overrides + [
            "objective.name=rlp", f"checkpoint.init_from={checkpoint}", "checkpoint.resume=none",
            f"run.dir={scratch}", "checkpoint.dir=null", "logging.tensorboard=false", "data.prefetch=0",
            "eval.interval=1"])  # the trainer opens the held-out streams for evaluation only
        trainer = Trainer(cfg)
        try:
            result = information_gain(trainer, batches=batches or cfg.eval.iters)
        finally:
            trainer.loader.close()
    return {**result, "checkpoint": trainer.init_from, "group_size": cfg.objective.rlp.group_size}


def main(argv: list[str]) -> int:
    args = parse_command(argv, _parse, program="info_gain", usage=USAGE)
    if isinstance(args, int):
        return args

    def work(world_size: int, rank: int) -> None:
        result = measure(args.config, args.overrides, args.checkpoint, batches=args.batches)
        print(f"{result['checkpoint']}: held-out information gain {result['information_gain']:+.4f} nats per "
              f"position (log p with a thought {result['logp_with_thought']:.4f}, without "
              f"{result['logp_without']:.4f}; {result['positive_fraction']:.0%} of thoughts help; thoughts of "
              f"{result['thought_length']:.1f} tokens) over {result['positions']} positions x "
              f"{result['group_size']} thoughts")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)

    return run_tool("info_gain", work)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
