"""Reading a prepared data directory (``data.path``): meta.json with the fields readers rely on, the
tokenizer's vocabulary against it, and every shard's size, header and CRC-32 against what prepare recorded.
Each check is one line naming the file and the fix; checksums are computed once per process per file."""
from __future__ import annotations

import logging
import os

from megatrain.data.indexed import CorruptShardError, ShardReader
from megatrain.data.tokenizer import load_tokenizer
from megatrain.errors import DataError

log = logging.getLogger("megatrain.data")

FORMAT_VERSION = 1


def read_meta(data_dir: str) -> dict:
    """meta.json of a prepared data dir, with the fields readers rely on checked (one line naming the field)."""
    from megatrain.safe_io import read_json
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise DataError(f"{data_dir} is not a prepared data directory (no meta.json); run "
                         "`python launch/prepare.py --config <recipe>` or fix data.path")
    fix = "prepare again with --data.force_prepare=true"
    meta = read_json(path, what="prepared data", fix=fix, error=DataError)
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: data format version {meta.get('format_version')}, this megatrain reads "
                         f"{FORMAT_VERSION}; {fix}")
    for key in ("vocab_size", "eos_id"):
        if isinstance(meta.get(key), bool) or not isinstance(meta.get(key), int) or meta[key] < 0:
            raise DataError(f"{path}: field {key!r} missing or not a non-negative integer; {fix}")
    splits = meta.get("splits")
    if not isinstance(splits, dict) or "train" not in splits:
        raise DataError(f"{path}: field 'splits' missing or without a 'train' split; {fix}")
    for name, split in splits.items():
        if (not isinstance(split, dict) or not isinstance(split.get("shards"), list)
                or not all(isinstance(x, str) and x and os.sep not in x and x not in (".", "..")
                           for x in split["shards"])
                or isinstance(split.get("num_tokens"), bool) or not isinstance(split.get("num_tokens"), int)):
            raise DataError(f"{path}: split {name!r} needs 'shards' (a list of shard names inside the directory) "
                            f"and an integer 'num_tokens'; {fix}")
    return meta


def check_tokenizer_vocab(data_dir: str, meta: dict) -> None:
    """meta.json's vocab_size must be the tokenizer's: a larger one silently builds a larger embedding, a
    smaller one lets ids index past it. Checked once per process per data dir."""
    if (data_dir, "vocab") in _VERIFIED:
        return
    tok = meta.get("tokenizer")
    if isinstance(tok, dict) and isinstance(tok.get("path"), str):
        path = os.path.join(data_dir, tok["path"])
        if os.path.exists(path):
            try:
                have = load_tokenizer(path).vocab_size
            except (RuntimeError, OSError):
                raise DataError(f"{path}: the tokenizer of prepared data {data_dir} cannot be loaded; prepare "
                                "again with --data.force_prepare=true") from None
            if have != meta["vocab_size"]:
                raise DataError(f"{data_dir}/meta.json records vocab_size={meta['vocab_size']} but its tokenizer "
                                f"{path} has {have} pieces; prepare again with --data.force_prepare=true")
    _VERIFIED.add((data_dir, "vocab"))


def empty_split_holds_tokens(data_dir: str, meta: dict, split: str) -> None:
    """A split meta.json records as empty must be empty on disk (else validation would vanish silently)."""
    shards = (meta["splits"].get(split) or {}).get("shards", [])
    held = sum(ShardReader(os.path.join(data_dir, name)).num_tokens for name in shards)
    if held:
        raise DataError(f"{data_dir}/meta.json records 0 tokens in split '{split}' but its shards hold {held}; "
                        "prepare again with --data.force_prepare=true")


_VERIFIED: set[tuple] = set()  # (shard prefix, size, mtime_ns) whose checksum passed in this process


def verify_shards(data_dir: str, meta: dict, *, checksums: bool = True) -> None:
    """Open every shard (sizes, magic, offsets) and, with ``checksums``, compare its .bin/.idx CRC-32 with the
    value prepare recorded; each shard is checksummed once per process. A mismatch is one line naming the
    shard. Data prepared before checksums existed is accepted with a warning."""
    from megatrain.data.indexed import file_crc32
    fix = "; the file was changed after prepare - prepare again with --data.force_prepare=true"
    for split_name, split in meta["splits"].items():
        records = split.get("checksums")
        for shard in split["shards"]:
            prefix = os.path.join(data_dir, shard)
            ShardReader(prefix)
            if not checksums:
                continue
            record = records.get(shard) if isinstance(records, dict) else None
            if not isinstance(record, dict):
                if (data_dir, "legacy") not in _VERIFIED:
                    _VERIFIED.add((data_dir, "legacy"))
                    log.warning("%s: no shard checksums recorded (prepared by an older megatrain); contents are "
                                "not verified - prepare again with --data.force_prepare=true to record them", data_dir)
                continue
            exts = [(".bin", "bin_crc32"), (".idx", "idx_crc32")]
            if "mask_crc32" in record:
                if not os.path.isfile(prefix + ".mask"):
                    raise CorruptShardError(f"shard {prefix}.mask of split '{split_name}' is missing{fix}")
                exts.append((".mask", "mask_crc32"))
            for ext, key in exts:
                st = os.stat(prefix + ext)
                stamp = (prefix + ext, st.st_size, st.st_mtime_ns)
                if stamp in _VERIFIED:
                    continue
                if file_crc32(prefix + ext) != record.get(key):
                    raise CorruptShardError(f"shard {prefix}{ext} of split '{split_name}' fails its checksum "
                                            f"(CRC-32 differs from meta.json){fix}")
                _VERIFIED.add(stamp)
