"""launch/evaluate.py on language models: a trained gpt2 (tied) / llama checkpoint on its own validation split and
on a raw text file, the same model saved with save_model, and a Hugging Face dir on a raw JSONL file; greedy
generation from the checkpoint equals a full-forward argmax loop. Every
reported loss equals a hand computation (the strictly loaded plain model, or transformers' own forward); the eval
loop counts only labels != -100 and feeds positions/segments to the model."""
import json

import pytest
import torch
import torch.nn.functional as F

from megatrain.infer.lm_eval import evaluate_lm
from megatrain.testing import run_ranks
from tests.conftest import tiny_overrides

TEXT = "".join(f"def add_{i}(a, b):\n    return a + b * {i}\n\n" for i in range(40))


def _evaluate(argv, capsys=None):
    from launch.evaluate import main
    main(argv)
    return json.loads(open(next(a.split("=", 1)[1] for a in argv if a.startswith("--log.dir=")) + "/eval.json").read())


def _hand_loss(model, windows: torch.Tensor) -> float:
    """Mean next-token CE of (N, T+1) token windows, each scored on its own."""
    with torch.no_grad():
        logits = model(windows[:, :-1])  # (N, T, V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), windows[:, 1:].reshape(-1)).item()


def _windows(stream: list[int], seq_len: int) -> torch.Tensor:
    n = (len(stream) - 1) // seq_len
    return torch.stack([torch.tensor(stream[i * seq_len:i * seq_len + seq_len + 1]) for i in range(n)])


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_checkpoint_own_split_raw_file_and_saved_model(tiny_corpus, tmp_path, arch):
    from megatrain.data.dataset import PackedTokenDataset
    from megatrain.data.tokenizer import load_tokenizer
    from megatrain.weights.sources import load_model, save_model
    run = tmp_path / "run"
    run_ranks(1, ["launch/pretrain.py", *tiny_overrides(tiny_corpus, run, arch, **{
        "train.max_steps": 3, "checkpoint.save_final": True})], timeout=400)
    plain, model_cfg = load_model(str(run))  # strict state-dict load: the independent reference
    plain.eval()
    if arch == "gpt2":
        assert model_cfg.tied

    # 1. its own validation split: data.path, seq_len 32, micro-batch 4 and eval_batches 2 from the checkpoint
    got = _evaluate([f"--checkpoint.resume={run}", f"--log.dir={tmp_path / 'ev'}"])
    val = PackedTokenDataset(tiny_corpus, "val", 32)
    windows = torch.stack([torch.from_numpy(val.window(i * 32, 33)) for i in range(8)])
    assert got["split"] == "val" and got["seq_len"] == 32 and got["metrics"]["tokens"] == 8 * 32
    assert got["metrics"]["loss"] == pytest.approx(_hand_loss(plain, windows), rel=1e-5)
    last_val = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in r][-1]
    assert got["metrics"]["loss"] == pytest.approx(last_val["val_loss"], rel=1e-5)  # the trainer's validation
    whole = _evaluate([f"--checkpoint.resume={run}", "--train.eval_batches=0", f"--log.dir={tmp_path / 'ev0'}"])
    windows = torch.stack([torch.from_numpy(val.window(i * 32, 33)) for i in range(len(val))])
    assert whole["metrics"]["tokens"] == windows[:, 1:].numel()
    assert whole["metrics"]["loss"] == pytest.approx(_hand_loss(plain, windows), rel=1e-5)
    assert got["metrics"]["ppl"] == pytest.approx(torch.tensor(got["metrics"]["loss"]).exp().item(), rel=1e-6)
    assert got["metrics"]["loss"] < 7.0  # a trained model, not random weights (ln 512 = 6.24 at init)

    # 2. a raw text file, tokenized with the run's tokenizer; eval_batches honoured
    raw = tmp_path / "held_out.txt"
    raw.write_text(TEXT)
    got = _evaluate([f"--checkpoint.resume={run}", f"--data.path={raw}", f"--log.dir={tmp_path / 'raw'}"])
    tok = load_tokenizer(tiny_corpus)
    stream = tok.encode(TEXT) + [tok.eos_id]
    windows = _windows(stream, 32)
    assert got["split"] == "all" and got["metrics"]["tokens"] == windows[:, 1:].numel()
    assert got["metrics"]["loss"] == pytest.approx(_hand_loss(plain, windows), rel=1e-5)
    two = _evaluate([f"--checkpoint.resume={run}", f"--data.path={raw}", "--train.eval_batches=2",
                     "--train.micro_batch_size=3", f"--log.dir={tmp_path / 'raw2'}"])
    assert two["metrics"]["tokens"] == 6 * 32
    assert two["metrics"]["loss"] == pytest.approx(_hand_loss(plain, windows[:6]), rel=1e-5)

    # generation from the checkpoint (KV cache, its tokenizer found through the run) = a full-forward greedy loop
    from launch.generate import main as generate_main
    out = tmp_path / "gen.jsonl"
    generate_main(["--model", str(run), "--prompt", "def f(", "--max_new_tokens", "6", "--output", str(out)])
    ids = tok.encode("def f(")
    new_ids = []
    with torch.no_grad():
        for _ in range(6):
            new_ids.append(int(plain(torch.tensor([ids + new_ids]))[0, -1].argmax()))
            if new_ids[-1] == tok.eos_id:
                break
    row = json.loads(out.read_text())
    assert row["tokens"] == len(new_ids)
    assert row["completion"] == tok.decode(new_ids[:-1] if new_ids[-1] == tok.eos_id else new_ids)

    # 3. the same weights as a saved model dir, scored on the prepared corpus (no tokenizer needed)
    saved = save_model(str(tmp_path / "saved"), plain, model_cfg)
    again = _evaluate([f"--checkpoint.resume={saved}", f"--data.path={tiny_corpus}", "--data.seq_len=32",
                       f"--log.dir={tmp_path / 'saved_ev'}"])
    assert again["model_kind"] == "saved"
    assert again["metrics"]["loss"] == pytest.approx(whole["metrics"]["loss"], rel=1e-6)


def test_hf_dir_on_raw_jsonl_equals_transformers_loss(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from tests.unit.test_generate import hf_model, save_tokenizer
    from transformers import AutoTokenizer
    hf = tmp_path / "hf"
    ref = hf_model("llama")
    ref.save_pretrained(hf)
    save_tokenizer(hf)
    docs = [f"def f(x):\n    return x + {i}\n" for i in range(30)]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    got = _evaluate([f"--checkpoint.resume={hf}", f"--data.path={data}", "--data.seq_len=16",
                     "--train.micro_batch_size=4", f"--log.dir={tmp_path / 'ev'}"])
    tok = AutoTokenizer.from_pretrained(str(hf))
    stream = [t for d in docs for t in tok(d)["input_ids"] + [tok.eos_token_id]]
    windows = _windows(stream, 16)
    with torch.no_grad():
        out = ref(windows[:, :-1], labels=windows[:, :-1])  # transformers shifts labels itself
        inner = out.loss.double() * windows.shape[0] * 15  # its mean covers 15 of each window's 16 targets
        last = F.cross_entropy(out.logits[:, -1].double(), windows[:, -1], reduction="sum")
    assert got["model_kind"] == "hf" and got["metrics"]["tokens"] == windows[:, 1:].numel()
    assert got["metrics"]["loss"] == pytest.approx(((inner + last) / windows[:, 1:].numel()).item(), rel=1e-5)

    # a data dir tokenized by another tokenizer is refused (its loss would mean nothing)
    from megatrain.config import build_config
    from megatrain.data.prepare import prepare_corpus
    from tokenizers import ByteLevelBPETokenizer
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(docs, vocab_size=270, special_tokens=["<pad>", "<eos>"], show_progress=False)
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>").save_pretrained(
        tmp_path / "other_tok")
    other = tmp_path / "other"
    prepare_corpus(build_config({"data": {"path": str(other), "sources": [str(data)], "tokenizer": str(
        tmp_path / "other_tok"), "val_fraction": 0.2, "min_chars": 1, "num_workers": 1}}).data, seed=0)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        _evaluate([f"--checkpoint.resume={hf}", f"--data.path={other}", f"--log.dir={tmp_path / 'ev3'}"])
    assert "another tokenizer" in capsys.readouterr().err

    # without --data.path an HF model has nothing to be scored on: one line, exit 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        _evaluate([f"--checkpoint.resume={hf}", f"--log.dir={tmp_path / 'none'}"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "--data.path" in err and "\n" not in err


def test_eval_loop_counts_only_labels_and_passes_packing():
    """Masked labels are not counted; a packed row with positions/segments scores each document as if alone."""
    from megatrain.config.schema import ModelConfig
    from megatrain.models.transformer import build_transformer
    model = build_transformer(ModelConfig(arch="llama", vocab_size=50, hidden_size=32, num_layers=2, num_heads=4,
                                          num_kv_heads=2, max_seq_len=32), seed=1).eval()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 50, (7,), generator=g), torch.randint(0, 50, (9,), generator=g)
    ids = torch.cat([a[:-1], b[:-1]])  # (14,) two documents packed
    labels = torch.cat([a[1:], b[1:]]).clone()
    labels[:2] = -100  # a masked prompt of document a
    labels[6:9] = -100  # ... and of document b
    row = {"input_ids": ids, "labels": labels, "positions": torch.cat([torch.arange(6), torch.arange(8)]),
           "segments": torch.cat([torch.zeros(6, dtype=torch.long), torch.ones(8, dtype=torch.long)])}
    got = evaluate_lm(model, [row, row], micro_batch_size=1)
    with torch.no_grad():
        la, lb = model(a[None, :-1])[0], model(b[None, :-1])[0]
    nll = torch.cat([F.cross_entropy(la.double(), a[1:], reduction="none")[2:],
                     F.cross_entropy(lb.double(), b[1:], reduction="none")[3:]])
    assert got["tokens"] == 2 * nll.numel() and got["samples"] == 2
    assert got["loss"] == pytest.approx(nll.mean().item(), rel=1e-6)
    plain = evaluate_lm(model, [{k: row[k] for k in ("input_ids", "labels")}], micro_batch_size=1)
    assert abs(plain["loss"] - got["loss"]) > 1e-4  # without the masks document b would see document a
