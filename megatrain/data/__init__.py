"""Text data: prepare (clean, dedup, tokenize, shard), memory-mapped shards, packed dataset, resumable sampler.

Names are imported lazily so that worker processes spawned by ``prepare_corpus`` (which import
``megatrain.data.tokenizer``) do not pay for importing torch.
"""
from importlib import import_module

_EXPORTS = {
    "prepare_corpus": "prepare", "read_meta": "prepare", "split_documents": "prepare", "config_hash": "prepare",
    "load_tokenizer": "tokenizer", "Tokenizer": "tokenizer", "train_sentencepiece": "tokenizer",
    "ShardReader": "indexed", "ShardWriter": "indexed", "CorruptShardError": "indexed", "token_dtype": "indexed",
    "PackedTokenDataset": "dataset", "DocumentPackedDataset": "packing",
    "RecordEncoder": "chat", "resolve_chat_template": "chat", "load_chat_template": "chat",
    "encode_chat_prompt": "chat",
    "GlobalBatchSampler": "sampler", "rank_slice": "sampler",
    "clean_text": "clean", "Cleaner": "clean",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"megatrain.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'megatrain.data' has no attribute {name!r}")
