"""The planner plans the real Hugging Face model of --model.from_hf, not the recipe's placeholder."""
import re

import pytest

transformers = pytest.importorskip("transformers")

from tests.unit.test_hf_families import tiny  # noqa: E402


def test_plan_reads_from_hf(tmp_path, capsys):
    import importlib.util
    ref = tiny("qwen3", num_key_value_heads=1)
    ref.save_pretrained(tmp_path / "hf")
    spec = importlib.util.spec_from_file_location("plan_launcher", "launch/plan.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    launcher.main(["--config", "recipes/finetune_llama.yaml", f"--model.from_hf={tmp_path / 'hf'}",
                   "--plan.world_size=2", "--parallel.tp=2", "--data.seq_len=32"])
    out = capsys.readouterr().out
    n = float(re.search(r"plan: qwen3 ([0-9.e+-]+)B params", out).group(1)) * 1e9
    assert n == pytest.approx(sum(p.numel() for p in ref.parameters()), rel=1e-3)  # tp=2 > 1 kv head is planned
    with pytest.raises(SystemExit) as err:
        launcher.main(["--config", "recipes/finetune_llama.yaml", f"--model.from_hf={tmp_path / 'hf'}",
                       "--model.num_layers=7"])
    assert err.value.code == 2
    assert "--model.num_layers=7 conflicts" in capsys.readouterr().err


def test_any_kv_head_count_layout_rule():
    """tp dividing the kv heads splits them, a multiple replicates one per rank, any other keeps them whole."""
    from megatrain.config import build_config, resolve_layout
    from megatrain.parallelize.tensor_parallel import kv_layout, kv_weight_heads, local_kv_heads
    model = {"arch": "llama", "vocab_size": 64, "hidden_size": 96, "num_heads": 12, "ffn_hidden_size": 96}
    for kv, tp in ((1, 2), (3, 6), (2, 4), (4, 2), (3, 2), (3, 4)):
        resolve_layout(build_config({"model": {**model, "num_kv_heads": kv}, "parallel": {"tp": tp}}), tp)
    assert [kv_layout(3, tp) for tp in (1, 2, 3, 4, 6)] == ["split", "whole", "split", "whole", "replicated_heads"]
    assert [kv_weight_heads(3, tp) for tp in (1, 2, 3, 4, 6)] == [3, 3, 1, 3, 1]  # k/v weight heads per rank
    assert [local_kv_heads(3, 12, tp) for tp in (1, 2, 3, 4, 6)] == [3, 6, 1, 3, 1]  # heads a rank's attention sees
