"""Held-out loss of a language model: any Transformer (or RNN LM) checkpoint, saved model or Hugging Face dir on
any prepared data directory or raw text/JSONL file.

Which data: ``--data.path`` when it is given (on the command line or in the ``--config`` recipe), else the data
the checkpoint was trained on. A prepared directory is scored on its validation split; a raw file (.txt,
.jsonl, ...) is prepared with the model's own tokenizer into ``<log.dir>/eval_data/<file name>`` (reused while
the file and settings are unchanged) with nothing held out, and scored whole. Samples come from the language
modelling task's dataset, so masked labels (-100) and packed documents (positions/segments) are what training
sees; the loss is the sum over counted labels divided by their number (megatrain.infer.lm_eval).

Which sizes: ``data.seq_len``, ``train.micro_batch_size`` and ``train.eval_batches`` when given, else the
checkpoint's sequence length and micro-batch size, and on its own validation split its ``train.eval_batches``
(so the loss equals the trainer's last validation), on other data the whole split (eval_batches=0).
"""
from __future__ import annotations

import os

from megatrain.errors import ConfigError, DataError


def _given(section, field: str) -> bool:
    return field in section.model_fields_set


def evaluate_lm_model(cfg, path: str, *, log=print) -> dict:
    """{"loss", "ppl", "tokens", "samples"} of the model at ``path`` plus where it was measured
    ({"data", "split", "seq_len"}); see the module doc for which data and sizes."""
    from megatrain.infer.lm_eval import evaluate_lm
    from megatrain.infer.load import load_for_inference, tokenizer_location
    from megatrain.train.tasks import make_task

    dtype = cfg.train.precision if _given(cfg.train, "precision") else "fp32"
    loaded = load_for_inference(path, dtype=dtype, need_tokenizer=False)
    own = loaded.config  # the run's config (checkpoints) or None
    if _given(cfg.data, "path"):
        data_path = os.path.expanduser(cfg.data.path)
    elif own is not None:
        data_path = own.data.path
    else:
        raise ConfigError(f"{path} is a {'Hugging Face' if loaded.kind == 'hf' else 'saved'} model with no data of "
                          "its own; pass --data.path=DIR (a prepared data dir) or a .txt/.jsonl file")
    split = "val"
    if os.path.isfile(data_path):
        tokenizer = tokenizer_location(loaded.kind, loaded.path, own)
        data_path, split = _prepare_raw(cfg, data_path, tokenizer, path), "train"
    elif not os.path.isfile(os.path.join(data_path, "meta.json")):
        raise DataError(f"data.path={data_path}: not a prepared data dir (no meta.json) nor a file; prepare it "
                        "(launch/prepare.py) or pass a .txt/.jsonl file")
    else:
        _check_same_tokenizer(data_path, tokenizer_location(loaded.kind, loaded.path, own), path)

    seq_len = cfg.data.seq_len if _given(cfg.data, "seq_len") and cfg.data.seq_len else (
        own.seq_len if own is not None else loaded.model_cfg.max_seq_len)
    if seq_len > loaded.model_cfg.max_seq_len:
        raise ConfigError(f"data.seq_len={seq_len} exceeds the model's max_seq_len={loaded.model_cfg.max_seq_len}; "
                          f"pass --data.seq_len={loaded.model_cfg.max_seq_len} or less")
    micro = cfg.train.micro_batch_size if _given(cfg.train, "micro_batch_size") or own is None else \
        own.train.micro_batch_size
    # its own validation split: as many batches as the trainer's validation (the same number comes out)
    own_split = own is not None and split == "val" and os.path.abspath(data_path) == os.path.abspath(own.data.path)
    batches = cfg.train.eval_batches if _given(cfg.train, "eval_batches") else (
        own.train.eval_batches if own_split else 0)

    base = own if own is not None else cfg
    task_cfg = base.model_copy(update={
        "model": loaded.model_cfg, "data": base.data.model_copy(update={"path": data_path, "seq_len": seq_len}),
        "train": base.train.model_copy(update={"fused_linear_ce": False})})
    task = make_task(task_cfg)
    dataset = task.val_dataset() if split == "val" else task.train_dataset()
    if dataset is None:
        raise DataError(f"data.path={data_path}: the validation split is empty; prepare it with data.val_fraction > 0 "
                        "or pass a raw .txt/.jsonl file to score whole")
    metrics = evaluate_lm(loaded.model, dataset, micro_batch_size=micro, max_batches=batches)
    where = "whole file" if split == "train" else split
    log(f"{path} on {data_path} ({where}, seq_len={seq_len}): loss={metrics['loss']:.4f} "
        f"ppl={metrics['ppl']:.4f} tokens={metrics['tokens']}")
    # a raw file is prepared with nothing held out: its "train" split is the whole file
    return {**metrics, "data": data_path, "split": "all" if split == "train" else split, "seq_len": seq_len,
            "model_kind": loaded.kind}


def _check_same_tokenizer(data_path: str, model_tokenizer: str | None, model_path: str) -> None:
    """A prepared dir tokenized with another tokenizer than the model's would give a meaningless loss: refuse it
    when the vocabulary size or the EOS id differ (a model with no known tokenizer is not checked)."""
    if model_tokenizer is None:
        return
    from megatrain.data.prepared import read_meta
    from megatrain.data.tokenizer import load_tokenizer
    meta, tok = read_meta(data_path), load_tokenizer(model_tokenizer)
    if (int(meta["vocab_size"]), int(meta["eos_id"])) != (tok.vocab_size, tok.eos_id):
        raise DataError(f"data.path={data_path} was tokenized with another tokenizer (vocab {meta['vocab_size']}, "
                        f"eos {meta['eos_id']}) than the model {model_path} (vocab {tok.vocab_size}, eos "
                        f"{tok.eos_id}); prepare it with --data.tokenizer={model_tokenizer} or pass the raw file")


def _prepare_raw(cfg, file_path: str, tokenizer: str | None, model_path: str) -> str:
    """Tokenize a raw text/JSONL file with the model's tokenizer into a cached data dir; returns the dir."""
    from megatrain.data.prepare import prepare_corpus
    if _given(cfg.data, "tokenizer") and cfg.data.tokenizer:
        tokenizer = cfg.data.tokenizer
    if tokenizer is None:
        raise DataError(f"data.path={file_path} is a raw file but the model {model_path} has no tokenizer beside it "
                        "or in its run; set --data.tokenizer=... or pass a prepared data dir")
    name = os.path.basename(file_path).replace(".", "_")
    out = os.path.join(cfg.log.dir, "eval_data", name)
    data_cfg = cfg.data.model_copy(update={
        "path": out, "sources": [os.path.abspath(file_path)], "tokenizer": tokenizer, "val_fraction": 0.0,
        "min_chars": cfg.data.min_chars if _given(cfg.data, "min_chars") else 1})
    prepare_corpus(data_cfg, seed=0)
    return out
