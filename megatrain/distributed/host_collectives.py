"""Every torch.distributed collective megatrain issues goes through this module (tests/unit/test_collectives.py
checks no other file calls one directly; docs/parallelism.md lists the call sites).

Why one module: a backend accepts tensors of some device types only. NCCL takes CUDA tensors and fails on a
CPU tensor with "No backend type associated with device type cpu"; gloo takes CPU tensors (its CUDA support is
partial); the mixed default group megatrain makes on GPU machines (``cpu:gloo,cuda:nccl``, dist/env.py) takes
both. The rule (``staging_device``): a tensor whose device type the group's backend accepts travels as it is;
otherwise it is copied to the device the backend wants, reduced there and copied back into the caller's tensor,
so callers keep in-place semantics and get their result on the device they passed. Bringing values to the host
is the caller's business (one ``.cpu()`` per optimizer step in the trainer), never done here.

The autograd collectives for tensor parallelism (dist/collectives.py) call into this module too.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
# backend name -> device types its collectives accept
_ACCEPTS = {"gloo": ("cpu",), "nccl": ("cuda",), "mpi": ("cpu", "cuda"), "ucc": ("cpu", "cuda")}


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size(group=None) -> int:
    return dist.get_world_size(group=group) if initialized() else 1


def rank(group=None) -> int:
    return dist.get_rank(group=group) if initialized() else 0


def backend_name(group=None) -> str:
    """The group's backend as torch names it: 'gloo', 'nccl', or a mixed 'cpu:gloo,cuda:nccl'."""
    return str(dist.get_backend(group))


def accepted_device_types(backend: str) -> tuple[str, ...]:
    """Device types a backend string accepts; 'cpu:gloo,cuda:nccl' → ('cpu', 'cuda')."""
    if ":" in backend:
        return tuple(part.split(":", 1)[0].strip() for part in backend.split(",") if ":" in part)
    return _ACCEPTS.get(backend.lower(), ("cpu", "cuda"))  # unknown backends: trust the caller's device


def staging_device(tensor_device: torch.device | str, backend: str) -> torch.device | None:
    """Where a tensor on ``tensor_device`` must travel for ``backend``; None when it can go as it is."""
    kind = torch.device(tensor_device).type
    accepts = accepted_device_types(backend)
    if kind in accepts:
        return None
    if "cuda" in accepts:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cuda")
    return torch.device(accepts[0])


def handling_backend(tensor_device: torch.device | str, backend: str) -> str:
    """The backend that runs a collective on a tensor from ``tensor_device`` (after staging): in a mixed
    'cpu:gloo,cuda:nccl' group a CPU tensor is gloo's, a CUDA tensor NCCL's."""
    if ":" not in backend:
        return backend
    table = {k.strip(): v.strip() for k, v in (part.split(":", 1) for part in backend.split(",") if ":" in part)}
    target = staging_device(tensor_device, backend)
    return table[(target or torch.device(tensor_device)).type]


def _staged(t: torch.Tensor, group) -> tuple[torch.Tensor, bool]:
    target = staging_device(t.device, backend_name(group))
    if target is None:
        return t, False
    return t.to(target, copy=True), True


def all_reduce(t: torch.Tensor, *, op: str = "sum", group=None) -> torch.Tensor:
    """In-place all-reduce of ``t`` over ``group``; returns ``t``. op: sum | max | min."""
    if world_size(group) == 1:
        return t
    work, moved = _staged(t, group)
    if not work.is_contiguous():
        work, moved = work.contiguous(), True
    dist.all_reduce(work, op=_OPS[op], group=group)
    if moved:
        with torch.no_grad():  # like the collective itself: a data write autograd does not record
            t.copy_(work)
    return t


def all_gather(t: torch.Tensor, *, group=None) -> list[torch.Tensor]:
    """Every rank's ``t`` (same shape on all ranks), in rank order, on ``t``'s device."""
    n = world_size(group)
    if n == 1:
        return [t]
    work, moved = _staged(t.contiguous(), group)
    parts = [torch.empty_like(work) for _ in range(n)]
    dist.all_gather(parts, work, group=group)
    return [p.to(t.device) for p in parts] if moved else parts


def reduce_scatter(parts: list[torch.Tensor], *, group=None) -> torch.Tensor:
    """Sum of every rank's ``parts[r]`` on rank r. gloo has none: all-reduce then keep our part (same
    result, 2× the traffic; CPU only)."""
    n = world_size(group)
    if n == 1:
        return parts[0]
    if handling_backend(parts[0].device, backend_name(group)) == "gloo":
        return all_reduce(torch.stack(parts).contiguous(), group=group)[rank(group)]
    work = [_staged(p.contiguous(), group)[0] for p in parts]
    out = torch.empty_like(work[0])
    dist.reduce_scatter(out, work, group=group)
    return out.to(parts[0].device)


def barrier(group=None) -> None:
    if world_size(group) > 1:
        dist.barrier(group=group)


def broadcast_object(obj, *, src: int = 0, group=None):
    """``obj`` from rank ``src`` (picklable) on every rank; torch stages the bytes on the right device."""
    if world_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_object(obj, *, group=None) -> list:
    n = world_size(group)
    if n == 1:
        return [obj]
    out = [None] * n
    dist.all_gather_object(out, obj, group=group)
    return out
