"""Prepared data holds the special tokens exactly as the HF tokenizer's own ``__call__`` adds them (plus the
document-separating EOS prepare always appends); a JSON-lines file named ``.json`` is read line by line."""
import json

import os

import pytest

pytest.importorskip("transformers")

from megatrain.config.schema import DataConfig  # noqa: E402
from megatrain.data.indexed import ShardReader  # noqa: E402
from megatrain.data.prepare import prepare_corpus  # noqa: E402
from megatrain.data.tokenizer import load_tokenizer  # noqa: E402


def make_tokenizer(path, *, bos: bool, eos: bool):
    """A tiny byte-level BPE saved as an HF tokenizer dir whose __call__ adds BOS and/or EOS."""
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import PreTrainedTokenizerFast
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["def f(x):\n    return x + 1\n"] * 20, vocab_size=280,
                            special_tokens=["<bos>", "<eos>"], show_progress=False)
    single = " ".join((["<bos>"] if bos else []) + ["$A"] + (["<eos>"] if eos else []))
    bpe._tokenizer.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("<bos>", 0), ("<eos>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<bos>", eos_token="<eos>").save_pretrained(path)
    return path


@pytest.mark.parametrize("bos,eos", [(True, False), (False, False), (True, True)])
def test_documents_carry_the_tokenizers_specials(tmp_path, bos, eos):
    from transformers import AutoTokenizer
    tok_dir = make_tokenizer(tmp_path / "tok", bos=bos, eos=eos)
    texts = ["def g(y):\n    return y\n", "x = 1\n"]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    summary = prepare_corpus(DataConfig(path=str(tmp_path / "data"), sources=[str(tmp_path / "a.jsonl")],
                                        tokenizer=str(tok_dir), val_fraction=0.0, min_chars=1,
                                        num_workers=1), seed=0)
    hf_tok = AutoTokenizer.from_pretrained(tok_dir)
    meta = json.loads(open(os.path.join(summary["path"], "meta.json")).read())
    docs = []
    for shard in meta["splits"]["train"]["shards"]:
        r = ShardReader(os.path.join(summary["path"], shard))
        docs += [r.document(i).tolist() for i in range(r.num_docs)]
    docs.sort()
    want = sorted((ids if ids[-1:] == [1] else ids + [1]) for ids in (hf_tok(t)["input_ids"] for t in texts))
    assert docs == want
    assert (docs[0][0] == 0) is bos
    assert load_tokenizer(str(tok_dir)).prefix == ([0] if bos else [])


def test_json_lines_named_json(tmp_path):
    from megatrain.data.sources import SourceStats, iter_documents
    (tmp_path / "a.json").write_text('{"text": "one"}\n{"text": "two"}\n')
    (tmp_path / "b.json").write_text('{\n  "text": "a whole document"\n}\n')
    docs = [text for _, text in iter_documents([str(tmp_path / "a.json"), str(tmp_path / "b.json")], SourceStats())]
    assert docs[:2] == ["one", "two"] and len(docs) == 3 and '"a whole document"' in docs[2]
