"""Fine-tune a local Hugging Face checkpoint (gpt2, llama, mistral, qwen2, qwen3) on your JSONL/text data, under any layout.

    deepspeed --num_gpus 8 launch/finetune.py --config recipes/finetune_llama.yaml \\
        --model.from_hf=/models/llama-1b --data.sources='[/data/chat.jsonl]' --parallel.tp=2 \\
        --checkpoint.export_hf=out/llama-1b-ft

The model's architecture comes from the directory's config.json (a conflicting --model.* override is refused);
the tokenizer defaults to the one in it. Everything is checked (config.json, tensors, the export target) before
data preparation. Each rank reads only the weight slices it owns (meta-device construction + safetensors slices)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatrain.errors import UserError  # noqa: E402
from megatrain.cli_args import fail, parse, run_training  # noqa: E402


def main(argv=None):
    cfg, _, local_rank = parse(argv, description=__doc__)
    if not cfg.model.from_hf:
        fail(ValueError("model.from_hf is not set; pass --model.from_hf=/path/to/hf_model_dir"))
    from megatrain.data.prepare import prepare_corpus
    from megatrain.interop.hf import resolve_from_hf
    try:
        resolve_from_hf(cfg, argv)  # architecture, tensors, export target, tokenizer: before any data work
        prepare_corpus(cfg.data, seed=cfg.train.seed)  # idempotent; concurrent ranks wait on its lock
    except UserError as err:
        fail(err)
    run_training(cfg, local_rank)


if __name__ == "__main__":
    main()
