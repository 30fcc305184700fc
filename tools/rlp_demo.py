"""`python -m tools.rlp_demo OUT [--pretrain-steps N] [--steps M]`: RLP where thinking can help, on the CPU.

1. Pretrain a small model with next-token prediction on `embedded:digits-think` (examples/rlp_pretrain.yaml):
   digit-sum problems, a share of them with the worked running sums inside `<think>` spans, so the model
   learns that a thought can carry the answer.
2. From that checkpoint, M steps of RLP on `embedded:digits`, the same kind of documents without thoughts
   (examples/rlp.yaml); and, for comparison, M steps of continued next-token pretraining on the same
   samples (the same config with objective.name=ntp).
3. The held-out information gain (tools/info_gain.py) of the three checkpoints, on held-out `digits`
   documents: log p(x_t | x_<t, c) - log p(x_t | x_<t), the model's own thoughts sampled as in training.

Prints the reward curve of the RLP run (mean reward per logged step, from its metrics.jsonl) and a table of
the three checkpoints. A stage whose run folder under OUT already holds its last checkpoint is not run again.
`--json PATH` writes the numbers. Overrides `section.key=value` apply to the RLP and NTP runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys

from pretrain.cli import ArgumentParser, parse_command, run_tool
from pretrain.config_loading import load_config
from pretrain.trainer import train
from tools.info_gain import measure

USAGE = "usage: python -m tools.rlp_demo OUT [--pretrain-steps N] [--steps M] [--json PATH] [section.key=value ...]"
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
PRETRAIN, RLP = os.path.join(EXAMPLES, "rlp_pretrain.yaml"), os.path.join(EXAMPLES, "rlp.yaml")


def _parse(argv: list[str]):
    parser = ArgumentParser(add_help=False)
    parser.add_argument("out")
    parser.add_argument("--pretrain-steps", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--json")
    parser.add_argument("--quiet", action="store_true")  # the runs' own output hidden (tests)
    args, overrides = parser.parse_known_args(argv)
    if any("=" not in o for o in overrides):
        parser.error(f"unexpected arguments {[o for o in overrides if '=' not in o]}")
    args.overrides = overrides
    return args


def _run(cfg, quiet: bool) -> None:
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        train(cfg)


def reward_curve(run_dir: str) -> list[tuple[int, float]]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [(r["step"], r["rlp_reward"]) for r in records if "rlp_reward" in r]


def demo(out: str, *, pretrain_steps: int | None, steps: int | None, overrides: list[str], quiet: bool) -> dict:
    pre = [f"run.dir={out}/pretrain"] + ([f"train.iters={pretrain_steps}"] if pretrain_steps else [])
    _run(load_config(PRETRAIN, pre), quiet)
    start = f"checkpoint.init_from={out}/pretrain/checkpoints"
    later = [start] + ([f"train.iters={steps}"] if steps else []) + overrides
    runs = {"rlp": later + [f"run.dir={out}/rlp"], "ntp": later + [f"run.dir={out}/ntp", "objective.name=ntp"]}
    for name, run in runs.items():
        _run(load_config(RLP, run), quiet)
    gains = {name: measure(RLP, overrides, f"{out}/{name}/checkpoints") for name in ("pretrain", "rlp", "ntp")}
    return {"reward_curve": reward_curve(f"{out}/rlp"), "information_gain": gains}


def report(result: dict) -> str:
    lines = ["RLP mean reward (information gain on the training contexts) by step:"]
    lines += [f"  step {step:>4}: {reward:+.4f}" for step, reward in result["reward_curve"]]
    lines += ["", "held-out information gain (nats per position; log p(x_t) with the model's own thought, without):",
              f"  {'checkpoint':<28} {'gain':>8} {'with':>8} {'without':>8} {'helps':>6} {'thought':>8}"]
    names = {"pretrain": "pretrained (NTP, with thoughts)", "rlp": "+ RLP", "ntp": "+ NTP, same tokens"}
    for name, g in result["information_gain"].items():
        lines.append(f"  {names[name]:<28} {g['information_gain']:>+8.4f} {g['logp_with_thought']:>8.4f} "
                     f"{g['logp_without']:>8.4f} {g['positive_fraction']:>6.0%} {g['thought_length']:>8.1f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_command(argv, _parse, program="rlp_demo", usage=USAGE)
    if isinstance(args, int):
        return args

    def work(world_size: int, rank: int) -> None:
        result = demo(args.out, pretrain_steps=args.pretrain_steps, steps=args.steps, overrides=args.overrides,
                      quiet=args.quiet)
        print(report(result))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)

    return run_tool("rlp_demo", work)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
