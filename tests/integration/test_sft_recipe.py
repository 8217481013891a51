"""recipes/sft_lora_tiny.yaml end to end, shortened: a base trained with the recipe's model, the shipped chat
data prepared with the base's tokenizer (built-in template), LoRA SFT on 2 ranks from the base, the PEFT
adapter written, and chat prompts answered by launch/generate.py — rendered exactly as prepare rendered the
training conversations."""
import json
import os

import pytest

from megatrain.testing import ROOT, run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.slow]
RECIPE = os.path.join(ROOT, "recipes", "sft_lora_tiny.yaml")
QUIET = ["--log.progress=none", "--log.tensorboard=false", "--log.report=false", "--train.eval_every=0",
         "--train.eval_batches=2"]


def test_sft_recipe_trains_adapters_and_answers_chat_prompts(tiny_corpus, tmp_path):
    import torch
    from megatrain.checkpoint.layout_free import load_model_state as raw_state
    from megatrain.data.chat import encode_chat_prompt, load_chat_template
    from megatrain.data.prepare import prepare_corpus
    from megatrain.config import load_config
    from megatrain.infer.chat import chat_template_of
    from megatrain.infer.load import load_for_inference

    base, sft, chat = tmp_path / "base", tmp_path / "sft", tmp_path / "chat"
    run_ranks(1, ["launch/pretrain.py", "--config", RECIPE, "--model.lora.rank=0", "--model.init_from=null",
                  "--checkpoint.export_peft=null", f"--data.path={tiny_corpus}", "--train.max_steps=4",
                  f"--log.dir={base}", *QUIET], timeout=300)
    over = [f"--model.init_from={base}/checkpoints", f"--data.path={chat}", f"--data.tokenizer={tiny_corpus}",
            f"--log.dir={sft}", f"--checkpoint.export_peft={sft}/adapter", "--train.max_steps=6", *QUIET]
    cfg = load_config(RECIPE, over)
    prepare_corpus(cfg.data, seed=0)
    meta = json.loads((chat / "meta.json").read_text())
    assert meta["chat_template"] and (chat / "chat_template.jinja").is_file()  # sentencepiece: the built-in one
    run_ranks(2, ["launch/pretrain.py", "--config", RECIPE, *over], timeout=300)

    rows = [json.loads(line) for line in (sft / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7)) and rows[-1]["loss"] < rows[0]["loss"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(sft / "adapter"))
    _, trained = raw_state(str(sft / "checkpoints"))
    _, start = raw_state(str(base / "checkpoints"))
    for name, t in trained.items():  # the base is frozen: only adapters moved
        if ".lora_" not in name:
            torch.testing.assert_close(t, start[name], rtol=0, atol=0, msg=name)

    out = tmp_path / "gen.jsonl"
    from launch.generate import main
    main(["--model", str(sft), "--prompts", os.path.join(ROOT, "recipes", "sft_prompts.jsonl"),
          "--max_new_tokens", "8", "--output", str(out), "--threads", "1"])
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(answers) == 4 and all(1 <= a["tokens"] <= 8 for a in answers)
    loaded = load_for_inference(str(sft), device="cpu")
    template = chat_template_of(loaded.tokenizer, data_dir=str(chat))
    assert template == load_chat_template(str(chat))  # the training data's template, not a guess
    ids = encode_chat_prompt(loaded.tokenizer, template, answers[0]["messages"])
    assert loaded.tokenizer.decode(ids).rstrip().endswith("<|assistant|>")
