"""The tensors of a checkpoint, through ``torch.distributed.checkpoint`` (DCP) in safetensors
files: every rank writes the chunks it owns (its FSDP shards, its share of the replicated
tensors), and a load on any number of ranks reads only the chunks that overlap what it holds.

Two parts of plain DCP are left out on purpose. Its ``.metadata`` file is a pickle: the chunk
listing goes into anychip's JSON manifest instead, and the reader is built from that manifest
alone (it never lists the directory). And a non-tensor value sent through DCP's safetensors
writer becomes a ``torch.save`` blob at the front of the file: only tensors go through DCP,
everything else is in the manifest.

The files are what DCP's ``HuggingFaceStorageWriter(save_distributed=True)`` writes (chunk
offsets in the ``DCP_SHARDING_INFO`` metadata), so DCP's own ``HuggingFaceStorageReader`` can
read them too. They are written here in one pass without building the file in memory first,
each tensor's SHA-256 computed while it is written, and one fsync per file. Every chunk a rank
reads is hashed and compared with the manifest before one byte of it is used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import struct
import threading
import warnings
from pathlib import Path

from anychip.checkpoint.format import check_file, check_file_name, dtype_name
from anychip.errors import CheckpointCorruptError, CheckpointError

HEADER_LIMIT = 64 << 20  # a safetensors header is ~100 bytes a tensor; refuse absurd ones unread
DCP_SHARDING_INFO, DCP_VERSION = "DCP_SHARDING_INFO", "DCP_VERSION"


def quiet_single_process() -> None:
    """DCP warns on every single-process save and load, which anychip asks for on purpose.
    Set before each call (a test runner resets the filters between tests); filterwarnings
    replaces an equal entry instead of adding another."""
    warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized", category=UserWarning)


def file_name(rank: int) -> str:
    return f"rank-{rank:05d}.safetensors"


def _st_dtypes() -> dict:
    """{torch dtype: safetensors dtype name}."""
    import safetensors.torch

    return {v: k for k, v in safetensors.torch._TYPES.items()}


def _raw(t) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    import torch

    flat = t.reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def write_file(path: Path, tensors: list[tuple[str, object, list[int]]]) -> dict:
    """Write ``[(key, CPU tensor, offsets in the whole tensor)]`` as one safetensors file;
    return its manifest record (size, header hash, per tensor dtype/shape/offsets/SHA-256).

    The tensors are hashed on a second thread (hashlib releases the GIL) while their bytes are
    written and flushed to the disk, so the save takes the longer of the two, not their sum."""
    names = _st_dtypes()
    body, header, offset = [], {}, 0
    for key, t, offsets in tensors:
        t = t.detach().contiguous()
        n = t.numel() * t.element_size()
        header[key] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        body.append((key, t, offsets))
        offset += n
    info = {key: {"saved_offsets": offsets} for key, _, offsets in body}
    header["__metadata__"] = {"format": "pt", DCP_SHARDING_INFO: json.dumps(info), DCP_VERSION: "1.0"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-(8 + len(encoded)) % 8)  # safetensors aligns the data to 8 bytes
    head = struct.pack("<Q", len(encoded)) + encoded
    record = {"bytes": len(head) + offset, "header_bytes": len(head), "header_sha256": hashlib.sha256(head).hexdigest(), "tensors": {}}
    views = [_raw(t) for _, t, _ in body]
    digests: list = [None] * len(views)

    def hash_all():
        for i, view in enumerate(views):
            digests[i] = _sha256(view)

    hasher = threading.Thread(target=hash_all, name="anychip-checkpoint-hash", daemon=True)
    hasher.start()
    try:
        with open(path, "xb") as fh:
            fh.write(head)
            for view in views:
                fh.write(view)
            fh.flush()
            os.fsync(fh.fileno())  # the hashes go on meanwhile: the slower of the two sets the time
    finally:
        hasher.join()
    for (key, t, offsets), digest in zip(body, digests):
        record["tensors"][key] = {"dtype": dtype_name(t), "shape": list(t.shape), "offsets": list(offsets), "sha256": digest}
    return record


def _sha256(view) -> str:
    return hashlib.sha256(view).hexdigest()


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Where one stored chunk is: DCP's storage info for the reader."""

    file: str
    key: str


def writer(directory: Path):
    """A DCP storage writer for ``directory``: each rank one file ``rank-NNNNN.safetensors``;
    on the coordinator, ``.records`` then holds every rank's file record."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.storage import WriteResult
    from torch.futures import Future

    class Writer(HuggingFaceStorageWriter):
        def __init__(self):
            super().__init__(str(directory), save_distributed=True)
            self.records: dict[str, dict] = {}

        def prepare_global_plan(self, plans):
            return [dataclasses.replace(plan, storage_data={"file": file_name(rank)}) for rank, plan in enumerate(plans)]

        def write_data(self, plan, planner):
            results, chosen = [], []
            for item in plan.items:
                t = planner.resolve_data(item).detach().cpu()
                chosen.append((item.index.fqn, t, list(item.tensor_data.chunk.offsets)))
            name = plan.storage_data["file"]
            record = None
            if chosen:
                record = write_file(directory / name, chosen)
            for item in plan.items:
                results.append(WriteResult(index=item.index, size_in_bytes=0, storage_data=(name, record)))
            future: Future = Future()
            future.set_result(results)
            return future

        def finish(self, metadata, results):
            for per_rank in results:
                for result in per_rank:
                    name, record = result.storage_data
                    if record is not None:
                        self.records[name] = record

    return Writer()


def check_listing(directory: Path, files) -> dict:
    """The manifest's file records, checked for shape: safe names, sizes, hashes, chunks.
    Returns {key: [(file, record of that chunk)]} over every file."""
    if not isinstance(files, dict) or not files:
        raise CheckpointCorruptError(f"{directory}/manifest.json lists no tensor files")
    chunks: dict[str, list] = {}
    for name, rec in files.items():
        check_file_name(directory, name)
        ok = isinstance(rec, dict) and all(_ints([rec.get(k)]) for k in ("bytes", "header_bytes"))
        ok = ok and isinstance(rec.get("header_sha256"), str) and isinstance(rec.get("tensors"), dict)
        if not ok or not 8 <= rec["header_bytes"] <= min(rec["bytes"], HEADER_LIMIT):
            raise CheckpointCorruptError(f"{directory}/manifest.json: the record of {name} is malformed")
        for key, c in rec["tensors"].items():
            if not (isinstance(c, dict) and isinstance(c.get("sha256"), str) and isinstance(c.get("dtype"), str)
                    and _ints(c.get("shape")) and _ints(c.get("offsets")) and len(c["shape"]) == len(c["offsets"])):
                raise CheckpointCorruptError(f"{directory}/manifest.json: chunk {key} of {name} is malformed")
            chunks.setdefault(key, []).append((name, c))
    return chunks


def _ints(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)


def check_coverage(directory: Path, chunks: dict, shapes: dict) -> None:
    """Every tensor ``shapes`` names ({key: (shape, dtype)}) is covered exactly by its chunks:
    each inside the tensor, no two overlapping, and as many elements in them as the tensor has
    (a rank's file left out shows as too few). Together that leaves no element unread, which
    would otherwise load as whatever the new memory held."""
    for key, (shape, dtype) in shapes.items():
        pieces = chunks.get(key)
        if not pieces:
            raise CheckpointCorruptError(f"{directory}: no stored chunk holds {key} (a rank's file is missing from the checkpoint)")
        total = 0
        for name, c in pieces:
            if c["dtype"] != dtype or len(c["shape"]) != len(shape) or any(o + s > n for o, s, n in zip(c["offsets"], c["shape"], shape)):
                raise CheckpointCorruptError(
                    f"{directory}/{name}: chunk {key} {c['shape']} at {c['offsets']} does not fit {list(shape)} {dtype}"
                )
            total += math.prod(c["shape"])
        for i, (name_a, a) in enumerate(pieces):
            for name_b, b in pieces[i + 1:]:
                spans = zip(a["offsets"], a["shape"], b["offsets"], b["shape"])
                if all(max(oa, ob) < min(oa + sa, ob + sb) for oa, sa, ob, sb in spans):
                    raise CheckpointCorruptError(f"{directory}: chunks of {key} in {name_a} and {name_b} overlap")
        if total != math.prod(shape):
            written = sorted({name for name, _ in pieces})
            raise CheckpointCorruptError(
                f"{directory}: the chunks of {key} cover {total} of its {math.prod(shape)} elements (in {', '.join(written)}): "
                "the checkpoint lacks part of a sharded tensor and cannot be resharded"
            )
    unknown = sorted(set(chunks) - set(shapes))
    if unknown:
        raise CheckpointCorruptError(f"{directory}: stored chunks {unknown[:5]} are not in the manifest's listing")


class OpenFile:
    """One shard file, opened only after its size and header hash match the manifest."""

    def __init__(self, directory: Path, name: str, rec: dict):
        from safetensors import safe_open

        path = directory / name
        check_file(path, rec["bytes"])
        with open(path, "rb") as fh:
            head = fh.read(rec["header_bytes"])
        claimed = 8 + struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else -1
        if claimed != rec["header_bytes"] or hashlib.sha256(head).hexdigest() != rec["header_sha256"]:
            raise CheckpointCorruptError(f"{path}: its safetensors header does not match the manifest: the file was altered or damaged")
        self.path, self.rec, self._verified = path, rec, {}
        try:
            self.handle = safe_open(str(path), framework="pt")
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError
            raise CheckpointCorruptError(f"{path} is not a valid safetensors file ({exc}); it is never unpickled") from None

    def chunk(self, key: str):
        """The whole stored chunk ``key``, after its SHA-256 matched the manifest."""
        if key not in self._verified:
            want = self.rec["tensors"].get(key)
            try:
                t = self.handle.get_tensor(key)
            except Exception as exc:  # noqa: BLE001
                raise CheckpointCorruptError(f"{self.path}: cannot read {key} ({exc})") from None
            if want is None or dtype_name(t) != want["dtype"] or list(t.shape) != want["shape"]:
                raise CheckpointCorruptError(f"{self.path}: {key} is not what the manifest lists")
            if _sha256(_raw(t.contiguous())) != want["sha256"]:
                raise CheckpointCorruptError(f"{self.path}: {key} does not match its SHA-256 in the manifest: the file was altered")
            self._verified[key] = t
        return self._verified[key]


def reader(directory: Path, files: dict, shapes: dict):
    """A DCP storage reader over the chunks the manifest lists (``shapes``: {key: (shape, dtype
    name)} of the whole tensors)."""
    import torch
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        StorageMeta,
        TensorProperties,
        TensorStorageMetadata,
    )
    from torch.futures import Future

    chunks = check_listing(directory, files)
    check_coverage(directory, chunks, shapes)

    class Reader(HuggingFaceStorageReader):
        def __init__(self):
            super().__init__(str(directory))
            self.opened: dict[str, OpenFile] = {}

        def read_metadata(self):
            state, storage = {}, {}
            for key, (shape, dtype) in shapes.items():
                pieces = chunks[key]
                state[key] = TensorStorageMetadata(
                    properties=TensorProperties(dtype=getattr(torch, dtype)),
                    size=torch.Size(shape),
                    chunks=[ChunkStorageMetadata(offsets=torch.Size(c["offsets"]), sizes=torch.Size(c["shape"])) for _, c in pieces],
                )
                for name, c in pieces:
                    storage[MetadataIndex(fqn=key, offset=torch.Size(c["offsets"]))] = Chunk(name, key)
            metadata = Metadata(state_dict_metadata=state, storage_data=storage)
            metadata.storage_meta = StorageMeta()
            return metadata

        def read_data(self, plan, planner):
            for req in plan.items:
                where = self.storage_data[req.storage_index]
                if where.file not in self.opened:
                    self.opened[where.file] = OpenFile(directory, where.file, files[where.file])
                whole = self.opened[where.file].chunk(where.key)
                piece = whole[tuple(slice(o, o + n) for o, n in zip(req.storage_offsets, req.lengths))]
                target = planner.resolve_tensor(req).detach()
                target.copy_(piece)
                planner.commit_tensor(req, target)
            future: Future = Future()
            future.set_result(None)
            return future

    return Reader()


def unwrap(exc: BaseException) -> BaseException:
    """DCP reports a rank's failure as a CheckpointException holding every rank's exception:
    the first of ours (a CheckpointError) is what the user is told about."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = [pair[0] for _, pair in sorted(failures.items()) if isinstance(pair, tuple) and pair]
        ours = [e for e in inner if isinstance(e, CheckpointError)]
        if ours:
            return ours[0]
        if inner:
            first = inner[0]
            return first if isinstance(first, OSError) else CheckpointError(f"{type(first).__name__}: {first}")
    return exc


def verify_all(directory: Path, files: dict, shapes: dict) -> None:
    """Every chunk of every file hashed and compared (``ac.verify``: the whole checkpoint)."""
    chunks = check_listing(directory, files)
    check_coverage(directory, chunks, shapes)
    for name, rec in files.items():
        f = OpenFile(directory, name, rec)
        listed = set(rec["tensors"])
        stored = set(f.handle.keys())
        if stored != listed:
            raise CheckpointCorruptError(f"{directory / name} holds {sorted(stored ^ listed)[:5]} the manifest does not list")
        for key in sorted(listed):
            f.chunk(key)
