"""Tokens/s of megatrain against its peers on the demo GPT-2, side by side in one run.

One process: megatrain's Trainer (DeepSpeed engine, ZeRO-0) vs a plain torch loop on Hugging Face's
GPT2LMHeadModel of the same config vs the HF Trainer on that model. Two ranks (gloo): megatrain under ZeRO-1
and ZeRO-0 vs torch DDP on HF's GPT2. Every loop gets the same batches' shapes, the same optimizer (the AdamW
``megatrain.ops.make_adamw`` picks: the C++ one on CPU), schedule and clipping, and the loops alternate every
step (the first of each round rotates). The HF Trainer drives its own loop; the other loops run one step each
from its ``on_step_end`` callback, so its steps alternate with theirs too. Prints median [min, max] tokens/s,
the ratios and the load averages; writes JSON to benchmarks/results/bench_peers.json.

    python benchmarks/bench_peers.py [--steps 20] [--skip-ddp] [--skip-one-process] [--section.key=value ...]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megatrain.config import load_config  # noqa: E402

RECIPE = "recipes/tiny_cpu_gpt.yaml"
BASE_OVERRIDES = ["--log.progress=none", "--log.tensorboard=false", "--log.report=false",
                  "--checkpoint.save_final=false", "--train.eval_every=0"]


def _config(zero_stage: int, rest: list[str], log_dir: str):
    return load_config(RECIPE, [*BASE_OVERRIDES, f"--log.dir={log_dir}", f"--parallel.zero_stage={zero_stage}", *rest])


def hf_model(cfg):
    """HF's GPT2LMHeadModel with the same sizes as megatrain's model (its own init; speed does not care)."""
    import transformers

    from megatrain.interop.hf_maps import hf_config_from_model
    fields = {k: v for k, v in hf_config_from_model(cfg.model).items() if k not in ("model_type", "architectures")}
    torch.manual_seed(cfg.train.seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**fields, bos_token_id=0, eos_token_id=0))


def megatrain_step(trainer):
    def step():
        trainer.train_step()
        trainer.step += 1
    return step


def one_process(args, rest: list[str]) -> dict:
    """megatrain vs a torch loop on HF's GPT2 (alternating), both run from the HF Trainer's step callback."""
    import transformers

    from megatrain.data.prepare import prepare_corpus
    from megatrain.train.lm_task import read_vocab_size
    from megatrain.train.trainer import Trainer
    cfg = _config(0, rest, os.path.join(args.workdir, "mega1"))
    prepare_corpus(cfg.data, seed=cfg.train.seed)
    cfg.model.vocab_size = cfg.model.vocab_size or read_vocab_size(cfg.data.path)  # as the Trainer will
    t = cfg.train
    accum = t.global_batch_size // t.micro_batch_size
    others: dict = {}  # filled once megatrain's Trainer exists (below)
    times: dict = {"HF Trainer, HF GPT2": []}
    warmup = 2

    class Alternate(transformers.TrainerCallback):
        def __init__(self):
            self.t0, self.n = 0.0, 0

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            elapsed = time.perf_counter() - self.t0
            if self.n >= warmup:
                times["HF Trainer, HF GPT2"].append(elapsed)
            names = list(others)
            for name in names[self.n % 2:] + names[:self.n % 2]:
                t0 = time.perf_counter()
                others[name]()
                if self.n >= warmup:
                    times[name].append(time.perf_counter() - t0)
            self.n += 1

    class Data(torch.utils.data.Dataset):
        def __init__(self, source):
            self.source = source  # megatrain's train dataset: both Trainers read the same rows

        def __len__(self):
            return len(self.source)

        def __getitem__(self, i):
            it = self.source[i]
            return {"input_ids": it["input_ids"], "labels": it["labels"]}

    def next_token_loss(outputs, labels, num_items_in_batch=None):
        # megatrain's labels are already the next tokens: no shift (HF's own loss would shift again)
        # the Trainer passes the token count of the whole accumulated step: sum / count is its mean
        logits = outputs.logits  # (B, T, V)
        if num_items_in_batch is None:
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
        return total / num_items_in_batch

    model = hf_model(cfg)
    opt, sched = common.trainer_optimizer(cfg, model)
    targs = transformers.TrainingArguments(
        output_dir=os.path.join(args.workdir, "hf"), per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=accum, max_grad_norm=t.grad_clip, max_steps=args.steps + warmup,
        report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", dataloader_num_workers=0,
        disable_tqdm=True, seed=t.seed)
    hf = transformers.Trainer(model=model, args=targs, train_dataset=None, optimizers=(opt, sched),
                              compute_loss_func=next_token_loss, callbacks=[Alternate()])
    # The HF Trainer is built first: built after megatrain's Trainer has started its one-rank process group, it
    # would wrap HF's model in a one-rank DDP with find_unused_parameters=True, a slower HF than a user gets.
    assert hf.args.world_size == 1 and hf.args.parallel_mode.name != "DISTRIBUTED", hf.args.parallel_mode
    trainer = Trainer(cfg)
    others.update({"megatrain Trainer": megatrain_step(trainer),
                   "torch loop, HF GPT2": common.hand_loop(cfg, hf_model(cfg), trainer.train_data, trainer.sampler,
                                                           micro=accum, logits=lambda out: out.logits)})
    times.update({k: [] for k in others})
    hf.train_dataset = Data(trainer.train_data)
    load_before = common.load_averages()
    hf.train()
    assert not isinstance(hf.model_wrapped, torch.nn.parallel.DistributedDataParallel), type(hf.model_wrapped)
    tokens = t.global_batch_size * cfg.seq_len
    return {"tokens_per_step": tokens, "threads": torch.get_num_threads(), "step_s": times,
            "load_averages": [load_before, common.load_averages()]}


def _rank_ddp(args, rest: list[str]) -> None:
    """One of the two ranks: megatrain ZeRO-1, megatrain ZeRO-0 and torch DDP on HF's GPT2, alternating."""
    from megatrain.distributed.env import shutdown_distributed
    from megatrain.train.trainer import Trainer
    zero1 = Trainer(_config(1, rest, os.path.join(args.workdir, "z1")))
    zero0 = Trainer(_config(0, rest, os.path.join(args.workdir, "z0")))
    cfg = zero1.cfg
    world = torch.distributed.get_world_size()
    micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * world)
    ddp = torch.nn.parallel.DistributedDataParallel(hf_model(cfg))
    rank_trainer = _RankSlice(zero1, torch.distributed.get_rank(), world, micro)
    fns = {"megatrain ZeRO-1": megatrain_step(zero1), "megatrain ZeRO-0": megatrain_step(zero0),
           "torch DDP, HF GPT2": common.hand_loop(cfg, ddp, rank_trainer.train_data, rank_trainer.sampler, micro=micro,
                                                  logits=lambda out: out.logits)}
    common.alternate(fns, 2)
    load_before = common.load_averages()
    times = common.alternate(fns, args.steps)
    if torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps({"tokens_per_step": cfg.train.global_batch_size * cfg.seq_len, "world": world,
                                      "threads": torch.get_num_threads(), "step_s": times,
                                      "load_averages": [load_before, common.load_averages()]}), flush=True)
    shutdown_distributed()


class _RankSlice:
    """This dp rank's share of each global batch, in the layout the Trainer uses (block m*dp + r)."""

    def __init__(self, trainer, rank: int, world: int, micro: int):
        self.train_data, self._sampler, self._rank, self._world, self._micro = (
            trainer.train_data, trainer.sampler, rank, world, micro)
        self.sampler = self  # torch_loop asks trainer.sampler.indices_for_step
        self._mb = trainer.cfg.train.micro_batch_size

    def indices_for_step(self, step: int):
        idx = self._sampler.indices_for_step(step)
        out = []
        for m in range(self._micro):
            block = m * self._world + self._rank
            out += list(idx[block * self._mb:(block + 1) * self._mb])
        return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each loop (after 2 warm-up steps)")
    parser.add_argument("--skip-ddp", action="store_true")
    parser.add_argument("--skip-one-process", action="store_true")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--rank-ddp", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results/bench_peers.json")
    args, rest = parser.parse_known_args()
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="bench_peers_")
    if args.rank_ddp:
        return _rank_ddp(args, rest)
    record = common.run_header("bench_peers", device="cpu", config=RECIPE, overrides=BASE_OVERRIDES + rest)
    sections = {}
    if not args.skip_one_process:
        sections["one process"] = (one_process(args, rest), "HF Trainer, HF GPT2", "megatrain Trainer")
    if not args.skip_ddp:
        from megatrain.data.prepare import prepare_corpus
        from megatrain.testing import run_ranks
        ddp_cfg = _config(1, rest, args.workdir)
        prepare_corpus(ddp_cfg.data, seed=ddp_cfg.train.seed)  # the seed prepare.py uses: the demo's cache stays valid
        results = run_ranks(2, [os.path.abspath(__file__), "--rank-ddp", "--steps", str(args.steps),
                                "--workdir", args.workdir, *rest], timeout=1800)
        line = next(x for r in results for x in r.stdout.splitlines() if x.startswith("RESULT "))
        sections["two ranks (gloo)"] = (json.loads(line.split(" ", 1)[1]), "torch DDP, HF GPT2", "megatrain ZeRO-1")
    for title, (res, peer, ours) in sections.items():
        tokens = res["tokens_per_step"]
        print(f"\n{title}: {tokens} tokens/step, {args.steps} steps per loop alternating every step, torch threads "
              f"{res['threads']} per process; load averages before/after {res['load_averages'][0]} / "
              f"{res['load_averages'][1]} (this run's own processes count in them)")
        print(f"{'loop':28s} {'tokens/s median [min, max]':>30s} {'ms/step':>9s} {'x vs ' + peer:>28s}")
        spreads = {k: common.spread(v) for k, v in res["step_s"].items()}
        res["tokens_per_s"], res["ratio_vs"] = {}, {}
        for name, sp in spreads.items():
            tps = {"median": tokens / sp["median"], "min": tokens / sp["max"], "max": tokens / sp["min"]}
            x = spreads[peer]["median"] / sp["median"]
            res["tokens_per_s"][name], res["ratio_vs"][name] = tps, x
            print(f"{name:28s} {common.fmt_spread(tps):>30s} {sp['median'] * 1e3:9.1f} {x:28.3f}")
        res["paired_ratio"] = {}
        for name in spreads:
            if name != ours:
                # per round (the two steps ran back to back): robust to the load drifting during the run
                paired = common.spread([b / a for a, b in zip(res["step_s"][ours], res["step_s"][name])])
                res["paired_ratio"][name] = paired
                print(f"  {ours} / {name}: {spreads[name]['median'] / spreads[ours]['median']:.3f}x of medians, "
                      f"{common.fmt_spread(paired, fmt='{:.3f}')} per round")
        record[title] = res
    common.save_record(args.out, record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
