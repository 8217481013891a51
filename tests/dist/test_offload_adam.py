"""ZeRO-2 with optimizer CPU offload on 2 gloo ranks: the C++ CPU AdamW trains like torch.optim.AdamW."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from megatrain.ops import extensions

STEPS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(rank: int, world: int, port: int, out_path: str) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # 2 ranks on 2 cores
    import deepspeed

    from megatrain.ops.adamw import CPUAdamW, make_adamw

    deepspeed.init_distributed(dist_backend="gloo")
    ds_config = {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
        "zero_force_ds_cpu_optimizer": False,  # accept a client optimizer under offload
        "zero_allow_untested_optimizer": True,  # ZeRO only whitelists its own/torch optimizers
        "steps_per_print": 10_000,
    }
    results = {}
    for name in ("cpu_adam", "torch"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(24, 48), torch.nn.Tanh(), torch.nn.Linear(48, 5))
        hyper = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        if name == "cpu_adam":
            optimizer = make_adamw(model.parameters(), offload=True, **hyper)
            assert isinstance(optimizer, CPUAdamW), type(optimizer)
        else:
            optimizer = torch.optim.AdamW(model.parameters(), **hyper)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        inner = engine.optimizer.optimizer  # ZeRO wraps the client optimizer; it must still be ours
        assert isinstance(inner, CPUAdamW) == (name == "cpu_adam"), type(inner)
        assert all(p.device.type == "cpu" and p.dtype == torch.float32
                   for g in inner.param_groups for p in g["params"])
        gen = torch.Generator().manual_seed(100 + rank)  # each rank its own (fixed) batch: loss must fall
        x = torch.randn(8, 24, generator=gen)
        y = torch.randn(8, 5, generator=gen)
        losses = []
        for _ in range(STEPS):
            loss = torch.nn.functional.mse_loss(engine(x), y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        results[name] = losses
        weights = torch.cat([p.detach().flatten() for p in engine.module.parameters()])
        results[name + "_weights_sum"] = float(weights.double().abs().sum())
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.dist
@pytest.mark.slow
def test_zero2_cpu_offload_with_cpu_adam_matches_torch(tmp_path):
    if not extensions.load("cpu_adam"):  # build once here, before the ranks start
        pytest.skip(f"C++ CPU AdamW unavailable: {extensions._status('cpu_adam').detail}")
    out = tmp_path / "losses.json"
    mp.start_processes(_train, args=(2, _free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    res = json.loads(out.read_text())
    ours, ref = res["cpu_adam"], res["torch"]
    print("losses cpu_adam", ours, "torch", ref)
    assert len(ours) == STEPS
    assert ours[-1] < ours[0], "loss did not fall"
    # same seed, same data: the two optimizers agree to fp32 rounding, step by step
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(ref), rtol=1e-5, atol=1e-6)
    assert abs(res["cpu_adam_weights_sum"] - res["torch_weights_sum"]) <= 1e-5 * res["torch_weights_sum"]
