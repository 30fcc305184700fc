"""`python -m pretrain [CONFIG.yaml] [section.key=value ...]`: train; with no config, the CPU quickstart.

Bad input ends with one line naming the problem and a non-zero exit; `run.debug=true`
shows the traceback instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "quickstart.yaml"
USAGE = "usage: python -m pretrain [CONFIG.yaml] [section.key=value ...]  (no config: examples/quickstart.yaml)"


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
    from pretrain.cli import USER_ERRORS, print_error
    from pretrain.config_loading import load_config
    from pretrain.trainer import train

    world_size, rank = distributed.world_from_env()
    who = f"foldtron (rank {rank}/{world_size})" if world_size > 1 else "foldtron"  # every rank's errors show
    try:
        cfg = load_config(path, overrides)
        debug = cfg.run.debug
        train(cfg, world_size, rank)
    except KeyboardInterrupt:
        print(f"{who}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug or not isinstance(err, USER_ERRORS):
            raise
        print_error(who, err)
        return 1
    finally:
        distributed.shutdown()
    return 0


def _yaml_true(text: str) -> bool:
    import yaml

    try:
        return yaml.safe_load(text) is True
    except yaml.YAMLError:
        return False


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
