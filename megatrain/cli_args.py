"""Command-line parsing shared by every launch/ script: ``--config FILE`` plus ``--section.key=value``.

The deepspeed launcher appends ``--local_rank=N``; it is accepted and consumed here."""
from __future__ import annotations

import argparse
import sys

from megatrain.config import Config, ConfigError, load_config


def parse(argv: list[str] | None = None, *, description: str, extra: list[tuple[str, dict]] = ()):
    """Returns (config, namespace of the extra flags, local_rank or None)."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                     epilog="Any config field can be overridden: --train.lr=1e-3 --parallel.tp=2")
    parser.add_argument("--config", help="YAML recipe (recipes/*.yaml)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    for flag, kwargs in extra:
        parser.add_argument(flag, **kwargs)
    args, rest = parser.parse_known_args(argv)
    try:
        cfg: Config = load_config(args.config, rest)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return cfg, args, args.local_rank


def fail(err: Exception) -> None:
    """One line on stderr and exit 2 for user errors (no traceback wall for a typo)."""
    print(f"error: {err}", file=sys.stderr)
    raise SystemExit(2)
