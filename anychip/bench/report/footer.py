"""The lines under the bench table: why rows failed, where each figure comes from, why a figure
is missing (with the flag that supplies it), the parity reference, and the run's warnings."""

from __future__ import annotations

from anychip.bench.metrics import row_label, row_world_size
from anychip.bench.report.cells import fmt_device, fmt_percent, fmt_versions, multi_process


def _grouped(pairs) -> dict[str, list[str]]:
    """{text: [row labels]} in first-seen order, so one reason shared by rows is one line."""
    out: dict[str, list[str]] = {}
    for text, label in pairs:
        out.setdefault(text, []).append(label)
    return out


def _finished(doc: dict) -> list[dict]:
    return [r for r in doc["rows"] if r["status"] == "ok"]


def measurement_note(doc: dict) -> str | None:
    """How step ms and tokens/s were measured: timed windows where the rows have them (one
    synchronisation per window); a document from before then timed each step on its own."""
    rows, steps = _finished(doc), doc["config"]["steps"]
    if not rows:
        return None
    repeats = sorted({r["repeat"] for r in rows if r.get("repeat")})
    if repeats:
        count = "/".join(map(str, repeats))
        return (
            f"step ms, tokens/s: median over the timed windows ({count} windows of {steps} steps, one synchronisation per window); "
            "± = half the p10-p90 range of tokens/s over the windows, relative to the median"
        )
    windows = sorted({r["throughput_window"]["steps"] for r in rows if r.get("throughput_window")})
    spread = "± = half the p10-p90 range of the per-step tokens/s, relative to tokens/s"
    if windows:
        count = "/".join(map(str, windows))
        return (
            f"tokens/s: one window of {count} back-to-back steps, one synchronisation at its end; "
            f"step ms: median of the other timed steps, each synchronised; {spread}"
        )
    return f"step ms: median of the timed steps, each synchronised; tokens/s = tokens per step / step ms; {spread}"


def memory_note(doc: dict) -> str | None:
    sources = _grouped((r["memory"]["source"], row_label(r)) for r in doc["rows"] if r["memory"])
    if not sources:
        return None
    parts = []
    for source, labels in sources.items():
        caveat = ", includes the framework and the host copy of the data" if source == "process RSS" else ""
        parts.append(f"{source} ({', '.join(labels)}{caveat})")
    return "peak mem: " + "; ".join(parts)


def _mfu_missing(row: dict) -> str:
    if row["flops_per_token"] is None:
        return "the workload reports no FLOPs per token"
    return f"no peak FLOP/s known for {row['device_kind'] or 'this device'}: pass --peak-tflops"


def mfu_notes(doc: dict) -> list[str]:
    rows = _finished(doc)
    missing = _grouped((_mfu_missing(r), row_label(r)) for r in rows if r["mfu"] is None)
    out = [f"MFU - ({', '.join(labels)}): {reason}" for reason, labels in missing.items()]
    known = [f"{row_label(r)} {r['peak_flops'] / 1e12:.4g} TFLOP/s ({r.get('peak_flops_source') or 'backend'})"
             for r in rows if r["mfu"] is not None and r["peak_flops"]]
    if known:
        out.insert(0, "MFU = tokens/s x FLOPs per token / peak FLOP/s of the devices used: " + ", ".join(known))
    return out


def price_notes(doc: dict) -> list[str]:
    rows, as_of = _finished(doc), doc["config"]["prices_as_of"]
    out = []
    priced = _grouped((f"${r['price']['usd_per_device_hour']:g}/device-hour ({r['price']['source']})", row_label(r))
                      for r in rows if r["price"])
    if priced:
        out.append("USD/M tokens = device-hours per million tokens x " + "; ".join(
            f"{text} for {', '.join(labels)}" for text, labels in priced.items()) + f"; price table as of {as_of}")
    missing = [row_label(r) for r in rows if r["usd_per_million_tokens"] is None]
    if missing:
        out.append(f"USD/M tokens - ({', '.join(missing)}): no price: pass --price NAME=USD_PER_HOUR (prices as of {as_of})")
    return out


def parity_notes(doc: dict) -> list[str]:
    rows = [r for r in doc["rows"] if r["parity"]]
    if not rows:
        return []
    by_world = _grouped((r["parity"]["reference"], str(row_world_size(r))) for r in rows)
    if multi_process(doc):
        against = ", ".join(f"{ref} for {'/'.join(dict.fromkeys(worlds))} process(es)" for ref, worlds in by_world.items())
    else:
        against = ", ".join(by_world)
    chosen = "the configured reference" if doc["config"].get("reference") else "the first row to finish"
    out = [
        f"parity: largest per-step relative loss difference against {against} ({chosen}); "
        f"tolerance {doc['config']['parity_tolerance']:g}; >tol: beyond it"
    ]
    for r in rows:
        p = r["parity"]
        if p["first_step_over"]:
            worst = "a non-finite loss" if p["max_rel_diff"] is None else f"up to {p['max_rel_diff']:.1e}"
            out.append(f"{row_label(r)}: loss beyond tolerance from step {p['first_step_over']} ({worst} against {p['reference']})")
    return out


def devices_note(doc: dict) -> str | None:
    """The devices in short (the --wide table and the JSON have the full names)."""
    devices = _grouped((fmt_device(r, short=True), row_label(r)) for r in doc["rows"] if fmt_device(r) != "-")
    return ("devices: " + "; ".join(f"{d} ({', '.join(labels)})" for d, labels in devices.items())) if devices else None


def process_notes(doc: dict) -> list[str]:
    """How the multi-process rows ran: launcher, layout, global batch, scaling efficiency."""
    if not multi_process(doc):
        return []
    out = []
    for r in doc["rows"]:
        world = row_world_size(r)
        if world == 1:
            continue
        lay = r.get("layout")
        where = ""
        if lay:
            where = f"{lay['engine'] or 'no launcher'}, {lay['nodes']} node(s) x {lay['local_world_size']} process(es)"
            where += f", rendezvous {lay['coordinator']}" if lay.get("coordinator") else ""
            where += "; "
        batch = (f"; global batch {world} x {r['batch']} = {r['samples_per_step']} samples per step"
                 if r["batch"] and r["samples_per_step"] else "")
        eff = f"; scaling eff. {fmt_percent(r['scaling_efficiency'])}" if r.get("scaling_efficiency") is not None else ""
        out.append(f"{row_label(r)}: {where}world size {world}, parallel={r.get('parallel')}{batch}{eff}")
        used = r["devices_used"]
        if r["status"] == "ok" and used and used < world:
            out.append(f"{row_label(r)}: {world} processes share {used} device(s) ({r['device_kind']}), "
                       "which a 1-process row has to itself")
    threads = [f"{row_label(r)} {r['cpu_threads']}" for r in doc["rows"] if r.get("cpu_threads")]
    if threads:
        out.append("CPU threads per process: " + ", ".join(threads)
                   + " (an N-process row gets OMP_NUM_THREADS = CPUs // N when it is unset)")
    for name in doc["config"].get("one_process_backends") or []:
        out.append(f"{name}: one process only: --nproc launches torch backends through torchrun; "
                   f"{name} drives every local device from one process")
    out.append(
        "scaling: weak (each process keeps the batch; N processes train on N x batch per step); tokens/s counts "
        "every process; scaling eff. = tokens/s at N / (N x tokens/s at 1); peak mem is rank 0's"
    )
    return out


def notes(doc: dict) -> list[str]:
    """Every footer line, in order: failures, devices, how figures were measured, what is
    missing and why, parity, processes, versions, machine load, warnings."""
    out = [f"{row_label(r)}: {r['status']}: {r['error'] or ''}".rstrip(": ") for r in doc["rows"] if r["status"] != "ok"]
    out += [line for line in (devices_note(doc), measurement_note(doc), memory_note(doc)) if line]
    out += mfu_notes(doc) + price_notes(doc) + parity_notes(doc) + process_notes(doc)
    seen = set()
    for r in doc["rows"]:
        if r["versions"] and r["backend"] not in seen:  # once per backend, not per process count
            seen.add(r["backend"])
            out.append(f"{r['backend']} versions: {fmt_versions(r)}")
    load = doc["machine"].get("load")
    if load:
        out.append(f"machine load: highest 1-minute load average {load['max_1min']:.2f} on {load['cores']} cores during the run")
    out += [f"warning: {w}" for w in doc.get("warnings") or []]
    return out
