"""An LSTM language model through the Trainer on the prepared corpus: validation perplexity falls."""
import json

import pytest

from megatrain.testing import run_ranks

pytestmark = [pytest.mark.slow]


def test_lstm_lm_perplexity_falls(tiny_corpus, tmp_path):
    run_ranks(1, ["launch/pretrain.py", "--config", "recipes/lstm_tiny.yaml", f"--data.path={tiny_corpus}",
                  "--model.hidden_size=64", "--model.num_layers=1", "--model.max_seq_len=32", "--train.max_steps=40",
                  "--train.eval_every=10", "--train.warmup_steps=5", "--checkpoint.save_final=false",
                  f"--log.dir={tmp_path}", "--log.progress=none", "--log.tensorboard=false", "--log.report=false"],
             timeout=400)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    ppl = [r["val_ppl"] for r in rows if "val_ppl" in r]
    assert len(ppl) == 4 and ppl[-1] < ppl[0] * 0.8, ppl
