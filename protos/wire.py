"""Wire helpers shared by device and coordinator: tensors <-> safetensors bytes, upload
precision (fp32/fp16/bf16/int8 with per-row scales), chunking, checksums, size caps and a
bandwidth-shaping hook.

A blob is a safetensors file. Its string metadata always has `format=edgefed`, `precision`
and whatever the caller adds (lora_alpha, use_rslora, rank, ...). In int8 blobs every
floating tensor `k` is stored as int8 `k` plus a float32 `k.__scale`, one scale per channel
(per row, or per column when a matrix has fewer columns, e.g. B (out, r)): x ~= q * scale
(symmetric, scale = max|channel| / 127). On the wire tensors are packed into one flat
tensor per dtype with a front-coded name index in the metadata (see `encode_tensors`).
"""
from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from . import federation_pb2 as pb

if TYPE_CHECKING:  # torch / safetensors load on the first tensor call: chunking and shaping stay torch-free
    import torch

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
CHUNK_SIZE = 1 << 20  # 1 MiB
MAX_BLOB_BYTES = 512 << 20  # default cap on one upload / download
SCALE_SUFFIX = ".__scale"

Throttle = Callable[[int], None]  # called with the byte count before each chunk is sent / after it is received


class WireError(ValueError):
    """A blob or stream is malformed (bad checksum, bad metadata, oversize, ...)."""


class BlobTooLarge(WireError):
    """The blob exceeds the size cap."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_size(n: int, cap: int = MAX_BLOB_BYTES, what: str = "blob") -> None:
    if n > cap:
        raise BlobTooLarge(f"{what} is {n} bytes, over the {cap}-byte cap; lower the rank or upload precision")


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel symmetric int8: one scale per row, or per column when there are fewer columns.

    x (rows, cols) -> q int8 (rows, cols), scale float32 (rows, 1) or (1, cols) (broadcasts);
    1-D / 0-D tensors get a single scale of shape (1,). x ~= q * scale.
    """
    import torch

    x = x.detach().to(torch.float32)
    if x.dim() == 2:
        dim = 1 if x.shape[0] <= x.shape[1] else 0  # reduce over the long axis
        amax = x.abs().amax(dim=dim, keepdim=True) if x.numel() else torch.zeros(1, 1)
    else:
        amax = x.abs().max().reshape(1) if x.numel() else torch.zeros(1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.clamp(torch.round(x / scale), -127, 127).to(torch.int8)
    return q, scale.contiguous()


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_int8: float32 tensor of q's shape."""
    import torch

    return q.to(torch.float32) * scale.to(torch.float32)


def _front_code(names: list[str]) -> list[list]:
    """Sorted names as [shared-prefix length with the previous name, rest] pairs."""
    out, prev = [], ""
    for n in names:
        k = 0
        while k < min(len(n), len(prev)) and n[k] == prev[k]:
            k += 1
        out.append([k, n[k:]])
        prev = n
    return out


def _front_decode(coded: list[list]) -> list[str]:
    out, prev = [], ""
    for k, rest in coded:
        prev = prev[:k] + rest
        out.append(prev)
    return out


@lru_cache(maxsize=1)
def _dtype_tables() -> tuple[dict[str, torch.dtype], dict[torch.dtype, str]]:
    """(upload precision -> float dtype, storage dtype -> pack code)."""
    import torch

    pack = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I8": torch.int8,
            "I64": torch.int64, "I32": torch.int32, "BOOL": torch.bool}
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}, {v: k for k, v in pack.items()}


def _scale_shape(shape: list[int]) -> list[int]:
    """Shape of the int8 scale quantize_int8 produces for a tensor of `shape`."""
    if len(shape) == 2:
        return [shape[0], 1] if shape[0] <= shape[1] else [1, shape[1]]
    return [1]


def encode_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, object] | None = None,
                   precision: str = "fp32", packed: bool = True) -> bytes:
    """name -> tensor to safetensors bytes at `precision`; metadata values are stringified.

    packed=True (the wire format): one flat tensor per storage dtype (`__packed.F32`, ...) and a
    compact index in the metadata `index` = ';'-joined `prefix_len,rest,code,d0xd1` entries
    (names front-coded in sorted order; code Q8 = int8 data in I8 plus its scale in F32),
    which keeps the header to a few hundred bytes.
    packed=False: one safetensors entry per tensor (peft export; int8 adds `<name>.__scale`).
    """
    import torch
    from safetensors.torch import save as st_save

    if precision not in PRECISIONS:
        raise WireError(f"upload precision {precision!r} is unknown; choose one of {PRECISIONS}")
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update(format="edgefed", precision=precision)
    names = sorted(tensors)
    for name in names:
        if name.endswith(SCALE_SUFFIX) or name.startswith("__packed") or (packed and any(c in name for c in ",;")):
            raise WireError(f"tensor name {name!r} uses a reserved name or character ({SCALE_SUFFIX!r}, '__packed', ',', ';')")
    groups: dict[str, list[torch.Tensor]] = {}
    entries: dict[str, torch.Tensor] = {}
    index = []
    for name, (k, rest) in zip(names, _front_code(names)):
        t = tensors[name].detach().cpu()
        shape = "x".join(str(d) for d in t.shape)
        if t.is_floating_point() and precision == "int8":
            q, scale = quantize_int8(t)
            entries[name], entries[name + SCALE_SUFFIX] = q, scale
            groups.setdefault("I8", []).append(q.reshape(-1))
            groups.setdefault("F32", []).append(scale.reshape(-1))
            code = "Q8"
        else:
            dtypes, codes = _dtype_tables()
            t = t.to(dtypes[precision]).contiguous() if t.is_floating_point() else t.contiguous()
            code = codes.get(t.dtype)
            if code is None:
                raise WireError(f"tensor {name!r} has unsupported dtype {t.dtype}")
            entries[name] = t
            groups.setdefault(code, []).append(t.reshape(-1))
        index.append(f"{k},{rest},{code},{shape}")
    if not packed:
        return st_save(entries, metadata=meta)
    meta["index"] = ";".join(index)
    return st_save({f"__packed.{c}": torch.cat(ts) for c, ts in groups.items()}, metadata=meta)


def _unpack(raw: dict[str, torch.Tensor], index: str) -> dict[str, torch.Tensor]:
    rows = [e.split(",") for e in index.split(";")] if index else []
    if any(len(r) != 4 for r in rows):
        raise WireError("packed blob index is malformed")
    names = _front_decode([[int(r[0]), r[1]] for r in rows])
    offsets: dict[str, int] = {}
    out = {}

    def take(code: str, shape: list[int], name: str) -> torch.Tensor:
        buf = raw.get(f"__packed.{code}")
        n, off = math.prod(shape), offsets.get(code, 0)
        if buf is None or off + n > buf.numel():
            raise WireError(f"packed blob is missing data for tensor {name!r} (truncated or corrupted)")
        offsets[code] = off + n
        return buf[off:off + n].reshape(shape)

    for name, (_, _, code, dims) in zip(names, rows):
        shape = [int(d) for d in dims.split("x")] if dims else []
        if code == "Q8":
            out[name] = take("I8", shape, name)
            out[name + SCALE_SUFFIX] = take("F32", _scale_shape(shape), name)
        else:
            out[name] = take(code, shape, name)
    return out


def decode_tensors(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors bytes (packed or not) -> (name -> float32 tensor, metadata). int8 is dequantized."""
    import torch
    from safetensors.torch import load as st_load

    try:
        raw = st_load(bytes(data))
        meta = read_metadata(data)
        if "index" in meta:
            raw = _unpack(raw, meta.pop("index"))
    except WireError:
        raise
    except Exception as e:  # safetensors / json raise their own error types
        raise WireError(f"blob is not a valid safetensors file: {e}") from None
    precision = meta.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise WireError(f"blob metadata precision={precision!r} is unknown; expected one of {PRECISIONS}")
    out: dict[str, torch.Tensor] = {}
    for name, t in raw.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        if precision == "int8" and t.dtype == torch.int8:
            scale = raw.get(name + SCALE_SUFFIX)
            if scale is None:
                raise WireError(f"int8 tensor {name!r} has no {name + SCALE_SUFFIX!r} scale tensor")
            out[name] = dequantize_int8(t, scale)
        elif t.is_floating_point():
            out[name] = t.to(torch.float32)
        else:
            out[name] = t
    return out, meta


def read_metadata(data: bytes) -> dict[str, str]:
    """The safetensors header's __metadata__ without decoding tensors."""
    import struct

    if len(data) < 8:
        raise WireError(f"blob is {len(data)} bytes; too short for a safetensors header")
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    if n > len(data) - 8:
        raise WireError("blob header length exceeds the blob size (truncated upload?)")
    try:
        header = json.loads(bytes(data[8:8 + n]))
    except ValueError as e:
        raise WireError(f"blob header is not JSON: {e}") from None
    return dict(header.get("__metadata__") or {})


def tensor_bytes(tensors: Mapping[str, torch.Tensor], precision: str = "fp32") -> int:
    """Payload bytes of `tensors` at `precision` (int8 includes the per-row scales)."""
    n = 0
    for t in tensors.values():
        if precision == "int8" and t.is_floating_point():
            n += t.numel() + 4 * (min(t.shape) if t.dim() == 2 else 1)
        elif t.is_floating_point():
            n += t.numel() * (4 if precision == "fp32" else 2)
        else:
            n += t.numel() * t.element_size()
    return n


def chunks(data: bytes, chunk_size: int = CHUNK_SIZE, start: int = 0) -> Iterator[tuple[int, bytes]]:
    """(offset, piece) pairs covering data[start:] in pieces of at most chunk_size bytes."""
    if chunk_size < 1:
        raise WireError(f"chunk_size must be >= 1, got {chunk_size}")
    view = memoryview(data)
    for off in range(start, len(data), chunk_size):
        yield off, bytes(view[off:off + chunk_size])


def download_chunks(data: bytes, start: int = 0, chunk_size: int = CHUNK_SIZE,
                    throttle: Throttle | None = None) -> Iterator[pb.Chunk]:
    """Server side of DownloadGlobal: Chunk messages from byte `start`; the first carries sha256."""
    digest, total = sha256_hex(data), len(data)
    if start > total:
        raise WireError(f"download offset {start} is past the end of the {total}-byte blob")
    first = True
    for off, piece in chunks(data, chunk_size, start):
        if throttle:
            throttle(len(piece))
        yield pb.Chunk(offset=off, data=piece, total_size=total, sha256=digest if first else "")
        first = False
    if first:  # empty remainder: still tell the client the size and digest
        yield pb.Chunk(offset=total, data=b"", total_size=total, sha256=digest)


def upload_chunks(header: pb.UploadHeader, data: bytes, start: int = 0, chunk_size: int = CHUNK_SIZE,
                  throttle: Throttle | None = None) -> Iterator[pb.UploadChunk]:
    """Client side of UploadUpdate: the header rides on the first message with the first piece."""
    first = True
    for off, piece in chunks(data, chunk_size, start):
        if throttle:
            throttle(len(piece))
        yield pb.UploadChunk(header=header if first else None, offset=off, data=piece)
        first = False
    if first:
        yield pb.UploadChunk(header=header, offset=len(data), data=b"")


def wire_bytes(messages: Iterable[object]) -> int:
    """Total serialized size of protobuf messages (what goes on the wire, minus HTTP/2 framing)."""
    return sum(m.ByteSize() for m in messages)


@dataclass
class TokenBucket:
    """Bandwidth shaping: `bucket(n)` blocks until n bytes may pass at `rate_bytes_per_s`.

    burst_bytes: how many bytes may pass at once after idling (default: one chunk).
    Thread-safe; pass it as the `throttle` of a client to emulate a slow link.
    """

    rate_bytes_per_s: float
    burst_bytes: int = CHUNK_SIZE
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep

    def __post_init__(self) -> None:
        if not self.rate_bytes_per_s > 0:
            raise ValueError(f"rate_bytes_per_s must be positive, got {self.rate_bytes_per_s}")
        self._tokens = float(self.burst_bytes)
        self._last = self.clock()
        self._lock = threading.Lock()
        self.total_bytes = 0
        self.waited_s = 0.0

    def __call__(self, nbytes: int) -> None:
        with self._lock:
            now = self.clock()
            self._tokens = min(float(max(self.burst_bytes, nbytes)),
                               self._tokens + (now - self._last) * self.rate_bytes_per_s)
            self._last = now
            self._tokens -= nbytes
            wait = -self._tokens / self.rate_bytes_per_s if self._tokens < 0 else 0.0
            self.total_bytes += nbytes
            self.waited_s += wait
        if wait > 0:
            self.sleep(wait)


# -- download layout shared by both sides ---------------------------------------------------------
BASE_DELTA = "base_delta."  # stack: `base_delta.<module>.B` (out, R) / `.A` (R, in), scale folded into B


def split_download(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, tuple]]:
    """(adapter state, module -> (B (out, R), A (R, in)) cumulative base delta) of a decoded download."""
    state = {k: v for k, v in tensors.items() if not k.startswith(BASE_DELTA)}
    delta = {k[len(BASE_DELTA):-2]: (tensors[k], tensors[k[:-2] + ".A"])
             for k in tensors if k.startswith(BASE_DELTA) and k.endswith(".B")}
    return state, delta
