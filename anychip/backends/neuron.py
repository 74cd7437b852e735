"""`neuron`: TorchNeuron, the native PyTorch backend of torch-neuronx 2.13+ (trn2 / trn3).

Follows AWS Neuron SDK 2.33 (October 2026): ``import torch_neuronx`` registers the ``neuron``
device; ``torch.compile(backend="neuron", fullgraph=True, dynamic=False)`` (static shapes
only, ``mode="default"``); ``torch.autocast("neuron", dtype=torch.bfloat16)``;
``dist.init_process_group("neuron")`` after the import; DDP / FSDP2 on top.
Everything else (placement, the step loop, memory through ``torch.accelerator``) is the shared
native-torch path in base.py, exactly as for cuda.

Also home of the Neuron host probe shared with ``neuron-xla``: ``/dev/neuron*`` and
``neuron-ls --json-output``, without importing any SDK.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

from anychip.backends import Availability
from anychip.backends import probe as facts
from anychip.backends.base import NativeTorchBackend

log = logging.getLogger("anychip")

NATIVE_FROM = (2, 13)  # torch-neuronx 2.13+ is TorchNeuron; earlier versions are the XLA lineage
INSTALL_NATIVE = (
    "pip install torch-neuronx==2.13.* --extra-index-url https://pip.repos.neuron.amazonaws.com (on a trn2/trn3 instance)"
)
# Which instances each lineage serves (AWS Neuron docs, "Setup" pages).
SERVES = {"native": "trn2, trn3 (TorchNeuron)", "xla": "trn1, inf2 (torch-neuronx on torch_xla)"}


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def lineage(torch_neuronx_version: str | None) -> str | None:
    """'native' (TorchNeuron), 'xla' (legacy) or None, from the torch-neuronx version alone."""
    if torch_neuronx_version is None:
        return None
    return "native" if _version_tuple(torch_neuronx_version) >= NATIVE_FROM else "xla"


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
    nodes = facts.device_files("/dev/neuron")
    ran = facts.run_tool(["neuron-ls", "--json-output"])
    found, note = parse_neuron_ls(*(ran if ran else (None, "")))
    chip = _chip_from_instance()
    if found is not None:
        cores = 0
        for d in found:
            count = d.get("nc_count")
            cores += count if isinstance(count, int) and count >= 0 else len(d.get("neuroncore_ids") or [])
        return NeuronHost(len(found), cores, chip, note)
    per_chip = {"trn1": 2, "trn2": 4, "trn3": 4}.get(chip, 0)
    return NeuronHost(len(nodes), len(nodes) * per_chip, chip, f"{note}; {len(nodes)} /dev/neuron node(s)")


def probe(name: str = "neuron") -> Availability:
    tnx = facts.version("torch-neuronx")
    versions = facts.versions("torch", "torch-neuronx", "torch-xla", "neuronx-cc")
    kind = lineage(tnx)
    if kind is None:
        return Availability(name, False, "torch-neuronx is not installed", versions=versions, install=INSTALL_NATIVE)
    if kind != "native":
        return Availability(
            name, False, f"torch-neuronx {tnx} is the XLA lineage ({SERVES['xla']}); use backend 'neuron-xla'",
            versions=versions, install=INSTALL_NATIVE,
        )
    if facts.version("torch-xla") is not None:
        return Availability(
            name, False, f"both Neuron lineages are installed (torch-neuronx {tnx} native and torch-xla "
            f"{facts.version('torch-xla')}); they register conflicting devices: uninstall torch-xla or use a separate venv",
            versions=versions,
        )
    host = neuron_host()
    if host.devices == 0:
        return Availability(name, False, f"no Neuron devices on this machine ({host.note})", versions=versions)
    chip = host.chip or "trainium"
    return Availability(
        name, True, f"TorchNeuron, serves {SERVES['native']}; {host.note}", devices=host.cores,
        device_kind=f"{chip} NeuronCore", versions=versions,
    )


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


class NeuronBackend(NativeTorchBackend):
    name = "neuron"
    device_type = "neuron"
    dist_backend = "neuron"
    compile_backend = "neuron"
    compile_by_default = True
    # The Neuron compiler takes whole static graphs: no graph breaks, no dynamic shapes.
    compile_options = {"fullgraph": True, "dynamic": False}

    _warned_dynamic = False

    @property
    def devices_in_use(self) -> int:
        return cores_in_use()

    def place_batch(self, batch):
        self._warn_dynamic(batch)
        return super().place_batch(batch)

    def _warn_dynamic(self, batch) -> None:
        """Dimensions marked dynamic (torch._dynamo.mark_dynamic) cannot stay dynamic here: the
        Neuron compiler takes static shapes only, so every new size is a full recompile
        (minutes). Said once, before the first compile, since place_batch runs before it."""
        from anychip.backends.base import map_tensors

        if self._warned_dynamic:
            return
        marked = []
        map_tensors(lambda t: marked.append(sorted(getattr(t, "_dynamo_dynamic_indices", ()))), batch)
        dims = sorted({d for m in marked for d in m})
        if dims:
            self._warned_dynamic = True
            log.warning(
                "anychip: neuron compiles static shapes only; batch dims %s were marked dynamic, so each "
                "new size is a full recompile: pad to a few sizes with anychip.recompile.pad_to_bucket", dims,
            )

    def peak_flops(self, dtype: str = "bf16") -> float | None:
        from anychip.bench.peaks import NEURON_CORES_PER_CHIP, peak_flops

        chip = self.device_kind.split()[0] if self.device_kind else ""
        per_chip = peak_flops(chip, dtype)
        if per_chip is None or chip not in NEURON_CORES_PER_CHIP:
            return None
        return per_chip / NEURON_CORES_PER_CHIP[chip] * self.devices_in_use


def create(availability: Availability) -> NeuronBackend:
    import torch_neuronx  # noqa: F401 - registers the "neuron" device and process-group backend

    return NeuronBackend(availability)
