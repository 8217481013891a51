"""Preflight plan: `python launch/plan.py --config recipes/X.yaml [--plan.world_size=N] [--plan.gpu_memory_gib=80]`.

Prints the predicted memory of every pipeline stage's ranks, from the config alone (no process group, no GPU),
and exits 2 with one line when the peak exceeds plan.gpu_memory_gib, naming a layout that fits. `--propose K`
lists the K cheapest layouts of the world size that fit. Any config field can be overridden as for training.
With --model.from_hf=DIR the model planned is that directory's (its config.json), as finetune would build it."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatrain.errors import UserError  # noqa: E402
from megatrain.cli_args import fail, parse  # noqa: E402


def main(argv=None):
    cfg, args, _ = parse(argv, description=__doc__, extra=[
        ("--propose", {"type": int, "default": 0, "metavar": "K", "help": "list the K cheapest layouts that fit"})])
    from megatrain.plan import GIB, check_fits, plan_memory, planned_world_size, propose, with_vocab
    from megatrain.plan.report import describe, layout_table, stage_table
    try:
        world = planned_world_size(cfg)
        from megatrain.interop.hf import config_from_hf_args
        config_from_hf_args(cfg, argv)  # the model of --model.from_hf, as the training launchers build it
        cfg = with_vocab(cfg)
        rows = plan_memory(cfg, world_size=world)
        print(describe(cfg, world))
        print(stage_table(rows))
        if args.propose:
            print(f"\ncheapest layouts of {world} ranks" + (f" within {cfg.plan.gpu_memory_gib:g} GiB" if
                                                            cfg.plan.gpu_memory_gib else "") + ":")
            print(layout_table(propose(cfg, world_size=world, limit=args.propose), world))
        check_fits(cfg, world_size=world, rows=rows)
    except UserError as err:
        fail(err)
    if cfg.plan.gpu_memory_gib:
        print(f"fits: peak {max(r.peak for r in rows) / GIB:.2f} GiB <= plan.gpu_memory_gib={cfg.plan.gpu_memory_gib:g}")


if __name__ == "__main__":
    main()
