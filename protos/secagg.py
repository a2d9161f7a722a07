"""Secure aggregation (Bonawitz et al. 2017, SecAgg+ of Bell et al. 2020): shared maths + messages.

Used by both `coordinator.secagg_server` and `edge_runtime.secagg_client`. Primitives come from
maintained libraries: X25519 key agreement, HKDF-SHA256, AES-256-GCM and the ChaCha20 keystream
from `cryptography`; Shamir secret sharing over GF(2^128) from `pycryptodome` (16-byte secrets, so
every 32-byte secret is shared as two halves with the same share index).

Arithmetic: float vectors are clipped to [-clip, clip], encoded as round(x * 2^scale_bits) and
added modulo 2^32 (numpy uint32 wrap-around). `make_params` checks that the sum over every device
cannot leave the signed 32-bit range, so the unmasked sum decodes exactly (two's complement).
Masks are ChaCha20 keystreams (a cryptographic PRG) keyed by a 32-byte seed, read as uint32.
"""
from __future__ import annotations

import dataclasses
import json
import math
import secrets
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MOD_BITS = 32
SEED_BYTES = 32
SHARE_BYTES = 32  # two 16-byte Shamir shares (one per half of a 32-byte secret)
DEFAULT_CLIP = 8.0


class SecAggError(RuntimeError):
    """A protocol check failed (tampered ciphertext, inconsistent message, misuse)."""


class SecAggAbort(SecAggError):
    """Too few devices are left to finish the round: abort it and start a new one."""


# ----------------------------------------------------------------------------- wire codec
_MAGIC = b"SAW2"  # secagg wire: magic, 4-byte big-endian header length, JSON header, raw blobs


def _enc(value: object, blobs: list[bytes]) -> object:
    """JSON-able form of `value`; bytes go to `blobs` (raw, not base64) as {"$b": index}."""
    if isinstance(value, bytes):
        blobs.append(value)
        return {"$b": len(blobs) - 1}
    if dataclasses.is_dataclass(value):
        return {f.name: _enc(getattr(value, f.name), blobs) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_enc(v, blobs) for v in value]
    if isinstance(value, dict):
        return {str(k): _enc(v, blobs) for k, v in value.items()}
    return value


def _dec(ann: object, value: object, blobs: Sequence[bytes]) -> object:
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        return _dec(next(a for a in args if a is not type(None)), value, blobs)
    if ann is bytes:
        if not (isinstance(value, dict) and isinstance(value.get("$b"), int) and 0 <= value["$b"] < len(blobs)):
            raise ValueError(f"bytes field refers to no blob: {str(value)[:40]}")
        return blobs[value["$b"]]
    if ann in (int, float, str, bool):
        return ann(value)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_dec(args[0], v, blobs) for v in value)
        if len(args) != len(value):
            raise ValueError(f"expected {len(args)} items, got {len(value)}")
        return tuple(_dec(a, v, blobs) for a, v in zip(args, value))
    if origin in (dict, Mapping):
        return {str(k): _dec(args[1], v, blobs) for k, v in value.items()}
    if dataclasses.is_dataclass(ann):
        hints = typing.get_type_hints(ann)
        return ann(**{f.name: _dec(hints[f.name], value[f.name], blobs) for f in dataclasses.fields(ann)})
    raise TypeError(f"cannot decode a value annotated {ann!r}")


class Wire:
    """Mixin: `to_bytes()` / `from_bytes()` for gRPC `bytes` fields: a tagged JSON header and the
    message's bytes fields appended raw (a masked vector costs 4 bytes per value on the wire)."""

    def to_bytes(self) -> bytes:
        blobs: list[bytes] = []
        body = _enc(self, blobs)
        header = json.dumps({"type": type(self).__name__, "body": body, "blobs": [len(b) for b in blobs]},
                            separators=(",", ":")).encode()
        return b"".join([_MAGIC, len(header).to_bytes(4, "big"), header, *blobs])

    @classmethod
    def from_bytes(cls, data: bytes):
        name = cls.__name__
        if len(data) < 8 or data[:4] != _MAGIC:
            raise ValueError(f"not a serialised {name}: missing the {_MAGIC!r} header")
        n = int.from_bytes(data[4:8], "big")
        try:
            doc = json.loads(data[8:8 + n])
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"not a serialised {name}: {e}") from e
        if not isinstance(doc, dict) or doc.get("type") != name:
            raise ValueError(f"expected a serialised {name}, got type {doc.get('type') if isinstance(doc, dict) else '?'!r}")
        sizes = doc.get("blobs", [])
        if not (isinstance(sizes, list) and all(isinstance(k, int) and k >= 0 for k in sizes)) \
                or 8 + n + sum(sizes) != len(data):
            raise ValueError(f"malformed {name}: blob sizes do not match the message length (truncated?)")
        blobs, off = [], 8 + n
        for k in sizes:
            blobs.append(bytes(data[off:off + k]))
            off += k
        try:
            return _dec(cls, doc["body"], blobs)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed {name}: {e}") from e


# ----------------------------------------------------------------------------- messages
@dataclass(frozen=True)
class SecAggParams(Wire):
    """Round parameters, coordinator -> devices before any key is made (see `make_params`)."""

    round_id: int
    device_ids: tuple[str, ...]  # selected devices, sorted
    threshold: int  # t: shares needed to rebuild a secret; also the minimum number of survivors
    vector_len: int  # length of every device's input vector
    clip: float  # inputs are clipped to [-clip, clip]
    scale_bits: int  # fixed-point scale 2^scale_bits
    neighbours: int | None = None  # SecAgg+: k neighbours per device (even); None = complete graph
    graph_seed: int = 0  # public seed of the SecAgg+ neighbour graph

    def __post_init__(self) -> None:
        n = len(self.device_ids)
        if n < 2 or len(set(self.device_ids)) != n:
            raise ValueError(f"secure aggregation needs >= 2 distinct device ids, got {list(self.device_ids)[:5]}")
        if any(not isinstance(d, str) or not d for d in self.device_ids):
            raise ValueError("device ids must be non-empty strings")
        if self.vector_len < 1:
            raise ValueError(f"vector_len must be >= 1, got {self.vector_len}")
        if self.neighbours is not None and (self.neighbours < 2 or self.neighbours % 2):
            raise ValueError(f"neighbours must be an even number >= 2 (SecAgg+ ring graph), got {self.neighbours}")
        holders = n if self.neighbours is None else min(n, self.neighbours + 1)
        if not 2 <= self.threshold <= holders:
            raise ValueError(f"threshold must be in [2, {holders}] (shares are held by {holders} devices per "
                             f"secret), got {self.threshold}; a threshold of 1 would let one share reveal a secret")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip must be a finite positive number, got {self.clip}")
        if n * (self.clip * 2.0 ** self.scale_bits + 1) > 2 ** (MOD_BITS - 1) - 1:
            raise ValueError(f"fixed-point overflow: {n} devices x clip {self.clip} x 2^{self.scale_bits} exceeds the "
                             f"signed {MOD_BITS}-bit range; lower scale_bits or clip (max scale_bits is "
                             f"{max_scale_bits(n, self.clip)})")


@dataclass(frozen=True)
class AdvertiseKeys(Wire):
    """Device -> coordinator: two X25519 public keys (raw 32 bytes): share encryption and mask agreement."""

    round_id: int
    device_id: str
    enc_pk: bytes
    mask_pk: bytes


@dataclass(frozen=True)
class KeyDirectory(Wire):
    """Coordinator -> devices: the public keys of U1 (devices that advertised in time)."""

    round_id: int
    keys: tuple[AdvertiseKeys, ...]


@dataclass(frozen=True)
class EncryptedShare(Wire):
    """AES-GCM ciphertext of (share index, mask-key share, self-mask-seed share) from sender to recipient."""

    sender: str
    recipient: str
    nonce: bytes
    ciphertext: bytes


@dataclass(frozen=True)
class ShareKeys(Wire):
    """Device -> coordinator: its encrypted shares, one per holder (its neighbours)."""

    round_id: int
    device_id: str
    shares: tuple[EncryptedShare, ...]


@dataclass(frozen=True)
class RoutedShares(Wire):
    """Coordinator -> one device: U2 (devices whose shares arrived) and the ciphertexts addressed to it."""

    round_id: int
    recipient: str
    u2: tuple[str, ...]
    shares: tuple[EncryptedShare, ...]


@dataclass(frozen=True)
class MaskedInput(Wire):
    """Device -> coordinator: y = x + PRG(b) + sum of signed pairwise masks, uint32 little-endian bytes."""

    round_id: int
    device_id: str
    vector: bytes


@dataclass(frozen=True)
class UnmaskRequest(Wire):
    """Coordinator -> devices: U3, the devices whose masked inputs are in the sum."""

    round_id: int
    survivors: tuple[str, ...]


@dataclass(frozen=True)
class UnmaskShares(Wire):
    """Device -> coordinator: shares of b_u for u in U3 and of the mask key of u in U2 \\ U3 (never both)."""

    round_id: int
    device_id: str
    self_mask_shares: dict[str, tuple[int, bytes]]
    key_shares: dict[str, tuple[int, bytes]]


# ----------------------------------------------------------------------------- parameters, graph
def max_scale_bits(n_devices: int, clip: float) -> int:
    """Largest fixed-point scale so that n_devices * (clip * 2^s + 1) stays below 2^31."""
    s = int(math.floor(MOD_BITS - 1 - math.log2(n_devices * clip)))
    while s > 0 and n_devices * (clip * 2.0 ** s + 1) > 2 ** (MOD_BITS - 1) - 1:
        s -= 1
    if s < 1:
        raise ValueError(f"{n_devices} devices with clip {clip} leave no fixed-point precision in {MOD_BITS} bits; "
                         f"lower the clip range")
    return s


def make_params(device_ids: Iterable[str], threshold: int, vector_len: int, *, round_id: int = 0,
                clip: float = DEFAULT_CLIP, scale_bits: int | None = None, neighbours: int | None = None,
                graph_seed: int | None = None) -> SecAggParams:
    """Validated round parameters; scale_bits defaults to the most precision that cannot overflow."""
    ids = tuple(sorted(str(d) for d in device_ids))
    bits = max_scale_bits(max(len(ids), 1), clip) if scale_bits is None else int(scale_bits)
    if neighbours is not None and neighbours >= len(ids) - 1:
        neighbours = None  # k >= n-1 is the complete graph
    seed = secrets.randbits(31) if graph_seed is None else int(graph_seed)
    return SecAggParams(round_id=int(round_id), device_ids=ids, threshold=int(threshold), vector_len=int(vector_len),
                        clip=float(clip), scale_bits=bits, neighbours=neighbours, graph_seed=seed)


def neighbour_graph(ids: Sequence[str], neighbours: int | None, seed: int) -> dict[str, frozenset[str]]:
    """Symmetric graph over `ids` (device -> its neighbours, itself excluded).

    None: complete graph (SecAgg). k: SecAgg+ Harary-style ring over a seeded public permutation,
    each device linked to the k/2 nearest positions on either side.
    """
    ids = sorted(ids)
    n = len(ids)
    if neighbours is None or neighbours >= n - 1:
        return {d: frozenset(x for x in ids if x != d) for d in ids}
    order = [ids[i] for i in np.random.default_rng(seed).permutation(n)]
    graph: dict[str, set[str]] = {d: set() for d in ids}
    for i, d in enumerate(order):
        for step in range(1, neighbours // 2 + 1):
            other = order[(i + step) % n]
            graph[d].add(other)
            graph[other].add(d)
    return {d: frozenset(v) for d, v in graph.items()}


# ----------------------------------------------------------------------------- fixed point, PRG
def encode_fixed(x: np.ndarray, clip: float, scale_bits: int) -> tuple[np.ndarray, int]:
    """(n,) floats -> ((n,) uint32 residues of round(clip(x) * 2^s), number of clipped entries)."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"input vector has {int(np.sum(~np.isfinite(x)))} non-finite entries; fix the update first")
    clipped = int(np.sum(np.abs(x) > clip))
    q = np.rint(np.clip(x, -clip, clip) * 2.0 ** scale_bits).astype(np.int64)
    return (q & 0xFFFFFFFF).astype(np.uint32), clipped


def decode_fixed(v: np.ndarray, scale_bits: int) -> np.ndarray:
    """(n,) uint32 residues -> (n,) float64, reading them as signed 32-bit (two's complement)."""
    return np.asarray(v, dtype=np.uint32).view(np.int32).astype(np.float64) / 2.0 ** scale_bits


def prg(seed: bytes, length: int) -> np.ndarray:
    """(length,) uint32 mask: the ChaCha20 keystream keyed by a 32-byte seed."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"PRG seed must be {SEED_BYTES} bytes, got {len(seed)}")
    enc = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor()
    return np.frombuffer(enc.update(bytes(4 * length)), dtype="<u4").astype(np.uint32)


def vector_to_bytes(v: np.ndarray) -> bytes:
    return np.asarray(v, dtype="<u4").tobytes()


def vector_from_bytes(data: bytes, length: int) -> np.ndarray:
    if len(data) != 4 * length:
        raise ValueError(f"masked vector has {len(data)} bytes, expected {4 * length} ({length} uint32 values)")
    return np.frombuffer(data, dtype="<u4").astype(np.uint32)


# ----------------------------------------------------------------------------- key agreement, encryption
def _hkdf(shared: bytes, label: str, round_id: int, a: str, b: str) -> bytes:
    info = json.dumps([label, int(round_id), *sorted((a, b))]).encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def pair_seed(own_sk: X25519PrivateKey, peer_pk: bytes, round_id: int, own_id: str, peer_id: str) -> bytes:
    """32-byte pairwise mask seed s_uv = HKDF(X25519(sk_u, pk_v)); symmetric in (u, v)."""
    return _hkdf(own_sk.exchange(X25519PublicKey.from_public_bytes(peer_pk)), "secagg/mask", round_id, own_id, peer_id)


def pair_mask_sign(own_id: str, peer_id: str) -> int:
    """+1 if own_id < peer_id else -1, so the masks of a pair cancel in the sum."""
    return 1 if own_id < peer_id else -1


def _aad(round_id: int, sender: str, recipient: str) -> bytes:
    return json.dumps(["secagg/share", int(round_id), sender, recipient]).encode()


def encrypt_share(own_sk: X25519PrivateKey, peer_pk: bytes, round_id: int, sender: str, recipient: str,
                  plaintext: bytes) -> EncryptedShare:
    """AES-256-GCM under HKDF(X25519(enc_sk_sender, enc_pk_recipient)); AAD binds round, sender, recipient."""
    key = _hkdf(own_sk.exchange(X25519PublicKey.from_public_bytes(peer_pk)), "secagg/enc", round_id, sender, recipient)
    nonce = secrets.token_bytes(12)
    ct = AESGCM(key).encrypt(nonce, plaintext, _aad(round_id, sender, recipient))
    return EncryptedShare(sender=sender, recipient=recipient, nonce=nonce, ciphertext=ct)


def decrypt_share(own_sk: X25519PrivateKey, peer_pk: bytes, round_id: int, share: EncryptedShare) -> bytes:
    """Inverse of `encrypt_share`; raises SecAggError if the ciphertext or its routing was tampered with."""
    key = _hkdf(own_sk.exchange(X25519PublicKey.from_public_bytes(peer_pk)), "secagg/enc", round_id,
                share.sender, share.recipient)
    try:
        return AESGCM(key).decrypt(share.nonce, share.ciphertext, _aad(round_id, share.sender, share.recipient))
    except (InvalidTag, ValueError) as e:
        raise SecAggError(f"share from {share.sender!r} to {share.recipient!r} failed authentication "
                          f"(tampered or mis-routed ciphertext); abort the round") from e


# ----------------------------------------------------------------------------- Shamir t-of-n
def split_secret(secret: bytes, threshold: int, n: int) -> dict[int, bytes]:
    """32-byte secret -> {index 1..n: 32-byte share}; any `threshold` shares rebuild it."""
    if len(secret) != 32:
        raise ValueError(f"secret must be 32 bytes, got {len(secret)}")
    lo, hi = Shamir.split(threshold, n, secret[:16]), Shamir.split(threshold, n, secret[16:])
    return {i: a + b for (i, a), (j, b) in zip(lo, hi)}


def combine_secret(shares: Sequence[tuple[int, bytes]], threshold: int) -> bytes:
    """Rebuild a 32-byte secret from >= threshold (index, 32-byte share) pairs (exactly t are used)."""
    if len(shares) < threshold:
        raise SecAggAbort(f"only {len(shares)} shares of a secret, {threshold} needed")
    used = sorted(shares)[:threshold]
    if any(len(s) != SHARE_BYTES for _, s in used):
        raise SecAggError(f"a share is not {SHARE_BYTES} bytes long")
    lo = Shamir.combine([(i, s[:16]) for i, s in used])
    hi = Shamir.combine([(i, s[16:]) for i, s in used])
    return lo + hi


def pack_share_plaintext(index: int, key_share: bytes, seed_share: bytes) -> bytes:
    """4-byte big-endian index + 32-byte mask-key share + 32-byte self-mask-seed share."""
    return int(index).to_bytes(4, "big") + key_share + seed_share


def unpack_share_plaintext(data: bytes) -> tuple[int, bytes, bytes]:
    if len(data) != 4 + 2 * SHARE_BYTES:
        raise SecAggError(f"decrypted share has {len(data)} bytes, expected {4 + 2 * SHARE_BYTES}")
    return int.from_bytes(data[:4], "big"), data[4:4 + SHARE_BYTES], data[4 + SHARE_BYTES:]


def share_index(u1: Sequence[str], device_id: str) -> int:
    """Shamir x-coordinate of a holder: 1 + its position in sorted U1."""
    return 1 + sorted(u1).index(device_id)
