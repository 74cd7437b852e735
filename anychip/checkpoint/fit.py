"""Whether a verified checkpoint fits a step: the optimizer spec, then the model's parameter
names, shapes and dtypes, then every optimizer slot. A misfit raises
:class:`CheckpointMismatchError` whose message lists each difference (renames guessed from
matching shapes), so the user sees what to change rather than a bare ``KeyError``.
"""

from __future__ import annotations

import collections
import difflib
import logging
from pathlib import Path

from anychip import user_optimizer
from anychip.checkpoint.format import MODEL_FILE, OPTIMIZER_FILE, dtype_name, optimizer_record
from anychip.errors import CheckpointMismatchError

log = logging.getLogger("anychip")


def check_fits(directory: Path, manifest: dict, tensors: dict, step, allow_optimizer_change: bool) -> dict:
    """The state dict to apply, once names, shapes, dtypes and the optimizer all fit the step."""
    ours = optimizer_record(step)
    theirs = manifest.get("optimizer")
    differences = optimizer_diff(theirs, ours)
    if differences:
        type_changed = not isinstance(theirs, dict) or theirs.get("type") != ours["type"]
        # A torch.optim optimizer whose groups hold other parameters cannot take the saved state.
        type_changed = type_changed or _group_params(theirs) != _group_params(ours)
        if type_changed or not allow_optimizer_change:
            hint = "" if type_changed else " (pass allow_optimizer_change=True to resume with the new settings)"
            raise CheckpointMismatchError(
                f"{directory} was trained with a different optimizer: " + "; ".join(differences) + hint, optimizer=differences
            )
        log.warning("anychip: resuming %s with a changed optimizer: %s", directory, "; ".join(differences))

    model_state = step.model.state_dict()
    want = {k: (tuple(v.shape), dtype_name(v)) for k, v in model_state.items()}
    listed = manifest["model"]["tensors"]
    have = {k: (tuple(v["shape"]), v["dtype"]) for k, v in listed.items()}
    d = diff_names(have, want)
    if any(d.values()):
        hint = ""
        if d["retyped"]:
            hint = f"the checkpoint was written with precision {manifest.get('precision')!r}, the step uses {step.spec.policy.name!r}"
        raise CheckpointMismatchError(mismatch_message(directory, "model", d, hint), **d)

    saved_precision, precision = manifest.get("precision"), step.spec.policy.name
    if saved_precision and saved_precision != precision:
        # The dtypes fit (bf16 autocast keeps fp32 weights), so nothing is cast, but the run
        # changes how it computes from here on: say so rather than resume silently.
        log.warning("anychip: load: %s was trained with precision %r; resuming with %r (weights and optimizer state "
                    "load as stored, in %s)", directory, saved_precision, precision, _dtypes(want))
    stored = tensors[MODEL_FILE]
    aliases = manifest["model"].get("aliases", {})
    model = {k: stored[aliases.get(k, k)] for k in listed}

    trainable = trainable_params(step)
    slots: dict[str, dict] = {}
    for key, t in tensors[OPTIMIZER_FILE].items():
        slot, _, name = key.partition("/")
        slots.setdefault(slot, {})[name] = t
    if user_optimizer.is_torch_optimizer(step.spec.optimizer):
        return _user_optimizer_state(directory, manifest, model, slots, trainable, keep_settings=bool(differences))
    for slot in step.spec.optimizer.slots:
        slots.setdefault(slot, {})
    unknown_slots = sorted(set(slots) - set(step.spec.optimizer.slots))
    if unknown_slots and not allow_optimizer_change:
        raise CheckpointMismatchError(f"{directory} holds optimizer slots {unknown_slots} that {ours['type']} does not use")
    slots = {s: slots[s] for s in step.spec.optimizer.slots}
    _check_slots_complete(directory, slots, ours["type"])
    for slot, by_name in slots.items():
        have = {k: (tuple(t.shape), dtype_name(t)) for k, t in by_name.items()}
        known = [k for k in sorted(have) if k in trainable]
        d = {
            "missing": [], "renamed": [],
            "unexpected": sorted(set(have) - set(trainable)),
            "reshaped": [(k, have[k][0], trainable[k][0]) for k in known if have[k][0] != trainable[k][0]],
            "retyped": [(k, have[k][1], trainable[k][1]) for k in known if have[k][0] == trainable[k][0] and have[k][1] != trainable[k][1]],
        }
        if any(d.values()):
            raise CheckpointMismatchError(mismatch_message(directory, f"optimizer slot {slot!r}", d), **d)
    return {"step": int(manifest["step"]), "model": model, "optimizer": {"slots": slots}}


def _dtypes(shapes_and_dtypes: dict) -> str:
    return ", ".join(sorted({dtype for _, dtype in shapes_and_dtypes.values()}))


def _check_slots_complete(directory: Path, slots: dict, optimizer: str) -> None:
    """A parameter the optimizer has state for has it in every slot (a fresh optimizer has none
    at all): the engine would otherwise load the partial state and fail at the next update."""
    holders = set().union(*slots.values()) if slots else set()
    missing = [(slot, sorted(holders - set(by_name))) for slot, by_name in slots.items() if holders - set(by_name)]
    if missing:
        listed = [f"{slot}/{name}" for slot, names in missing for name in names]
        parts = [f"slot {slot!r} for {', '.join(names)}" if len(names) < len(holders) else f"slot {slot!r}" for slot, names in missing]
        raise CheckpointMismatchError(
            f"{directory} lacks optimizer state {optimizer} keeps for every parameter it updated: missing "
            + "; ".join(parts) + " (the checkpoint is incomplete or was edited)",
            missing=listed,
        )


def _group_params(record) -> list | None:
    groups = record.get("fields", {}).get("groups") if isinstance(record, dict) else None
    return None if groups is None else [g.get("params") for g in groups]


def _user_optimizer_state(directory: Path, manifest: dict, model: dict, slots: dict, trainable: dict, keep_settings: bool) -> dict:
    """A torch.optim optimizer's state: its slots are whatever it created (found in the files);
    each must name a trainable parameter and be shaped like it, or be a per-parameter scalar.
    ``keep_settings`` (a changed optimizer, allowed): the step keeps its own fixed
    hyperparameters and takes only what the scheduler moves from the checkpoint."""
    for slot, by_name in slots.items():
        known = [k for k in sorted(by_name) if k in trainable]
        d = {
            "missing": [], "renamed": [], "retyped": [],
            "unexpected": sorted(set(by_name) - set(trainable)),
            "reshaped": [(k, tuple(by_name[k].shape), trainable[k][0]) for k in known
                         if by_name[k].ndim and tuple(by_name[k].shape) != trainable[k][0]],
        }
        if any(d.values()):
            raise CheckpointMismatchError(mismatch_message(directory, f"optimizer slot {slot!r}", d), **d)
    # Not refused like a spec optimizer's: torch's Optimizer.load_state_dict casts a parameter's
    # floating state (all but "step") to the parameter's dtype, the JAX engine does the same.
    log_conversions(directory, {"optimizer state": [
        (dtype_name(t), trainable[k][1]) for slot, by_name in slots.items() if slot != "step"
        for k, t in by_name.items() if t.is_floating_point() and dtype_name(t) != trainable[k][1]
    ]})
    listed = manifest["optimizer_state"]
    groups = listed.get("groups", [])
    if keep_settings:
        kept = user_optimizer.SCHEDULED_KEYS | {"params"}
        groups = [{k: v for k, v in g.items() if k in kept} for g in groups]
    optimizer = {"slots": slots, "scalars": listed.get("scalars", {}), "groups": groups}
    return {"step": int(manifest["step"]), "model": model, "optimizer": optimizer, "lr_scheduler": manifest.get("lr_scheduler")}


def log_conversions(directory: Path, converted: dict[str, list[tuple[str, str]]]) -> None:
    """One WARNING for a load that casts tensors: ``converted`` is {kind: [(saved, loaded dtype)]},
    e.g. "anychip: load: 6 tensors converted bfloat16 -> float32 (optimizer state 6) from ckpt"."""
    counts = collections.Counter((a, b, kind) for kind, pairs in converted.items() for a, b in pairs)
    parts = []
    for a, b in sorted({(a, b) for a, b, _ in counts}):
        kinds = [(kind, counts[a, b, kind]) for kind in converted if counts[a, b, kind]]
        n = sum(c for _, c in kinds)
        parts.append(f"{n} tensor{'' if n == 1 else 's'} converted {a} -> {b} (" + ", ".join(f"{k} {c}" for k, c in kinds) + ")")
    if parts:
        log.warning("anychip: load: %s from %s", "; ".join(parts), directory)


def trainable_params(step) -> dict:
    """{name: (shape, dtype)} of the parameters the optimizer updates, in the engine's naming."""
    named = dict(step.model.named_parameters())
    return {n: (tuple(named[n].shape), dtype_name(named[n])) for n in step.engine.param_names}


def diff_names(have: dict, want: dict) -> dict:
    """Compare {name: (shape, dtype)} of the checkpoint (``have``) and the model (``want``)."""
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    renamed = []
    for new in list(missing):
        candidates = [old for old in unexpected if have[old] == want[new]]
        if candidates:
            old = max(candidates, key=lambda c: difflib.SequenceMatcher(None, c, new).ratio())
            renamed.append((old, new))
            missing.remove(new)
            unexpected.remove(old)
    common = sorted(set(have) & set(want))
    reshaped = [(k, have[k][0], want[k][0]) for k in common if have[k][0] != want[k][0]]
    retyped = [(k, have[k][1], want[k][1]) for k in common if have[k][0] == want[k][0] and have[k][1] != want[k][1]]
    return {"missing": missing, "unexpected": unexpected, "renamed": renamed, "reshaped": reshaped, "retyped": retyped}


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def mismatch_message(directory: Path, what: str, d: dict, hint: str = "") -> str:
    """One sentence per kind of difference in ``d`` (as :func:`diff_names` returns it)."""
    parts = []
    if d["renamed"]:
        parts.append("renamed (checkpoint -> model): " + ", ".join(f"{a} -> {b}" for a, b in d["renamed"]))
    if d["reshaped"]:
        parts.append("reshaped (checkpoint vs model): " + ", ".join(f"{k} {_fmt_shape(a)} vs {_fmt_shape(b)}" for k, a, b in d["reshaped"]))
    if d["retyped"]:
        parts.append("dtype (checkpoint vs model): " + ", ".join(f"{k} {a} vs {b}" for k, a, b in d["retyped"]))
    if d["missing"]:
        parts.append("missing from the checkpoint: " + ", ".join(d["missing"]))
    if d["unexpected"]:
        parts.append("not in the model: " + ", ".join(d["unexpected"]))
    return f"{directory} does not fit this step's {what}: " + "; ".join(parts) + (f". {hint}" if hint else "")


def optimizer_diff(theirs, ours, prefix: str = "") -> list[str]:
    """Every difference between two :func:`~anychip.checkpoint.format.spec_json` trees, as
    ``"path: checkpoint X, step Y"`` lines."""
    if isinstance(theirs, dict) and isinstance(ours, dict):
        out = []
        for k in sorted(set(theirs) | set(ours)):
            key = k if k in ("type", "fields") else f"{prefix}{k}"
            if k == "fields":
                out += optimizer_diff(theirs.get(k), ours.get(k), prefix)
            elif k == "type":
                if theirs.get(k) != ours.get(k):
                    out.append(f"{prefix.rstrip('.') or 'optimizer'} type: checkpoint {theirs.get(k)}, step {ours.get(k)}")
            else:
                out += optimizer_diff(theirs.get(k), ours.get(k), f"{key}.")
        return out
    if theirs != ours:
        return [f"{prefix.rstrip('.')}: checkpoint {theirs!r}, step {ours!r}"]
    return []
