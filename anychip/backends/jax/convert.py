"""Arrays between torch and JAX: host copies JAX accepts without x64, sharded arrays back to CPU
tensors, host data placed on a sharding without a collective."""

from __future__ import annotations

DATA_AXIS = "data"  # the one mesh axis: batches split along it, FSDP shards too


def host_array(t):
    """A torch tensor as a numpy array JAX accepts without x64: int64 -> int32, float64 -> float32."""
    import jax.numpy as jnp
    import numpy as np
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.float().numpy().astype(jnp.bfloat16)
    a = t.numpy()
    if a.dtype == np.int64:
        return a.astype(np.int32)
    if a.dtype == np.float64:
        return a.astype(np.float32)
    return a


def to_torch(arr):
    """A (possibly sharded, possibly multi-host) JAX array as a CPU torch tensor."""
    import jax.numpy as jnp
    import numpy as np
    import torch

    if not arr.is_fully_addressable:
        if arr.sharding.is_fully_replicated:
            arr = arr.addressable_data(0)  # every process holds it whole: no collective
        else:
            from jax.experimental import multihost_utils

            arr = multihost_utils.process_allgather(arr, tiled=True)
    a = np.asarray(arr)
    if a.dtype == jnp.bfloat16:
        return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.array(a))


def global_array(a, sharding):
    """Host data ``a``, the same on every process, placed on ``sharding``. Across processes each
    copies only the pieces its own devices hold: ``jax.device_put`` would first all-gather ``a``
    to check that it is equal everywhere, a collective and a compile per shape."""
    import jax

    if sharding.is_fully_addressable:
        return jax.device_put(a, sharding)
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])


def matmul_precision() -> str:
    """JAX's float32 matmul precision from torch's global setting, so one knob governs both
    stacks (JAX defaults to TF32 on GPUs, torch to full float32)."""
    import torch

    return {"highest": "highest", "high": "tensorfloat32", "medium": "bfloat16"}.get(
        torch.get_float32_matmul_precision(), "highest"
    )
