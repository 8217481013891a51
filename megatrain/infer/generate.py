"""Batched sampling from a Transformer with its KV cache: greedy, temperature, top-k, top-p (nucleus), seeded.

Prompts of different lengths are left-padded into one (B, L) batch: pads are segment 0 and every real token
segment 1, so no token attends to padding (``megatrain.models.kv_cache``), and positions count real tokens
only, so a padded row computes what it would alone. One forward over the prompts fills the cache (prefill),
then one token per row per step (decode). A row stops at the tokenizer's EOS, at any of ``stop_ids``, or
after ``max_new_tokens``; finished rows are fed EOS until every row is done (their output is not extended).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from megatrain.errors import ConfigError


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. ``temperature=0`` is greedy (argmax); top_k=0 and top_p=1 are off."""
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max_new_tokens={self.max_new_tokens}: must be at least 1")
        if self.temperature < 0:
            raise ConfigError(f"--temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ConfigError(f"--top_k={self.top_k}: must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top_p={self.top_p}: must be in (0, 1] (1 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class Generation:
    """Per row: the new token ids (the stop token included, as transformers' generate returns it) and why
    the row ended ("eos", "stop" or "length"); timings of the two phases."""
    tokens: list[list[int]]
    finish: list[str]
    prompt_tokens: int = 0  # real (unpadded) prompt tokens prefilled
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_tokens: int = 0  # tokens produced by decode steps (all rows, until each row stopped)
    extra: dict = field(default_factory=dict)

    def rates(self) -> dict[str, float]:
        return {"prefill_tokens_per_s": self.prompt_tokens / max(self.prefill_s, 1e-9),
                "decode_tokens_per_s": self.decode_tokens / max(self.decode_s, 1e-9)}


def filter_logits(logits: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(B, V) logits with everything outside the top-k and outside the smallest set whose probability
    reaches top_p set to -inf (the most likely token always survives)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        # a token is dropped when the tokens ranked above it already reach top_p
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits of the last position -> (B,) chosen ids."""
    logits = logits.float()
    if sampling.greedy:
        return logits.argmax(-1)
    logits = filter_logits(logits / sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(model, prompts: list[list[int]], sampling: Sampling, *,
             eos_id: int | list[int] | tuple[int, ...] | None) -> Generation:
    """Continue every prompt (a list of token ids) with ``model`` (a megatrain Transformer in eval mode).
    ``eos_id``: the end-of-sequence id, or several (a chat model's end-of-turn besides its EOS)."""
    eos_ids = [] if eos_id is None else [eos_id] if isinstance(eos_id, int) else list(eos_id)
    from megatrain.models.kv_cache import KVCache
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token (an empty prompt gives the model nothing to "
                          "continue); drop empty prompts")
    device = next(model.parameters()).device
    longest = max(len(p) for p in prompts)
    limit = model.cfg.max_seq_len
    if longest + sampling.max_new_tokens > limit:
        raise ConfigError(f"a prompt of {longest} tokens + --max_new_tokens={sampling.max_new_tokens} exceeds the "
                          f"model's max_seq_len={limit}; lower --max_new_tokens or shorten the prompt")
    pad = eos_ids[0] if eos_ids else 0  # any valid id: pads are masked out of attention
    b = len(prompts)
    ids = torch.full((b, longest), pad, dtype=torch.long)
    segments = torch.zeros((b, longest), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
        segments[i, longest - len(p):] = 1
    ids, segments = ids.to(device), segments.to(device)  # (B, L) each
    positions = (segments.cumsum(1) - 1).clamp_min(0)  # (B, L): 0.. over real tokens only
    stops = torch.tensor(sorted({*sampling.stop_ids, *eos_ids}) or [-1], device=device)
    generator = None
    if sampling.seed is not None and not sampling.greedy:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)

    cache = KVCache(len(model.layers), max_len=longest + sampling.max_new_tokens)
    _sync(device)
    t0 = time.perf_counter()
    logits = model(ids, positions=positions, segments=segments, cache=cache)[:, -1]  # (B, V)
    _sync(device)
    t1 = time.perf_counter()

    out = torch.empty((b, 0), dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    lengths = torch.zeros(b, dtype=torch.long, device=device)  # tokens each row produced
    last_pos = positions[:, -1:]  # (B, 1)
    ones = torch.ones((b, 1), dtype=torch.long, device=device)
    decode_tokens = torch.zeros((), dtype=torch.long, device=device)  # read once at the end, not per step
    for step in range(sampling.max_new_tokens):
        tok = next_tokens(logits, sampling, generator)  # (B,)
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        lengths += (~done).long()
        out = torch.cat([out, tok[:, None]], dim=1)
        if step:
            decode_tokens += (~done).sum()
        done = done | torch.isin(tok, stops)
        if step == sampling.max_new_tokens - 1 or bool(done.all()):
            break
        last_pos = last_pos + 1
        logits = model(tok[:, None], positions=last_pos, segments=ones, cache=cache)[:, -1]  # (B, V)
    _sync(device)
    t2 = time.perf_counter()

    rows, finish = [], []
    eos_set = set(eos_ids)
    for i, n in enumerate(lengths.tolist()):
        row = out[i, :n].tolist()
        rows.append(row)
        finish.append("eos" if row and row[-1] in eos_set else "stop" if row and row[-1] in sampling.stop_ids
                      else "length")
    # the first new token comes from the prefill's logits; decode steps produce the rest
    return Generation(rows, finish, prompt_tokens=sum(len(p) for p in prompts), prefill_s=t1 - t0,
                      decode_s=t2 - t1, decode_tokens=int(decode_tokens))
