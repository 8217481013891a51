"""Teacher cache: write → read round trip, mismatches as one-line errors, and distilling from the cache."""
import json
import os

import pytest
import torch

from megatrain.compress.distill import DistillationTask
from megatrain.compress.sparse_kl import topk_targets
from megatrain.compress.teacher_cache import (TeacherCache, dataset_identity, tensor_crc, write_manifest,
                                              write_teacher_cache)
from megatrain.models.transformer import build_transformer
from tests.unit.test_distill import _tiny_cfg, assert_distilled_closer


def _write(cfg, teacher, out, *, k=8, num_samples=10, dtype="float32", shard_samples=3, temperature=2.0):
    from megatrain.data.dataset import PackedTokenDataset
    data = PackedTokenDataset(cfg.data.path, "train", cfg.seq_len)
    manifest = write_teacher_cache(str(out), teacher, data, k=k, temperature=temperature,
                                   vocab_size=cfg.model.vocab_size, value_dtype=dtype, num_samples=num_samples,
                                   micro_batch_size=4, shard_samples=shard_samples,
                                   teacher_info={"path": "t", "weights_crc32": tensor_crc(teacher)}, log=lambda m: None)
    write_manifest(str(out), manifest)
    return data, manifest


@pytest.fixture
def setup(tiny_corpus, tmp_path):
    cfg = _tiny_cfg(tiny_corpus, tmp_path)
    teacher = build_transformer(cfg.model.model_copy(update={"hidden_size": 48}), seed=11).eval()
    return cfg, teacher


@pytest.mark.parametrize("dtype, tol", [("float32", 0.0), ("float16", 1e-3)])
def test_round_trip(setup, tmp_path, dtype, tol):
    cfg, teacher = setup
    data, manifest = _write(cfg, teacher, tmp_path / "c", dtype=dtype)
    assert [s["num_samples"] for s in manifest["shards"]] == [3, 3, 3, 1]  # 10 samples, 3 per shard
    assert not [f for f in os.listdir(tmp_path / "c") if ".tmp" in f]  # every temp file was renamed
    cache = TeacherCache(str(tmp_path / "c"))
    assert len(cache) == 10 and cache.k == 8
    for i in (0, 2, 3, 9):  # first/last of a shard, the short last shard
        got = cache.targets(i)
        with torch.no_grad():
            ids, logp, tail = topk_targets(teacher(data[i]["input_ids"][None])[0], k=8, temperature=2.0)
        assert torch.equal(got["teacher_ids"].long(), ids), i
        torch.testing.assert_close(got["teacher_logp"], logp, rtol=tol, atol=tol)
        torch.testing.assert_close(got["teacher_tail"], tail, rtol=1e-6, atol=1e-6)
        assert got["teacher_ids"].shape == (cfg.seq_len, 8) and got["teacher_tail"].shape == (cfg.seq_len,)
    with pytest.raises(IndexError):
        cache.targets(10)


def _check(cache, cfg, dataset, **change):
    args = dict(vocab_size=cfg.model.vocab_size, seq_len=cfg.seq_len, temperature=2.0, k=None,
                data=dataset_identity(dataset, len(cache)), teacher_crc=None)
    args.update(change)
    cache.check(**args)


def test_mismatches_are_one_line_errors(setup, tmp_path):
    cfg, teacher = setup
    data, _ = _write(cfg, teacher, tmp_path / "c")
    cache = TeacherCache(str(tmp_path / "c"))
    _check(cache, cfg, data, k=8, teacher_crc=tensor_crc(teacher))  # the matching config passes
    ident = dataset_identity(data, len(cache))
    cases = [
        (dict(vocab_size=cfg.model.vocab_size + 1), r"holds vocab_size=\d+ but model.vocab_size=\d+"),
        (dict(seq_len=32), r"data.seq_len=16 but the config has 32; set data.seq_len=16"),
        (dict(k=4), r"holds k=8 .* distill.cache_topk=4; set distill.cache_topk=8"),
        (dict(temperature=1.0), r"temperature 2.0 but distill.temperature=1.0; set distill.temperature=2.0"),
        (dict(data={**ident, "dataset_samples": 5}), r"written for \d+ 'train' samples .* yields 5; point data.path"),
        (dict(data={**ident, "tokens_crc32": "0"}), r"the tokens of data.path=.* differ from the cached ones"),
        (dict(teacher_crc="deadbeef"), r"distill.teacher has CRC deadbeef; point distill.teacher at the cached"),
    ]
    for change, pattern in cases:
        with pytest.raises(ValueError, match=pattern) as err:
            _check(cache, cfg, data, **change)
        assert "\n" not in str(err.value) and "launch/cache_teacher.py" in str(err.value)


def test_bad_cache_directories(setup, tmp_path):
    cfg, teacher = setup
    with pytest.raises(ValueError, match="has no manifest.json .* launch/cache_teacher.py"):
        TeacherCache(str(tmp_path))
    _write(cfg, teacher, tmp_path / "c")
    mpath = tmp_path / "c" / "manifest.json"
    manifest = json.loads(mpath.read_text())
    mpath.write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(ValueError, match="is not megatrain-teacher-topk v1; rewrite it"):
        TeacherCache(str(tmp_path / "c"))
    mpath.write_text(json.dumps(manifest))
    with open(tmp_path / "c" / "s00001.logp.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match=r"s00001.logp.bin has 100 bytes, the manifest needs \d+"):
        TeacherCache(str(tmp_path / "c"))


def test_task_checks_the_cache_against_the_config(setup, tmp_path):
    cfg, teacher = setup
    _write(cfg, teacher, tmp_path / "c", temperature=1.0)
    bad = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"teacher_cache": str(tmp_path / "c")})})
    with pytest.raises(ValueError, match="set distill.temperature=1.0"):  # the config says T=2
        DistillationTask(bad, student=build_transformer(cfg.model))
    mse = bad.model_copy(update={"distill": bad.distill.model_copy(update={"hidden_mse": 1.0})})
    with pytest.raises(ValueError, match="distill.hidden_mse needs the live teacher"):
        DistillationTask(mse, student=build_transformer(cfg.model))


def test_live_teacher_with_pipeline_is_refused(tiny_corpus, tmp_path):
    from megatrain.compress.passes import run_distill
    cfg = _tiny_cfg(tiny_corpus, tmp_path, teacher=str(tmp_path))
    cfg = cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"pp": 2})})
    with pytest.raises(ValueError, match="parallel.pp>1 needs a precomputed teacher.*set distill.teacher_cache"):
        run_distill(cfg)


def test_distilling_from_the_cache_gets_closer_to_the_teacher(setup, tmp_path):
    # The teacher's top-16 of 512 tokens + the tail bucket, 100 steps: the student's full KL to the teacher
    # (all 512 tokens, T=1) ends well below a student trained on hard labels from the same start.
    cfg, teacher = setup
    data, _ = _write(cfg, teacher, tmp_path / "c", k=16, num_samples=200, dtype="float16", shard_samples=64)
    cfg = _tiny_cfg(cfg.data.path, tmp_path, alpha=0.9, teacher_cache=str(tmp_path / "c"))
    distilled, hard = (build_transformer(cfg.model, seed=cfg.train.seed) for _ in range(2))
    task = DistillationTask(cfg, student=distilled)
    train = task.train_dataset()
    assert len(train) == 200 and set(train[0]) == {"input_ids", "labels", "teacher_ids", "teacher_logp", "teacher_tail"}
    assert_distilled_closer(task, teacher, distilled, hard, train)
    val = task.val_dataset()
    _, stats = task.loss_and_stats(distilled, torch.utils.data.default_collate([val[0], val[1]]))
    assert set(task.summarize(stats)) == {"loss", "ce", "ppl"}  # validation: no cached targets, hard-label CE
