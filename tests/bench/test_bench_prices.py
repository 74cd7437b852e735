"""The dated price table: read from its data file, every figure sourced, lookups by device kind,
a user's --prices FILE, and one-line errors for a file that cannot be used."""

from __future__ import annotations

import ast
import importlib.resources
import inspect
import json

import pytest

from anychip.bench import metrics, prices
from anychip.errors import InvalidArgumentError

_FILE = importlib.resources.files("anychip.bench").joinpath("prices.json")


def _raw() -> dict:
    return json.loads(_FILE.read_text(encoding="utf-8"))


def test_every_default_entry_names_a_source_url_and_its_date():
    assert prices.PRICES, "the default table is empty"
    for p in prices.PRICES:
        assert p.source.startswith("https://"), p
        assert len(p.source_date) == 10 and p.source_date[4] == p.source_date[7] == "-", p
        assert p.usd_per_device_hour > 0 and p.region and p.provider, p
    # the table's date is that of its newest source
    assert prices.PRICES_AS_OF == max(p.source_date for p in prices.PRICES) == _raw()["as_of"]


def test_default_table_is_the_data_file_and_no_second_list_in_code():
    raw = _raw()["prices"]
    assert [(p.match, p.usd_per_device_hour, p.source) for p in prices.PRICES] == [
        (e["match"], e["usd_per_device_hour"], e["source"]) for e in raw
    ]
    figures = {e["usd_per_device_hour"] for e in raw} | {e.get("instance_usd_per_hour") for e in raw} - {None}
    code = ast.parse(inspect.getsource(prices))
    literals = {n.value for n in ast.walk(code) if isinstance(n, ast.Constant) and type(n.value) in (int, float)}
    assert not figures & literals, f"prices.py holds price figures of its own: {figures & literals}"


def test_cost_by_hand_on_the_dated_table():
    # p5.48xlarge USD 55.04/h for 8 GPUs -> 6.88 per GPU-hour. 400k tokens/s = 1.44e9 tokens/h
    # -> 6.88 / 1440 USD per million tokens.
    q = prices.quote("cuda", "NVIDIA H100 80GB HBM3")
    assert q.usd_per_device_hour == pytest.approx(6.88)
    assert "p5.48xlarge" in q.source and "(as of 2025-07-01)" in q.source
    assert metrics.usd_per_million_tokens(q.usd_per_device_hour, 400_000) == pytest.approx(6.88 / 1440)
    # trn2.48xlarge: 16 chips, 64 logical NeuronCores
    assert prices.quote("neuron", "Trainium2").usd_per_device_hour == pytest.approx(44.70 / 16)
    assert prices.quote("neuron", "trn2 NeuronCore").usd_per_device_hour == pytest.approx(44.70 / 64)
    assert prices.quote("neuron-xla", "trn1 NeuronCore").usd_per_device_hour == pytest.approx(21.50 / 32)
    assert prices.quote("neuron-xla", "Trainium1").usd_per_device_hour == pytest.approx(21.50 / 16)
    assert prices.quote("jax:tpu", "TPU v5 lite").usd_per_device_hour == 1.20
    assert prices.quote("jax:tpu", "TPU v5p").usd_per_device_hour == 4.20
    # v6e: a 128-chip slice at USD 345.60/h
    assert prices.quote("jax:tpu", "TPU v6e").usd_per_device_hour == pytest.approx(345.6 / 128)


def test_sourced_devices_get_their_entry_and_unsourced_ones_none():
    h200 = prices.lookup("NVIDIA H200")
    assert (h200.instance, h200.usd_per_device_hour, h200.source_date) == ("p5en.48xlarge", pytest.approx(63.296 / 8), "2026-08-06")
    assert prices.lookup("NVIDIA H100 80GB HBM3").instance == "p5.48xlarge"
    # No sourced price: no entry, so the bench asks for --price instead of guessing.
    for kind in ("NVIDIA GH200 480GB", "NVIDIA B200", "NVIDIA A100-SXM4-80GB", "NVIDIA L4", "Trainium3", "trn3 NeuronCore",
                 "TPU7x", "AMD EPYC", ""):
        assert prices.lookup(kind) is None, kind
        assert prices.quote("cuda", kind) is None, kind


def test_price_overrides_backend_then_device_kind_case_insensitive():
    kind = "NVIDIA H100 80GB HBM3"
    assert prices.quote("cuda", kind, {"CUDA": 11.03}).usd_per_device_hour == 11.03
    assert prices.quote("cuda", kind, {kind.lower(): 2.0}).usd_per_device_hour == 2.0
    assert prices.quote("cuda", kind, {"cuda": 1.0, kind: 2.0}).usd_per_device_hour == 1.0
    q = prices.quote("cpu", "AMD EPYC", {"cpu": 0.10})
    assert (q.usd_per_device_hour, q.source) == (0.10, "--price cpu=0.1")


@pytest.mark.parametrize("text", ["cuda", "=3", "cuda=", "cuda=abc", "cuda=-1", "cuda=inf", "cuda=nan"])
def test_malformed_price_is_refused(text):
    with pytest.raises(ValueError, match="--price"):
        prices.parse_price(text)


def test_parse_price():
    assert prices.parse_price("jax:tpu=1.2") == ("jax:tpu", 1.2)
    assert prices.parse_price("TPU v5 lite=0") == ("TPU v5 lite", 0.0)


def _entry(**over) -> dict:
    e = {"match": "H100", "usd_per_device_hour": 2.5, "source": "our contract", "source_date": "2026-01-02"}
    e.update(over)
    return e


def test_a_users_file_replaces_the_default_table(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"prices": [_entry(), _entry(match="B200", usd_per_device_hour=4, source_date="2026-03-04")]}))
    table = prices.load(path)
    assert table.as_of == "2026-03-04" and table.origin == str(path)
    assert prices.quote("cuda", "NVIDIA H100 80GB HBM3", table=table).usd_per_device_hour == 2.5
    assert prices.quote("cuda", "NVIDIA B200", table=table).usd_per_device_hour == 4.0
    assert prices.quote("neuron", "Trainium2", table=table) is None  # the default table is not consulted
    assert prices.quote("cuda", "NVIDIA B200", {"cuda": 1.0}, table=table).usd_per_device_hour == 1.0  # --price still wins


@pytest.mark.parametrize(
    "content, expected",
    [
        ("{not json", "not valid JSON (line 1"),
        ("[]", 'a JSON object with a "prices" list'),
        (json.dumps({"prices": [_entry(usd_per_device_hour=-1)]}),
            "entry 0 ('H100'): usd_per_device_hour must be a finite number of USD >= 0"),
        (json.dumps({"prices": [_entry(), _entry(usd_per_device_hour="3")]}), "entry 1 ('H100'): usd_per_device_hour"),
        (json.dumps({"prices": [_entry(usd_per_device_hour=True)]}), "usd_per_device_hour"),
        (json.dumps({"prices": [{"match": "H100", "usd_per_device_hour": 1}]}), "entry 0 ('H100'): missing source, source_date"),
        (json.dumps({"prices": [_entry(usd_per_hour=3)]}), "unknown key 'usd_per_hour'"),
        (json.dumps({"prices": [_entry(match="H100(")]}), "not a valid regular expression"),
        (json.dumps({"prices": [_entry(source_date="2026-02-30")]}), "source_date must be a date YYYY-MM-DD, got '2026-02-30'"),
        (json.dumps({"prices": [_entry(devices=8, instance_usd_per_hour=30.0)]}), "2.5 x devices 8 = 20, but instance_usd_per_hour is 30"),
        (json.dumps({"prices": [_entry(devices=0)]}), "devices must be a whole number >= 1"),
        (json.dumps({"as_of": "2025-01-01", "prices": [_entry()]}), '"as_of" 2025-01-01 is older than a source_date (2026-01-02)'),
        (json.dumps({"prices": [_entry()], "price": []}), "unknown key 'price'"),
        (json.dumps({"prices": ["H100=2"]}), "entry 0: expected an object"),
    ],
)
def test_a_bad_prices_file_is_refused_in_one_line(tmp_path, content, expected):
    path = tmp_path / "prices.json"
    path.write_text(content)
    with pytest.raises(InvalidArgumentError) as info:
        prices.load(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"prices file {path}")
    assert expected in message, message


@pytest.mark.parametrize("kind", ["missing", "directory", "binary"])
def test_an_unreadable_prices_file_is_refused_in_one_line(tmp_path, kind):
    path = tmp_path / "prices.json"
    if kind == "directory":
        path.mkdir()
    elif kind == "binary":
        path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(InvalidArgumentError) as info:
        prices.load(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"prices file {path}: ")
    assert ("cannot be read" if kind != "binary" else "not UTF-8 text") in message, message
