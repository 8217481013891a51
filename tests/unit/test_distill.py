"""Distillation: KL against references (temperature, vocab-parallel), the task end to end, bad inputs."""
import pytest
import torch
import torch.nn.functional as F

from megatrain.compress.distill import DistillationTask
from megatrain.compress.kl import distill_loss, kl_per_token, vocab_parallel_kl
from megatrain.config import build_config
from megatrain.models.transformer import build_transformer
from megatrain.testing import spawn_group


def _reference_kl(s, t, T):
    # KL(p_t || p_s) = sum p_t (log p_t - log p_s), from the definition in float64
    pt = torch.softmax(t.double() / T, -1)
    return (pt * (pt.log() - torch.log_softmax(s.double() / T, -1))).sum(-1)


@pytest.mark.parametrize("T", [1.0, 2.0, 0.5])
def test_kl_matches_reference_and_gradient(T):
    torch.manual_seed(0)
    s, t = torch.randn(6, 11, requires_grad=True), torch.randn(6, 11) * 3
    kl = kl_per_token(s, t, temperature=T)
    torch.testing.assert_close(kl.double(), _reference_kl(s, t, T), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl, F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                                            reduction="none").sum(-1))
    kl.sum().backward()
    # d KL / d s = (softmax(s/T) - softmax(t/T)) / T
    torch.testing.assert_close(s.grad, (torch.softmax(s / T, -1) - torch.softmax(t / T, -1)).detach() / T)
    loss = distill_loss(kl.mean(), torch.tensor(3.0), alpha=0.25, temperature=T)
    torch.testing.assert_close(loss, 0.25 * T * T * kl.mean() + 0.75 * 3.0)


def _vocab_parallel_worker(rank, world, s_full, t_full, vocab, T):
    padded = s_full.shape[-1]
    per = padded // world
    s = s_full[:, rank * per:(rank + 1) * per].clone().requires_grad_(True)
    t = t_full[:, rank * per:(rank + 1) * per]
    kl = vocab_parallel_kl(s, t, group=torch.distributed.group.WORLD, vocab_size=vocab, temperature=T)
    ref_s = s_full[:, :vocab].clone().requires_grad_(True)
    ref = kl_per_token(ref_s, t_full[:, :vocab], temperature=T)
    torch.testing.assert_close(kl, ref, rtol=1e-5, atol=1e-6)
    (kl * torch.arange(1, 6).float()).sum().backward()
    (ref * torch.arange(1, 6).float()).sum().backward()
    grad_ref = torch.cat([ref_s.grad, torch.zeros(5, padded - vocab)], 1)[:, rank * per:(rank + 1) * per]
    torch.testing.assert_close(s.grad, grad_ref, rtol=1e-5, atol=1e-7)


def test_vocab_parallel_kl_equals_full_kl():
    torch.manual_seed(1)
    vocab, padded = 13, 14  # one padding column on the last rank, as the tp LM head pads the vocabulary
    s, t = torch.randn(5, padded), torch.randn(5, padded) * 2
    s[:, vocab:], t[:, vocab:] = 100.0, -100.0  # padding must not count, whatever it holds
    spawn_group(2, _vocab_parallel_worker, s, t, vocab, 2.0)


def _tiny_cfg(corpus, tmp_path, **distill):
    from megatrain.train.lm_task import read_vocab_size
    return build_config({
        "model": {"arch": "gpt2", "vocab_size": read_vocab_size(corpus), "hidden_size": 32, "num_layers": 1,
                  "num_heads": 2, "max_seq_len": 16},
        "data": {"path": corpus, "seq_len": 16},
        "train": {"seed": 3}, "log": {"dir": str(tmp_path)}, "distill": {"temperature": 2.0, **distill}})


def _kl_to_teacher(model, teacher, batches, T):
    with torch.no_grad():
        return torch.stack([kl_per_token(model(b["input_ids"]).flatten(0, 1), teacher(b["input_ids"]).flatten(0, 1),
                                         temperature=T).mean() for b in batches]).mean().item()


def _train(task, model, data, steps, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(len(data), (4,), generator=g).tolist()
        batch = torch.utils.data.default_collate([data[i] for i in idx])
        loss, _ = task.loss_and_stats(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_distilled_student_is_closer_to_teacher_than_hard_labels(tiny_corpus, tmp_path):
    torch.manual_seed(0)
    cfg = _tiny_cfg(tiny_corpus, tmp_path, alpha=0.9)
    teacher_cfg = cfg.model.model_copy(update={"hidden_size": 48})
    teacher = build_transformer(teacher_cfg, seed=11)  # a fixed function the student can imitate
    distilled, hard = (build_transformer(cfg.model, seed=cfg.train.seed) for _ in range(2))  # the same start
    task = DistillationTask(cfg, teacher=(teacher, teacher_cfg), student=distilled)
    data = task.train_dataset()
    assert task.build_model() is distilled
    assert_distilled_closer(task, teacher, distilled, hard, data)


def assert_distilled_closer(task, teacher, distilled, hard, data, steps=100):
    """Train ``distilled`` with the task and ``hard`` on labels alone for the same steps from the same start;
    the distilled student must end much closer to the teacher (full KL at T=1 on validation batches)."""
    _train(task, distilled, data, steps)
    _train(task.lm, hard, data, steps)
    val = task.val_dataset()
    batches = [torch.utils.data.default_collate([val[i] for i in range(j, j + 4)]) for j in range(0, 16, 4)]
    kl_d, kl_h = (_kl_to_teacher(m, teacher, batches, 1.0) for m in (distilled, hard))
    assert kl_d < 0.7 * kl_h, (kl_d, kl_h)


def test_hidden_mse_with_projection_trains(tiny_corpus, tmp_path):
    cfg = _tiny_cfg(tiny_corpus, tmp_path, hidden_mse=1.0)
    teacher_cfg = cfg.model.model_copy(update={"hidden_size": 48})
    task = DistillationTask(cfg, teacher=(build_transformer(teacher_cfg, seed=1), teacher_cfg),
                            student=build_transformer(cfg.model, seed=2))
    model = task.build_model()
    assert model.distill_proj.weight.shape == (48, 32)
    batch = torch.utils.data.default_collate([task.train_dataset()[i] for i in range(2)])
    loss, stats = task.loss_and_stats(model, batch)
    loss.backward()
    assert model.distill_proj.weight.grad is not None and torch.isfinite(loss)
    assert all(p.grad is None for p in task.teacher.parameters())  # frozen teacher
    assert set(task.summarize(stats)) == {"loss", "ce", "ppl", "kl"}


def test_teacher_vocab_mismatch_is_one_line_error(tiny_corpus, tmp_path):
    cfg = _tiny_cfg(tiny_corpus, tmp_path)
    teacher_cfg = cfg.model.model_copy(update={"vocab_size": cfg.model.vocab_size + 1})
    with pytest.raises(ValueError, match=r"distill.teacher has vocab_size=\d+ but the student's model.vocab_size") as e:
        DistillationTask(cfg, teacher=(build_transformer(teacher_cfg), teacher_cfg))
    assert "\n" not in str(e.value)


@pytest.mark.slow  # importing transformers dominates
def test_teacher_from_a_hugging_face_directory(tiny_corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = _tiny_cfg(tiny_corpus, tmp_path)
    hf_cfg = transformers.GPT2Config(vocab_size=cfg.model.vocab_size, n_embd=32, n_layer=1, n_head=2, n_positions=16,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    cfg = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"teacher": str(tmp_path / "hf")})})
    task = DistillationTask(cfg, student=build_transformer(cfg.model, seed=0))
    ids = torch.randint(0, cfg.model.vocab_size, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(task.teacher_logits(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
    assert not any(p.requires_grad for p in task.teacher.parameters()) and not task.teacher.training
