"""The JAX step's PRNG key as training state.

JAX has no global generator: the key belongs to the engine, goes into the jitted step and comes
out advanced (torchax splits it for every dropout mask). It starts from torch's CPU generator
(:func:`~anychip.backends.contract.seed_from_torch`), so ``torch.manual_seed`` governs it as it
governs torch's own dropout. ``state_dict()["rng"]`` carries it as ``{"jax_key": uint8 tensor}``
(the raw bytes of ``jax.random.key_data``), and ``load_state_dict`` puts it back: a resumed run
draws the masks the uninterrupted run would have drawn.

A state without a JAX key (written by a torch engine, whose dropout draws from torch's
generators instead) cannot continue a stream that never existed; the key is then derived from
torch's CPU generator as restored and the update number, so the resumed run draws fresh masks,
not those of the first updates again.
"""

from __future__ import annotations

from anychip.backends.contract import seed_from_torch

STATE_KEY = "jax_key"


def initial_key_data():
    """The raw data of the key a new step starts from (a host numpy array)."""
    import jax
    import numpy as np

    return np.asarray(jax.random.key_data(jax.random.key(seed_from_torch())))


def place(data, sharding):
    """A typed key array on ``sharding`` from raw key data (host numpy)."""
    import jax

    from anychip.backends.jax.convert import global_array

    return jax.jit(jax.random.wrap_key_data, out_shardings=sharding)(global_array(data, sharding))


def key_state(key) -> dict:
    """``{"jax_key": uint8 CPU tensor}`` of a (replicated) typed key array."""
    import jax
    import numpy as np
    import torch

    data = jax.random.key_data(key)
    if not data.is_fully_addressable:
        data = data.addressable_data(0)  # replicated: every process holds all of it
    return {STATE_KEY: torch.from_numpy(np.array(data).view(np.uint8))}


def key_data_from_state(rng: dict, step: int, key):
    """The raw key data a loaded state asks for, checked against the running ``key``: the saved
    key, or one derived from torch's generator and ``step`` when the state has none."""
    import jax
    import numpy as np

    like = jax.eval_shape(jax.random.key_data, key)
    if STATE_KEY not in rng:
        derived = jax.random.fold_in(jax.random.key(seed_from_torch()), step)
        return np.asarray(jax.random.key_data(derived)).astype(like.dtype).reshape(like.shape)
    raw = np.ascontiguousarray(np.asarray(rng[STATE_KEY]), dtype=np.uint8).ravel()
    want = int(np.prod(like.shape)) * np.dtype(like.dtype).itemsize
    if raw.nbytes != want:
        impl = jax.config.jax_default_prng_impl
        raise ValueError(
            f"the saved JAX PRNG key has {raw.nbytes} bytes, this JAX's {impl!r} keys have {want}: it was saved with "
            "another jax_default_prng_impl; set the same one, or load with restore_rng=False"
        )
    return raw.view(like.dtype).reshape(like.shape)
