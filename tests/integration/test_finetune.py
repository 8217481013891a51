"""Fine-tune a tiny Hugging Face Llama with tp=2 on 2 CPU ranks from JSONL: loss falls, and the exported
directory loads and runs in transformers."""
import json

import pytest
import torch

from megatrain.testing import run_ranks

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.slow, pytest.mark.dist]


def test_finetune_tp2_and_export(tiny_corpus, tmp_path):
    meta = json.loads(open(f"{tiny_corpus}/meta.json").read())
    cfg = transformers.LlamaConfig(vocab_size=meta["vocab_size"], hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    lines = [json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {i % 7}\n"}) for i in range(400)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines))
    argv = ["launch/finetune.py", "--config", "recipes/finetune_llama.yaml", f"--model.from_hf={tmp_path / 'hf'}",
            f"--data.sources=[{tmp_path / 'train.jsonl'}]", f"--data.tokenizer={tiny_corpus}/tokenizer.model",
            f"--data.path={tmp_path / 'data'}", "--data.seq_len=32", "--data.num_workers=1", "--parallel.tp=2",
            "--train.precision=fp32", "--train.max_steps=20", "--train.global_batch_size=8", "--train.micro_batch_size=4",
            "--train.lr=3e-3", "--train.warmup_steps=2", "--train.eval_every=0", f"--log.dir={tmp_path / 'run'}",
            "--log.progress=none", "--log.tensorboard=false", f"--checkpoint.export_hf={tmp_path / 'export'}"]
    run_ranks(2, argv, timeout=600)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    with torch.no_grad():
        logits = model(torch.randint(0, cfg.vocab_size, (1, 12))).logits
    assert logits.shape == (1, 12, cfg.vocab_size) and torch.isfinite(logits).all()


def test_finetune_kv_replication_tp2_equals_tp1(tiny_corpus, tmp_path):
    """Qwen3 with ONE kv head at tp=2: the kv head is replicated on both ranks (its gradient summed), q/k
    RMSNorm weights see different heads per rank (summed too); losses equal tp=1, with grad clipping on."""
    meta = json.loads(open(f"{tiny_corpus}/meta.json").read())
    cfg = transformers.Qwen3Config(vocab_size=meta["vocab_size"], hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    lines = [json.dumps({"text": f"def g{i}(y):\n    return y - {i}\n"}) for i in range(200)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines))
    losses = {}
    for tp in (1, 2):
        argv = ["launch/finetune.py", "--config", "recipes/finetune_llama.yaml", f"--model.from_hf={tmp_path / 'hf'}",
                f"--data.sources=[{tmp_path / 'train.jsonl'}]", f"--data.tokenizer={tiny_corpus}/tokenizer.model",
                f"--data.path={tmp_path / 'data'}", "--data.seq_len=32", "--data.num_workers=1",
                f"--parallel.tp={tp}", "--train.precision=fp32", "--train.max_steps=6", "--train.global_batch_size=4",
                "--train.micro_batch_size=4", "--train.lr=3e-3", "--train.warmup_steps=1", "--train.eval_every=0",
                "--train.grad_clip=0.5", f"--log.dir={tmp_path / f'run{tp}'}", "--log.progress=none",
                "--log.tensorboard=false", "--checkpoint.every=0", f"--checkpoint.export_hf={tmp_path / f'export{tp}'}"]
        run_ranks(tp, argv, timeout=600)
        rows = (tmp_path / f"run{tp}" / "metrics.jsonl").read_text().splitlines()
        losses[tp] = [json.loads(r)["loss"] for r in rows if "loss" in json.loads(r)]
    assert len(losses[1]) == 6
    assert losses[2] == pytest.approx(losses[1], rel=2e-5)
    # the tp=2 checkpoint gathers one copy of each replicated kv head: the exports hold the same model
    one, two = (transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"export{tp}").state_dict() for tp in (1, 2))
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5)
