"""Dense peak FLOP/s and memory bandwidth per device, for MFU and for bandwidth-bound estimates.
FLOP/s are vendor datasheet numbers *without* structured sparsity; MFU against a sparse peak
would flatter every result by 2x. A "device" is what one runtime device is: a GPU, a NeuronCore
as the Neuron runtime exposes it, a TPU chip, or half a TPU7x chip (it is two TPU devices).

Sources (FLOP/s read 2026-11; bandwidth read 2026-12):
- NVIDIA H100 / H200 / A100 / L4 datasheets and the HGX B200 specification
  (nvidia.com/en-us/data-center/*): H100 SXM bf16 989.4 TFLOP/s and 3.35 TB/s, H100 PCIe 756
  and 2 TB/s, H100 NVL 835 and 3.9 TB/s, H200 989.4 and 4.8 TB/s, B200 2250 and 8 TB/s,
  A100 312, L4 121 and 300 GB/s (dense = half of the "with sparsity" figure). One name covers
  parts with different memory (A100 40 GB / 80 GB, GH200 with HBM3 or HBM3e): no bandwidth there.
- AWS Trainium (AWS Neuron documentation, SDK 2.33, "Trainium architecture" and the NKI
  architecture guides): Trainium1 190 TFLOP/s bf16 per chip (2 NeuronCore-v2) and 820 GB/s,
  Trainium2 667 per chip (8 NeuronCore-v3; 4 logical cores at the default LNC=2) and 2.9 TB/s,
  Trainium3 671 per chip and 4.9 TB/s.
  https://awsdocs-neuron.readthedocs-hosted.com/en/latest/general/arch/neuron-hardware/trainium.html
  https://awsdocs-neuron.readthedocs-hosted.com/en/latest/about-neuron/arch/neuron-hardware/trainium2.html
  https://awsdocs-neuron.readthedocs-hosted.com/en/latest/about-neuron/arch/neuron-hardware/trainium3.html
  https://awsdocs-neuron.readthedocs-hosted.com/en/latest/nki/arch/trainium2_arch.html
- Trainium per NeuronCore (what the Neuron runtime hands one process): the chip figures divided
  by the cores the runtime exposes per chip, so that N cores add up to the chip figure.
  Trainium1: 190 / 2 = 95 per NeuronCore-v2. Trainium2 and Trainium3 expose *logical* cores:
  at the default LNC=2 one logical core is two physical ones, 667 / 4 = 166.75 (Trn2) and
  671 / 4 = 167.75 (Trn3); at LNC=1, 667 / 8 = 83.4 and 671 / 8 = 83.9 per physical core.
  (The NeuronCore-v3 page quotes 79 TFLOP/s for the tensor engine alone; the chip figure
  divided by 8 is used so that per-core and per-chip MFU agree.)
- Google Cloud TPU system architecture pages (cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e,tpu7x}):
  v4 275 TFLOP/s bf16 and 1200 GB/s per chip, v5e 197 and 819, v5p 459 and 2765, v6e (Trillium)
  918 and 1638, TPU7x (Ironwood) 2307 and 7380 per chip; a TPU7x chip is two TPU devices (its
  dual-chiplet programming model; torch-tpu 0.2.0 counts 2 devices per v7 chip too), so one
  device is 1153.5 TFLOP/s and 3690 GB/s.
fp32 peaks are not listed: MFU is conventionally quoted against the bf16 tensor-core peak.
"""

from __future__ import annotations

import dataclasses
import re

from anychip.backends.facts.neuron import CORES_PER_CHIP


@dataclasses.dataclass(frozen=True)
class Peak:
    pattern: str  # regular expression matched (case-insensitive) against the device name
    bf16_tflops: float
    source: str
    hbm_gbps: float | None = None  # memory bandwidth of the same device, GB/s (1e9 bytes/s); None: not one figure

    def __post_init__(self) -> None:
        re.compile(self.pattern)
        if self.bf16_tflops <= 0:
            raise ValueError(f"peak for {self.pattern!r} must be positive")
        if self.hbm_gbps is not None and self.hbm_gbps <= 0:
            raise ValueError(f"memory bandwidth for {self.pattern!r} must be positive")


# (bf16 TFLOP/s, GB/s) of one chip, for the entries that divide it among the devices it exposes.
_TRN1, _TRN2, _TRN3, _TPU7X = (190.0, 820.0), (667.0, 2900.0), (671.0, 4900.0), (2307.0, 7380.0)


def _shared(pattern: str, chip: tuple[float, float], devices: int, source: str) -> Peak:
    """A chip's figures divided among the ``devices`` it exposes (NeuronCores, TPU7x's two halves)."""
    return Peak(pattern, chip[0] / devices, source, chip[1] / devices)


# Order matters: the first match wins, so specific names come before generic ones.
PEAKS: tuple[Peak, ...] = (
    Peak(r"H100.*PCIe", 756.0, "NVIDIA H100 datasheet (PCIe)", 2000.0),
    Peak(r"H100.*NVL", 835.0, "NVIDIA H100 datasheet (NVL)", 3900.0),
    Peak(r"H100", 989.4, "NVIDIA H100 datasheet (SXM)", 3350.0),
    Peak(r"GH200", 989.4, "NVIDIA GH200 datasheet (HBM3 or HBM3e: no one bandwidth)"),
    Peak(r"H200", 989.4, "NVIDIA H200 datasheet", 4800.0),
    Peak(r"B200", 2250.0, "NVIDIA HGX B200 specification", 8000.0),
    Peak(r"A100", 312.0, "NVIDIA A100 datasheet (40 GB and 80 GB parts: no one bandwidth)"),
    Peak(r"\bL4\b", 121.0, "NVIDIA L4 datasheet", 300.0),
    # Per-core entries first: a device called "trn2 NeuronCore" is one core, not a chip.
    _shared(r"(trainium1?|trn1)\b.*core|NeuronCore-v2", _TRN1, 2, "AWS Neuron docs: Trainium1 per NeuronCore-v2"),
    _shared(r"(trainium2|trn2).*core.*LNC ?=? ?1|NeuronCore-v3", _TRN2, 8, "AWS Neuron docs: Trainium2 per physical NeuronCore-v3 (LNC=1)"),
    _shared(r"(trainium2|trn2).*core", _TRN2, 4, "AWS Neuron docs: Trainium2 per logical NeuronCore (LNC=2)"),
    _shared(r"(trainium3|trn3).*core.*LNC ?=? ?1|NeuronCore-v4", _TRN3, 8, "AWS Neuron docs: Trainium3 per physical NeuronCore-v4 (LNC=1)"),
    _shared(r"(trainium3|trn3).*core", _TRN3, 4, "AWS Neuron docs: Trainium3 per logical NeuronCore (LNC=2)"),
    _shared(r"trainium3|trn3", _TRN3, 1, "AWS Neuron docs: Trainium3 per chip"),
    _shared(r"trainium2|trn2", _TRN2, 1, "AWS Neuron docs: Trainium2 per chip"),
    _shared(r"trainium1?\b|trn1", _TRN1, 1, "AWS Neuron docs: Trainium1 per chip"),
    Peak(r"TPU v4", 275.0, "Cloud TPU v4 system architecture", 1200.0),
    Peak(r"TPU v5 ?lite|TPU v5e", 197.0, "Cloud TPU v5e system architecture", 819.0),
    Peak(r"TPU v5p?\b", 459.0, "Cloud TPU v5p system architecture", 2765.0),
    Peak(r"TPU v6|Trillium", 918.0, "Cloud TPU v6e system architecture", 1638.0),
    _shared(r"TPU ?v?7x?\b|Ironwood", _TPU7X, 2, "Cloud TPU7x system architecture, per TPU device (half a chip)"),
)


def lookup(device_name: str) -> Peak | None:
    for peak in PEAKS:
        if re.search(peak.pattern, device_name or "", flags=re.IGNORECASE):
            return peak
    return None


def memory_bandwidth(device_name: str) -> float | None:
    """Peak memory bandwidth of one device called ``device_name``, in bytes/s; None when unknown."""
    peak = lookup(device_name)
    return peak.hbm_gbps * 1e9 if peak is not None and peak.hbm_gbps is not None else None


def peak_flops(device_name: str, dtype: str = "bf16") -> float | None:
    """Dense peak FLOP/s of one device called ``device_name``; None when unknown."""
    peak = lookup(device_name)
    if peak is None:
        return None
    # bf16-pure and fp16 run on the same tensor cores; fp32 has no comparable datasheet figure.
    return peak.bf16_tflops * 1e12 if dtype in ("bf16", "bf16-pure", "fp16") else None


def neuron_core_flops(device_kind: str, dtype: str, cores: int) -> float | None:
    """Peak of ``cores`` NeuronCores of the chip named first in ``device_kind`` ("trn2 NeuronCore"):
    the chip figure divided by the cores it exposes, so N cores add up to the chip."""
    chip = device_kind.split()[0] if device_kind else ""
    per_chip = peak_flops(chip, dtype)
    if per_chip is None or chip not in CORES_PER_CHIP:
        return None
    return per_chip / CORES_PER_CHIP[chip] * cores


def mfu(tokens_per_second: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak."""
    if not peak:
        return None
    return tokens_per_second * flops_per_token / peak
