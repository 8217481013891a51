"""Prepare text data: `python launch/prepare.py --config recipes/X.yaml [--data.key=value ...] [--force]`.

--force (or --data.force_prepare=true) rebuilds even when data.path is up to date; a reused directory is
verified first (shard checksums, see docs/data.md) and rebuilt when a shard was changed.

Reads data.sources (text, folders, JSONL of {text}, {prompt, completion} or {messages} records, 'stdlib',
'chat_demo'), cleans and deduplicates, trains or loads the tokenizer, renders chats with data.chat_template, and
writes the .bin/.idx shards (plus a per-token loss .mask for SFT data) and meta.json under data.path (see
docs/data.md). A second run with the same data config reuses them."""
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatrain.errors import UserError  # noqa: E402
from megatrain.cli_args import fail, parse  # noqa: E402


def main(argv=None):
    cfg, args, _ = parse(argv, description=__doc__, extra=[
        ("--force", {"action": "store_true", "help": "prepare again even if data.path is up to date (same as "
                                                     "--data.force_prepare=true)"})])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if cfg.data.dataset != "tokens":  # image datasets are read directly; only text is prepared
        print(f"data.dataset={cfg.data.dataset} needs no prepare step; nothing to do")
        return
    from megatrain.data import prepare_corpus
    try:
        summary = prepare_corpus(cfg.data, seed=cfg.train.seed, force=args.force)
    except UserError as err:
        fail(err)
    summary.pop("config", None)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
