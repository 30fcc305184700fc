"""`python -m pretrain [CONFIG.yaml] [section.key=value ...]`: train; with no config, the CPU quickstart.

Bad input ends with one line naming the problem and a non-zero exit; `run.debug=true`
shows the traceback instead. Under torchrun the line is printed once, not by every rank:
an error of the config or the layout (raised before the process group starts, the same on
every rank) by rank 0, a later one by the first rank that has it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "quickstart.yaml"
USAGE = "usage: python -m pretrain [CONFIG.yaml] [section.key=value ...]  (no config: examples/quickstart.yaml)"

# A rank other than 0 with an error from before the process group starts leaves it to rank 0 and waits this long
# before ending: torchrun (and srun --kill-on-bad-exit) stop every rank once one has ended, which could otherwise
# stop rank 0 before it prints. They stop this rank as soon as rank 0 has ended; a rank still running after the
# wait had an error that rank 0 did not have (a file its node lacks, say) and prints it.
QUIET_WAIT_SECONDS = 30


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\n\nEvery field and its default is listed in the README's config reference.")
        return 0
    overrides = [a for a in argv if "=" in a]
    paths = [a for a in argv if "=" not in a]
    debug = any(a.startswith("run.debug=") and _yaml_true(a.partition("=")[2]) for a in overrides)
    if len(paths) > 1:
        print(f"foldtron: error: expected at most one config file, got {paths}\n{USAGE}", file=sys.stderr)
        return 2
    if not paths and not QUICKSTART.is_file():
        print(f"foldtron: error: {QUICKSTART} not found: the quickstart runs from a source checkout "
              "(pip install -e .); or pass a config file", file=sys.stderr)
        return 2
    path = paths[0] if paths else str(QUICKSTART)
    from pretrain import distributed
    from pretrain.cli import USER_ERRORS
    from pretrain.config_loading import load_config
    from pretrain.trainer import train

    world_size, rank = distributed.world_from_env()
    who = f"foldtron (rank {rank}/{world_size})" if world_size > 1 else "foldtron"
    try:
        cfg = load_config(path, overrides)
        debug = cfg.run.debug
        serialize_kernel_launches(cfg)
        train(cfg, world_size, rank)
    except KeyboardInterrupt:
        print(f"{who}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug or not isinstance(err, USER_ERRORS):
            raise
        report(err, world_size, rank)
        return 1
    finally:
        distributed.shutdown()
    return 0


def serialize_kernel_launches(cfg) -> None:
    """CUDA_DEVICE_MAX_CONNECTIONS=1 under sequence parallelism (tensor > 1), unless the environment sets it.

    With one hardware queue per GPU, kernels start in the order the host issued them, whatever their stream: a
    collective issued before a matmul starts before it and takes its share of the GPU, instead of waiting
    behind it, so the communication that sequence parallelism and the gradient buckets run next to compute
    really overlaps it (Megatron-LM asks for the same setting for sequence parallelism). CUDA reads the
    variable when it creates its context, so it is set here, before the trainer first touches CUDA (the
    launchers start `-m pretrain`: this covers torchrun and Slurm alike). Without sequence parallelism
    several queues let independent streams run freely, and the variable is left alone."""
    p = cfg.parallel
    if p.sequence_parallel and p.tensor > 1:
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")


def report(err: Exception, world_size: int, rank: int, *, program: str = "foldtron") -> None:
    """The error line, once over the ranks. Before the process group starts, an error comes from the config and
    the layout, the same on every rank: rank 0 prints it (the others wait, see QUIET_WAIT_SECONDS). From then on
    the ranks can fail differently: each different line is printed by the first rank that has it. `program`
    names the command in the line (a tool's name)."""
    from pretrain import distributed
    from pretrain.cli import one_line, print_error

    who = f"{program} (rank {rank}/{world_size})"
    if world_size == 1:
        print_error(program, err)
    elif distributed.started():
        if distributed.first_to_report(one_line(err)):
            print_error(who, err)
    elif rank == 0:
        print_error(program, err)
    else:
        with contextlib.suppress(KeyboardInterrupt):
            time.sleep(QUIET_WAIT_SECONDS)
            print_error(who, err)


def _yaml_true(text: str) -> bool:
    import yaml

    try:
        return yaml.safe_load(text) is True
    except yaml.YAMLError:
        return False


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
