"""A language-modelling task on packed, loss-masked rows built in memory (what SFT data gives the trainer), and a
script entry point that trains it on real ranks: ``python tests/dist/packed_task.py [--section.key=value ...]``.

Each row packs several documents (``segments`` ids, ``positions`` restarting at 0); a document's first tokens are a
"prompt" whose labels are -100, and its last token has no target. Rows hold very different numbers of label
tokens (every fourth row almost none), so a mean of micro-batch means differs from the global token mean.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatrain.train.lm_task import LanguageModelingTask  # noqa: E402

ROWS = 48


def packed_row(index: int, seq_len: int, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + index)
    ids = torch.randint(0, vocab, (seq_len,), generator=g)
    labels = torch.full((seq_len,), -100, dtype=torch.long)
    positions = torch.zeros(seq_len, dtype=torch.long)
    segments = torch.zeros(seq_len, dtype=torch.long)
    start, doc = 0, 0
    while start < seq_len:
        n = min(int(torch.randint(3, seq_len // 2 + 1, (1,), generator=g)), seq_len - start)
        prompt = n - 1 if index % 4 == 0 else int(torch.randint(0, n, (1,), generator=g))  # masked part
        positions[start:start + n] = torch.arange(n)
        segments[start:start + n] = doc
        for t in range(start + prompt, start + n - 1):  # next token of the same document
            labels[t] = ids[t + 1]
        start, doc = start + n, doc + 1
    return {"input_ids": ids, "labels": labels, "positions": positions, "segments": segments}


class PackedRows(torch.utils.data.Dataset):
    def __init__(self, seq_len: int, vocab: int, rows: int = ROWS):
        self.seq_len, self.vocab, self.rows = seq_len, vocab, rows

    def __len__(self):
        return self.rows

    def __getitem__(self, i):
        return packed_row(i, self.seq_len, self.vocab)


class PackedMaskedTask(LanguageModelingTask):
    def train_dataset(self):
        return PackedRows(self.cfg.seq_len, self.cfg.model.vocab_size)

    def val_dataset(self):
        return PackedRows(self.cfg.seq_len, self.cfg.model.vocab_size, rows=16)


def true_token_mean(model, rows: list[dict]) -> float:
    """Σ CE over every label token of ``rows`` / their number: the loss the step must report."""
    batch = torch.utils.data.default_collate(rows)
    with torch.no_grad():
        logits = model(batch["input_ids"], positions=batch["positions"], segments=batch["segments"])
    labels = batch["labels"].reshape(-1)
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels,
                                                   reduction="sum") / (labels != -100).sum())


def main(argv=None):
    from megatrain.cli_args import parse
    from megatrain.distributed.env import shutdown_distributed
    from megatrain.train.trainer import Trainer
    cfg, _, local_rank = parse(argv, description=__doc__)
    trainer = Trainer(cfg, PackedMaskedTask(cfg), local_rank=local_rank)
    trainer.run()
    shutdown_distributed()


if __name__ == "__main__":
    main()
