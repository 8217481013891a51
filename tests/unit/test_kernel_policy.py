"""model.kernels=auto means "proven fastest here": torch unless a benchmark record for this GPU class shows the
custom kernel faster at the run's key shape and dtype. Records are faked in a temp dir, the GPU name passed in."""
import json

import pytest
import torch

from megatrain.ops import dispatch
from megatrain.ops.policy import KernelPolicy, gpu_class, load_records


def _write(tmp_path, gpu, records, name="kernels_H100.json"):
    (tmp_path / name).write_text(json.dumps({"gpu": gpu, "gpu_class": gpu_class(gpu), "records": records}))


def _rec(op, ms, torch_ms, dtype="bfloat16", backend="triton", **shape):
    return {"op": op, "backend": backend, "dtype": dtype, "shape": shape, "ms": ms, "torch_ms": torch_ms}


H100 = "NVIDIA H100 80GB HBM3"


@pytest.fixture
def restore_dispatch():
    saved = dispatch.current_config()
    yield
    dispatch.configure(saved.default, saved.overrides)


@pytest.mark.parametrize("name,cls", [(H100, "H100"), ("NVIDIA H200", "H200"), ("NVIDIA A100-SXM4-80GB", "A100"),
                                      ("NVIDIA H100 PCIe", "H100"), ("NVIDIA GeForce RTX 4090", "RTX4090")])
def test_gpu_class(name, cls):
    assert gpu_class(name) == cls


def test_no_record_means_torch(tmp_path):
    policy = KernelPolicy(gpu=H100, directory=str(tmp_path))
    choice = policy.resolve_auto("rms_norm", ["triton", "torch"], dtype=torch.bfloat16, shape={"hidden": 4096})
    assert choice.backend == "torch" and "no benchmark record for H100" in choice.reason


def test_record_faster_at_the_shape_picks_the_kernel(tmp_path):
    _write(tmp_path, H100, [_rec("rms_norm", 0.08, 0.10, hidden=4096, tokens=8192),
                            _rec("rms_norm", 0.09, 0.10, hidden=4096, tokens=16384),
                            _rec("rms_norm", 0.30, 0.10, hidden=1024, tokens=8192)])
    policy = KernelPolicy(gpu=H100, directory=str(tmp_path))
    fast = policy.resolve_auto("rms_norm", ["triton", "torch"], dtype=torch.bfloat16, shape={"hidden": 4096})
    assert fast.backend == "triton" and "kernels_H100.json" in fast.reason and "1.11" in fast.reason
    slow = policy.resolve_auto("rms_norm", ["triton", "torch"], dtype=torch.bfloat16, shape={"hidden": 1024})
    assert slow.backend == "torch" and "0.33" in slow.reason
    other = policy.resolve_auto("rms_norm", ["triton", "torch"], dtype=torch.bfloat16, shape={"hidden": 2048})
    assert other.backend == "torch" and "no record" in other.reason
    fp16 = policy.resolve_auto("rms_norm", ["triton", "torch"], dtype=torch.float16, shape={"hidden": 4096})
    assert fp16.backend == "torch"


def test_one_slower_record_keeps_torch(tmp_path):
    _write(tmp_path, H100, [_rec("layer_norm", 0.08, 0.10, hidden=4096, tokens=8192),
                            _rec("layer_norm", 0.12, 0.10, hidden=4096, tokens=65536)])
    choice = KernelPolicy(gpu=H100, directory=str(tmp_path)).resolve_auto(
        "layer_norm", ["triton", "torch"], dtype=torch.bfloat16, shape={"hidden": 4096})
    assert choice.backend == "torch"


def test_records_of_another_gpu_class_do_not_count(tmp_path):
    _write(tmp_path, "NVIDIA A100-SXM4-80GB", [_rec("swiglu", 0.05, 0.10, ffn=11008)], name="kernels_A100.json")
    choice = KernelPolicy(gpu=H100, directory=str(tmp_path)).resolve_auto(
        "swiglu", ["triton", "torch"], dtype=torch.bfloat16, shape={"ffn": 11008})
    assert choice.backend == "torch"
    assert load_records("NVIDIA A100 80GB PCIe", str(tmp_path))[0] == "kernels_A100.json"


def test_fp32_attention_never_takes_the_triton_kernel(tmp_path):
    _write(tmp_path, H100, [_rec("attention", 0.5, 1.0, dtype="float32", head_dim=128, causal=True)])
    choice = KernelPolicy(gpu=H100, directory=str(tmp_path)).resolve_auto(
        "attention", ["triton", "torch"], dtype=torch.float32, shape={"head_dim": 128, "causal": True})
    assert choice.backend == "torch" and "fp32" in choice.reason


def test_broken_record_file_is_no_proof(tmp_path):
    (tmp_path / "kernels_H100.json").write_text("{not json")
    choice = KernelPolicy(gpu=H100, directory=str(tmp_path)).resolve_auto("rope", ["triton", "torch"])
    assert choice.backend == "torch"


def test_dispatch_auto_on_cuda_follows_the_records(tmp_path, restore_dispatch):
    """Through the dispatcher, as the ops call it (device 'cuda' as a name; nothing runs on it)."""
    _write(tmp_path, H100, [_rec("swiglu", 0.05, 0.10, ffn=3072)])
    dispatch.configure("auto", gpu=H100, records_dir=str(tmp_path))
    if "triton" not in dispatch.available_backends("swiglu", "cuda"):
        pytest.skip("triton not importable")
    assert dispatch.backend_for("swiglu", "cuda", dtype=torch.bfloat16, shape={"ffn": 3072}) == "triton"
    assert dispatch.backend_for("swiglu", "cuda", dtype=torch.bfloat16, shape={"ffn": 4096}) == "torch"
    assert dispatch.backend_for("attention", "cuda", dtype=torch.bfloat16, shape={"head_dim": 64}) == "torch"
    assert dispatch.backend_for("swiglu", "cpu") == "torch"
    why = dispatch.explain("attention", "cuda", dtype=torch.bfloat16)
    assert why.backend == "torch" and "no record for attention" in why.reason
    dispatch.configure("triton", gpu=H100, records_dir=str(tmp_path))  # explicit: obeyed
    assert dispatch.backend_for("swiglu", "cuda", shape={"ffn": 4096}) == "triton"


def test_env_report_names_the_choice_and_reason():
    from megatrain.env_report import report_rows
    rows = dict(report_rows())
    assert rows["op attention"].startswith("torch: cpu tensors run the torch path")
