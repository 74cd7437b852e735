"""Test support: the one skip helper, and reference loops written in plain PyTorch."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import pytest

_CHECKS = {
    "jax": lambda: importlib.util.find_spec("jax") is not None,
    "torchax": lambda: importlib.util.find_spec("torchax") is not None,
    "optax": lambda: importlib.util.find_spec("optax") is not None,
    "triton": lambda: importlib.util.find_spec("triton") is not None,
    "matplotlib": lambda: importlib.util.find_spec("matplotlib") is not None,
    "safetensors": lambda: importlib.util.find_spec("safetensors") is not None,
    "transformers": lambda: importlib.util.find_spec("transformers") is not None,
    "torch_xla": lambda: importlib.util.find_spec("torch_xla") is not None,
    "cuda": lambda: bool(shutil.which("nvidia-smi")) and _torch_cuda(),
    "c-compiler": lambda: bool(shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")),
}


def _torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def requires(*needs: str):
    """Skip marker naming *every* missing requirement in one reason."""
    unknown = [n for n in needs if n not in _CHECKS]
    if unknown:
        raise ValueError(f"unknown requirement(s) {unknown}; known: {sorted(_CHECKS)}")
    missing = [n for n in needs if not _CHECKS[n]()]
    return pytest.mark.skipif(bool(missing), reason="missing: " + ", ".join(missing))


def resign_manifest(manifest: pathlib.Path, edit) -> None:
    """Tamper with a checkpoint's manifest as a careful attacker would: ``edit(manifest_dict)``,
    then recompute the manifest's own checksum (SHA-256 of its canonical JSON without that key)."""
    import hashlib
    import json

    m = json.loads(manifest.read_text())
    edit(m)
    body = {k: v for k, v in m.items() if k != "manifest_sha256"}
    m["manifest_sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()).hexdigest()
    manifest.write_text(json.dumps(m))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(worker: pathlib.Path, *args: str, env_extra: dict | None = None, monitor_s: float = 0.1,
             timeout_s: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    """``torchrun --nproc-per-node 2 worker args...`` on this machine, with anychip and the tests'
    folder importable; returns the finished process and its wall time."""
    import anychip

    root = str(pathlib.Path(anychip.__file__).resolve().parent.parent)
    tests = str(pathlib.Path(__file__).resolve().parent)
    env = {k: v for k, v in os.environ.items() if k not in ("ANYCHIP_BACKEND", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([root, tests, str(worker.parent)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "--monitor-interval", str(monitor_s), str(worker), *args]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    return done, time.perf_counter() - start


def hand_written_loop(model, loss_fn, batches, *, lr, weight_decay, schedule, max_grad_norm=None, sgd=None):
    """The loop a user writes without anychip; the reference TrainStep must reproduce."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if sgd is None:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, **sgd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule.value(s))
    losses = []
    for batch in batches:
        loss = loss_fn(model, batch)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses
