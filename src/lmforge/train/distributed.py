"""Several processes through torchrun: gloo on CPU, nccl on GPU. A single process is world size 1.

The engine replicates the model with DDP (``train.parallel=ddp``) or shards it with FSDP2
(``train.parallel=fsdp``: :func:`shard_model`, ``torch.distributed.fsdp.fully_shard`` on each
transformer block and on the root, which keeps the embeddings, final norm and heads). Under
FSDP every forward all-gathers parameters, so it is a collective: ranks must run the same
number of forwards. Code that runs forwards unevenly (evaluation on a rank's share of the
held-out data, rank 0's final report) does so inside :func:`gathered`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> DistInfo:
    """This process's place among those torchrun launched (RANK, LOCAL_RANK, WORLD_SIZE; one
    process without torchrun), read before the process group starts, so that settings can be
    checked before any side effect."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world)


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    info = launched()
    if not info.enabled:
        return info
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``t`` over ranks in place (a CPU tensor is moved to the GPU for nccl and back)."""
    if info.enabled:
        if dist.get_backend() == "nccl" and t.device.type != "cuda":
            on_gpu = t.cuda()
            dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
            t.copy_(on_gpu.cpu())
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is true on at least one (a collective)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
    return bool(all_reduce_sum(t, info).item() > 0)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` was sharded by FSDP2 (its forward is a collective)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: torch.nn.Module, param_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """FSDP2 in place: each block of ``model.layers`` is one unit (all-gathered for its forward
    and backward, resharded after), the root holds the remaining parameters. ``param_dtype``
    (bf16 autocast runs) is the dtype parameters are gathered and computed in; gradients are
    reduce-scattered in fp32 and the sharded master weights and optimizer state stay fp32.
    Frozen parameters (PEFT bases, in any dtype) are sharded too and get no gradient."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for block in getattr(model, "layers", []):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


@contextmanager
def gathered(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Every rank holds the whole of a sharded ``model`` inside the block, so each may run any
    number of forwards (or call ``hidden_states`` and other methods directly) without
    collectives. Entering and leaving are collectives: every rank must enter. Under FSDP's
    mixed precision the gathered weights are in the compute dtype. A no-op for unsharded models."""
    if not is_sharded(model):
        yield model
        return
    from torch.distributed.fsdp import FSDPModule

    # FSDP sets up its root on the root's first forward; code run here may call blocks directly
    # (``hidden_states``), which would set the blocks up as roots of their own
    model._get_fsdp_state()._lazy_init()
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    # Whether each unit reshards after its forward (FSDP's default differs for the root);
    # restored on exit. Kept unsharded inside, a forward's pre-hook has nothing to gather.
    was = []
    for m in units:
        group = m._get_fsdp_state()._fsdp_param_group
        was.append(group is not None and group.post_forward_mesh_info is not None)
    for m in units:
        m.unshard()
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for m, reshard in zip(units, was):
            m.reshard()
            m.set_reshard_after_forward(reshard, recurse=False)
