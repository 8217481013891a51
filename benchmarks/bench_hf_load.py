"""Loading a Hugging Face checkpoint of each family: megatrain into tp=2 × pp=2 (4 CPU ranks, each reading only
its own slices) vs transformers' own ``AutoModelForCausalLM.from_pretrained`` (one process), for checkpoints
written by transformers in bf16 and in fp32. Reports seconds and peak RSS (VmHWM; for megatrain the largest
rank's, and the sum over the 4 ranks).

    python benchmarks/bench_hf_load.py --hidden 2048 --layers 16 --vocab 128256    # ~1B per family
    python benchmarks/bench_hf_load.py --hidden 512 --layers 4 --vocab 32000       # minutes on 2 cores

megatrain keeps fp32 parameters (the training master copy) whatever the file's dtype; transformers keeps the
file's dtype, and may leave the weights memory-mapped (read from disk at first use): its "weights read" columns
touch every parameter once after from_pretrained, so those include reading the bytes. The two loaders run alternately per family and dtype in one run, so their ratio is side by side.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _config(family: str, a):
    import transformers
    heads = a.hidden // 64
    common = dict(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=4 * a.hidden, num_hidden_layers=a.layers,
                  num_attention_heads=heads, num_key_value_heads=max(heads // 4, 2), max_position_embeddings=4096,
                  tie_word_embeddings=family in ("qwen2", "qwen3"))
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[family]
    extra = {"mistral": {"sliding_window": 1024}, "qwen3": {"head_dim": 64},
             "llama": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 1024}}}.get(family, {})
    return cls(**common, **extra)


def write_checkpoint(family: str, dtype: str, a, root: str) -> str:
    import transformers
    path = os.path.join(root, f"{family}_{dtype}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(_config(family, a))
    model = model.to_empty(device="cpu").to(getattr(torch, dtype))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(path, max_shard_size="2GB")
    return path


def _rank_load(hf_dir: str) -> None:
    """One rank: meta build, shard tp×pp, fill this rank's tensors from the HF files; report RSS and seconds."""
    from megatrain.config import build_config
    from megatrain.distributed.dims import build_parallel_dims
    from megatrain.distributed.env import init_distributed
    from megatrain.interop.hf import HFSource, model_config_from_hf
    from megatrain.models.registry import spec_for
    from megatrain.parallelize import parallelize
    rank, world, _ = init_distributed()
    t0 = time.perf_counter()
    cfg = build_config({"parallel": {"tp": 2, "pp": 2}, "train": {"global_batch_size": 2, "micro_batch_size": 1}})
    cfg.model = model_config_from_hf(hf_dir, base=cfg.model)
    dims = build_parallel_dims(tp=2, pp=2, dp=world // 4)
    model = parallelize(spec_for(cfg.model).build(cfg.model, meta=True), cfg, dims, loss_fn=lambda x, y: x.sum(),
                        source=HFSource(hf_dir, cfg.model))
    local = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    print(json.dumps({"rank": rank, "local_params": local, "peak_rss_mb": _peak_rss_mb(),
                      "load_s": time.perf_counter() - t0}), flush=True)


def _hf_load(hf_dir: str, dtype: str) -> None:
    import transformers
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype))
    n = sum(p.numel() for p in model.parameters())
    loaded_s, loaded_rss = time.perf_counter() - t0, _peak_rss_mb()
    # from_pretrained may leave the weights memory-mapped, read from disk only when first used: touch every
    # parameter once so the "read" figures include the bytes megatrain's ranks have in memory when they return
    with torch.no_grad():
        for p in model.parameters():
            p.sum()
    print(json.dumps({"params": n, "peak_rss_mb": loaded_rss, "load_s": loaded_s,
                      "read_peak_rss_mb": _peak_rss_mb(), "read_s": time.perf_counter() - t0}), flush=True)


def megatrain_load(hf_dir: str) -> dict:
    from megatrain.testing import run_ranks
    results = run_ranks(4, [os.path.abspath(__file__), "--rank-load", hf_dir], timeout=3600)
    ranks = [json.loads(line) for r in results for line in r.stdout.splitlines() if line.startswith("{")]
    return {"load_s": max(r["load_s"] for r in ranks), "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
            "sum_peak_rss_mb": sum(r["peak_rss_mb"] for r in ranks), "ranks": ranks}


def transformers_load(hf_dir: str, dtype: str) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--hf-load", hf_dir, "--hf-dtype", dtype],
                         capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--workdir", default=None, help="where the generated checkpoints go (default: a temp dir)")
    parser.add_argument("--out", default="benchmarks/results/bench_hf_load.json")
    parser.add_argument("--rank-load", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--hf-load", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--hf-dtype", default="float32", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.rank_load:
        return _rank_load(a.rank_load)
    if a.hf_load:
        return _hf_load(a.hf_load, a.hf_dtype)
    work = a.workdir or tempfile.mkdtemp(prefix="bench_hf_load_")
    rows = []
    for i, (family, dtype) in enumerate((f, d) for f in a.families.split(",") for d in a.dtypes.split(",")):
        path = write_checkpoint(family, dtype, a, work)
        gb = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors")) / 1e9
        order = ("megatrain", "transformers") if i % 2 == 0 else ("transformers", "megatrain")  # alternate
        got = {}
        for who in order:
            got[who] = megatrain_load(path) if who == "megatrain" else transformers_load(path, dtype)
        params = got["transformers"]["params"]
        rows.append({"family": family, "dtype": dtype, "params": params, "checkpoint_GB": gb,
                     "megatrain_tp2pp2": got["megatrain"], "transformers": got["transformers"]})
        shutil.rmtree(path, ignore_errors=True)  # disk: one checkpoint at a time
    print(f"\nhidden {a.hidden}, {a.layers} layers, vocab {a.vocab}; megatrain: tp=2 x pp=2 on 4 CPU ranks (fp32 "
          "parameters); transformers: from_pretrained in one process (the file's dtype)")
    print("| family | dtype | params | file GB | megatrain s | megatrain peak RSS/rank GB | sum of 4 ranks GB "
          "| transformers s | transformers peak RSS GB | transformers s, weights read | peak RSS GB, weights read |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        m, t = r["megatrain_tp2pp2"], r["transformers"]
        print(f"| {r['family']} | {r['dtype']} | {r['params'] / 1e6:.1f} M | {r['checkpoint_GB']:.2f} | {m['load_s']:.2f} "
              f"| {m['peak_rss_mb'] / 1024:.2f} | {m['sum_peak_rss_mb'] / 1024:.2f} | {t['load_s']:.2f} "
              f"| {t['peak_rss_mb'] / 1024:.2f} | {t['read_s']:.2f} | {t['read_peak_rss_mb'] / 1024:.2f} |")
    result = {"benchmark": "bench_hf_load", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "size": {"hidden": a.hidden, "layers": a.layers, "vocab": a.vocab}, "machine": platform.machine(),
              "cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg(), "torch": torch.__version__,
              "command": " ".join(["python", *sys.argv]), "rows": rows}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(a.out + ".tmp", a.out)
    print(f"wrote {a.out}")
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
