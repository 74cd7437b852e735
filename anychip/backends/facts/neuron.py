"""AWS Neuron hosts, seen through ``/dev/neuron<N>``, ``neuron-ls --json-output`` and the EC2
instance type, without any SDK; and which torch-neuronx lineage is installed.

Two lineages share the ``torch-neuronx`` name: 2.13+ is TorchNeuron, the native ``neuron``
device (trn2/trn3); earlier versions run on torch_xla (trn1, inf2), the ``neuron-xla`` backend.
"""

from __future__ import annotations

import dataclasses
import json
import os

from anychip.backends.facts import host

NATIVE_FROM = (2, 13)
# The TorchNeuron releases followed here (Neuron SDK 2.33, 2026-10): torch-neuronx 2.13.3 and
# 2.14.3, for trn2/trn3 only, each built for the torch of its own major.minor, on Python >= 3.12.
NATIVE_RELEASES = ((2, 13), (2, 14))
NATIVE_PYTHON = (3, 12)
# The XLA lineage is frozen: Neuron 2.30 ended PyTorch/XLA training, and torch-neuronx 2.9 (Neuron
# SDK <= 2.29) is its last release, the trn1 path.
XLA_LAST = (2, 9)
XLA_FROZEN = "frozen on torch-neuronx 2.9 (Neuron SDK <= 2.29; Neuron 2.30 ended PyTorch/XLA training)"
# Which instances each lineage serves (AWS Neuron docs, "Setup" pages).
SERVES = {"native": "trn2, trn3 (TorchNeuron)", "xla": "trn1, inf2 (torch-neuronx on torch_xla)"}
# NeuronCores per chip as the runtime exposes them (logical cores at the default LNC=2).
CORES_PER_CHIP = {"trn1": 2, "trn2": 4, "trn3": 4}


def version_tuple(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as '2.13.0+abc'."""
    parts = []
    for piece in version.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def lineage(torch_neuronx_version: str | None) -> str | None:
    """'native' (TorchNeuron), 'xla' (legacy) or None, from the torch-neuronx version alone."""
    if torch_neuronx_version is None:
        return None
    return "native" if version_tuple(torch_neuronx_version) >= NATIVE_FROM else "xla"


@dataclasses.dataclass(frozen=True)
class NeuronHost:
    """What the machine says about its Neuron devices, read without any SDK."""

    devices: int  # Neuron chips
    cores: int  # NeuronCores the runtime exposes (logical cores)
    chip: str  # "trn1", "trn2", "trn3" or "" when unknown
    note: str  # why the figures are what they are


def parse_neuron_ls(returncode: int | None, output: str) -> tuple[list[dict] | None, str]:
    """Parse ``neuron-ls --json-output``. Returns (devices or None, note); never raises.

    ``returncode`` None means the binary is missing. A non-zero exit ("failed to discover
    Neuron devices") and JSON of an unexpected shape are reported in the note.
    """
    if returncode is None:
        return None, "neuron-ls not installed"
    if returncode != 0:
        first = output.strip().splitlines()[0] if output.strip() else f"exit status {returncode}"
        return None, f"neuron-ls failed: {first}"
    try:
        data = json.loads(output)
    except json.JSONDecodeError:
        return None, "neuron-ls printed something that is not JSON"
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        return None, "neuron-ls JSON is not a list of devices"
    return data, f"neuron-ls: {len(data)} device(s)"


def _chip_from_instance() -> str:
    # On EC2 (Nitro) the DMI product name is the instance type, e.g. "trn2.48xlarge".
    try:
        with open("/sys/devices/virtual/dmi/id/product_name") as fh:
            name = fh.read().strip().lower()
    except OSError:
        return ""
    return name.split(".")[0] if name.startswith(("trn1", "trn2", "trn3", "inf2")) else ""


def neuron_host() -> NeuronHost:
    nodes = host.device_files("/dev/neuron")
    ran = host.run_tool(["neuron-ls", "--json-output"])
    found, note = parse_neuron_ls(*(ran if ran else (None, "")))
    chip = _chip_from_instance()
    if found is not None:
        cores = 0
        for d in found:
            count = d.get("nc_count")
            cores += count if isinstance(count, int) and count >= 0 else len(d.get("neuroncore_ids") or [])
        return NeuronHost(len(found), cores, chip, note)
    per_chip = CORES_PER_CHIP.get(chip, 0)
    return NeuronHost(len(nodes), len(nodes) * per_chip, chip, f"{note}; {len(nodes)} /dev/neuron node(s)")


def cores_in_use() -> int:
    """NeuronCores this process drives: NEURON_RT_NUM_CORES, else the size of
    NEURON_RT_VISIBLE_CORES ('0-3' or '0,1'), else 1 (one core per torchrun rank)."""
    if (n := os.environ.get("NEURON_RT_NUM_CORES", "").strip()).isdigit():
        return int(n)
    visible = os.environ.get("NEURON_RT_VISIBLE_CORES", "").strip()
    if visible:
        count = 0
        for part in visible.split(","):
            lo, _, hi = part.partition("-")
            count += (int(hi) - int(lo) + 1) if hi else 1
        return count
    return 1
