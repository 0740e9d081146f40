"""Data-parallel training with ``torch.distributed`` (``torchrun``): NCCL on GPUs, Gloo on CPUs.

``torchrun --nproc_per_node=N -m pcfast train ...`` runs ``run_training`` on N ranks. What each
rule does across ranks:

- **BP** runs through :class:`torch.nn.parallel.DistributedDataParallel` (bucketed gradient
  all-reduce overlapped with the backward pass, buffers broadcast from rank 0 every forward).
- **PC** (every mode of :class:`pcfast.pc.PCEngine`) and **DTP** write ``.grad`` themselves
  (``torch.autograd.grad``), which DDP never sees, so :class:`GradientReducer` averages the
  local gradients on purpose: flattened into buckets of about 25 MB per device and dtype, each
  bucket's ``all_reduce`` launched asynchronously as soon as it is packed (the next bucket is
  packed while the previous one is on the wire), all handles waited before the gradients are
  clipped and the optimizer steps. (The PC engine writes every ``.grad`` at the end of its
  batch, so there is no backward pass left to overlap the communication with.)

Averaging. Every rule's gradient is that of a mean over the batch (the PC engine divides its
summed gradients by the *local* batch size). The reducer weights each rank's gradient by its
local sample count: ``g = sum_r n_r g_r / sum_r n_r``, which is exactly the gradient of the
mean over the global batch; with equal local batches (what :class:`ShardedLoader` gives) it is
the plain average. DDP averages plainly, so the BP path relies on equal local batches.

Batches. ``--batch-size`` is the *global* batch: each of the W ranks takes ``batch_size / W``
samples of every global batch (:class:`ShardedLoader`), so the data order, the number of steps
per epoch, the learning-rate schedule and the checkpoints do not depend on the number of ranks,
and a run resumes on any number of ranks.

BatchNorm. By default each rank normalises with its own local batch's statistics (as DDP
does); :func:`convert_sync_batchnorm` (``--sync-bn``) swaps every BatchNorm for
:class:`SyncBatchNorm`, whose training statistics are those of the global batch and whose
backward pass is the exact global-batch backward (two per-channel sums all-reduced), so a
W-rank run computes what one process computes on the global batch. In PC that includes every
inference step's ``J^T e`` through a BatchNorm: one small all-reduce per BatchNorm layer per
step, the price of keeping PC on W ranks equal to PC on the global batch.

Rank 0 logs and writes every file; a NaN on any rank reaches all ranks through the all-reduced
training sums (the loop's sync points), so they stop together; collectives time out after
``PCFAST_DIST_TIMEOUT`` seconds.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from pcfast.data.loader import DeviceLoader

DEFAULT_BUCKET_MB = 25.0
DEFAULT_TIMEOUT_S = 600.0  # collective timeout; PCFAST_DIST_TIMEOUT (seconds) overrides it

__all__ = [
    "DEFAULT_BUCKET_MB", "DistContext", "DistributedError", "GradientReducer", "ShardedLoader",
    "SyncBatchNorm", "check_config", "convert_sync_batchnorm", "distribute_rule", "env_rank",
    "init_distributed", "prepare_sync_bn", "rank_zero", "shard_data", "shard_eval_loader",
    "world_size_note",
]


class DistributedError(ValueError):
    """A data-parallel set-up that cannot work (bad world size, batch size, device)."""


# ------------------------------------------------------------------------------- context
@dataclass
class DistContext:
    """Where this process stands in a data-parallel run (``world_size == 1``: no run).

    Example::

        ctx = init_distributed("auto")          # under torchrun: joins the process group
        model.to(ctx.device)
        loss_sum, count = ctx.all_reduce_sum(loss_sum, count)
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this context initialised the process group (and destroys it)

    @property
    def enabled(self) -> bool:
        """Whether there are several ranks."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the rank that logs and writes metrics, curves and checkpoints."""
        return self.rank == 0

    def all_reduce_sum(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """The sums over all ranks of ``tensors`` (new tensors, same shapes; one collective).

        The inputs are left as they were. A single process returns them unchanged.
        """
        if not self.enabled:
            return list(tensors)
        flat = torch.cat([t.detach().reshape(-1).to(self.device, torch.float64)
                          for t in tensors])
        dist.all_reduce(flat)
        out, start = [], 0
        for t in tensors:
            out.append(flat[start:start + t.numel()].view(t.shape).to(t.dtype))
            start += t.numel()
        return out

    def broadcast_module(self, module: nn.Module, buffers_only: bool = False) -> None:
        """Copy rank 0's parameters (unless ``buffers_only``) and buffers to every rank."""
        if not self.enabled:
            return
        tensors = [] if buffers_only else [p.data for p in module.parameters()]
        tensors += [b for b in module.buffers()]
        by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for t in tensors:
            by_kind.setdefault((t.device, t.dtype), []).append(t)
        for group in by_kind.values():
            flat = _flatten_dense_tensors(group)
            dist.broadcast(flat, src=0)
            with torch.no_grad():
                for t, new in zip(group, _unflatten_dense_tensors(flat, group)):
                    t.copy_(new)

    def reduce_sums(self, sums: dict[str, torch.Tensor],
                    count: float) -> tuple[dict[str, torch.Tensor], float]:
        """``sums`` (name -> tensor) and ``count`` summed over the ranks, in one collective."""
        if not self.enabled:
            return sums, count
        keys = list(sums)
        reduced = self.all_reduce_sum(*(torch.as_tensor(sums[k], device=self.device)
                                        for k in keys),
                                      torch.tensor(float(count), device=self.device))
        return dict(zip(keys, reduced[:-1])), float(reduced[-1].item())

    def main_first(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on each machine's local rank 0 first, then on the other ranks: a download
        or a cache fill happens once per machine (every rank calls this once)."""
        if not self.enabled:
            return fn()
        if self.local_rank != 0:
            dist.barrier()
        result = fn()
        if self.local_rank == 0:
            dist.barrier()
        return result

    def from_main(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` computed on rank 0 and sent to every rank (pickled), or rank 0's exception
        raised on every rank: for a checkpoint that only rank 0's machine may hold."""
        if not self.enabled:
            return fn()
        box: list[Any] = [None]
        if self.is_main:
            try:
                box = [("ok", fn())]
            except Exception as exc:  # every rank raises it, so all stop with one message
                box = [("error", exc)]
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise value
        return value

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if self.enabled:
            dist.barrier()

    def seed_epoch(self, seed: int, epoch: int) -> None:
        """Give every rank its own torch random stream for ``epoch`` (DTP noise, dropout).

        Without it every rank would draw the same noise for its own samples. Seeded from
        ``(seed, epoch, rank)``, so a resumed run draws the same numbers. No-op in one process.
        """
        if self.enabled:
            torch.manual_seed((seed * 1_000_003 + epoch) * 65_537 + self.rank + 1)

    def close(self) -> None:
        """Leave the process group if this context created it, once every rank is done.

        The barrier first keeps a rank that finished from tearing its connections down (and
        exiting) while another still works, rank 0 writing the last checkpoint: without it a
        Gloo rank that exits early can abort in its teardown (SIGABRT, "terminate called
        without an active exception"), which fails the whole run after it completed.
        """
        if self.owns_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
            self.owns_group = False


def _timeout() -> datetime.timedelta:
    text = os.environ.get("PCFAST_DIST_TIMEOUT")
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise DistributedError(f"PCFAST_DIST_TIMEOUT must be a number of seconds, got {text!r}") \
            from None
    return datetime.timedelta(seconds=seconds)


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    return int(text) if text not in (None, "") else default


def _resolve_device(name: str, local_rank: int, world_size: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available; use --device cpu")
    if world_size > 1:
        if device.index is not None:
            raise DistributedError(
                f"--device {name}: under torchrun each rank takes the GPU of its local rank "
                "(cuda:LOCAL_RANK); pass --device cuda or auto, and CUDA_VISIBLE_DEVICES to "
                "choose the GPUs")
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise DistributedError(
                f"local rank {local_rank} has no GPU of its own: this machine shows {count} "
                "GPU(s); start at most that many processes per node (--nproc_per_node)")
        device = torch.device("cuda", local_rank)
    return device


def init_distributed(device: str = "auto") -> DistContext:
    """Join the data-parallel run this process was started in, or describe a single process.

    Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the default process group is
    initialised from the environment (``MASTER_ADDR``/``MASTER_PORT``, ``RANK``,
    ``WORLD_SIZE``), with NCCL for CUDA devices and Gloo for the CPU; each rank uses
    ``cuda:LOCAL_RANK``. A process group initialised already (by the caller) is used as it is.
    Collectives time out after ``PCFAST_DIST_TIMEOUT`` seconds (default 600).

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` (``"cuda:N"`` in a single process only).
    """
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        local = _env_int("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1))
        dev = _resolve_device(device, local, world)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistContext(rank, world, local, dev, owns_group=False)
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        dev = _resolve_device(device, 0, 1)
        return DistContext(device=dev)
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    dev = _resolve_device(device, local, world)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=_timeout(),
                            **({"device_id": dev} if dev.type == "cuda" else {}))
    return DistContext(rank, world, local, dev, owns_group=True)


# --------------------------------------------------------------------------- gradients
class GradientReducer:
    """Averages the ``.grad`` of ``params`` over the ranks: bucketed, asynchronous all-reduces.

    Gradients are flattened into buckets of at most ``bucket_cap_mb`` (one bucket list per
    device and dtype, in parameter order); each bucket's ``all_reduce`` is launched
    asynchronously as soon as it is packed, and every handle is waited before the averaged
    values are copied back into ``.grad``. Parameters whose ``.grad`` is ``None`` are left
    ``None`` (optimizers skip them); which ones are ``None`` must be the same on every rank, as
    it is when every rank runs the same code.

    ``all_reduce(count=n)`` weights this rank's gradient by its local sample count ``n``:
    ``g = sum_r n_r g_r / sum_r n_r``, the gradient of the mean over the global batch whatever
    the local batch sizes; ``count=None`` averages plainly (equal local batches).

    Example::

        reducer = GradientReducer(model.parameters())
        engine.compute_gradients(x_local, y_local)   # writes the local .grad
        reducer.all_reduce(count=x_local.shape[0])
        optimizer.step()
    """

    def __init__(self, params, bucket_cap_mb: float = DEFAULT_BUCKET_MB,
                 group: Any = None) -> None:
        seen: set[int] = set()
        self.params: list[nn.Parameter] = []
        for p in params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self.params.append(p)
        if not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be positive, got {bucket_cap_mb}")
        self.bucket_bytes = int(bucket_cap_mb * 2**20)
        self.group = group
        self.calls = 0  # how many times gradients were reduced (the rules' wrapper checks it)
        self.last_buckets = 0

    def buckets(self, params: Sequence[nn.Parameter]) -> list[list[nn.Parameter]]:
        """``params`` (with gradients) split into buckets of one device and dtype each."""
        by_kind: dict[tuple[torch.device, torch.dtype], list[list[nn.Parameter]]] = {}
        sizes: dict[tuple[torch.device, torch.dtype], int] = {}
        for p in params:
            grad = p.grad
            assert grad is not None
            if grad.is_sparse:
                raise DistributedError("GradientReducer does not average sparse gradients")
            key = (grad.device, grad.dtype)
            nbytes = grad.numel() * grad.element_size()
            lists = by_kind.setdefault(key, [[]])
            if lists[-1] and sizes.get(key, 0) + nbytes > self.bucket_bytes:
                lists.append([])
                sizes[key] = 0
            lists[-1].append(p)
            sizes[key] = sizes.get(key, 0) + nbytes
        return [b for lists in by_kind.values() for b in lists]

    @torch.no_grad()
    def all_reduce(self, count: int | float | None = None) -> None:
        """Replace every ``.grad`` by its average over the ranks (see the class docstring)."""
        self.calls += 1
        if not (dist.is_available() and dist.is_initialized()):
            return
        world = dist.get_world_size(self.group)
        if world == 1:
            return
        live = [p for p in self.params if p.grad is not None]
        buckets = self.buckets(live)
        self.last_buckets = len(buckets)
        total_work = None
        if count is not None:
            device = live[0].grad.device if live else torch.device("cpu")
            if dist.get_backend(self.group) == "nccl" and device.type != "cuda":
                device = torch.device("cuda", torch.cuda.current_device())
            total = torch.tensor([float(count)], dtype=torch.float64, device=device)
            total_work = dist.all_reduce(total, group=self.group, async_op=True)
        pending = []
        for bucket in buckets:
            flat = _flatten_dense_tensors([p.grad for p in bucket])
            if count is not None:
                flat.mul_(float(count))
            pending.append((bucket, flat, dist.all_reduce(flat, group=self.group,
                                                          async_op=True)))
        if total_work is not None:
            total_work.wait()
            if not total.item() > 0:
                raise DistributedError("no rank had any sample in this step")
            scale = 1.0 / total.item()
        else:
            scale = 1.0 / world
        for bucket, flat, work in pending:
            work.wait()
            flat.mul_(scale)
            grads = [p.grad for p in bucket]
            for g, avg in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(avg)


def _unused_in_forward(model: nn.Module) -> bool:
    """Whether ``model(x)`` leaves some trainable parameters out (DDP must look for them)."""
    from pcfast.dtp.net import DTPNet

    return isinstance(model, DTPNet)  # BP on a DTPNet ignores its feedback layers


def distribute_rule(rule, ctx: DistContext, bucket_cap_mb: float = DEFAULT_BUCKET_MB):
    """Make a :class:`pcfast.train.rules.Rule` train data-parallel over ``ctx``'s ranks.

    BP (:class:`~pcfast.train.rules.BPRule` and subclasses): ``rule.model`` becomes a
    :class:`~torch.nn.parallel.DistributedDataParallel` wrapper of the model. Every other rule
    (PC, DTP) gets a :class:`GradientReducer` over its parameter groups that averages the local
    gradients right before the rule clips them and steps the optimizer: the rules call
    ``self.clip()`` between computing gradients and ``optimizer.step()``, and that call is
    where the reduction runs, so clipping acts on the global gradient as in one process. A rule
    that steps without calling ``clip()`` is refused at its first step rather than silently
    training each rank on its own gradients. Returns ``rule`` (changed in place).
    """
    if not ctx.enabled:
        return rule
    from pcfast.train.rules import BPRule

    if isinstance(rule, BPRule):
        model = rule.model
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        rule.model = nn.parallel.DistributedDataParallel(
            model, device_ids=ids, bucket_cap_mb=bucket_cap_mb,
            find_unused_parameters=_unused_in_forward(model))
        return rule
    params = [p for g in rule.parameter_groups() for p in g["params"]]
    reducer = GradientReducer(params, bucket_cap_mb)
    inner_clip, inner_step = rule.clip, rule.train_step
    local = {"count": None}

    def clip() -> None:
        reducer.all_reduce(count=local["count"])
        inner_clip()

    def train_step(x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer):
        before = reducer.calls
        local["count"] = x.shape[0]
        out = inner_step(x, y, optimizer)
        if reducer.calls == before:
            raise DistributedError(
                f"rule {type(rule).__name__} stepped the optimizer without calling "
                "self.clip() after computing its gradients, so they cannot be averaged over "
                "the ranks; call self.clip() right before optimizer.step()")
        return out

    rule.clip, rule.train_step = clip, train_step
    rule.gradient_reducer = reducer
    return rule


# ---------------------------------------------------------------------------- BatchNorm
class _SyncBNFunction(torch.autograd.Function):
    """Training-mode BatchNorm over the global batch: forward statistics and exact backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):
        dims = [0] + list(range(2, x.dim()))
        c = x.shape[1]
        n_local = x.numel() // c
        stat_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        xs = x.to(stat_dtype)
        mean_l = xs.mean(dims)
        m2_l = (xs - mean_l.view(1, c, *([1] * (x.dim() - 2)))).pow(2).sum(dims)
        packed = torch.cat([mean_l, m2_l, mean_l.new_full((1,), float(n_local))])
        world = dist.get_world_size(group)
        gathered = [torch.empty_like(packed) for _ in range(world)]
        dist.all_gather(gathered, packed, group=group)
        stats = torch.stack(gathered)  # (W, 2C+1): per-rank mean, M2, count (Chan et al.)
        counts = stats[:, -1]
        n = counts.sum()
        if n.item() <= 1:
            raise ValueError("Expected more than 1 value per channel when training "
                             f"(the global batch has {int(n.item())})")
        means, m2s = stats[:, :c], stats[:, c:2 * c]
        mean = (counts[:, None] * means).sum(0) / n
        m2 = (m2s + counts[:, None] * (means - mean).pow(2)).sum(0)
        var = m2 / n
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None:
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        if running_var is not None:
            running_var.lerp_((m2 / (n - 1)).to(running_var.dtype), momentum)
        shape = (1, c, *([1] * (x.dim() - 2)))
        xhat = (xs - mean.view(shape)) * invstd.view(shape)
        y = xhat
        if weight is not None:
            y = y * weight.to(stat_dtype).view(shape) + bias.to(stat_dtype).view(shape)
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.n, ctx.group, ctx.dims, ctx.shape = float(n.item()), group, dims, shape
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        xhat, invstd, weight = ctx.saved_tensors
        dims, shape = ctx.dims, ctx.shape
        dyf = dy.to(xhat.dtype)
        sum_dy = dyf.sum(dims)
        sum_dy_xhat = (dyf * xhat).sum(dims)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            # The exact backward of the global batch: the two per-channel sums of every rank.
            both = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(both, group=ctx.group)
            c = sum_dy.numel()
            g_dy, g_dy_xhat = both[:c] / ctx.n, both[c:] / ctx.n
            scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
            dx = ((dyf - g_dy.view(shape) - xhat * g_dy_xhat.view(shape))
                  * scale.view(shape)).to(dy.dtype)
        if weight is not None:
            if ctx.needs_input_grad[1]:
                dw = sum_dy_xhat.to(weight.dtype)  # local: the gradient reducer sums the ranks
            if ctx.needs_input_grad[2]:
                db = sum_dy.to(weight.dtype)
        return dx, dw, db, None, None, None, None, None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch over all ranks.

    Same math as :class:`torch.nn.SyncBatchNorm` (per-rank mean, centred sum of squares and
    count gathered and combined; the backward all-reduces the per-channel sums of ``dy`` and
    ``dy * x_hat``), but it runs on any device and backend, Gloo on the CPU included
    (``torch.nn.SyncBatchNorm`` refuses CPU tensors). It is not a ``BatchNorm1d/2d``, so the
    fast PC backend differentiates it through autograd (its exact, communicating backward)
    instead of its local-statistics rule. Outside a process group, or in eval mode, it is a
    plain BatchNorm. Input: ``(N, C, *)``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 process_group: Any = None, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {input.dim()}-D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            assert self.num_batches_tracked is not None
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked.item())
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        running_mean = self.running_mean if track else None
        running_var = self.running_var if track else None
        sync = (bn_training and self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1)
        if not sync:
            return F.batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                bn_training, factor, self.eps)
        return _SyncBNFunction.apply(input, self.weight, self.bias,
                                     running_mean if self.training else None,
                                     running_var if self.training else None,
                                     self.eps, factor, self.process_group)


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace every BatchNorm in ``module`` by a :class:`SyncBatchNorm` (same parameters,
    buffers and state-dict keys); returns the converted module (``module`` itself unless it is
    a BatchNorm)."""
    out = module
    if (isinstance(module, nn.modules.batchnorm._BatchNorm)
            and not isinstance(module, SyncBatchNorm)):
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out


# --------------------------------------------------------------------------------- data
class ShardedLoader:
    """This rank's part of every global batch of a training :class:`DeviceLoader`.

    The wrapped loader's batch size is the *global* batch ``G``; each of the ``W`` ranks gets
    ``G / W`` samples of it: the epoch's permutation (seeded from ``(seed, epoch)``, the same on
    every rank) is cut into global batches and each global batch into W contiguous, disjoint
    slices, so the ranks cover the epoch together. The last, incomplete global batch is cut to
    a multiple of W (at most W-1 images of an epoch are left out, different ones each epoch) so
    every rank has the same number of batches of the same size. Flips and crops are drawn for
    the whole global batch and sliced, so W ranks see exactly the images one process sees
    (``--extra-augment`` draws per rank).

    Example::

        loader = ShardedLoader(train_loader, rank=ctx.rank, world_size=ctx.world_size)
        loader.set_epoch(epoch)
        for x, y in loader: ...                   # x: (G / W, C, H, W)
    """

    def __init__(self, loader: DeviceLoader, rank: int, world_size: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        if loader.batch_size % world_size:
            raise DistributedError(
                f"--batch-size {loader.batch_size} is the global batch and must be a multiple "
                f"of the number of ranks ({world_size}); use e.g. --batch-size "
                f"{(loader.batch_size // world_size + 1) * world_size}")
        self.loader, self.rank, self.world_size = loader, rank, world_size
        self.device = loader.device

    @property
    def batch_size(self) -> int:
        """The local batch size (``global / world_size``)."""
        return self.loader.batch_size // self.world_size

    @property
    def num_images(self) -> int:
        return self.loader.num_images

    @property
    def epoch(self) -> int:
        return self.loader.epoch

    def set_epoch(self, epoch: int) -> None:
        """Fix the permutation and augmentation of ``epoch``."""
        self.loader.set_epoch(epoch)

    def _sizes(self) -> list[int]:
        n, g, w = self.loader.num_images, self.loader.batch_size, self.world_size
        sizes = [g] * (n // g)
        rest = (n % g) // w * w
        if rest and not self.loader.drop_last:
            sizes.append(rest)
        return sizes

    def __len__(self) -> int:
        return len(self._sizes())

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        ld, dev = self.loader, self.device
        g = torch.Generator(device=dev)
        g.manual_seed(ld.seed * 1_000_003 + ld.epoch)  # as DeviceLoader: the same stream
        n = ld.num_images
        order = (torch.randperm(n, generator=g, device=dev) if ld.shuffle
                 else torch.arange(n, device=dev))
        for i, size in enumerate(self._sizes()):
            local = size // self.world_size
            lo, hi = self.rank * local, (self.rank + 1) * local
            idx = order[i * ld.batch_size:i * ld.batch_size + size][lo:hi]
            x = ld.images[idx].float().div_(255)
            if ld.flip:
                flip = (torch.rand(size, device=dev, generator=g) < 0.5)[lo:hi]
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
            if ld.crop_padding:
                p = ld.crop_padding
                offsets = torch.randint(0, 2 * p + 1, (size, 2), device=dev, generator=g)
                x = _crop(x, p, offsets[lo:hi])
            if ld.augment is not None:
                x = ld.augment(x, g)
            if ld.preprocess is not None:
                x = ld.preprocess(x)
            yield x, ld.labels[idx]


def _crop(x: torch.Tensor, padding: int, offsets: torch.Tensor) -> torch.Tensor:
    """Zero-pad ``x`` (B, C, H, W) by ``padding`` and crop image ``b`` at ``offsets[b]``
    (the indexing of :func:`pcfast.data.loader.random_crop`)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = (offsets[:, 0:1] + torch.arange(h, device=x.device)).view(b, 1, h, 1)
    cols = (offsets[:, 1:2] + torch.arange(w, device=x.device)).view(b, 1, 1, w)
    batch = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    chan = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
    return padded[batch, chan, rows, cols]


def shard_eval_loader(loader: DeviceLoader, rank: int, world_size: int) -> DeviceLoader:
    """This rank's contiguous block of an evaluation loader (blocks differ by at most one
    image; together they are the whole set, each image once). Sum the counts over the ranks
    (:meth:`DistContext.all_reduce_sum`) for whole-set metrics."""
    n = loader.num_images
    lo, hi = rank * n // world_size, (rank + 1) * n // world_size
    return DeviceLoader(loader.images[lo:hi], loader.labels[lo:hi], loader.batch_size,
                        shuffle=False, preprocess=loader.preprocess, device=loader.device)


def shard_data(data, ctx: DistContext):
    """A :class:`pcfast.data.pipeline.DataBundle` with this rank's loaders (itself in one
    process): the training loader sharded per global batch, validation and test split in
    blocks."""
    if not ctx.enabled:
        return data
    val = None if data.val is None else shard_eval_loader(data.val, ctx.rank, ctx.world_size)
    return replace(data, train=ShardedLoader(data.train, ctx.rank, ctx.world_size), val=val,
                   test=shard_eval_loader(data.test, ctx.rank, ctx.world_size))


def prepare_sync_bn(model: nn.Module, ctx: DistContext,
                    log: Callable[[str], None]) -> nn.Module:
    """``--sync-bn``: the model with :class:`SyncBatchNorm` layers when there are several
    ranks; in one process it is left as it is (the statistics are global already), said once."""
    if not ctx.enabled:
        log("--sync-bn: a single process; BatchNorm statistics are those of the whole batch "
            "already, nothing to synchronise.")
        return model
    return convert_sync_batchnorm(model)


def check_config(cfg, ctx: DistContext) -> None:
    """Refuse, before any data is read, a run the ranks cannot share (``cfg``: a TrainConfig)."""
    if ctx.enabled and cfg.batch_size % ctx.world_size:
        w = ctx.world_size
        raise DistributedError(
            f"--batch-size {cfg.batch_size} is the global batch and must be a multiple of the "
            f"number of ranks ({w}); use e.g. --batch-size {(cfg.batch_size // w + 1) * w}")


def world_size_note(old: int, new: int, cfg) -> str:
    """The line a resume prints when the checkpoint was trained on another number of ranks."""
    ranks = lambda n: f"{n} rank{'s' if n != 1 else ''}"  # noqa: E731
    note = (f"--resume: the checkpoint was trained on {ranks(old)}, this run has {ranks(new)}. "
            "The data order, the steps and the averaged gradients are those of the global "
            f"batch of {cfg.batch_size} either way")
    if not cfg.sync_bn:
        note += (f"; per-rank BatchNorm statistics now come from {cfg.batch_size // new} images "
                 f"instead of {cfg.batch_size // old}")
    if cfg.rule == "dtp":
        note += "; DTP draws its noise in other per-rank streams"
    return note + "."


def env_rank() -> tuple[int, int]:
    """``(rank, world_size)`` from the torchrun environment (``(0, 1)`` outside torchrun)."""
    return _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)


def rank_zero(log: Callable[[str], None], ctx: DistContext) -> Callable[[str], None]:
    """``log`` on rank 0, a no-op on the other ranks."""
    return log if ctx.is_main else (lambda message: None)
