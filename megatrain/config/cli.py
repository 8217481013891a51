"""``--config FILE`` plus ``--section.key=value`` from a command line → a validated Config, or one line and exit 2.

The deepspeed launcher appends ``--local_rank=N``; it is accepted and consumed here. Every entry point parses
through this one function (launch/*.py via megatrain.cli_args, and rank entries such as megatrain.plan.measure)."""
from __future__ import annotations

import argparse
import sys

from megatrain.config.loader import load_config
from megatrain.config.schema import Config
from megatrain.errors import ConfigError


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (its default prints the usage block first)."""

    def error(self, message: str):
        print(f"error: {message}; see --help", file=sys.stderr)
        raise SystemExit(2)


def parse(argv: list[str] | None = None, *, description: str, extra: list[tuple[str, dict]] = ()):
    """Returns (config, namespace of the extra flags, local_rank or None)."""
    parser = _Parser(description=description, allow_abbrev=False,
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
