"""`python -m tools.blend_plan CONFIG.yaml [section.key=value ...]`: what a run's data schedule will read.

Per phase and source: samples and tokens taken, realised share against the target, and
epochs of the source read so far; then the totals of the run. Exits non-zero with one
line naming the problem when a source path is missing, a phase does not fit the run, or
a source would be read more than its `max_epochs`. Opens only the `.idx` files.
"""

from __future__ import annotations

import sys

from pretrain.cli import USER_ERRORS, print_error
from pretrain.config_loading import load_config
from pretrain.trainer import load_tokenizer, plan_data


def main(argv: list[str]) -> int:
    paths = [a for a in argv if "=" not in a]
    overrides = [a for a in argv if "=" in a]
    if len(paths) > 1 or any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 0 if paths == ["-h"] or paths == ["--help"] else 2
    try:
        cfg = load_config(paths[0] if paths else None, overrides).validate()
        plan = plan_data(cfg, load_tokenizer(cfg))
    except USER_ERRORS as err:
        print_error("blend_plan", err)
        return 1
    t = cfg.train
    print(f"{t.iters} steps x {t.global_batch_size} sequences x {cfg.model.seq_length} tokens = "
          f"{t.iters * t.global_batch_size * cfg.model.seq_length:,} training tokens")
    print(plan.report())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
