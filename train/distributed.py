"""Data-parallel training under ``torchrun`` (DDP semantics, explicit collectives).

Every rank holds the full model and the same sampler state, so all ranks draw the same domain each
step; each rank loads its slice of the global batch. Gradients are averaged over ranks with one
coalesced all-reduce per step (rather than ``DistributedDataParallel``, whose bucket hooks dislike
the per-domain heads that sit out most steps). The relational loss runs on the gathered global
batch through :func:`gather_with_grad`, whose backward sums every rank's gradient for this rank's
slice; with the gradient average that yields exactly the single-process gradient.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_env() -> DistContext:
        """Read torchrun's environment and join the process group (gloo on CPU, nccl on CUDA)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return DistContext()
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            # Validation runs on rank 0 while the others wait: allow it a long time.
            dist.init_process_group(backend, timeout=datetime.timedelta(hours=4))
        return DistContext(rank=rank, world_size=world, local_rank=local_rank)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # reduce-scatter written with all-reduce: gloo has no reduce_scatter
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """All ranks' rows, rank order, differentiable w.r.t. this rank's rows."""
    return _GatherWithGrad.apply(tensor) if ctx.enabled else tensor


def gather_detached(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if not ctx.enabled:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(ctx.world_size)]
    dist.all_gather(parts, tensor.detach().contiguous())
    return torch.cat(parts)


def average_gradients(params: list[torch.nn.Parameter], ctx: DistContext) -> None:
    """Average ``.grad`` over ranks in one flat buffer (all ranks hold the same set of grads)."""
    if not ctx.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= ctx.world_size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def _scalar_device() -> torch.device:
    """Where a small collective's tensor must live: NCCL only reduces CUDA tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def average_scalars(values: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """Mean of per-rank scalars (loss values) so every rank logs and samples from the same numbers."""
    if not ctx.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_scalar_device())
    dist.all_reduce(t)
    t /= ctx.world_size
    return dict(zip(keys, t.tolist(), strict=True))


def broadcast_float(value: float, ctx: DistContext) -> float:
    """Rank 0's ``value`` on every rank (e.g. the elapsed time that decides when a budgeted run ends)."""
    if not ctx.enabled:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_scalar_device())
    dist.broadcast(t, src=0)
    return float(t.item())
