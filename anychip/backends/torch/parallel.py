"""Several torch processes under torchrun: DDP or FSDP2 around the model, gradient sync during
accumulation, each rank's slice of the global batch, and collective failures as one error.

:class:`SingleProcess` answers the same questions for a step without ``parallel=``, so the
engine has one path through them.
"""

from __future__ import annotations

import contextlib

from anychip import distributed
from anychip.batch import split_batch
from anychip.errors import DistributedError


class SingleProcess:
    world, rank = 1, 0

    def wrap(self, model):
        return model

    def grad_sync(self, net, model, last: bool):
        return contextlib.nullcontext()

    def local_batch(self, batch, tokens: int, split_batches: bool):
        return batch, tokens

    def reduce(self, loss, norm):
        return loss, norm

    def collectives(self, what: str):
        return contextlib.nullcontext()


class TorchParallel(SingleProcess):
    """``parallel="ddp"`` or ``"fsdp"``: checks the launch and joins the process group before
    the model is touched."""

    def __init__(self, backend, mode: str):
        import torch.distributed as dist

        self.backend, self.mode = backend, mode
        distributed.require_launch(mode)
        if mode == "fsdp" and backend.traits.lazy_tensors:
            raise DistributedError(
                f"parallel='fsdp' is not supported on {backend.name!r} (lazy tensors: FSDP2 needs eager DTensors); use parallel='ddp'"
            )
        backend.init_distributed()
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        launched = distributed.launched_world_size()
        if launched is not None and launched != self.world:
            # torch_xla's "xla://" takes rank and world size from the PJRT runtime, which on
            # some devices (PJRT_DEVICE=CPU) ignores torchrun: every process would train alone.
            raise DistributedError(
                f"torchrun started {launched} processes but the {backend.name!r} process group has world size "
                f"{self.world}; the {backend.name} runtime here cannot join processes (on torch_xla: a PJRT device "
                "with multi-process support is needed, not PJRT_DEVICE=CPU)"
            )

    def wrap(self, model):
        """DDP around the model, or FSDP2 (``fully_shard``) applied to it in place.

        FSDP shards every element of every ``nn.ModuleList`` (the transformer blocks: one
        all-gather per block, so only one block is unsharded at a time), then the root. It is
        first given rank 0's weights, as DDP's constructor does: ranks that built the model from
        different seeds still train one model."""
        import torch
        import torch.distributed as dist

        traits = self.backend.traits
        if self.mode == "ddp":
            # One device per rank (cuda, neuron); CPU and lazy XLA tensors take no device_ids.
            eager_device = traits.device_type != "cpu" and not traits.lazy_tensors
            device = [torch.accelerator.current_device_index()] if eager_device else None
            return torch.nn.parallel.DistributedDataParallel(model, device_ids=device)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        with torch.no_grad():
            for t in model.state_dict().values():
                dist.broadcast(t, src=0)
        mesh = init_device_mesh(traits.device_type, (self.world,))
        for blocks in [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]:
            for block in blocks:
                if any(p.requires_grad for p in block.parameters()):
                    fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def grad_sync(self, net, model, last: bool):
        """Gradient accumulation: reduce across ranks after the last micro-batch only."""
        if self.mode == "ddp" and not last:
            return net.no_sync()
        if self.mode == "fsdp":
            model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def local_batch(self, batch, tokens: int, split_batches: bool):
        """This rank's slice of the global batch (``split_batches``); otherwise every rank
        passed its own part, and the global batch is their union."""
        if split_batches:
            return split_batch(batch, self.world)[self.rank], tokens
        return batch, tokens * self.world

    def reduce(self, loss, norm):
        """The loss of the global batch: the mean of the ranks' (equal-sized) slices. Gloo has
        no AVG, hence SUM / world. Every rank then takes the same non-finite decision."""
        import torch.distributed as dist

        dist.all_reduce(loss, op=dist.ReduceOp.SUM)
        loss = loss / self.world
        if hasattr(norm, "full_tensor"):  # FSDP: per-shard norms, combined across ranks
            norm = norm.full_tensor()
        return loss, norm

    @contextlib.contextmanager
    def collectives(self, what: str):
        """A collective that fails (a peer died or hung past the timeout) as one clear error."""
        try:
            yield
        except Exception as exc:
            if distributed.is_collective_failure(exc):
                raise distributed.peer_failure(exc, what) from exc
            raise


def parallel_for(backend, mode: str | None) -> SingleProcess:
    return SingleProcess() if mode is None else TorchParallel(backend, mode)
