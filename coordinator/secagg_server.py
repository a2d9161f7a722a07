"""Coordinator side of secure aggregation (Bonawitz et al. 2017; SecAgg+ neighbour graph optional).

One `SecAggServer` per round. Each phase collects device messages (`receive_*`) until the caller
closes it (`close_*`, at quorum or deadline); devices missing at a close have dropped out.

    srv = SecAggServer(device_ids, threshold, vector_len)
    srv.params                                   -> send to every device (SecAggParams)
    srv.receive_advertise(AdvertiseKeys);  srv.close_advertise()    -> KeyDirectory (broadcast)
    srv.receive_share_keys(ShareKeys);     srv.close_share_keys()   -> {device: RoutedShares}
    srv.receive_masked_input(MaskedInput); srv.close_masked_input() -> UnmaskRequest (broadcast)
    srv.receive_unmask(UnmaskShares);      srv.finish()             -> SecAggResult (the SUM only)

The server keeps only public keys, ciphertexts it cannot read, the running sum of masked inputs
and the unmasking shares; it never holds an individual device's unmasked input.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protos.secagg import (AdvertiseKeys, KeyDirectory, MaskedInput, RoutedShares, SecAggAbort, SecAggError,
                           SecAggParams, ShareKeys, UnmaskRequest, UnmaskShares,
                           combine_secret, decode_fixed, make_params, neighbour_graph, pair_mask_sign, pair_seed,
                           prg, vector_from_bytes)

__all__ = ["SecAggServer", "SecAggResult"]


@dataclass(frozen=True)
class SecAggResult:
    """The unmasked sum over `survivors` (U3): (vector_len,) float64 (divide by the summed weight outside)."""

    round_id: int
    total: np.ndarray
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]  # selected devices whose masked input is not in the sum


class SecAggServer:
    """Round logic: collects public keys, routes encrypted shares, sums masked inputs, removes the masks."""

    def __init__(self, device_ids: Iterable[str], threshold: int, vector_len: int, *, round_id: int = 0,
                 clip: float = 8.0, scale_bits: int | None = None, neighbours: int | None = None,
                 graph_seed: int | None = None):
        self.params: SecAggParams = make_params(device_ids, threshold, vector_len, round_id=round_id, clip=clip,
                                                scale_bits=scale_bits, neighbours=neighbours, graph_seed=graph_seed)
        self._stage = "advertise"
        self._keys: dict[str, AdvertiseKeys] = {}
        self._outbox: dict[str, dict[str, object]] = {}  # recipient -> sender -> EncryptedShare
        self._shared: set[str] = set()
        self._u2: tuple[str, ...] = ()
        self._masked_sum = np.zeros(self.params.vector_len, dtype=np.uint32)
        self._u3: list[str] = []
        self._unmask: dict[str, UnmaskShares] = {}

    # -- helpers
    def _check(self, stage: str, round_id: int, device_id: str, allowed: Iterable[str]) -> None:
        if self._stage != stage:
            raise SecAggError(f"{stage} message from {device_id!r} arrived while the round is at {self._stage!r}")
        if round_id != self.params.round_id:
            raise SecAggError(f"message from {device_id!r} is for round {round_id}, this is round {self.params.round_id}")
        if device_id not in allowed:
            raise SecAggError(f"device {device_id!r} may not send {stage} now (not selected or dropped earlier)")

    def _need(self, have: int, what: str) -> None:
        if have < self.params.threshold:
            raise SecAggAbort(f"round {self.params.round_id}: only {have} of {len(self.params.device_ids)} devices "
                              f"{what}; the threshold is {self.params.threshold}, so the sum cannot be unmasked. "
                              f"Abort this round and retry with more devices or a lower threshold.")

    # -- phase 0: advertise keys
    def receive_advertise(self, msg: AdvertiseKeys) -> None:
        self._check("advertise", msg.round_id, msg.device_id, self.params.device_ids)
        if msg.device_id in self._keys:
            raise SecAggError(f"device {msg.device_id!r} advertised keys twice")
        if len(msg.enc_pk) != 32 or len(msg.mask_pk) != 32:
            raise SecAggError(f"device {msg.device_id!r} sent public keys that are not 32-byte X25519 keys")
        self._keys[msg.device_id] = msg

    def close_advertise(self) -> KeyDirectory:
        self._need(len(self._keys), "advertised keys")
        self._stage = "share_keys"
        self._graph = neighbour_graph(sorted(self._keys), self.params.neighbours, self.params.graph_seed)
        return KeyDirectory(round_id=self.params.round_id, keys=tuple(self._keys[d] for d in sorted(self._keys)))

    # -- phase 1: share keys
    def receive_share_keys(self, msg: ShareKeys) -> None:
        self._check("share_keys", msg.round_id, msg.device_id, self._keys)
        if msg.device_id in self._shared:
            raise SecAggError(f"device {msg.device_id!r} shared keys twice")
        recipients = [s.recipient for s in msg.shares]
        if sorted(recipients) != sorted(self._graph[msg.device_id]) or any(s.sender != msg.device_id for s in msg.shares):
            raise SecAggError(f"device {msg.device_id!r} must send exactly one share to each of its neighbours")
        for s in msg.shares:
            self._outbox.setdefault(s.recipient, {})[msg.device_id] = s
        self._shared.add(msg.device_id)

    def close_share_keys(self) -> dict[str, RoutedShares]:
        u2 = tuple(sorted(self._shared))
        self._need(len(u2), "shared their keys")
        self._u2, self._stage = u2, "masked_input"
        routed = {v: RoutedShares(round_id=self.params.round_id, recipient=v, u2=u2,
                                  shares=tuple(self._outbox[v][u] for u in sorted(self._outbox.get(v, {})) if u in u2))
                  for v in u2}
        self._outbox = {}  # delivered; nothing left to route
        return routed

    # -- phase 2: masked input
    def receive_masked_input(self, msg: MaskedInput) -> None:
        self._check("masked_input", msg.round_id, msg.device_id, self._u2)
        if msg.device_id in self._u3:
            raise SecAggError(f"device {msg.device_id!r} sent its masked input twice")
        y = vector_from_bytes(msg.vector, self.params.vector_len)
        self._masked_sum = self._masked_sum + y  # only the running sum is kept (mod 2^32)
        self._u3.append(msg.device_id)

    def close_masked_input(self) -> UnmaskRequest:
        self._need(len(self._u3), "sent masked inputs")
        self._stage = "unmask"
        self._u3 = sorted(self._u3)
        return UnmaskRequest(round_id=self.params.round_id, survivors=tuple(self._u3))

    # -- phase 3: unmasking
    def receive_unmask(self, msg: UnmaskShares) -> None:
        self._check("unmask", msg.round_id, msg.device_id, self._u3)
        if msg.device_id in self._unmask:
            raise SecAggError(f"device {msg.device_id!r} sent unmasking shares twice")
        if set(msg.self_mask_shares) & set(msg.key_shares):
            raise SecAggError(f"device {msg.device_id!r} revealed both shares of one device")
        self._unmask[msg.device_id] = msg

    def _shares_of(self, owner: str, which: str) -> list[tuple[int, bytes]]:
        out = []
        for holder, msg in sorted(self._unmask.items()):
            got = getattr(msg, which).get(owner)
            if got is not None:
                out.append(got)
        return out

    def finish(self) -> SecAggResult:
        """Rebuild survivors' b and dropped devices' mask keys from t shares; return the unmasked sum."""
        if self._stage != "unmask":
            raise SecAggError(f"finish() called while the round is at {self._stage!r}")
        self._need(len(self._unmask), "answered the unmasking request")
        p, u3 = self.params, set(self._u3)
        total = self._masked_sum.copy()
        for u in self._u3:
            b = combine_secret(self._need_shares(u, "self_mask_shares"), p.threshold)
            total = total - prg(b, p.vector_len)
        for u in sorted(set(self._u2) - u3):
            sk = X25519PrivateKey.from_private_bytes(combine_secret(self._need_shares(u, "key_shares"), p.threshold))
            for v in sorted(self._graph[u] & u3):
                mask = prg(pair_seed(sk, self._keys[v].mask_pk, p.round_id, u, v), p.vector_len)
                # v added sign(v, u) * PRG(s_vu); remove it
                total = total - mask if pair_mask_sign(v, u) > 0 else total + mask
        self._stage = "done"
        self._masked_sum = np.zeros(0, dtype=np.uint32)
        result = decode_fixed(total, p.scale_bits)
        return SecAggResult(round_id=p.round_id, total=result, survivors=tuple(self._u3),
                            dropped=tuple(d for d in p.device_ids if d not in u3))

    def _need_shares(self, owner: str, which: str) -> list[tuple[int, bytes]]:
        shares = self._shares_of(owner, which)
        if len(shares) < self.params.threshold:
            kind = "self-mask seed" if which == "self_mask_shares" else "mask key"
            raise SecAggAbort(f"round {self.params.round_id}: only {len(shares)} shares of device {owner!r}'s {kind} "
                              f"arrived, {self.params.threshold} needed (too many of its neighbours dropped); "
                              f"abort this round")
        return shares
