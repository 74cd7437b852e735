"""Google TPUs, seen through PCI ids and device nodes (no libtpu is loaded, no TPU runtime started).

Google's PCI vendor id is shared by TPUs and other devices (the gVNIC network card of every
GCE VM), so the device id must say "TPU". Device ids as in jax/_src/hardware_utils.py.

A TPU PCI device reaches the runtime one of two ways: bound to vfio (its IOMMU group has a node
``/dev/vfio/<group>``), or through the TPU driver's ``/dev/accel<N>`` nodes on older VM images.
torch-tpu 0.2.0 counts only the vfio-bound ones (torch_tpu/_internal/utils/hardware.py).
"""

from __future__ import annotations

import dataclasses
import glob
import os

from anychip.backends.facts import host

PCI_ROOT = "/sys/bus/pci/devices"
DEV_ROOT = "/dev"
GOOGLE_PCI_VENDOR = "0x1ae0"
TPU_PCI_DEVICES = {
    "0x0027": "TPU v3",
    "0x005e": "TPU v4",
    "0x0062": "TPU v5p",
    "0x0063": "TPU v5 lite",
    "0x006f": "TPU v6 lite",
    "0x0076": "TPU7x",
}


@dataclasses.dataclass(frozen=True)
class TpuHost:
    """What the machine says about its TPUs, read without any SDK."""

    chips: int  # TPU PCI devices
    kind: str  # their name, "" when there are none
    google: bool  # any Google PCI device at all (a GCE VM)
    vfio: int  # of the TPU PCI devices, those bound to vfio
    accel: int  # /dev/accel<N> nodes


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read().strip().lower()


def tpu_host(root: str | None = None, dev: str | None = None) -> TpuHost:
    """The TPU PCI devices under ``root`` (sysfs) and their device nodes under ``dev``."""
    chips, kind, google, vfio = 0, "", False, 0
    dev = dev or DEV_ROOT
    for vendor_path in glob.glob(os.path.join(root or PCI_ROOT, "*", "vendor")):
        pci = os.path.dirname(vendor_path)
        try:
            if _read(vendor_path) != GOOGLE_PCI_VENDOR:
                continue
            google = True
            device = _read(os.path.join(pci, "device"))
        except OSError:
            continue
        if device not in TPU_PCI_DEVICES:
            continue
        chips, kind = chips + 1, TPU_PCI_DEVICES[device]
        try:
            group = os.path.basename(os.readlink(os.path.join(pci, "iommu_group")))
        except OSError:  # no IOMMU group: not vfio-bound
            continue
        vfio += os.path.exists(os.path.join(dev, "vfio", group))
    return TpuHost(chips, kind, google, vfio, len(host.device_files(os.path.join(dev, "accel"))))


def tpu_chips(root: str | None = None) -> tuple[int, str, bool]:
    """(TPU chips, their kind, whether any Google PCI device was seen at all)."""
    found = tpu_host(root)
    return found.chips, found.kind, found.google
