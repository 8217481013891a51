"""Checkpoint I/O: save/load GB/s of megatrain's layout-free format (checksums, fsync, manifest; verified on
load) vs safetensors, torch.save (both fsynced) and torch DCP on the same bytes, interleaved in one run, and peak RSS per rank when a ~1B-parameter Hugging Face
checkpoint (random weights written by transformers) is loaded into tp=2 × pp=2 on CPU.

    python benchmarks/bench_checkpoint.py [--io-params 1e8] [--rounds 3] [--hf-size 1b|tiny] [--skip-rss]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

import torch  # noqa: E402
import warnings  # noqa: E402

# DCP warns on every call that it runs without a process group: the single-process intent is ours
warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")

SIZES = {  # Llama-3.2-1B shape (1.24B params) and a tiny one for a quick check
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "tiny": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True),
}


def _drop_cache(path: str) -> None:
    """Best effort: evict a file from the page cache so load timings read the disk path we control."""
    try:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    except (OSError, AttributeError):
        pass


def _fsync(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _writers_and_readers(tensors: dict):
    """name -> (save(dir), load(dir) -> dict of tensors). Every writer fsyncs, so all pay for durability."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file, save_file

    from megatrain.checkpoint.store import CheckpointSource, FORMAT, atomic_write_text, write_tensors

    def mega_save(d):  # one-pass checksums, fsync and the manifest
        entry = write_tensors(os.path.join(d, "model-s0.safetensors"), tensors)
        atomic_write_text(os.path.join(d, "manifest.json"), json.dumps(
            {"format": FORMAT, "step": 0, "config": {}, "files": {"model-s0.safetensors": entry}}))

    def mega_load(d):  # checksums verified while reading
        src = CheckpointSource(d, verify=True)
        return {k: src.tensor(k) for k in tensors}

    def st_save(d):
        save_file(tensors, os.path.join(d, "m.safetensors"))
        _fsync(os.path.join(d, "m.safetensors"))

    def pt_save(d):
        torch.save(tensors, os.path.join(d, "m.pt"))
        _fsync(os.path.join(d, "m.pt"))

    def dcp_load(d):
        out = {k: torch.empty_like(v) for k, v in tensors.items()}
        dcp.load(out, checkpoint_id=d, no_dist=True)
        return out

    return {
        "megatrain layout-free": (mega_save, mega_load),
        "safetensors+fsync": (st_save, lambda d: load_file(os.path.join(d, "m.safetensors"))),
        "torch.save+fsync": (pt_save, lambda d: torch.load(os.path.join(d, "m.pt"), weights_only=True)),
        "torch DCP": (lambda d: dcp.save(tensors, checkpoint_id=d, no_dist=True), dcp_load),
    }


def io_table(n_params: int, out: str, *, rounds: int = 3) -> dict:
    """Save and load times of each writer: one warm-up round, then ``rounds`` rounds, the writers' order
    rotated every round so none always runs first (or right after another's page-cache churn)."""
    n_tensors = 64
    tensors = {f"layers.{i}.w": torch.randn(n_params // n_tensors) for i in range(n_tensors)}
    gb = sum(t.numel() * 4 for t in tensors.values()) / 1e9
    variants = _writers_and_readers(tensors)
    names = list(variants)
    samples = {n: {"save_s": [], "load_s": []} for n in names}
    for r in range(rounds + 1):
        for name in names[r % len(names):] + names[:r % len(names)]:
            save, load = variants[name]
            d = tempfile.mkdtemp(dir=out)
            t0 = time.perf_counter()
            save(d)
            save_s = time.perf_counter() - t0
            for f in os.listdir(d):
                _drop_cache(os.path.join(d, f))
            t0 = time.perf_counter()
            loaded = load(d)
            total = sum(float(t[0]) for t in loaded.values())  # touch the data (safetensors maps lazily)
            load_s = time.perf_counter() - t0
            assert total == total and set(loaded) == set(tensors)
            shutil.rmtree(d)
            if r:  # round 0 is the warm-up
                samples[name]["save_s"].append(save_s)
                samples[name]["load_s"].append(load_s)
    rows = []
    for name in names:
        save, load = common.spread(samples[name]["save_s"]), common.spread(samples[name]["load_s"])
        rows.append({"writer": name, "GB": gb, "save_s": save, "load_s": load,
                     "save_GBps": gb / save["median"], "load_GBps": gb / load["median"]})
    by = {r["writer"]: r for r in rows}
    mega = by["megatrain layout-free"]
    ratios = {"save_vs_safetensors_fsync": by["safetensors+fsync"]["save_s"]["median"] / mega["save_s"]["median"],
              "load_vs_dcp": by["torch DCP"]["load_s"]["median"] / mega["load_s"]["median"]}
    return {"rows": rows, "ratios": ratios, "rounds": rounds}


def _peak_rss_mb() -> float:
    """VmHWM: peak resident set of this address space (ru_maxrss survives exec on Linux, so a child
    started by a big parent would report the parent's peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rank_load(hf_dir: str) -> None:
    """One rank: build the model on meta, shard tp×pp, materialise this rank's tensors from HF; report RSS."""
    from megatrain.config import build_config
    from megatrain.distributed.dims import build_parallel_dims
    from megatrain.distributed.env import init_distributed
    from megatrain.interop.hf import HFSource, model_config_from_hf
    from megatrain.models.transformer import build_transformer
    from megatrain.parallelize import parallelize
    rank, world, _ = init_distributed()
    cfg = build_config({"parallel": {"tp": 2, "pp": 2}, "train": {"global_batch_size": 2, "micro_batch_size": 1}})
    cfg.model = model_config_from_hf(hf_dir, base=cfg.model)
    dims = build_parallel_dims(tp=2, pp=2, dp=world // 4)
    before = _peak_rss_mb()
    t0 = time.perf_counter()
    model = parallelize(build_transformer(cfg.model, meta=True), cfg, dims, loss_fn=lambda x, y: x.sum(),
                        source=HFSource(hf_dir, cfg.model))
    local = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    peak = _peak_rss_mb()
    print(json.dumps({"rank": rank, "local_params": local, "rss_before_mb": before, "peak_rss_mb": peak,
                      "load_s": time.perf_counter() - t0}), flush=True)


def rss_table(size: str, out: str) -> dict:
    import transformers

    from megatrain.testing import run_ranks
    hf_dir = os.path.join(out, f"hf_{size}")
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        cfg = transformers.LlamaConfig(max_position_embeddings=2048, **SIZES[size])
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(cfg)
        model = model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        model.save_pretrained(hf_dir, max_shard_size="2GB")
        del model
    n = sum(json.load(open(os.path.join(hf_dir, "model.safetensors.index.json")))["weight_map"].__len__() for _ in [0]) \
        if os.path.isfile(os.path.join(hf_dir, "model.safetensors.index.json")) else None
    results = run_ranks(4, [os.path.abspath(__file__), "--rank-load", hf_dir], timeout=1800)
    ranks = [json.loads(line) for r in results for line in r.stdout.splitlines() if line.startswith("{")]
    total_bytes = sum(os.path.getsize(os.path.join(hf_dir, f)) for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
    return {"hf_size": size, "checkpoint_GB": total_bytes / 1e9, "hf_tensors": n, "ranks": ranks}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--io-params", type=float, default=1e8, help="fp32 parameters in the I/O table (1e8: 0.4 GB)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of the I/O table (after one warm-up)")
    parser.add_argument("--hf-size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--workdir", default=None, help="where the generated checkpoints go (default: a temp dir)")
    parser.add_argument("--rank-load", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="default: benchmarks/results/bench_checkpoint.json, or "
                        "bench_checkpoint_io.json with --skip-rss (so an I/O-only run keeps the RSS record)")
    args = parser.parse_args()
    if args.rank_load:
        return _rank_load(args.rank_load)
    args.out = args.out or os.path.join(common.RESULTS_DIR, "bench_checkpoint_io.json" if args.skip_rss
                                        else "bench_checkpoint.json")
    work = args.workdir or tempfile.mkdtemp(prefix="bench_ckpt_")
    os.makedirs(work, exist_ok=True)
    load_before = common.load_averages()
    io = io_table(int(args.io_params), work, rounds=args.rounds)
    print(f"\nload averages before/after: {load_before} / {common.load_averages()}; {io['rounds']} rounds after a "
          "warm-up, writers rotated each round; median [min, max]")
    print(f"{'writer':24s} {'GB':>6s} {'save s':>20s} {'save GB/s':>10s} {'load s':>20s} {'load GB/s':>10s}")
    for r in io["rows"]:
        print(f"{r['writer']:24s} {r['GB']:6.2f} {common.fmt_spread(r['save_s'], fmt='{:.3f}'):>20s} "
              f"{r['save_GBps']:10.2f} {common.fmt_spread(r['load_s'], fmt='{:.3f}'):>20s} {r['load_GBps']:10.2f}")
    print(f"megatrain save vs safetensors+fsync: {io['ratios']['save_vs_safetensors_fsync']:.2f}x (target >= 0.8); "
          f"load vs torch DCP: {io['ratios']['load_vs_dcp']:.2f}x (target >= 1.0)")
    result = {"benchmark": "bench_checkpoint", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
              "load_averages": [load_before, common.load_averages()], "io": io}
    if not args.skip_rss:
        rss = rss_table(args.hf_size, work)
        result["rss"] = rss
        print(f"\nloading a {rss['checkpoint_GB']:.2f} GB HF checkpoint ({args.hf_size}) into tp=2 x pp=2 (4 CPU ranks)")
        print(f"{'rank':>4s} {'local params':>14s} {'local GB fp32':>14s} {'RSS before GB':>14s} {'peak RSS GB':>12s} {'load s':>8s}")
        for r in sorted(rss["ranks"], key=lambda r: r["rank"]):
            print(f"{r['rank']:4d} {r['local_params']:14,d} {r['local_params'] * 4 / 1e9:14.2f} "
                  f"{r['rss_before_mb'] / 1024:14.2f} {r['peak_rss_mb'] / 1024:12.2f} {r['load_s']:8.1f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
