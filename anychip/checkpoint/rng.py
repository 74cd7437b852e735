"""Random-number generator states in the manifest: captured at save, validated at load before
anything is applied, then applied.

The host generators (torch's CPU generator, numpy's global ``RandomState``, python's
``random``) are read here directly. The device generator belongs to the backend
(``backend.rng_state()`` / ``backend.set_rng_state()``) and is stored under ``rng["device"]``:
``bytes`` values base64-encoded, ``int`` values as they are. A generator the engine owns (the
JAX step's key: ``TrainStep.state_dict()["rng"]``, ``{name: uint8 tensor}``) is stored under
``rng["engine"]`` as base64.

Loading applies the generators before the step's state, so that a generator the checkpoint has
no state for (saved on another backend) is seeded from torch's restored CPU generator rather
than left where a fresh run starts.
"""

from __future__ import annotations

import base64
from pathlib import Path

from anychip.checkpoint.format import MANIFEST
from anychip.errors import CheckpointCorruptError


def capture(backend, engine: dict | None = None) -> dict:
    """The RNG section of a manifest: every host generator, the backend's device one, and the
    engine's own (``state_dict()["rng"]``) when it has any."""
    import random

    import numpy as np
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": {"seed": torch.initial_seed(), "state": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()},
        "numpy": {
            "bit_generator": kind, "keys": [int(k) for k in keys], "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "device": _encode_device(backend.name, backend.rng_state()),
        **({"engine": {str(k): base64.b64encode(v.contiguous().numpy().tobytes()).decode() for k, v in engine.items()}} if engine else {}),
    }


def _encode_device(backend_name: str, state: dict) -> dict:
    out = {}
    for key, value in state.items():
        if isinstance(value, (bytes, bytearray)):
            out[str(key)] = base64.b64encode(bytes(value)).decode()
        elif isinstance(value, int) and not isinstance(value, bool):
            out[str(key)] = value
        else:
            raise TypeError(f"backend {backend_name!r}: rng_state()[{key!r}] is {type(value).__name__}; the contract allows bytes or int")
    return out


def _decode_device(saved) -> dict:
    if not isinstance(saved, dict):
        raise ValueError("device RNG state is not a JSON object")
    out = {}
    for key, value in saved.items():
        if isinstance(value, str):
            out[key] = base64.b64decode(value, validate=True)
        elif isinstance(value, int) and not isinstance(value, bool):
            out[key] = value
        else:
            raise ValueError(f"device RNG state {key!r} is neither base64 bytes nor an int")
    return out


def _legacy_cuda(states) -> dict:
    """``rng["torch_cuda"]`` of checkpoints written before the backend held the device RNG:
    ``torch.cuda.get_rng_state_all()`` of rank 0, one state per visible GPU. Rank 0 drove the
    first of them, and every rank now restores rank 0's device state, so that entry is the one."""
    if not isinstance(states, list) or not all(isinstance(s, str) for s in states):
        raise ValueError("torch_cuda RNG states are not a list of base64 strings")
    return {"cuda": base64.b64decode(states[0], validate=True)} if states else {}


def parse(directory: Path, rng: dict, backend) -> dict:
    """Saved RNG states, validated and converted, ready to apply (nothing applied yet)."""
    import numpy as np
    import torch

    where = directory / MANIFEST
    try:
        if not isinstance(rng, dict):
            raise TypeError("the rng section is not a JSON object")
        out = {}
        if "torch" in rng:
            raw = base64.b64decode(rng["torch"]["state"], validate=True)
            if len(raw) != torch.get_rng_state().numel():
                raise ValueError(f"torch RNG state of {len(raw)} bytes")
            out["torch"] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        if "numpy" in rng:
            s = rng["numpy"]
            keys = np.asarray(s["keys"], dtype=np.uint32)
            if s["bit_generator"] != "MT19937" or keys.shape != (624,):
                raise ValueError("numpy state is not MT19937 with 624 keys")
            out["numpy"] = (s["bit_generator"], keys, int(s["pos"]), int(s["has_gauss"]), float(s["cached_gaussian"]))
        if "python" in rng:
            s = rng["python"]
            internal = tuple(int(v) for v in s["internal"])
            gauss = s["gauss_next"]
            if len(internal) != 625 or not (gauss is None or isinstance(gauss, float)):
                raise ValueError("python random state is not 625 ints")
            out["python"] = (int(s["version"]), internal, gauss)
        if "device" in rng:
            device = _decode_device(rng["device"])
        elif "torch_cuda" in rng:
            device = _legacy_cuda(rng["torch_cuda"])
        else:
            device = None
        if device:
            _check_device_fits(device, backend.rng_state())
        out["device"] = device or {}
        engine = rng.get("engine", {})
        if not isinstance(engine, dict) or not all(isinstance(v, str) for v in engine.values()):
            raise ValueError("engine RNG state is not an object of base64 strings")
        out["engine"] = {k: torch.frombuffer(bytearray(base64.b64decode(v, validate=True)), dtype=torch.uint8) for k, v in engine.items()}
        return out
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise CheckpointCorruptError(f"{where}: saved RNG state is unusable ({exc})") from None


def _check_device_fits(saved: dict, current: dict) -> None:
    """A generator this device has must get a state of its own kind and size; a state for a
    generator it lacks (saved on another chip) is passed on and ignored by the backend."""
    for key in saved.keys() & current.keys():
        theirs, ours = saved[key], current[key]
        if isinstance(ours, (bytes, bytearray)) != isinstance(theirs, bytes):
            raise ValueError(f"device RNG state {key!r} is {type(theirs).__name__}, this device's is {type(ours).__name__}")
        if isinstance(theirs, bytes) and len(theirs) != len(ours):
            raise ValueError(f"device RNG state {key!r} of {len(theirs)} bytes, this device's has {len(ours)}")


def apply(rng: dict, backend) -> None:
    """Set every host and device generator :func:`parse` returned a state for (the engine's go
    in with the step's state, as ``state["rng"] = rng["engine"]``)."""
    import random

    import numpy as np
    import torch

    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "numpy" in rng:
        np.random.set_state(rng["numpy"])
    if "python" in rng:
        random.setstate(rng["python"])
    # Always, even with nothing saved: the backend seeds a generator the checkpoint lacks.
    backend.set_rng_state(rng.get("device", {}))
