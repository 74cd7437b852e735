"""On-demand prices, for ``USD per million tokens`` in ``anychip bench``.

A benchmark row runs on some number of *devices* (one GPU, one NeuronCore, one TPU chip), so
every price is **USD per device-hour**: an instance's on-demand Linux price divided by the
devices it holds. A row then costs

    usd_per_hour = usd_per_device_hour x devices_used
    usd_per_million_tokens = usd_per_hour / 3600 / tokens_per_second x 1e6

The default table is the data file ``anychip/bench/prices.json``, dated by its ``as_of`` (the
newest of its sources' dates). Each entry names the page its figure was read from and that
page's date; a device with no sourced price has no entry, and its rows carry no cost until
``--price NAME=USD_PER_HOUR`` (USD per device-hour, NAME a backend name or a device kind) gives
one. CPU rows have no default price: a host CPU's cost depends on the machine.

``--prices FILE`` replaces the default table with a file of the same format (see
:func:`load`), for the prices you actually pay::

    {
      "as_of": "2026-08-06",                optional; the newest source_date when absent
      "prices": [
        {
          "match": "H100",                  regular expression, searched case-insensitively in
                                            the row's device kind; the first entry found wins
          "usd_per_device_hour": 6.88,      >= 0
          "source": "https://...",          where the figure comes from (a URL or a contract)
          "source_date": "2025-07-01",      YYYY-MM-DD
          "device": "H100 SXM GPU",         optional from here on
          "provider": "AWS", "instance": "p5.48xlarge", "region": "us-east-1",
          "instance_usd_per_hour": 55.04,   with "devices": must equal devices x the device price
          "devices": 8,
          "note": "..."
        }
      ]
    }

Order matters: per-core Trainium entries come before per-chip ones, as in
``anychip.backends.facts.peaks``, so that "trn2 NeuronCore" is priced as one core.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.resources
import json
import math
import os
import re

from anychip.errors import InvalidArgumentError

_REQUIRED = ("match", "usd_per_device_hour", "source", "source_date")
_OPTIONAL = ("device", "provider", "instance", "region", "instance_usd_per_hour", "devices", "note")
_TOP_LEVEL = ("as_of", "about", "prices")


@dataclasses.dataclass(frozen=True)
class Price:
    """One device's on-demand price, what it matches and where it was read."""

    match: str  # regular expression searched (case-insensitive) in a row's device kind
    usd_per_device_hour: float
    source: str
    source_date: str  # YYYY-MM-DD
    device: str = ""
    provider: str = ""
    instance: str = ""
    region: str = ""
    instance_usd_per_hour: float | None = None  # the whole instance, when the price was derived from one
    devices: int | None = None  # devices that instance holds, as a benchmark row counts them
    note: str = ""

    def matches(self, device_kind: str) -> bool:
        return re.search(self.match, device_kind or "", flags=re.IGNORECASE) is not None

    def describe(self) -> str:
        """The row's price source: what the figure was derived from and when it was read."""
        where = " ".join(p for p in (self.instance, self.provider, self.region) if p)
        if self.instance_usd_per_hour is not None and self.devices:
            figure = f"on-demand USD {self.instance_usd_per_hour:g}/h / {self.devices} x {self.device or 'device'}"
        else:
            figure = f"on-demand USD {self.usd_per_device_hour:g} per {self.device or 'device'}-hour"
        return f"{where} {figure} (as of {self.source_date})".strip()


@dataclasses.dataclass(frozen=True)
class PriceTable:
    entries: tuple[Price, ...]
    as_of: str
    origin: str  # the file it was read from

    def lookup(self, device_kind: str) -> Price | None:
        return next((p for p in self.entries if p.matches(device_kind)), None)


@dataclasses.dataclass(frozen=True)
class Quote:
    """The price a row is costed at, and where it came from."""

    usd_per_device_hour: float
    source: str


def load(path: str | os.PathLike) -> PriceTable:
    """The table in the JSON file at ``path`` (the format above), for ``--prices FILE``.

    Raises InvalidArgumentError with one line naming the file and what is wrong with it."""
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise InvalidArgumentError(f"prices file {name}: not UTF-8 text; pass a JSON file like anychip/bench/prices.json") from None
    except OSError as exc:
        raise InvalidArgumentError(f"prices file {name}: cannot be read ({exc.strerror or exc}); pass a readable JSON file") from None
    return parse(text, name)


def parse(text: str, origin: str) -> PriceTable:
    """The table in ``text`` (JSON); ``origin`` names it in the error messages."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(f"prices file {origin}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("prices"), list):
        raise InvalidArgumentError(f'prices file {origin}: expected a JSON object with a "prices" list, as in anychip/bench/prices.json')
    unknown = sorted(set(doc) - set(_TOP_LEVEL))
    if unknown:
        raise InvalidArgumentError(f"prices file {origin}: unknown key {unknown[0]!r}; the keys are {', '.join(_TOP_LEVEL)}")
    entries = tuple(_entry(item, i, origin) for i, item in enumerate(doc["prices"]))
    newest = max((p.source_date for p in entries), default=None)
    as_of = doc.get("as_of", newest)
    if as_of is None:
        raise InvalidArgumentError(f'prices file {origin}: an empty "prices" list needs an "as_of" date (YYYY-MM-DD)')
    _date(as_of, f'prices file {origin}: "as_of"')
    if newest is not None and as_of < newest:
        raise InvalidArgumentError(f'prices file {origin}: "as_of" {as_of} is older than a source_date ({newest}); give the newest one')
    return PriceTable(entries, as_of, origin)


def _entry(item, index: int, origin: str) -> Price:
    label = f"prices file {origin}: entry {index}"
    if not isinstance(item, dict):
        raise InvalidArgumentError(f"{label}: expected an object with {', '.join(_REQUIRED)}, got {type(item).__name__}")
    if isinstance(item.get("match"), str) and item["match"]:
        label += f" ({item['match']!r})"
    missing = [k for k in _REQUIRED if k not in item]
    if missing:
        raise InvalidArgumentError(f"{label}: missing {', '.join(missing)}")
    unknown = sorted(set(item) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise InvalidArgumentError(f"{label}: unknown key {unknown[0]!r}; the keys are {', '.join(_REQUIRED + _OPTIONAL)}")
    for key in ("match", "source", "source_date", *(k for k in _OPTIONAL if k not in ("instance_usd_per_hour", "devices"))):
        if key in item and not isinstance(item[key], str):
            raise InvalidArgumentError(f"{label}: {key} must be a string, got {item[key]!r}")
    if not item["match"] or not item["source"].strip():
        raise InvalidArgumentError(f"{label}: match and source must not be empty")
    try:
        re.compile(item["match"])
    except re.error as exc:
        raise InvalidArgumentError(f"{label}: match is not a valid regular expression ({exc})") from None
    _date(item["source_date"], f"{label}: source_date")
    usd = _usd(item["usd_per_device_hour"], f"{label}: usd_per_device_hour")
    instance_usd = _usd(item["instance_usd_per_hour"], f"{label}: instance_usd_per_hour") if "instance_usd_per_hour" in item else None
    devices = item.get("devices")
    if devices is not None and (isinstance(devices, bool) or not isinstance(devices, int) or devices < 1):
        raise InvalidArgumentError(f"{label}: devices must be a whole number >= 1, got {devices!r}")
    if instance_usd is not None and devices is not None and not math.isclose(usd * devices, instance_usd, rel_tol=5e-3, abs_tol=1e-9):
        raise InvalidArgumentError(
            f"{label}: usd_per_device_hour {usd:g} x devices {devices} = {usd * devices:g}, but instance_usd_per_hour is {instance_usd:g}"
        )
    return Price(**{**item, "usd_per_device_hour": float(usd), "instance_usd_per_hour": instance_usd})


def _usd(value, label: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise InvalidArgumentError(f"{label} must be a finite number of USD >= 0, got {value!r}")
    return float(value)


def _date(value, label: str) -> None:
    if isinstance(value, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        try:
            datetime.date.fromisoformat(value)
            return
        except ValueError:  # 2025-02-30: the right shape, not a day
            pass
    raise InvalidArgumentError(f"{label} must be a date YYYY-MM-DD, got {value!r}")


def _default() -> PriceTable:
    resource = importlib.resources.files("anychip.bench").joinpath("prices.json")
    return parse(resource.read_text(encoding="utf-8"), "anychip/bench/prices.json")


DEFAULT = _default()
PRICES = DEFAULT.entries
PRICES_AS_OF = DEFAULT.as_of


def lookup(device_kind: str, table: PriceTable | None = None) -> Price | None:
    """The first entry of ``table`` (the default one unless given) matching ``device_kind``."""
    return (table or DEFAULT).lookup(device_kind)


def quote(backend: str, device_kind: str, overrides: dict[str, float] | None = None, table: PriceTable | None = None) -> Quote | None:
    """The per-device-hour price of a row: ``--price`` for its backend name, then for its
    device kind (both compared case-insensitively), then ``table`` (the default one unless
    given, e.g. from ``--prices FILE``); None when unknown."""
    for key in (backend, device_kind):
        for name, usd in (overrides or {}).items():
            if key and name.lower() == key.lower():
                return Quote(usd, f"--price {name}={usd:g}")
    price = lookup(device_kind, table)
    if price is None:
        return None
    return Quote(price.usd_per_device_hour, price.describe())


def parse_price(text: str) -> tuple[str, float]:
    """``NAME=USD_PER_HOUR`` -> (NAME, USD); InvalidArgumentError with the reason otherwise."""
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise InvalidArgumentError(f"--price expects NAME=USD_PER_HOUR (e.g. cuda=6.88), got {text!r}")
    try:
        usd = float(value)
    except ValueError:
        raise InvalidArgumentError(f"--price {name}: {value!r} is not a number of USD per device-hour") from None
    if not (usd >= 0 and usd != float("inf")):
        raise InvalidArgumentError(f"--price {name}: must be a finite number >= 0, got {value!r}")
    return name, usd
