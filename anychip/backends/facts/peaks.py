"""Dense peak FLOP/s per device, for MFU. Figures are vendor datasheet numbers *without*
structured sparsity; MFU against a sparse peak would flatter every result by 2x.

Sources (read 2026-11):
- NVIDIA H100 / H200 / B200 / A100 / L4 datasheets (nvidia.com/en-us/data-center/*):
  H100 SXM bf16 989.4 TFLOP/s, H100 PCIe 756, H100 NVL 835, H200 989.4, B200 2250,
  A100 312, L4 121 (dense = half of the "with sparsity" figure).
- AWS Trainium (AWS Neuron documentation, SDK 2.33, "Trainium architecture"):
  Trainium1 190 TFLOP/s bf16 per chip (2 NeuronCore-v2), Trainium2 667 per chip
  (8 NeuronCore-v3; 4 logical cores at the default LNC=2), Trainium3 671 per chip.
  https://awsdocs-neuron.readthedocs-hosted.com/en/latest/general/arch/neuron-hardware/trainium.html
  https://awsdocs-neuron.readthedocs-hosted.com/en/latest/about-neuron/arch/neuron-hardware/trainium2.html
  https://awsdocs-neuron.readthedocs-hosted.com/en/latest/about-neuron/arch/neuron-hardware/trainium3.html
- Trainium per NeuronCore (what the Neuron runtime hands one process): the chip peak divided
  by the cores the runtime exposes per chip, so that N cores add up to the chip figure.
  Trainium1: 190 / 2 = 95 per NeuronCore-v2. Trainium2 and Trainium3 expose *logical* cores:
  at the default LNC=2 one logical core is two physical ones, 667 / 4 = 166.75 (Trn2) and
  671 / 4 = 167.75 (Trn3); at LNC=1, 667 / 8 = 83.4 and 671 / 8 = 83.9 per physical core.
  (The NeuronCore-v3 page quotes 79 TFLOP/s for the tensor engine alone; the chip figure
  divided by 8 is used so that per-core and per-chip MFU agree.)
- Google Cloud TPU system architecture pages: v4 275, v5e 197, v5p 459, v6e (Trillium) 918
  TFLOP/s bf16 per chip.
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

    def __post_init__(self) -> None:
        re.compile(self.pattern)
        if self.bf16_tflops <= 0:
            raise ValueError(f"peak for {self.pattern!r} must be positive")


# Order matters: the first match wins, so specific names come before generic ones.
PEAKS: tuple[Peak, ...] = (
    Peak(r"H100.*PCIe", 756.0, "NVIDIA H100 datasheet (PCIe)"),
    Peak(r"H100.*NVL", 835.0, "NVIDIA H100 datasheet (NVL)"),
    Peak(r"H100", 989.4, "NVIDIA H100 datasheet (SXM)"),
    Peak(r"H200|GH200", 989.4, "NVIDIA H200 datasheet"),
    Peak(r"B200", 2250.0, "NVIDIA B200 datasheet"),
    Peak(r"A100", 312.0, "NVIDIA A100 datasheet"),
    Peak(r"\bL4\b", 121.0, "NVIDIA L4 datasheet"),
    # Per-core entries first: a device called "trn2 NeuronCore" is one core, not a chip.
    Peak(r"(trainium1?|trn1)\b.*core|NeuronCore-v2", 190.0 / 2, "AWS Neuron docs: Trainium1 per NeuronCore-v2"),
    Peak(r"(trainium2|trn2).*core.*LNC ?=? ?1|NeuronCore-v3", 667.0 / 8, "AWS Neuron docs: Trainium2 per physical NeuronCore-v3 (LNC=1)"),
    Peak(r"(trainium2|trn2).*core", 667.0 / 4, "AWS Neuron docs: Trainium2 per logical NeuronCore (LNC=2)"),
    Peak(r"(trainium3|trn3).*core.*LNC ?=? ?1|NeuronCore-v4", 671.0 / 8, "AWS Neuron docs: Trainium3 per physical NeuronCore-v4 (LNC=1)"),
    Peak(r"(trainium3|trn3).*core", 671.0 / 4, "AWS Neuron docs: Trainium3 per logical NeuronCore (LNC=2)"),
    Peak(r"trainium3|trn3", 671.0, "AWS Neuron docs: Trainium3 per chip"),
    Peak(r"trainium2|trn2", 667.0, "AWS Neuron docs: Trainium2 per chip"),
    Peak(r"trainium1?\b|trn1", 190.0, "AWS Neuron docs: Trainium1 per chip"),
    Peak(r"TPU v4", 275.0, "Cloud TPU v4 system architecture"),
    Peak(r"TPU v5 ?lite|TPU v5e", 197.0, "Cloud TPU v5e system architecture"),
    Peak(r"TPU v5p?\b", 459.0, "Cloud TPU v5p system architecture"),
    Peak(r"TPU v6|Trillium", 918.0, "Cloud TPU v6e system architecture"),
)

def lookup(device_name: str) -> Peak | None:
    for peak in PEAKS:
        if re.search(peak.pattern, device_name or "", flags=re.IGNORECASE):
            return peak
    return None


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
