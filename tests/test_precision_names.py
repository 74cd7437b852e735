"""Precision names: Lightning Fabric's aliases mean what they mean there, float16 is refused with
its reason, a misspelling is never answered with the opposite policy, and results record the
canonical name."""

from __future__ import annotations

import pytest

import anychip as ac
from anychip import workloads
from anychip.errors import InvalidArgumentError
from anychip.precision import ALIASES, POLICIES, policy


@pytest.mark.parametrize(
    "alias, canonical",
    [("bf16-mixed", "bf16"), ("bf16-true", "bf16-pure"), ("32", "fp32"), ("32-true", "fp32")],
)
def test_fabric_aliases_give_the_canonical_policy(alias, canonical):
    pol = policy(alias)
    assert pol is POLICIES[canonical] and pol.name == canonical
    # bf16-mixed keeps float32 weights under autocast; the -true names keep one dtype throughout
    assert pol.autocast == alias.endswith("-mixed")


def test_canonical_names_are_unchanged():
    assert [policy(n).name for n in POLICIES] == ["fp32", "bf16", "bf16-pure"]
    assert set(ALIASES.values()) <= set(POLICIES)


@pytest.mark.parametrize("name", ["fp16", "16", "16-mixed", "16-true", "fp16-mixed", "float16"])
def test_float16_is_refused_with_the_reason_in_one_line(name):
    with pytest.raises(InvalidArgumentError) as info:
        policy(name)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"precision {name!r} is float16")
    assert "loss scaler" in message and "'bf16'" in message and "'bf16-pure'" in message


@pytest.mark.parametrize(
    "typo, meant",
    [
        ("bf16-mixd", "bf16-mixed"),
        ("bf16mixed", "bf16-mixed"),
        ("bf16-mix", "bf16-mixed"),
        ("bf16-tru", "bf16-true"),
        ("bf16-pur", "bf16-pure"),
        ("bf61", "bf16"),
        ("32-tru", "32-true"),
        ("fp23", "fp32"),
    ],
)
def test_a_misspelling_is_answered_with_what_it_means(typo, meant):
    with pytest.raises(InvalidArgumentError, match=f"unknown precision '{typo}'. Did you mean '{meant}'"):
        policy(typo)


@pytest.mark.parametrize("typo", ["bf16-mixd", "bf16_mixed", "bf-mixed", "mixed", "bf16-mixedd", "bf16-true-ish", "truebf16", "pure"])
def test_no_suggestion_has_the_opposite_meaning(typo):
    with pytest.raises(InvalidArgumentError) as info:
        policy(typo)
    message = str(info.value)
    wants_mixed = "mix" in typo
    if "Did you mean" in message:
        suggested = message.split("Did you mean '")[1].split("'")[0]
        assert policy(suggested).autocast == wants_mixed, message


def test_a_name_with_no_close_match_lists_every_name():
    with pytest.raises(InvalidArgumentError) as info:
        policy("fp8")
    message = str(info.value)
    assert "Did you mean" not in message
    assert all(n in message for n in (*POLICIES, *ALIASES))


def test_trainstep_with_bf16_mixed_trains_exactly_as_bf16_and_records_bf16():
    w = workloads.get("mlp")
    batches = [w.batch(i, 8, 16, 0) for i in range(2)]
    runs = {}
    for name in ("bf16-mixed", "bf16"):
        step = ac.TrainStep(w.build(seed=0), w.loss_fn, ac.AdamW(lr=1e-2), backend="cpu", precision=name, compile=False)
        assert step.spec.policy.name == "bf16"
        runs[name] = [step(b).loss for b in batches]
    assert runs["bf16-mixed"] == runs["bf16"]
    assert runs["bf16"][0] != runs["bf16"][1]  # the steps trained: the comparison is not between constants


def test_trainstep_refuses_fp16_before_building_anything():
    w = workloads.get("mlp")
    with pytest.raises(InvalidArgumentError, match="loss scaler"):
        ac.TrainStep(w.build(), w.loss_fn, backend="cpu", precision="16-mixed")
