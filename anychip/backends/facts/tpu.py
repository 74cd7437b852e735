"""Google TPUs, seen through PCI ids (no libtpu is loaded, no TPU runtime started).

Google's PCI vendor id is shared by TPUs and other devices (the gVNIC network card of every
GCE VM), so the device id must say "TPU". Device ids as in jax/_src/hardware_utils.py.
"""

from __future__ import annotations

import glob
import os

PCI_ROOT = "/sys/bus/pci/devices"
GOOGLE_PCI_VENDOR = "0x1ae0"
TPU_PCI_DEVICES = {
    "0x0027": "TPU v3",
    "0x005e": "TPU v4",
    "0x0062": "TPU v5p",
    "0x0063": "TPU v5 lite",
    "0x006f": "TPU v6 lite",
    "0x0076": "TPU7x",
}


def tpu_chips(root: str | None = None) -> tuple[int, str, bool]:
    """(TPU chips, their kind, whether any Google PCI device was seen at all)."""
    chips, kind, google = 0, "", False
    for vendor_path in glob.glob(os.path.join(root or PCI_ROOT, "*", "vendor")):
        try:
            with open(vendor_path) as fh:
                if fh.read().strip().lower() != GOOGLE_PCI_VENDOR:
                    continue
            google = True
            with open(os.path.join(os.path.dirname(vendor_path), "device")) as fh:
                device = fh.read().strip().lower()
        except OSError:
            continue
        if device in TPU_PCI_DEVICES:
            chips, kind = chips + 1, TPU_PCI_DEVICES[device]
    return chips, kind, google
