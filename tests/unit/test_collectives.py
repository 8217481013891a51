"""All collectives go through megatrain/distributed/host_collectives.py, and its device rule is right for NCCL.

NCCL accepts CUDA tensors only: a CPU tensor handed to it fails ("No backend type associated with device
type cpu"). The rule is tested with the backend name faked, since no GPU is needed to check it; the AST
test fails on any file that calls torch.distributed collectives directly (the trainer once did)."""
import ast
import os

import pytest
import torch

from megatrain.distributed import env
from megatrain.distributed import host_collectives as hc
from megatrain.testing import spawn_group

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "broadcast_object_list", "all_gather_object", "gather", "scatter", "reduce",
               "barrier", "monitored_barrier", "all_to_all", "all_to_all_single", "gather_object",
               "scatter_object_list", "send", "recv", "isend", "irecv", "batch_isend_irecv"}
ALLOWED = {os.path.join("megatrain", "distributed", "host_collectives.py"),
           os.path.join("megatrain", "distributed", "comm_counter.py")}  # it wraps the functions, never calls them


def _dist_aliases(tree: ast.AST) -> tuple[set[str], set[str]]:
    """Names bound to torch.distributed (modules) and collectives imported by name."""
    modules, funcs = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch.distributed":
                    modules.add(a.asname or "torch.distributed")
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            funcs.update(a.asname or a.name for a in node.names if a.name in COLLECTIVES)
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            modules.update(a.asname or a.name for a in node.names if a.name == "distributed")
    return modules, funcs


def _direct_calls(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    modules, funcs = _dist_aliases(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        fn = node.func
        if isinstance(fn, ast.Name) and fn.id in funcs:
            found.append(f"{path}:{node.lineno} {fn.id}")
        elif isinstance(fn, ast.Attribute) and fn.attr in COLLECTIVES:
            base = ast.unparse(fn.value)
            if base in modules or base == "torch.distributed":
                found.append(f"{path}:{node.lineno} {base}.{fn.attr}")
    return found


def _sources():
    for top in ("megatrain", "kernels", "launch", "benchmarks"):
        for dirpath, dirnames, files in os.walk(os.path.join(ROOT, top)):
            dirnames[:] = [d for d in dirnames if d != "triton_kernels"]  # a symlink to kernels/
            for name in files:
                if name.endswith(".py"):
                    full = os.path.join(dirpath, name)
                    if os.path.relpath(full, ROOT) not in ALLOWED:
                        yield full


def test_no_direct_collectives_outside_the_module():
    calls = [c for path in _sources() for c in _direct_calls(path)]
    assert not calls, "call megatrain.distributed.host_collectives instead of torch.distributed:\n" + "\n".join(calls)


def test_ast_check_catches_a_direct_call(tmp_path):
    src = tmp_path / "x.py"
    src.write_text("import torch.distributed as dist\nfrom torch.distributed import barrier\n"
                   "def f(t):\n    dist.all_reduce(t)\n    barrier()\n    dist.get_rank()\n")
    assert [c.split(" ")[1] for c in _direct_calls(str(src))] == ["dist.all_reduce", "barrier"]


@pytest.mark.parametrize("device,backend,expected", [
    ("cpu", "gloo", None),
    ("cpu", "nccl", "cuda"),            # the first-step failure: CPU stats into an NCCL group
    ("cuda", "nccl", None),
    ("cuda", "gloo", "cpu"),
    ("cpu", "cpu:gloo,cuda:nccl", None),
    ("cuda", "cpu:gloo,cuda:nccl", None),
    ("cpu", "cuda:nccl", "cuda"),
])
def test_staging_rule(device, backend, expected):
    got = hc.staging_device(device, backend)
    assert (got.type if got is not None else None) == expected


def test_handling_backend_of_a_mixed_group():
    assert hc.handling_backend("cpu", "cpu:gloo,cuda:nccl") == "gloo"
    assert hc.handling_backend("cuda", "cpu:gloo,cuda:nccl") == "nccl"
    assert hc.handling_backend("cpu", "nccl") == "nccl"


def test_all_reduce_stages_cpu_tensors_for_nccl(monkeypatch):
    """With the group's backend faked as nccl, the tensor handed to torch is the staged copy (not the caller's
    CPU tensor) and the result lands back in the caller's tensor."""
    seen = {}
    monkeypatch.setattr(hc, "world_size", lambda group=None: 2)
    monkeypatch.setattr(hc, "backend_name", lambda group=None: "nccl")
    sentinel = torch.device("cpu")  # stands in for the CUDA device (none here); what matters is the copy
    monkeypatch.setattr(hc, "staging_device", lambda d, b: sentinel if torch.device(d).type == "cpu" else None)

    def fake_all_reduce(t, op=None, group=None):
        seen["tensor"] = t
        t.mul_(2)

    monkeypatch.setattr(hc.dist, "all_reduce", fake_all_reduce)
    x = torch.ones(3)
    out = hc.all_reduce(x)
    assert seen["tensor"] is not x  # staged: a copy went to the collective
    assert out is x and torch.equal(x, torch.full((3,), 2.0))


def test_default_backend_is_mixed_on_gpu_machines():
    assert env.default_backend(cuda_available=True) == "cpu:gloo,cuda:nccl"
    assert env.default_backend(cuda_available=False) == "gloo"


def _ranks(rank, world):
    x = torch.full((2,), float(rank + 1))
    assert torch.equal(hc.all_reduce(x), torch.full((2,), 3.0))
    m = torch.tensor([float(rank)])
    assert hc.all_reduce(m, op="max").item() == 1.0
    parts = hc.all_gather(torch.tensor([rank]))
    assert [int(p) for p in parts] == [0, 1]
    rs = hc.reduce_scatter([torch.tensor([1.0 + rank]), torch.tensor([10.0 + rank])])
    assert rs.item() == (3.0 if rank == 0 else 21.0)
    assert hc.broadcast_object({"r": rank}) == {"r": 0}
    assert hc.all_gather_object(rank) == [0, 1]
    hc.barrier()


@pytest.mark.dist
def test_module_on_two_gloo_ranks():
    spawn_group(2, _ranks)


def test_trainer_keeps_micro_batch_stats_on_the_device():
    """No host copy per micro-batch: statistics stay on their device until the step's one reduction.
    (Meta tensors stand in for CUDA ones: a .cpu() there raises.)"""
    from megatrain.train.trainer import Trainer

    totals = {}
    for _ in range(3):
        Trainer._add(totals, {"loss_sum": torch.ones((), device="meta"), "count": torch.ones((), device="meta")})
    assert all(v.device.type == "meta" for v in totals.values())


def test_trainer_reduce_is_one_collective_then_one_host_copy(monkeypatch):
    from megatrain.train.trainer import Trainer

    calls = []
    monkeypatch.setattr(hc, "world_size", lambda group=None: 2)
    monkeypatch.setattr(hc, "backend_name", lambda group=None: "gloo")
    monkeypatch.setattr(hc.dist, "all_reduce", lambda t, op=None, group=None: (calls.append(t.dtype), t.mul_(2)))
    out = Trainer._reduce({"loss_sum": torch.tensor(3.0), "count": torch.tensor([2.0, 5.0])}, None)
    assert calls == [torch.float64]  # one packed fp64 collective
    assert out["loss_sum"].item() == 6.0 and out["count"].tolist() == [4.0, 10.0]
    assert all(v.device.type == "cpu" for v in out.values())


def test_nonfinite_flag_stays_on_the_statistics_device():
    """The per-step non-finite flag is computed where the statistics are, without a host sync: on meta tensors any
    bool() would raise. It travels in the same reduction as the statistics (one tensor, one device)."""
    from megatrain.train.nonfinite import local_nonfinite
    meta = {"loss_sum": torch.empty((), device="meta"), "count": torch.empty((), device="meta")}
    flag = local_nonfinite(meta, {"skipped": 0})
    assert flag.device.type == "meta" and flag.shape == ()
    ok = {"loss_sum": torch.tensor(3.0), "count": torch.tensor(2.0)}
    assert float(local_nonfinite(ok, {"skipped": 0})) == 0
    assert float(local_nonfinite({**ok, "loss_sum": torch.tensor(float("nan"))}, {"skipped": 0})) > 0
    guard = {"skipped": 1}
    assert float(local_nonfinite(ok, guard)) > 0 and guard["skipped"] == 0
