"""The .bin/.idx format: round trip, dtype choice, and every corruption caught by the index."""
import os

import numpy as np
import pytest

from megatrain.data.indexed import CorruptShardError, ShardReader, ShardWriter, token_dtype


def _write(prefix, docs, dtype=np.uint16):
    w = ShardWriter(str(prefix), np.dtype(dtype))
    for d in docs:
        w.add(d)
    w.close()


DOCS = [[5, 6, 7], [], [1], list(range(100, 140))]


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_round_trip(tmp_path, dtype):
    _write(tmp_path / "s", DOCS, dtype)
    r = ShardReader(str(tmp_path / "s"))
    assert r.num_docs == 4 and r.num_tokens == 44 and r.dtype == np.dtype(dtype)
    assert [r.document(i).tolist() for i in range(4)] == DOCS
    assert os.path.getsize(tmp_path / "s.bin") == 44 * np.dtype(dtype).itemsize


def test_dtype_choice():
    assert token_dtype(4096) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_out_of_range_ids_refused(tmp_path):
    w = ShardWriter(str(tmp_path / "s"), np.dtype(np.uint16))
    with pytest.raises(ValueError, match="uint32"):
        w.add([70000])


def test_empty_shard(tmp_path):
    _write(tmp_path / "e", [])
    r = ShardReader(str(tmp_path / "e"))
    assert r.num_docs == 0 and r.num_tokens == 0 and r.tokens.size == 0


def test_truncated_bin_names_the_file(tmp_path):
    _write(tmp_path / "s", DOCS)
    with open(tmp_path / "s.bin", "r+b") as f:
        f.truncate(40)
    with pytest.raises(CorruptShardError, match=r"s\.bin: 40 bytes but .*s\.idx records 44"):
        ShardReader(str(tmp_path / "s"))


def test_truncated_idx(tmp_path):
    _write(tmp_path / "s", DOCS)
    size = os.path.getsize(tmp_path / "s.idx")
    with open(tmp_path / "s.idx", "r+b") as f:
        f.truncate(size - 8)
    with pytest.raises(CorruptShardError, match=r"s\.idx: .*truncated"):
        ShardReader(str(tmp_path / "s"))
    with open(tmp_path / "s.idx", "r+b") as f:
        f.truncate(10)
    with pytest.raises(CorruptShardError, match="truncated header"):
        ShardReader(str(tmp_path / "s"))


def test_bad_magic(tmp_path):
    _write(tmp_path / "s", DOCS)
    with open(tmp_path / "s.idx", "r+b") as f:
        f.write(b"NOTMAGIC")
    with pytest.raises(CorruptShardError, match=r"s\.idx: bad magic"):
        ShardReader(str(tmp_path / "s"))


def test_inconsistent_offsets(tmp_path):
    _write(tmp_path / "s", DOCS)
    raw = bytearray((tmp_path / "s.idx").read_bytes())
    raw[-16:-8] = (50).to_bytes(8, "little")  # offsets[-2] beyond offsets[-1]
    (tmp_path / "s.idx").write_bytes(bytes(raw))
    with pytest.raises(CorruptShardError, match="offsets"):
        ShardReader(str(tmp_path / "s"))


def test_missing_files(tmp_path):
    _write(tmp_path / "s", DOCS)
    os.remove(tmp_path / "s.idx")  # e.g. a writer killed before close(): the .bin alone is never read
    with pytest.raises(CorruptShardError, match=r"s\.idx is missing"):
        ShardReader(str(tmp_path / "s"))
