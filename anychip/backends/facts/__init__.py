"""Stdlib-only facts about the machine, for backend probes, and the datasheet table of peak
FLOP/s: ``host`` (versions, device files, vendor tools), ``nvidia``, ``tpu``, ``neuron``,
``peaks``. Nothing here imports torch, jax or a vendor SDK, so ``anychip devices`` is fast and
never crashes on a broken install."""
