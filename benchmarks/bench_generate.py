"""Generation speed: prefill and decode tokens/s of megatrain.infer.generate with the KV cache, per batch size.

Any model launch/generate.py takes (a checkpoint, a saved model or a Hugging Face dir). Prompts are random token
ids of one length, so every row is as long as the batch and the numbers compare across batch sizes; greedy, no
stop token, so every row decodes --new tokens. Each batch size runs --repeats times after one warm-up; the table
is median [min, max] with the load averages (CPU figures on a shared machine move with its load).

    python benchmarks/bench_generate.py --model runs/tiny_gpt --threads 1 [--batch 1 4 16] [--prompt_len 32]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

import torch  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new", type=int, default=64, help="tokens decoded per row")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/bench_generate.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from megatrain.infer.generate import Sampling, generate
    from megatrain.infer.load import load_for_inference
    loaded = load_for_inference(args.model, device=args.device, dtype=args.dtype, need_tokenizer=False)
    vocab = loaded.model_cfg.vocab_size
    sampling = Sampling(max_new_tokens=args.new)
    gen = torch.Generator().manual_seed(0)
    load_before = common.load_averages()
    rows = []
    for b in args.batch:
        prompts = torch.randint(0, vocab, (b, args.prompt_len), generator=gen).tolist()
        generate(loaded.model, prompts, Sampling(max_new_tokens=4), eos_id=None)  # warm-up
        runs = [generate(loaded.model, prompts, sampling, eos_id=None).rates() for _ in range(args.repeats)]
        rows.append({"batch": b, "prompt_len": args.prompt_len, "new_tokens": args.new,
                     "prefill_tokens_per_s": common.spread([r["prefill_tokens_per_s"] for r in runs]),
                     "decode_tokens_per_s": common.spread([r["decode_tokens_per_s"] for r in runs])})
    params = sum(p.numel() for p in {id(p): p for p in loaded.model.parameters()}.values())
    print(f"\nmodel {args.model} ({loaded.model_cfg.arch}, {params / 1e6:.2f}M params) on {loaded.device} {args.dtype}, "
          f"torch threads {torch.get_num_threads()}, load averages before/after {load_before} / "
          f"{common.load_averages()}")
    print(f"{'batch':>5s} {'prefill tokens/s median [min, max]':>36s} {'decode tokens/s median [min, max]':>36s}")
    for r in rows:
        print(f"{r['batch']:5d} {common.fmt_spread(r['prefill_tokens_per_s']):>36s} "
              f"{common.fmt_spread(r['decode_tokens_per_s']):>36s}")
    record = {**common.run_header("bench_generate", device=str(loaded.device), config=args.model,
                                  overrides=sys.argv[1:]), "params": params, "threads": torch.get_num_threads(),
              "load_before": load_before, "rows": rows}
    print("wrote", common.save_record(args.out, record))


if __name__ == "__main__":
    main()
