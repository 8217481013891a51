"""Chat rendering and assistant masks against the tokenizer's own output, on a tiny local HF tokenizer (trained here
with the `tokenizers` library, no download) and on megatrain's sentencepiece tokenizers with the built-in template."""
import json

import numpy as np
import pytest

from megatrain.data.chat import BUILTIN_CHAT_TEMPLATE, RecordEncoder, resolve_chat_template
from megatrain.data.tokenizer import load_tokenizer, train_sentencepiece
from megatrain.errors import DataError

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
          " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# The same format with {% generation %} blocks: what return_assistant_tokens_mask reads
CHATML_GEN = ("{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
              "{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}{% else %}"
              "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Renders the last assistant turn differently from earlier ones: its prefixes are not prefixes of it
NOT_PREFIX = ("{% for message in messages %}{{ message['role'] + ': ' + message['content'] }}"
              "{% if loop.last %}{{ ' [end]' }}{% endif %}{{ '\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")

CONV = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 2 + 3?"},
        {"role": "assistant", "content": "it is 5."}, {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "world, hello"}]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, what is 2 + 3? it is 5.", "system user assistant be brief"] * 20, trainer)
    path = tmp_path_factory.mktemp("hf_tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>",
                            chat_template=CHATML).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    text = "<|user|>\nwhat is 2 + 3?\n<|assistant|>\nit is 5. hello world é\n" * 30
    train_sentencepiece(iter([text]), str(path), vocab_size=300, num_threads=1)
    return str(path)


def _own_ids(tok, messages, template, **kw):
    out = tok.tok.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True, **kw)
    return out


def test_ids_and_mask_match_the_tokenizers_own_rendering(hf_dir):
    tok = load_tokenizer(hf_dir)
    template, source = resolve_chat_template(None, tok)
    assert source == "tokenizer" and template == CHATML  # the model dir's chat_template.jinja
    ids, mask = RecordEncoder(tok, template).encode({"messages": CONV}, "x:1")
    own = _own_ids(tok, CONV, template)["input_ids"]
    assert ids.tolist() == list(own) + [tok.eos_id]  # exactly apply_chat_template's ids, then EOS
    # prefix method on a template without generation blocks: the assistant content and its end-of-turn
    assert tok.decode(ids[mask == 1][:-1].tolist()) == "it is 5.<|im_end|>\nworld, hello<|im_end|>\n"
    assert mask[-1] == 1  # the appended EOS is a target: an assistant spoke last
    # the same conversation under the {% generation %} template: our mask equals transformers' assistant mask
    ids_g, mask_g = RecordEncoder(tok, CHATML_GEN).encode({"messages": CONV}, "x:1")
    own_g = _own_ids(tok, CONV, CHATML_GEN, return_assistant_tokens_mask=True)
    assert ids_g.tolist()[:-1] == list(own_g["input_ids"]) and mask_g.tolist()[:-1] == list(own_g["assistant_masks"])
    assert ids_g.tolist() == ids.tolist() and mask_g.tolist() == mask.tolist()  # both methods agree


def test_prompt_completion_and_text(hf_dir):
    tok = load_tokenizer(hf_dir)
    enc = RecordEncoder(tok)
    ids, mask = enc.encode({"prompt": "what is 2 + 3? ", "completion": "it is 5."})
    prompt, completion = tok.encode_plain("what is 2 + 3? "), tok.encode_plain("it is 5.")
    assert ids.tolist() == prompt + completion + [tok.eos_id]
    assert mask.tolist() == [0] * len(prompt) + [1] * (len(completion) + 1)
    ids, mask = enc.encode("hello world")
    assert ids.tolist() == tok.encode("hello world") + [tok.eos_id] and mask.all()


def test_builtin_template_on_sentencepiece(sp_model):
    tok = load_tokenizer(sp_model)
    template, source = resolve_chat_template(None, tok)
    assert source == "builtin" and template == BUILTIN_CHAT_TEMPLATE
    enc = RecordEncoder(tok, template)
    conv = [{"role": "user", "content": "what is 2 + 3?"}, {"role": "assistant", "content": "it is 5."},
            {"role": "user", "content": "é?"}, {"role": "assistant", "content": "hello"}]
    text = enc.render(conv)
    assert text == "<|user|>\nwhat is 2 + 3?\n<|assistant|>\nit is 5.</s><|user|>\né?\n<|assistant|>\nhello</s>"
    ids, mask = enc.encode({"messages": conv})
    # the rendered </s> strings are the EOS id (sentencepiece never reads control pieces from text); no extra EOS
    assert ids.tolist() == (tok.encode("<|user|>\nwhat is 2 + 3?\n<|assistant|>\nit is 5.") + [tok.eos_id]
                            + tok.encode("<|user|>\né?\n<|assistant|>\nhello") + [tok.eos_id])
    assert tok.decode(ids[mask == 1].tolist()) == "it is 5.hello" and mask[-1] == 1
    assert int((ids[mask == 1] == tok.eos_id).sum()) == 2  # each assistant turn learns to stop
    # generation blocks (the built-in template has them) and the prefix method give the same spans
    assert enc.assistant_spans(conv, use_generation=True)[1] == enc.assistant_spans(conv, use_generation=False)[1]
    gen = enc.render(conv[:1], add_generation_prompt=True)
    assert gen.endswith("<|assistant|>\n")


def test_chat_template_override_file_string_and_errors(tmp_path, hf_dir):
    tok = load_tokenizer(hf_dir)
    f = tmp_path / "t.jinja"
    f.write_text(CHATML_GEN)
    assert resolve_chat_template(str(f), tok) == (CHATML_GEN, f"file:{f}")
    assert resolve_chat_template(CHATML_GEN, tok) == (CHATML_GEN, "string")
    assert resolve_chat_template("builtin", tok)[0] == BUILTIN_CHAT_TEMPLATE  # overrides the tokenizer's own
    with pytest.raises(DataError, match=r"data.chat_template='nope.jinja': not 'builtin', an existing \.jinja file"):
        resolve_chat_template("nope.jinja", tok)
    with pytest.raises(DataError, match=r"f\.jsonl:3: the chat template does not render the conversation's prefixes"):
        RecordEncoder(tok, NOT_PREFIX).encode({"messages": CONV}, "f.jsonl:3")
    with pytest.raises(DataError, match=r"f\.jsonl:1: chat template failed to render \(TemplateError: no system messages\)"):
        RecordEncoder(tok, "{{ raise_exception('no system messages') }}").encode({"messages": CONV}, "f.jsonl:1")


def test_prepare_with_hf_tokenizer_stores_masks(tmp_path, hf_dir):
    from megatrain.config import DataConfig
    from megatrain.data.indexed import ShardReader
    from megatrain.data.prepare import prepare_corpus
    src = tmp_path / "chat.jsonl"
    convs = [CONV, CONV[1:3], [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]]
    src.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    meta = prepare_corpus(DataConfig(sources=[str(src)], path=str(tmp_path / "out"), tokenizer=hf_dir,
                                     val_fraction=0.0, num_workers=1))
    assert meta["loss_mask"] and meta["chat_template"]["source"] == "tokenizer"
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == CHATML
    r = ShardReader(str(tmp_path / "out" / "train-00000"))
    tok = load_tokenizer(str(tmp_path / "out"))
    enc = RecordEncoder(tok, CHATML)
    for i, conv in enumerate(convs):
        ids, mask = enc.encode({"messages": conv})
        a, b = r.offsets[i], r.offsets[i + 1]
        assert r.tokens[a:b].tolist() == ids.tolist() and r.mask[a:b].tolist() == mask.tolist()
    assert "mask_crc32" in meta["splits"]["train"]["checksums"]["train-00000"]


def test_generation_prompt_helpers(tmp_path, sp_model):
    from megatrain.config import DataConfig
    from megatrain.data.chat import encode_chat_prompt, load_chat_template
    from megatrain.data.prepare import prepare_corpus
    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps({"messages": CONV[1:3]}) + "\n")
    prepare_corpus(DataConfig(sources=[str(src)], path=str(tmp_path / "out"), tokenizer=sp_model, val_fraction=0.0,
                              num_workers=1))
    template = load_chat_template(str(tmp_path / "out"))
    assert template == BUILTIN_CHAT_TEMPLATE
    tok = load_tokenizer(str(tmp_path / "out"))
    ids = encode_chat_prompt(tok, template, CONV[1:2])
    assert ids == tok.encode("<|user|>\nwhat is 2 + 3?\n<|assistant|>\n")
    full, mask = RecordEncoder(tok, template).encode({"messages": CONV[1:3]})
    assert full[:len(ids)].tolist() == ids and not mask[:len(ids)].any() and mask[len(ids):].all()


def test_no_second_eos_when_the_template_closes_with_it(tmp_path, hf_dir):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(hf_dir)
    hf.eos_token = "<|im_end|>"  # an instruct model's ChatML: the end of turn is the EOS
    path = tmp_path / "im_end"
    hf.save_pretrained(path)
    tok = load_tokenizer(str(path))
    ids, mask = RecordEncoder(tok, CHATML).encode({"messages": CONV})
    own = _own_ids(tok, CONV, CHATML)["input_ids"]
    assert ids.tolist() == list(own)  # "...<|im_end|>\n": no EOS appended after the newline
    assert tok.decode(ids[mask == 1].tolist()) == "it is 5.<|im_end|>\nworld, hello<|im_end|>\n"


def test_template_read_from_tokenizer_config_json(tmp_path, hf_dir):
    import os
    import shutil
    path = tmp_path / "cfg_template"
    shutil.copytree(hf_dir, path)
    os.remove(path / "chat_template.jinja")  # older layout: the template inside tokenizer_config.json
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = CHATML_GEN
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(str(path))
    assert resolve_chat_template(None, tok) == (CHATML_GEN, "tokenizer")
    without = tmp_path / "no_template"
    shutil.copytree(hf_dir, without)
    os.remove(without / "chat_template.jinja")
    assert resolve_chat_template(None, load_tokenizer(str(without)))[1] == "builtin"
    tok = load_tokenizer(str(without))
    ids, mask = RecordEncoder(tok, BUILTIN_CHAT_TEMPLATE).encode({"messages": CONV[1:3]})
    assert ids.tolist() == tok.encode_plain("<|user|>\nwhat is 2 + 3?\n<|assistant|>\nit is 5.") + [tok.eos_id]
    assert tok.decode(ids[mask == 1].tolist()) == "it is 5.<|endoftext|>"


def test_byte_fallback_pieces_masked_with_their_character(sp_model):
    tok = load_tokenizer(sp_model)
    enc = RecordEncoder(tok, BUILTIN_CHAT_TEMPLATE)
    conv = [{"role": "user", "content": "中?"}, {"role": "assistant", "content": "文😀 ok"}]  # unseen: byte pieces
    ids, mask = enc.encode({"messages": conv})
    assert ids.tolist() == tok.encode("<|user|>\n中?\n<|assistant|>\n文😀 ok") + [tok.eos_id]
    assert tok.decode(ids[mask == 1].tolist()) == "文😀 ok"
