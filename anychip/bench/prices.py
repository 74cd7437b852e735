"""On-demand prices, for ``USD per million tokens`` in ``anychip bench``.

A benchmark row runs on some number of *devices* (one GPU, one NeuronCore, one TPU chip), so
every price here is reduced to **USD per device-hour**: the instance's on-demand Linux price
divided by the devices it holds. A row then costs

    usd_per_hour = usd_per_device_hour x devices_used
    usd_per_million_tokens = usd_per_hour / 3600 / tokens_per_second x 1e6

Prices change, differ by region and are discounted by commitments and spot markets: treat the
table as a dated default and pass ``--price NAME=USD_PER_HOUR`` (USD per device-hour, NAME a
backend name or a device kind) for what you actually pay. CPU rows have no default price: a
host CPU's cost depends on the machine.

Table as of :data:`PRICES_AS_OF`: on-demand list prices, Linux, the region named per entry,
transcribed from the vendor pages below. They could not be re-read live when this file was
written (no network), so check them before quoting a result:

- AWS EC2 on-demand pricing, https://aws.amazon.com/ec2/pricing/on-demand/ and the instance
  pages https://aws.amazon.com/ec2/instance-types/p5/ , /trn1/ , /trn2/ .
  p5.48xlarge (8x H100 SXM, us-east-1): USD 55.04/h after AWS's June 2025 price cut on P5
  (it was 98.32), so 55.04 / 8 = 6.88 per GPU-hour.
  trn1.32xlarge (16 Trainium1 chips, 32 NeuronCore-v2, us-east-1): USD 21.50/h, so 1.34375
  per chip-hour and 0.671875 per NeuronCore-hour.
  trn2.48xlarge (16 Trainium2 chips, 64 logical NeuronCores at LNC=2, us-east-2): USD 44.70/h
  (the least certain figure here), so 2.79375 per chip-hour and 0.6984375 per logical core-hour.
- Google Cloud TPU pricing, https://cloud.google.com/tpu/pricing (already per chip-hour,
  on-demand, us-central1 / us-east): v5e 1.20, v5p 4.20, v6e (Trillium) 2.70.
- Google Compute Engine GPU pricing, https://cloud.google.com/compute/gpus-pricing :
  a3-highgpu-8g (8x H100 80GB, us-central1) about USD 88.25/h, so 11.03 per GPU-hour.
  Listed for reference; H100 rows default to the AWS figure (first match wins); pass
  ``--price cuda=11.03`` to cost a run at the GCP rate.
"""

from __future__ import annotations

import dataclasses
import re

PRICES_AS_OF = "2025-07-01"


@dataclasses.dataclass(frozen=True)
class InstancePrice:
    """One instance (or TPU chip) on-demand price and how it splits into devices."""

    instance: str
    provider: str
    region: str
    usd_per_hour: float  # the whole instance, on-demand, Linux
    devices: int  # devices the price covers, as a benchmark row counts them
    device: str  # what one device is ("H100 GPU", "Trainium2 chip", ...)
    pattern: str  # regular expression matched (case-insensitive) against a row's device kind
    source: str

    def __post_init__(self) -> None:
        re.compile(self.pattern)
        if not (self.usd_per_hour > 0 and self.devices >= 1):
            raise ValueError(f"{self.instance}: price and device count must be positive")

    @property
    def usd_per_device_hour(self) -> float:
        return self.usd_per_hour / self.devices


_AWS = "https://aws.amazon.com/ec2/pricing/on-demand/"
_TPU = "https://cloud.google.com/tpu/pricing"
_GCE = "https://cloud.google.com/compute/gpus-pricing"

# Order matters: the first pattern that matches a device kind wins, so per-core Trainium
# entries come before the per-chip ones (the same device names as anychip.backends.facts.peaks).
PRICES: tuple[InstancePrice, ...] = (
    InstancePrice("p5.48xlarge", "AWS", "us-east-1", 55.04, 8, "H100 SXM GPU", r"H100", _AWS),
    InstancePrice("trn1.32xlarge", "AWS", "us-east-1", 21.50, 32, "NeuronCore-v2", r"(trainium1?|trn1)\b.*core|NeuronCore-v2", _AWS),
    InstancePrice("trn1.32xlarge", "AWS", "us-east-1", 21.50, 16, "Trainium1 chip", r"trainium1?\b|trn1", _AWS),
    InstancePrice("trn2.48xlarge", "AWS", "us-east-2", 44.70, 64, "Trainium2 logical NeuronCore (LNC=2)", r"(trainium2|trn2).*core", _AWS),
    InstancePrice("trn2.48xlarge", "AWS", "us-east-2", 44.70, 16, "Trainium2 chip", r"trainium2|trn2", _AWS),
    InstancePrice("TPU v5e", "Google Cloud", "us-central1", 1.20, 1, "TPU v5e chip", r"TPU v5 ?lite|TPU v5e", _TPU),
    InstancePrice("TPU v5p", "Google Cloud", "us-east5", 4.20, 1, "TPU v5p chip", r"TPU v5p?\b", _TPU),
    InstancePrice("TPU v6e", "Google Cloud", "us-east1", 2.70, 1, "TPU v6e chip", r"TPU v6|Trillium", _TPU),
    InstancePrice("a3-highgpu-8g", "Google Cloud", "us-central1", 88.25, 8, "H100 80GB GPU", r"H100", _GCE),
)


@dataclasses.dataclass(frozen=True)
class Quote:
    """The price a row is costed at, and where it came from."""

    usd_per_device_hour: float
    source: str


def lookup(device_kind: str) -> InstancePrice | None:
    for price in PRICES:
        if re.search(price.pattern, device_kind or "", flags=re.IGNORECASE):
            return price
    return None


def quote(backend: str, device_kind: str, overrides: dict[str, float] | None = None) -> Quote | None:
    """The per-device-hour price of a row: ``--price`` for its backend name, then for its
    device kind (both compared case-insensitively), then the dated table; None when unknown."""
    for key in (backend, device_kind):
        for name, usd in (overrides or {}).items():
            if key and name.lower() == key.lower():
                return Quote(usd, f"--price {name}={usd:g}")
    price = lookup(device_kind)
    if price is None:
        return None
    return Quote(
        price.usd_per_device_hour,
        f"{price.instance} {price.provider} {price.region} on-demand USD {price.usd_per_hour:g}/h / "
        f"{price.devices} x {price.device} (as of {PRICES_AS_OF})",
    )


def parse_price(text: str) -> tuple[str, float]:
    """``NAME=USD_PER_HOUR`` -> (NAME, USD); ValueError with the reason otherwise."""
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise ValueError(f"--price expects NAME=USD_PER_HOUR (e.g. cuda=6.88), got {text!r}")
    try:
        usd = float(value)
    except ValueError:
        raise ValueError(f"--price {name}: {value!r} is not a number of USD per device-hour") from None
    if not (usd >= 0 and usd != float("inf")):
        raise ValueError(f"--price {name}: must be a finite number >= 0, got {value!r}")
    return name, usd
