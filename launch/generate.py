"""Generate: continue prompts with a trained model (a megatrain checkpoint, a saved model or a Hugging Face dir).

  python launch/generate.py --model runs/tiny --prompt "def fib(n):" --max_new_tokens 64
  python launch/generate.py --model hf/Qwen3-0.6B --prompts chats.jsonl --output out.jsonl \\
      --temperature 0.7 --top_p 0.9 --seed 1

Prompts: repeatable --prompt TEXT and/or --prompts FILE.jsonl with one {"prompt": str} or {"messages": [...]}
per line (messages are rendered with the tokenizer's chat template, the assistant turn opened). Rows are
generated --batch_size at a time, left-padded. Output: one JSON object per prompt ({"prompt"|"messages",
"completion", "tokens", "finish_reason"}) to --output, else the completions on stdout; prefill and decode
tokens/s on stderr. Same as `megatrain generate ...`."""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatrain.errors import UserError  # noqa: E402
from megatrain.cli_args import fail  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the usage block
        print(f"error: {message}; see --help", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--model", required=True, help="run/checkpoint dir, step dir, saved model dir or HF model dir")
    p.add_argument("--tokenizer", help="tokenizer to use instead of the model's own (.model, HF dir, data dir)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", help='JSONL file: {"prompt": str} or {"messages": [{"role", "content"}]} per line')
    p.add_argument("--chat_template", help="template for messages prompts: 'builtin', a .jinja file or a template "
                   "string (default: the model's training data's, else the tokenizer's own)")
    p.add_argument("--output", help="write results as JSONL here (default: print completions)")
    p.add_argument("--max_new_tokens", type=int, default=64, help="tokens generated per prompt at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; else sample from softmax(logits/T)")
    p.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus: smallest set reaching probability p (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling generator (reproducible draws)")
    p.add_argument("--stop_id", type=int, action="append", default=[], help="extra stop token id (repeatable); "
                   "the tokenizer's EOS always stops")
    p.add_argument("--batch_size", type=int, default=8, help="prompts per batch")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights and compute dtype")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's own); 1 is "
                   "fastest for small models on a busy machine")
    return p


def run(args) -> list[dict]:
    from megatrain.infer.chat import chat_template_of, encode_prompt, read_prompts_jsonl
    from megatrain.infer.generate import Sampling, generate
    from megatrain.infer.load import load_for_inference
    from megatrain.errors import ConfigError

    rows = [{"prompt": p} for p in args.prompt] + (read_prompts_jsonl(args.prompts) if args.prompts else [])
    if not rows:
        raise ConfigError("no prompts; pass --prompt TEXT (repeatable) or --prompts FILE.jsonl")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads={args.threads}: must be at least 1")
        import torch
        torch.set_num_threads(args.threads)
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size={args.batch_size}: must be at least 1")
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed, stop_ids=tuple(args.stop_id))
    loaded = load_for_inference(args.model, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer)
    if not loaded.model_cfg.is_transformer:
        raise ConfigError(f"--model={args.model} is a {loaded.model_cfg.arch} model; generation needs a Transformer")
    tok = loaded.tokenizer
    template = None
    if any("messages" in r for r in rows):
        data_dir = loaded.config.data.path if loaded.config is not None else None
        template = chat_template_of(tok, data_dir=data_dir, override=args.chat_template)
    ids = [encode_prompt(tok, r.get("prompt"), r.get("messages"), template=template, where=f"prompt {i + 1}")
           for i, r in enumerate(rows)]
    totals = {"prompt_tokens": 0, "prefill_s": 0.0, "decode_tokens": 0, "decode_s": 0.0}
    results = []
    for start in range(0, len(rows), args.batch_size):
        gen = generate(loaded.model, ids[start:start + args.batch_size], sampling, eos_id=loaded.eos_ids)
        for key in totals:
            totals[key] += getattr(gen, key)
        for row, new, why in zip(rows[start:start + args.batch_size], gen.tokens, gen.finish):
            text_ids = new[:-1] if why in ("eos", "stop") else new  # the stop token is not part of the text
            results.append({**row, "completion": tok.decode(text_ids), "tokens": len(new), "finish_reason": why})
    if args.output:
        from megatrain.fsutil import atomic_write_text
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        atomic_write_text(args.output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
        print(f"wrote {len(results)} completions to {args.output}")
    else:
        for r in results:
            print(r["completion"])
            print("-" * 40)
    print(f"prefill: {totals['prompt_tokens']} tokens in {totals['prefill_s']:.3f}s "
          f"({totals['prompt_tokens'] / max(totals['prefill_s'], 1e-9):.1f} tokens/s); "
          f"decode: {totals['decode_tokens']} tokens in {totals['decode_s']:.3f}s "
          f"({totals['decode_tokens'] / max(totals['decode_s'], 1e-9):.1f} tokens/s)", file=sys.stderr)
    return results


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UserError as err:
        fail(err)


if __name__ == "__main__":
    main()
