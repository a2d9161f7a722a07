"""Device side of secure aggregation: one `SecAggClient` per device per round (fresh keys each round).

Steps mirror `coordinator.secagg_server.SecAggServer`:
    adv = c.advertise_keys(params)        # SecAggParams -> AdvertiseKeys
    sk  = c.share_keys(directory)         # KeyDirectory -> ShareKeys (encrypted Shamir shares)
    mi  = c.masked_input(routed, vector)  # RoutedShares + (vector_len,) floats -> MaskedInput
    us  = c.unmask(request)               # UnmaskRequest -> UnmaskShares
Every step checks what the coordinator sent (round, membership, thresholds) and raises
SecAggError / SecAggAbort instead of revealing anything that could unmask an individual input.
"""
from __future__ import annotations

import secrets

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from protos.secagg import (SEED_BYTES, AdvertiseKeys, KeyDirectory, MaskedInput, RoutedShares, SecAggAbort,
                           SecAggError, SecAggParams, ShareKeys, UnmaskRequest, UnmaskShares, decrypt_share,
                           encode_fixed, encrypt_share, neighbour_graph, pack_share_plaintext, pair_mask_sign,
                           pair_seed, prg, share_index, split_secret, unpack_share_plaintext, vector_to_bytes)


def _raw_pk(sk: X25519PrivateKey) -> bytes:
    return sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


class SecAggClient:
    """One device's protocol state for one round. Secrets never leave it except as Shamir shares."""

    def __init__(self, device_id: str):
        if not isinstance(device_id, str) or not device_id:
            raise ValueError(f"device_id must be a non-empty string, got {device_id!r}")
        self.device_id = device_id
        self._stage = "advertise"
        self.clipped = 0  # entries clipped to [-clip, clip] in the last masked input

    def _expect(self, stage: str, round_id: int) -> None:
        if self._stage != stage:
            raise SecAggError(f"device {self.device_id}: step {stage!r} called while at {self._stage!r}; "
                              f"use one SecAggClient per round and call the steps in order")
        if stage != "advertise" and round_id != self.params.round_id:
            raise SecAggError(f"device {self.device_id}: message for round {round_id}, this client is in round "
                              f"{self.params.round_id}")

    def advertise_keys(self, params: SecAggParams) -> AdvertiseKeys:
        """Make the round's two X25519 key pairs and the self-mask seed b; publish the public keys."""
        self._expect("advertise", params.round_id)
        if self.device_id not in params.device_ids:
            raise SecAggError(f"device {self.device_id} is not among the round's selected devices")
        self.params = params
        self._enc_sk, self._mask_sk = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        self._b = secrets.token_bytes(SEED_BYTES)
        self._adv = AdvertiseKeys(round_id=params.round_id, device_id=self.device_id,
                                  enc_pk=_raw_pk(self._enc_sk), mask_pk=_raw_pk(self._mask_sk))
        self._stage = "share_keys"
        return self._adv

    def share_keys(self, directory: KeyDirectory) -> ShareKeys:
        """t-of-n share the mask key and b among this device's neighbours in U1; encrypt each share to its holder."""
        self._expect("share_keys", directory.round_id)
        p = self.params
        keys = {k.device_id: k for k in directory.keys}
        if len(keys) != len(directory.keys) or not set(keys) <= set(p.device_ids):
            raise SecAggError("key directory has duplicate or unselected devices")
        if keys.get(self.device_id) != self._adv:
            raise SecAggError(f"key directory does not carry device {self.device_id}'s own public keys unchanged")
        pks = [k.enc_pk for k in keys.values()] + [k.mask_pk for k in keys.values()]
        if len(set(pks)) != len(pks):
            raise SecAggError("key directory repeats a public key")
        if len(keys) < p.threshold:
            raise SecAggAbort(f"only {len(keys)} devices advertised keys, threshold is {p.threshold}")
        self._keys, self._u1 = keys, sorted(keys)
        self._graph = neighbour_graph(self._u1, p.neighbours, p.graph_seed)
        holders = sorted(self._graph[self.device_id] | {self.device_id})
        if len(holders) < p.threshold:
            raise SecAggAbort(f"device {self.device_id} has {len(holders) - 1} neighbours in U1; "
                              f"{p.threshold - 1} needed for threshold {p.threshold}")
        n = len(self._u1)
        mask_sk_raw = self._mask_sk.private_bytes_raw()
        key_sh, seed_sh = split_secret(mask_sk_raw, p.threshold, n), split_secret(self._b, p.threshold, n)
        own = share_index(self._u1, self.device_id)
        self._held: dict[str, tuple[int, bytes, bytes]] = {self.device_id: (own, key_sh[own], seed_sh[own])}
        out = []
        for v in holders:
            if v == self.device_id:
                continue
            i = share_index(self._u1, v)
            out.append(encrypt_share(self._enc_sk, keys[v].enc_pk, p.round_id, self.device_id, v,
                                     pack_share_plaintext(i, key_sh[i], seed_sh[i])))
        self._stage = "masked_input"
        return ShareKeys(round_id=p.round_id, device_id=self.device_id, shares=tuple(out))

    def masked_input(self, routed: RoutedShares, vector: np.ndarray) -> MaskedInput:
        """Decrypt the shares held for others, then send y = enc(x) + PRG(b) + sum_v sign(u,v) PRG(s_uv) mod 2^32.

        vector: (vector_len,) float array, already weighted (see protos.secagg_payload).
        """
        self._expect("masked_input", routed.round_id)
        p = self.params
        if routed.recipient != self.device_id:
            raise SecAggError(f"routed shares are addressed to {routed.recipient!r}, not {self.device_id!r}")
        u2 = set(routed.u2)
        if not u2 <= set(self._u1) or self.device_id not in u2:
            raise SecAggError("U2 is not a subset of U1 containing this device")
        if len(u2) < p.threshold:
            raise SecAggAbort(f"only {len(u2)} devices shared keys, threshold is {p.threshold}")
        peers = (self._graph[self.device_id] & u2)
        if len(peers) + 1 < p.threshold:
            raise SecAggAbort(f"device {self.device_id} has {len(peers)} neighbours left in U2; "
                              f"{p.threshold - 1} needed")
        senders = [s.sender for s in routed.shares]
        if sorted(senders) != sorted(peers) or any(s.recipient != self.device_id for s in routed.shares):
            raise SecAggError(f"routed shares come from {sorted(senders)[:5]}, expected this device's neighbours "
                              f"in U2 {sorted(peers)[:5]}")
        own = share_index(self._u1, self.device_id)
        for s in routed.shares:
            idx, key_share, seed_share = unpack_share_plaintext(
                decrypt_share(self._enc_sk, self._keys[s.sender].enc_pk, p.round_id, s))
            if idx != own:
                raise SecAggError(f"share from {s.sender!r} has index {idx}, expected {own}")
            self._held[s.sender] = (idx, key_share, seed_share)
        x = np.asarray(vector, dtype=np.float64).reshape(-1)
        if x.shape[0] != p.vector_len:
            raise ValueError(f"input vector has {x.shape[0]} entries, the round expects {p.vector_len}")
        y, self.clipped = encode_fixed(x, p.clip, p.scale_bits)
        y = y + prg(self._b, p.vector_len)  # uint32 wrap-around = mod 2^32
        for v in sorted(peers):
            mask = prg(pair_seed(self._mask_sk, self._keys[v].mask_pk, p.round_id, self.device_id, v), p.vector_len)
            y = y + mask if pair_mask_sign(self.device_id, v) > 0 else y - mask
        self._u2 = u2
        self._stage = "unmask"
        return MaskedInput(round_id=p.round_id, device_id=self.device_id, vector=vector_to_bytes(y))

    def unmask(self, request: UnmaskRequest) -> UnmaskShares:
        """For each neighbour u in U2 (and itself): the b_u share if u is in U3, else the mask-key share."""
        self._expect("unmask", request.round_id)
        p = self.params
        u3 = set(request.survivors)
        if not u3 <= self._u2 or self.device_id not in u3:
            raise SecAggError("U3 must be a subset of U2 that contains this device")
        if len(u3) < p.threshold:
            raise SecAggAbort(f"only {len(u3)} masked inputs arrived, threshold is {p.threshold}; "
                              f"refusing to help unmask so few inputs")
        seeds, keys = {}, {}
        for u in sorted((self._graph[self.device_id] & self._u2) | {self.device_id}):
            idx, key_share, seed_share = self._held[u]
            if u in u3:
                seeds[u] = (idx, seed_share)
            else:
                keys[u] = (idx, key_share)
        self._stage = "done"
        return UnmaskShares(round_id=p.round_id, device_id=self.device_id, self_mask_shares=seeds, key_shares=keys)
