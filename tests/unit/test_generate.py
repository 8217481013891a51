"""Generation: greedy output equals transformers' generate token for token (tiny random Llama, GPT-2, Qwen3
written with save_pretrained and read back through megatrain.infer.load); a left-padded batch equals each
prompt alone; top-k=1 is greedy; seeded sampling is reproducible; EOS and stop ids end a row; top-k/top-p
filtering equals transformers' logits processors; the launcher writes JSONL, renders chat messages with the
tokenizer's template and refuses messages for a tokenizer without one."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatrain.errors import UserError  # noqa: E402
from megatrain.infer.generate import Sampling, filter_logits, generate  # noqa: E402
from megatrain.infer.load import load_for_inference  # noqa: E402

VOCAB = 300
CHAT_TEMPLATE = ("{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<bos>assistant:{% endif %}")


def save_tokenizer(path, *, chat_template=None):
    """A byte-level BPE with <bos>/<eos> (ids 0, 1) saved as an HF tokenizer dir."""
    from tokenizers import ByteLevelBPETokenizer
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["def f(x):\n    return x + 1\n", "user: hello there\nassistant: hi\n"] * 20,
                            vocab_size=280, special_tokens=["<bos>", "<eos>"], show_progress=False)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<bos>",
                                               eos_token="<eos>")
    if chat_template:
        tok.chat_template = chat_template
    tok.save_pretrained(path)


def hf_model(family):
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=1)
        model = transformers.GPT2LMHeadModel(cfg)
    elif family == "llama":
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       max_position_embeddings=64, tie_word_embeddings=True)
        model = transformers.Qwen3ForCausalLM(cfg)
    with torch.no_grad():  # sharper logits than the 0.02-std init, so greedy picks are far from ties
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(5)
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "gpt2", "qwen3"])
def hf_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model = hf_model(request.param)
    model.save_pretrained(path)
    save_tokenizer(path, chat_template=CHAT_TEMPLATE)
    return request.param, path, model


def prompts(seed=1, lengths=(3, 9, 5)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in lengths]


def test_greedy_equals_transformers_generate(hf_dir):
    family, path, ref = hf_dir
    loaded = load_for_inference(str(path), device="cpu")
    assert loaded.kind == "hf" and loaded.model_cfg.hf_family == family and not loaded.model.training
    assert all(not p.is_meta for p in loaded.model.parameters())
    if loaded.model_cfg.tied:
        assert loaded.model.head.lm_head.weight is loaded.model.embed.wte.weight
    eos = loaded.tokenizer.eos_id
    for p in prompts():
        ours = generate(loaded.model, [p], Sampling(max_new_tokens=20), eos_id=eos)
        with torch.no_grad():
            theirs = ref.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                  do_sample=False, max_new_tokens=20, eos_token_id=eos, pad_token_id=eos)
        assert ours.tokens[0] == theirs[0, len(p):].tolist()


def test_padded_batch_equals_one_by_one_and_top_k_1_is_greedy(hf_dir):
    _, path, _ = hf_dir
    model = load_for_inference(str(path), device="cpu").model
    rows = prompts(lengths=(2, 11, 6, 4))
    batched = generate(model, rows, Sampling(max_new_tokens=15), eos_id=None)
    alone = [generate(model, [p], Sampling(max_new_tokens=15), eos_id=None).tokens[0] for p in rows]
    assert batched.tokens == alone and batched.finish == ["length"] * 4
    top1 = generate(model, rows, Sampling(max_new_tokens=15, temperature=0.7, top_k=1, seed=3), eos_id=None)
    assert top1.tokens == alone


def test_seeded_sampling_is_reproducible(hf_dir):
    _, path, _ = hf_dir
    model = load_for_inference(str(path), device="cpu").model
    rows = prompts(lengths=(4, 7))
    draw = lambda seed, **kw: generate(model, rows, Sampling(max_new_tokens=16, seed=seed, **kw),  # noqa: E731
                                       eos_id=None).tokens
    nucleus = dict(temperature=1.3, top_p=0.9)
    assert draw(5, **nucleus) == draw(5, **nucleus)
    assert draw(5, **nucleus) != draw(6, **nucleus)
    assert draw(5, temperature=1.0, top_k=20) == draw(5, temperature=1.0, top_k=20)
    greedy = generate(model, rows, Sampling(max_new_tokens=16), eos_id=None).tokens
    assert draw(5, **nucleus) != greedy


def test_eos_and_stop_ids_end_a_row(hf_dir):
    _, path, _ = hf_dir
    model = load_for_inference(str(path), device="cpu").model
    rows = prompts(lengths=(5, 8))
    free = generate(model, rows, Sampling(max_new_tokens=12), eos_id=None).tokens
    target = free[0][3]  # the 4th token row 0 produces: make it the EOS
    first = free[0].index(target)
    as_eos = generate(model, rows, Sampling(max_new_tokens=12), eos_id=target)
    assert as_eos.tokens[0] == free[0][:first + 1] and as_eos.finish[0] == "eos"
    other = free[1].index(target) + 1 if target in free[1] else 12
    assert as_eos.tokens[1] == free[1][:other]  # the other row runs on until its own stop
    as_stop = generate(model, rows, Sampling(max_new_tokens=12, stop_ids=(target,)), eos_id=None)
    assert as_stop.tokens[0] == free[0][:first + 1] and as_stop.finish[0] == "stop"


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.8), (0, 0.3), (7, 0.5)])
def test_filtering_equals_transformers_processors(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    ref = logits.clone()
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    ours = filter_logits(logits, top_k=top_k, top_p=top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    torch.testing.assert_close(ours[~torch.isinf(ours)], logits[~torch.isinf(ours)])


def test_bad_sampling_and_long_prompts_are_one_line(hf_dir):
    _, path, _ = hf_dir
    model = load_for_inference(str(path), device="cpu").model
    for bad in (dict(top_p=0.0), dict(temperature=-1.0), dict(max_new_tokens=0), dict(top_k=-2)):
        with pytest.raises(UserError, match="--"):
            Sampling(**bad)
    with pytest.raises(UserError, match="max_seq_len=64"):
        generate(model, [[5] * 60], Sampling(max_new_tokens=10), eos_id=None)


def test_launcher_jsonl_chat_template_and_refusal(hf_dir, tmp_path, capsys):
    from launch.generate import main
    family, path, _ = hf_dir
    prompts_file = tmp_path / "p.jsonl"
    chat = [{"role": "user", "content": "hello there"}]
    prompts_file.write_text(json.dumps({"messages": chat}) + "\n" + json.dumps({"prompt": "def f(x):"}) + "\n")
    out = tmp_path / "out.jsonl"
    main(["--model", str(path), "--prompt", "def f", "--prompts", str(prompts_file), "--max_new_tokens", "6",
          "--output", str(out), "--batch_size", "2"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [("prompt" in r, "messages" in r) for r in rows] == [(True, False), (False, True), (True, False)]
    assert all(1 <= r["tokens"] <= 6 and isinstance(r["completion"], str) for r in rows)
    err = capsys.readouterr().err
    assert "prefill:" in err and "decode:" in err and "tokens/s" in err
    # the chat row is the template's rendering, continued exactly as generate() continues those ids
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    ids = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert ids.endswith("<bos>assistant:")
    model = load_for_inference(str(path), device="cpu")
    expect = generate(model.model, [tok.encode(ids, add_special_tokens=False)], Sampling(max_new_tokens=6),
                      eos_id=model.eos_ids)
    assert rows[1]["tokens"] == len(expect.tokens[0])

    plain = tmp_path / "plain"
    hf_model(family).save_pretrained(plain)
    save_tokenizer(plain)  # no chat template
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["--model", str(plain), "--prompts", str(prompts_file), "--max_new_tokens", "2"])
    assert exit_.value.code == 2
    line = capsys.readouterr().err.strip()
    assert "chat template" in line and "\n" not in line


def test_megatrain_generate_subcommand(hf_dir, tmp_path, capsys):
    from megatrain.cli import main
    family, path, _ = hf_dir
    if family != "llama":
        pytest.skip("one family is enough for the wiring")
    out = tmp_path / "o.jsonl"
    main(["generate", "--model", str(path), "--prompt", "def f", "--max_new_tokens", "3", "--output", str(out),
          "--threads", "1"])
    row = json.loads(out.read_text())
    assert row["prompt"] == "def f" and (row["tokens"], row["finish_reason"]) in ((3, "length"), (3, "eos"))
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"])
    assert exit_.value.code == 2 and "no such directory" in capsys.readouterr().err


def test_bf16_load_generates_close_to_fp32(hf_dir):
    family, path, _ = hf_dir
    if family != "llama":
        pytest.skip("one family is enough for the dtype path")
    loaded = load_for_inference(str(path), device="cpu", dtype="bf16")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    row = prompts(lengths=(6,))
    fp32 = generate(load_for_inference(str(path), device="cpu").model, row, Sampling(max_new_tokens=4), eos_id=None)
    bf16 = generate(loaded.model, row, Sampling(max_new_tokens=4), eos_id=None)
    assert bf16.tokens[0][0] == fp32.tokens[0][0]  # the first pick survives bf16 rounding on this sharp model
    with pytest.raises(UserError, match="--dtype=int8"):
        load_for_inference(str(path), device="cpu", dtype="int8")


def test_hf_generation_config_eos_ids_stop_too(hf_dir, tmp_path):
    """A chat model's end-of-turn id often lives only in generation_config.json: it ends a row like EOS."""
    import shutil
    family, path, _ = hf_dir
    if family != "llama":
        pytest.skip("one family is enough")
    copy = tmp_path / "m"
    shutil.copytree(path, copy)
    loaded = load_for_inference(str(copy), device="cpu")
    row = prompts(lengths=(5,))
    free = generate(loaded.model, row, Sampling(max_new_tokens=10), eos_id=None).tokens[0]
    turn_end = free[2]
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [loaded.tokenizer.eos_id, turn_end]}))
    reloaded = load_for_inference(str(copy), device="cpu")
    assert turn_end in reloaded.eos_ids and reloaded.eos_ids[0] == reloaded.tokenizer.eos_id
    out = generate(reloaded.model, row, Sampling(max_new_tokens=10), eos_id=reloaded.eos_ids)
    assert out.tokens[0] == free[:free.index(turn_end) + 1] and out.finish == ["eos"]


def test_a_bad_chat_template_flag_is_one_line_naming_it(hf_dir, tmp_path, capsys):
    from launch.generate import main
    _, path, _ = hf_dir
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["--model", str(path), "--prompts", str(prompts), "--chat_template", str(tmp_path / "none.jinja")])
    line = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in line and line.startswith("error: --chat_template=")
