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
