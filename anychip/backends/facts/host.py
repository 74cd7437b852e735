"""Host facts for probes: installed versions, importable modules, device files, PCI vendors,
vendor command-line tools, the CPU model. Stdlib only."""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import platform
import re
import shutil
import subprocess
import sys


def version(dist: str) -> str | None:
    """Installed version of a distribution, or None (reads metadata only)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions(*dists: str) -> dict[str, str]:
    return {d: v for d in dists if (v := version(d)) is not None}


def python_version() -> tuple[int, int]:
    """(major, minor) of this interpreter: the one a backend's packages must have been built for."""
    return tuple(sys.version_info[:2])


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def device_files(pattern: str) -> list[str]:
    """Numbered device nodes such as /dev/nvidia0, /dev/neuron3 (not /dev/nvidiactl)."""
    return sorted(p for p in glob.glob(pattern + "*") if re.fullmatch(re.escape(pattern) + r"\d+", p))


def run_tool(argv: list[str], timeout: float = 5.0) -> tuple[int, str] | None:
    """Run a vendor CLI (nvidia-smi, neuron-ls) if installed; None when it is absent or hangs."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.returncode, done.stdout if done.returncode == 0 else (done.stderr or done.stdout)


def cpu_name() -> str:
    """The host CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
