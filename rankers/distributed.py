"""Data-parallel training under `torchrun`: the process group, batch shares, reductions.

A trainer that runs in one process and under `torchrun --nproc-per-node N` alike:

    with distributed.session(device) as ctx:      # RANK, WORLD_SIZE, LOCAL_RANK from torchrun
        model = build(seed)                       # the same seed on every rank
        net = distributed.wrap(model, device)     # DistributedDataParallel when N > 1, else model
        for epoch ...:
            plan = make_batches(rng(seed, epoch)) # every rank builds the same plan
            for rows in plan:                     # one global batch (B rows) per optimizer step
                part, share = distributed.micro_batch(rows, ctx)
                loss = mean_loss(net, part)       # mean over this rank's rows
                (loss * share * ctx.world_size).backward()  # DDP averages: the full batch's gradient
                opt.step()
            metrics = validate() if ctx.is_main else None
            metrics = distributed.broadcast_object(metrics)  # every rank stops alike
        if ctx.is_main: write files

One process with batch B and N processes with B/N rows each then take the same optimizer
steps up to the order of float additions in the gradient all-reduce: the scheme keeps the
global batch (and so the learning rate) unchanged and only splits its work.

- `micro_batch` cuts each global batch into N contiguous shares whose sizes differ by at
  most one row (`share_bounds`). A rank whose share is empty (a batch of fewer than N rows)
  still runs the forward and backward passes, on one row with weight 0, because DDP needs
  every rank in every gradient all-reduce.
- Dropout draws per rank (`rank_seed`), so with dropout the N-process run is a different,
  equally valid draw of the same training, not the one-process run; with dropout 0 the two
  agree (tests/test_ddp.py).
- A trainer that manages gradients itself (accumulation, gradient surgery) can skip `wrap`
  and call `all_reduce_gradients(params)` before its optimizer step instead: with the
  losses scaled by `share` (not `share * N`) their sum over ranks is the full batch's.
  Gradients it keeps aside (one per task, for surgery) go through `all_reduce_sum_list`
  BEFORE they are combined, so the combination sees the whole batch's task gradients. A
  loss that is a mean over something else than the samples (the distinct news of a batch)
  needs weights of its own to sum to the one-process loss (rankers.finetune does this).
- Files: rank 0 writes, then `barrier()` before another rank may read them; `main_first()`
  lets rank 0 create what the others then reuse (a tokenizer learned into a folder).
- Collectives block until every rank arrives: every rank must call them in the same order
  with the same shapes. `check_same` turns a mismatched setup into an error instead of a hang.

Without torchrun (no WORLD_SIZE, or WORLD_SIZE=1) everything here is a no-op: one rank,
`micro_batch` returns the whole batch with share 1, reductions return their input.
Backends: gloo on CPU, nccl on CUDA (each rank on GPU LOCAL_RANK).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import inspect
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from storage.errors import PipelineError


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank among `world_size` and its GPU index on the node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """Whether training is data-parallel (more than one rank)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that validates, reports and writes files."""
        return self.rank == 0


def env_context() -> Context:
    """The ranks torchrun announces in RANK, WORLD_SIZE and LOCAL_RANK (one rank without them)."""
    try:
        ctx = Context(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                      int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
        found = ", ".join(f"{n}={os.environ.get(n)!r}" for n in names)
        raise PipelineError(f"{found} must be integers; launch with torchrun") from None
    if ctx.world_size < 1 or not 0 <= ctx.rank < ctx.world_size or ctx.local_rank < 0:
        raise PipelineError(f"RANK={ctx.rank} is not within WORLD_SIZE={ctx.world_size}; launch with torchrun")
    return ctx


def current() -> Context:
    """The context of the initialised process group, or a single rank when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return Context()
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def is_main() -> bool:
    return current().is_main


def _uses_cuda(device: str | torch.device) -> bool:
    if str(device) == "auto":
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def init(device: str | torch.device = "auto", timeout_s: float = 1800.0) -> Context:
    """Join the process group torchrun set up (gloo on CPU; nccl on CUDA, each rank on GPU
    LOCAL_RANK, so that a device named plain "cuda" means this rank's GPU). A no-op for one
    rank or when the group already exists."""
    ctx = env_context()
    if not ctx.enabled or dist.is_initialized():
        return current()
    if not dist.is_available():
        raise PipelineError("this torch build has no torch.distributed; run with one process")
    cuda = _uses_cuda(device)
    if cuda:
        if ctx.local_rank >= torch.cuda.device_count():
            raise PipelineError(f"LOCAL_RANK {ctx.local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                                "start at most one process per GPU (--nproc-per-node), or use --device cpu")
        torch.cuda.set_device(ctx.local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return current()


def cleanup() -> None:
    """Leave the process group (after a barrier, so no rank leaves while others still talk)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device: str | torch.device = "auto") -> Iterator[Context]:
    """`init` on entry; `cleanup` on a normal exit. On an error the group is destroyed without
    waiting: the other ranks fail in their next collective, and torchrun stops them all."""
    ctx = init(device)
    try:
        yield ctx
    except BaseException:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        raise
    cleanup()


def rank_seed(seed: int, rank: int, *more: int) -> int:
    """A torch seed of its own per (seed, rank[, epoch, ...]), for what should differ across
    ranks (dropout)."""
    return int(np.random.SeedSequence([seed, rank, *more]).generate_state(1)[0])


# ---------------------------------------------------------------------------------------
# Shares of a batch


def share_bounds(n: int, world_size: int) -> np.ndarray:
    """Offsets (world_size + 1,) cutting n rows into contiguous shares, the first n % world_size
    one row longer (numpy.array_split's rule)."""
    if n < 0 or world_size < 1:
        raise ValueError(f"cannot share {n} rows among {world_size} ranks")
    sizes = np.full(world_size, n // world_size, dtype=np.int64)
    sizes[: n % world_size] += 1
    return np.concatenate([[0], np.cumsum(sizes)])


def shard(rows: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank `rank`'s contiguous share of `rows`; the shares of all ranks are `rows`, in order."""
    bounds = share_bounds(len(rows), world_size)
    return rows[bounds[rank]:bounds[rank + 1]]


def micro_batch(rows: np.ndarray, ctx: Context | None = None) -> tuple[np.ndarray, float]:
    """This rank's rows of a global batch and their fraction of it (len(share) / len(rows)).

    An empty share comes back as the batch's first row with fraction 0: the rank still runs
    a forward and backward pass (DDP all-reduces every parameter's gradient on every rank)
    and its loss, scaled by 0, adds nothing."""
    ctx = ctx or current()
    if not ctx.enabled:
        return rows, 1.0
    if not len(rows):
        raise ValueError("an empty global batch cannot be shared")
    part = shard(rows, ctx.rank, ctx.world_size)
    if not len(part):
        return rows[:1], 0.0
    return part, len(part) / len(rows)


def shard_plan(plan: Iterable[np.ndarray], ctx: Context | None = None) -> list[tuple[np.ndarray, float]]:
    """`micro_batch` of every global batch of an epoch's plan: one (rows, fraction) per step."""
    ctx = ctx or current()
    return [micro_batch(rows, ctx) for rows in plan]


# ---------------------------------------------------------------------------------------
# Collectives (no-ops for one rank)


def wrap(model: nn.Module, device: str | torch.device) -> nn.Module:
    """DistributedDataParallel over `model` when data-parallel, else `model` itself.

    Buffers are not re-broadcast at every forward (set once, e.g. input statistics, and
    identical on every rank); parameters are broadcast from rank 0 once here."""
    if not current().enabled:
        return model
    device = torch.device(device)
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel
    # torch 2.15 renamed broadcast_buffers (still synced once at construction either way).
    quiet = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
             else "broadcast_buffers")
    return ddp(model, device_ids=ids, **{quiet: False})


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks, in place; returns it."""
    if current().enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of `tensor` over ranks, in place (floating tensors); returns it."""
    ctx = current()
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(ctx.world_size)
    return tensor


def all_reduce_sum_list(tensors: Sequence[torch.Tensor | None],
                        like: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """Sums over ranks of `tensors` (gradients), entry by entry; `like[i]` gives the shape,
    dtype and device of entry i where a rank holds None.

    An entry that is None on EVERY rank stays None (an optimizer skips such a parameter, as
    it would in one process); one that is None on some ranks only counts as zeros there.
    The sums travel in flat buckets (one all-reduce per bucket, not per tensor) and are
    written back into the given tensors where there are any. Every rank must pass lists of
    the same length with the same shapes."""
    ctx = current()
    if not ctx.enabled:
        return list(tensors)
    if len(tensors) != len(like):
        raise ValueError(f"{len(tensors)} tensors but {len(like)} templates")
    if not tensors:
        return []
    held = torch.tensor([t is not None for t in tensors], dtype=torch.int32, device=like[0].device)
    dist.all_reduce(held, op=dist.ReduceOp.SUM)
    held = held.tolist()
    out = [t if t is not None else (torch.zeros_like(like[i]) if held[i] else None) for i, t in enumerate(tensors)]
    _sum_in_buckets([t for t in out if t is not None])
    return out


def _sum_in_buckets(tensors: list[torch.Tensor], cap_bytes: int = 64 * 2**20) -> None:
    """All-reduce (sum) `tensors` in place, concatenated per (device, dtype) into buckets of
    at most `cap_bytes` (a tensor larger than that travels alone)."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    buckets: list[list[torch.Tensor]] = []
    for group in groups.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for t in group:
            nbytes = t.numel() * t.element_size()
            if bucket and size + nbytes > cap_bytes:
                buckets.append(bucket)
                bucket, size = [], 0
            bucket.append(t)
            size += nbytes
        if bucket:
            buckets.append(bucket)
    flats = [torch.cat([t.reshape(-1) for t in bucket]) for bucket in buckets]
    works = [dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True) for flat in flats]
    for work, flat, bucket in zip(works, flats, buckets):
        work.wait()
        offset = 0
        for t in bucket:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def all_reduce_gradients(params: Iterable[nn.Parameter], mean: bool = False) -> None:
    """Sum (or average) the gradients of `params` over ranks, for trainers without `wrap`.

    Every rank must pass the same parameters. A parameter without a gradient on any rank
    keeps none (the optimizer skips it, as in one process); one with a gradient on some
    ranks only gets zeros on the others (`all_reduce_sum_list`)."""
    ctx = current()
    if not ctx.enabled:
        return
    params = list(params)
    for p, g in zip(params, all_reduce_sum_list([p.grad for p in params], params)):
        if g is not None and mean:
            g.div_(ctx.world_size)
        p.grad = g


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Rank `src`'s parameters and buffers into `module` on every rank (in place), so ranks
    that built the same model start from the same weights even where initialisation drew
    from an unseeded generator (weights a pre-trained checkpoint lacks)."""
    if not current().enabled:
        return
    with torch.no_grad():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=src)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` of rank `src` on every rank (picklable objects: metrics, decisions, paths)."""
    if not current().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if current().enabled:
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first; the others run it once rank 0 has finished it (e.g. rank
    0 learns a tokenizer into a folder, the others then read it instead of racing to write)."""
    ctx = current()
    if ctx.enabled and not ctx.is_main:
        dist.barrier()
    yield
    if ctx.enabled and ctx.is_main:
        dist.barrier()


def check_same(value: str, what: str) -> None:
    """Raise on every rank unless all ranks hold the same `value` (e.g. a digest of the
    training setup): ranks that would train on different plans would otherwise hang."""
    ctx = current()
    if not ctx.enabled:
        return
    values: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(values, value)
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        raise PipelineError(f"{what} differs between rank 0 and rank(s) {differ}; every rank must be started "
                            "with the same options and data")


def digest(*parts: Any) -> str:
    """A short sha256 of arrays (their bytes) and other values (their repr)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(np.ascontiguousarray(part).tobytes() if isinstance(part, np.ndarray) else repr(part).encode())
    return h.hexdigest()[:16]
