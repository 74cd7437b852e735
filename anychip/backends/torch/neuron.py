"""`neuron`: TorchNeuron, the native PyTorch backend of torch-neuronx 2.13+ (trn2 / trn3).

Follows AWS Neuron SDK 2.33 (October 2026): ``import torch_neuronx`` registers the ``neuron``
device; ``torch.compile(backend="neuron", fullgraph=True, dynamic=False)`` (static shapes
only, ``mode="default"``); ``torch.autocast("neuron", dtype=torch.bfloat16)``;
``dist.init_process_group("neuron")`` after the import; DDP / FSDP2 on top.
Everything else (placement, the step loop, memory through ``torch.accelerator``) is the shared
native-torch path of :mod:`anychip.backends.torch.base`, exactly as for cuda.

The host probe shared with ``neuron-xla`` is :mod:`anychip.backends.facts.neuron`.
"""

from __future__ import annotations

import logging

from anychip.backends.facts import host, peaks
from anychip.backends.facts.neuron import NATIVE_PYTHON, NATIVE_RELEASES, SERVES, cores_in_use, lineage, neuron_host, version_tuple
from anychip.backends.registry import Availability
from anychip.backends.torch.base import NativeTorchBackend, Traits
from anychip.batch import map_tensors

log = logging.getLogger("anychip")

INSTALL_NATIVE = (
    "pip install torch-neuronx==2.14.3 'torch==2.14.*' --extra-index-url https://pip.repos.neuron.amazonaws.com "
    "(Neuron SDK 2.33; on a trn2/trn3 instance, Python >= 3.12; torch-neuronx==2.13.3 pairs with torch 2.13)"
)


def probe(name: str = "neuron") -> Availability:
    tnx = host.version("torch-neuronx")
    versions = host.versions("torch", "torch-neuronx", "torch-xla", "neuronx-cc")
    kind = lineage(tnx)
    if kind is None:
        return Availability(name, False, "torch-neuronx is not installed", versions=versions, install=INSTALL_NATIVE)
    if kind != "native":
        return Availability(
            name, False, f"torch-neuronx {tnx} is the XLA lineage ({SERVES['xla']}); use backend 'neuron-xla'",
            versions=versions, install=INSTALL_NATIVE,
        )
    if host.version("torch-xla") is not None:
        return Availability(
            name, False, f"both Neuron lineages are installed (torch-neuronx {tnx} native and torch-xla "
            f"{host.version('torch-xla')}); they register conflicting devices: uninstall torch-xla or use a separate venv",
            versions=versions,
        )
    if host.python_version() < NATIVE_PYTHON:
        return Availability(
            name, False, f"torch-neuronx {tnx} (TorchNeuron) needs Python >= 3.12, and this is Python "
            f"{'.'.join(map(str, host.python_version()))}", versions=versions, install=INSTALL_NATIVE,
        )
    built_for, torch_v = version_tuple(tnx), versions.get("torch")
    if torch_v is None or version_tuple(torch_v) != built_for:
        want = ".".join(map(str, built_for))
        have = f"torch {torch_v} is installed" if torch_v else "torch is not installed"
        return Availability(name, False, f"torch-neuronx {tnx} is built for torch {want}, and {have}", versions=versions,
                            install=f"pip install 'torch=={want}.*'")
    found = neuron_host()
    if found.devices == 0:
        return Availability(name, False, f"no Neuron devices on this machine ({found.note})", versions=versions)
    chip = found.chip or "trainium"
    newer = "" if built_for in NATIVE_RELEASES else "; newer than the torch-neuronx 2.13 / 2.14 releases checked here"
    return Availability(
        name, True, f"TorchNeuron {tnx}, serves {SERVES['native']}; {found.note}{newer}", devices=found.cores,
        device_kind=f"{chip} NeuronCore", versions=versions,
    )


class NeuronBackend(NativeTorchBackend):
    name = "neuron"
    # The Neuron compiler takes whole static graphs: no graph breaks, no dynamic shapes.
    traits = Traits(
        device_type="neuron", dist_backend="neuron", compile_backend="neuron", compile_by_default=True,
        compile_options={"fullgraph": True, "dynamic": False},
    )

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
        return peaks.neuron_core_flops(self.device_kind, dtype, self.devices_in_use)


def create(availability: Availability) -> NeuronBackend:
    import torch_neuronx  # noqa: F401 - registers the "neuron" device and process-group backend

    return NeuronBackend(availability)
