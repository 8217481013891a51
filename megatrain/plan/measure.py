"""Measured memory of a real Trainer, to check the planner against and for ``benchmarks/bench_memory.py``.

``python -m megatrain.plan.measure --config ... [--section.key=value ...]`` as each rank of a launch builds the
Trainer, runs two training steps by hand and prints one JSON line: the bytes of all live tensors on the device
(each storage once; ``torch.empty`` counts in full, as a GPU would reserve it) after setup, at the end of the
forward, inside the backward (when the token table's gradient, the last one, arrives: reduce buckets exist, most
activations are freed), after the backward and after the step, of the second step (it has optimizer state); plus
the rank's coordinates and the parameters its module holds.
"""
from __future__ import annotations

import gc
import json
import sys

import torch

POINTS = ("init", "forward", "in_backward", "backward", "step")


def live_tensor_bytes(device_type: str) -> int:
    """Bytes of every live tensor on ``device_type``, each storage once."""
    seen = {}
    for obj in gc.get_objects():
        try:
            if torch.is_tensor(obj) and obj.device.type == device_type:
                storage = obj.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # storage-less tensors
            continue
    return sum(seen.values())


def main(argv: list[str] | None = None) -> None:
    from megatrain.config.cli import parse
    from megatrain.data.sampler import rank_slice
    from megatrain.distributed.env import shutdown_distributed
    from megatrain.plan import with_vocab
    from megatrain.plan.params import meta_model
    from megatrain.train.trainer import Trainer
    cfg, _, local_rank = parse(argv, description=__doc__)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    base = live_tensor_bytes(dev)
    t = Trainer(cfg, local_rank=local_rank)
    out = {"rank": t.rank, "tp_rank": t.dims.tp_rank, "pp_rank": t.dims.pp_rank, "dp_rank": t.dims.dp_rank,
           "local_params": sum(p.numel() for p in t.engine.module.parameters()),
           "local_trainable": sum(p.numel() for p in t.engine.module.parameters() if p.requires_grad),
           "init": live_tensor_bytes(dev) - base}
    if t.pipelined:  # DeepSpeed's pipeline engine runs forward and backward inside train_batch
        t.train_step()
    else:
        # the first trainable parameter (the token table; with LoRA block 0's first adapter): its gradient arrives last
        last_grad = next(p for p in t.engine.module.parameters() if p.requires_grad)
        for step in range(2):
            mb = rank_slice(t._global_indices(step), dp_rank=t.dims.dp_rank, dp_size=t.dims.dp,
                            micro_batch_size=t.layout.micro_batch_size, micro_step=0)
            batch = t._micro_batch(mb, t.train_data)
            loss, _ = t.task.loss_and_stats(t.engine, batch)
            out["forward"] = live_tensor_bytes(dev) - base
            hook = last_grad.register_hook(lambda g: out.__setitem__("in_backward", live_tensor_bytes(dev) - base))
            t.engine.backward(loss)
            hook.remove()
            out["backward"] = live_tensor_bytes(dev) - base
            t.engine.step()
            del loss, batch
            gc.collect()
            out["step"] = live_tensor_bytes(dev) - base
    out["params"] = meta_model(with_vocab(cfg).model).num_params()  # ψ of the whole model
    print(json.dumps(out), flush=True)
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
