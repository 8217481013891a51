"""Checkpoint integrity: truncated files, checksum mismatches, wrong configs and dangling pointers give
errors that name the file (and tensor); rotation never deletes the newest complete checkpoint."""
import json
import os

import pytest
import torch

from megatrain.checkpoint.layout_free import _check_model
from megatrain.checkpoint.store import (CheckpointError, CheckpointSource, FORMAT, atomic_write_text, commit,
                                        latest_step_dir, read_manifest, resolve_resume, verify_file, write_tensors)
from megatrain.config import ModelConfig


def make_step(ckpt_dir, step, tensors):
    tmp = os.path.join(ckpt_dir, f".tmp-step_{step:08d}")
    os.makedirs(tmp)
    files = {"model-s0.safetensors": write_tensors(os.path.join(tmp, "model-s0.safetensors"), tensors)}
    manifest = {"format": FORMAT, "step": step, "config": {"model": {"hidden_size": 8}}, "files": files}
    atomic_write_text(os.path.join(tmp, "manifest.json"), json.dumps(manifest))
    commit(tmp, os.path.join(ckpt_dir, f"step_{step:08d}"), ckpt_dir, keep_last=2)
    return os.path.join(ckpt_dir, f"step_{step:08d}")


@pytest.fixture
def step_dir(tmp_path):
    return make_step(str(tmp_path), 3, {"a.weight": torch.randn(4, 8), "b.bias": torch.randn(8)})


def test_round_trip_and_verify(step_dir):
    manifest = read_manifest(step_dir)
    verify_file(os.path.join(step_dir, "model-s0.safetensors"), manifest["files"]["model-s0.safetensors"])
    src = CheckpointSource(step_dir)
    assert src.tensor("a.weight", (4, 8)).shape == (4, 8)
    with pytest.raises(CheckpointError, match="has shape"):
        src.tensor("a.weight", (8, 4))
    with pytest.raises(CheckpointError, match="has no tensor 'zzz'"):
        src.tensor("zzz")


def test_truncated_file_is_named(step_dir):
    path = os.path.join(step_dir, "model-s0.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10)
    with pytest.raises(CheckpointError, match=f"{path} has .* bytes, manifest says"):
        verify_file(path, read_manifest(step_dir)["files"]["model-s0.safetensors"])


def test_checksum_mismatch_names_tensor(step_dir):
    path = os.path.join(step_dir, "model-s0.safetensors")
    with open(path, "r+b") as f:
        f.seek(-3, os.SEEK_END)
        byte = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match="tensor '(a.weight|b.bias)' fails its checksum"):
        verify_file(path, read_manifest(step_dir)["files"]["model-s0.safetensors"])


def test_wrong_config_is_named(step_dir):
    with pytest.raises(CheckpointError, match="written for model.hidden_size=8 but the config has 16"):
        _check_model(read_manifest(step_dir), ModelConfig(hidden_size=16), step_dir)


def test_pointers_resume_and_rotation(tmp_path):
    ck = str(tmp_path)
    for step in (1, 2, 3):
        make_step(ck, step, {"w": torch.full((2,), float(step))})
    assert sorted(os.listdir(ck)) == ["latest", "step_00000002", "step_00000003"]
    assert latest_step_dir(ck).endswith("step_00000003")
    assert resolve_resume("auto", ck).endswith("step_00000003")
    assert resolve_resume(os.path.join(ck, "step_00000002"), ck).endswith("step_00000002")
    assert resolve_resume("none", ck) is None
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        resolve_resume(str(tmp_path / "nope"), ck)
    atomic_write_text(os.path.join(ck, "latest"), "step_00000009")
    with pytest.raises(CheckpointError, match="points to 'step_00000009', which is incomplete"):
        resolve_resume("auto", ck)


def test_written_file_is_plain_safetensors_with_the_same_crcs(tmp_path):
    # the one-pass writer keeps the format: safetensors (and so HF) reads it, and each manifest crc is the
    # crc32 of that tensor's bytes, as the separate pass computed it before
    from safetensors import safe_open
    from safetensors.torch import load_file

    from megatrain.checkpoint.store import crc32_of
    tensors = {"w": torch.randn(3, 1000), "h": torch.randn(7).bfloat16(), "i": torch.arange(5),
               "s": torch.tensor(2.5), "e": torch.zeros(0, 4), "big": torch.randn(3 << 20)}  # > one 8 MiB chunk
    path = str(tmp_path / "m.safetensors")
    entry = write_tensors(path, tensors)
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype
        assert entry["tensors"][k] == {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."),
                                       "crc32": crc32_of(v)}
    with safe_open(path, "pt") as f:
        assert sorted(f.keys()) == sorted(tensors)
    assert entry["bytes"] == os.path.getsize(path)


def _flip_byte_of(path, name):
    from megatrain.checkpoint.reader import SafetensorsReader
    r = SafetensorsReader(path)
    start, stop = r.header[name]["data_offsets"]
    with open(path, "r+b") as f:
        f.seek(r.base + (start + stop) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))


def test_reading_verifies_in_the_same_pass(tmp_path):
    tensors = {"a.weight": torch.randn(64, 8), "b.bias": torch.randn(8), "c.big": torch.randn(5 << 20)}
    step_dir = make_step(str(tmp_path), 1, tensors)
    src = CheckpointSource(step_dir, verify=True)
    for k, v in tensors.items():
        assert torch.equal(src.tensor(k), v)
    assert torch.equal(CheckpointSource(step_dir, verify=True).rows("a.weight", 16, 32), tensors["a.weight"][16:32])
    path = os.path.join(step_dir, "model-s0.safetensors")
    for name in ("c.big", "a.weight"):
        _flip_byte_of(path, name)
        src = CheckpointSource(step_dir, verify=True)
        with pytest.raises(CheckpointError, match=f"tensor '{name}' fails its checksum"):
            src.tensor(name)
    with pytest.raises(CheckpointError, match="tensor 'a.weight' fails its checksum"):  # a row range too
        CheckpointSource(step_dir, verify=True).rows("a.weight", 0, 8)
    assert CheckpointSource(step_dir).tensor("b.bias").shape == (8,)  # verify=False reads without checking


def test_verifying_source_names_a_truncated_file_on_open(tmp_path):
    step_dir = make_step(str(tmp_path), 1, {"a.weight": torch.randn(4, 8)})
    path = os.path.join(step_dir, "model-s0.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 4)
    with pytest.raises(CheckpointError, match=f"{path} has .* bytes, manifest says"):
        CheckpointSource(step_dir, verify=True)
