"""mfu and peak_mem_gib in the metrics line: the peak table, the arithmetic, and the console line."""
import pytest
import torch

from megatrain.config import build_config
from megatrain.models.transformer import flops_per_token
from megatrain.train.logging import RunLogger
from megatrain.train.perf import StepPerf, peak_bf16_flops


@pytest.mark.parametrize("name,tflops", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                         ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                         ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0)])
def test_peak_table(name, tflops):
    assert peak_bf16_flops(name) == tflops * 1e12


def test_unknown_gpu_has_no_peak():
    assert peak_bf16_flops("Some Future Accelerator") is None


def _cfg(**over):
    return build_config({"model": {"arch": "gpt2", "hidden_size": 64, "num_layers": 2, "num_heads": 4,
                                   "vocab_size": 100, "max_seq_len": 32}, "data": {"path": "x"}}, over)


def test_mfu_arithmetic_and_cpu_memory():
    cfg = _cfg()
    perf = StepPerf(cfg, torch.device("cpu"), world_size=4)
    assert "mfu" not in perf.fields(1000.0)  # CPU: left out, no datasheet peak
    perf.peak = 100e12  # as on a GPU with a 100 TFLOP/s peak
    f = perf.fields(2.0e6)
    assert f["mfu"] == pytest.approx(flops_per_token(cfg.model, cfg.seq_len) * 2.0e6 / (4 * 100e12))
    assert 0 < f["peak_mem_gib"] < 1024


def test_non_transformer_has_no_mfu():
    cfg = build_config({"model": {"arch": "lstm", "vocab_size": 50}, "data": {"path": "x"}})
    perf = StepPerf(cfg, torch.device("cpu"), world_size=1)
    perf.peak = 1e12
    assert "mfu" not in perf.fields(10.0)


def test_console_line_shows_mfu_and_memory(tmp_path, capsys):
    log = RunLogger(str(tmp_path), total_steps=1, start_step=0, progress="plain", tensorboard=False, active=True)
    log.log({"step": 1, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 100.0, "mfu": 0.412, "peak_mem_gib": 3.25})
    out = capsys.readouterr().out
    assert "mfu 41.2%" in out and "mem 3.25 GiB" in out
    assert '"mfu": 0.412' in (tmp_path / "metrics.jsonl").read_text()
