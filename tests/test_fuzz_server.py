"""1200 malformed or mutated messages against a live `edge-coordinator serve` subprocess: random
bytes, truncated streams, wrong checksums, huge sizes, NaN/Inf, wrong ranks and dtypes, replays,
bad offsets, bad tokens, raw garbage protobufs. Every one is refused with a status code, the
server keeps serving (a valid upload is accepted afterwards), its RSS stays bounded, and the
refusals are counted per reason in `edge-coordinator status`."""
import json
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from coordinator.cli import main as coordinator_main
from protos import federation_pb2 as pb
from protos import federation_pb2_grpc as pbg
from protos import wire
from test_reliability_support import SimDevice, rss_mb, spawn_serve, tiny_model

C = grpc.StatusCode
N = 1200
CAP = 200_000
OTHERS = {"bad_token", "raw_garbage", "bad_register", "bad_zo", "bad_download"}  # not uploads of the legit device


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    model = tiny_model(tmp)
    proc, port = spawn_serve(["--host", "127.0.0.1", "--port", "0", "--model", str(model), "--store",
                              str(tmp / "store"), "--rounds", "100", "--max-rank", "4", "--insecure",
                              "--keep-serving", "--max-upload-bytes", str(CAP), "--norm-bound", "1000"],
                             tmp / "coordinator.log")
    yield proc, port, tmp
    proc.kill()
    proc.wait()


def _mutations(rng: random.Random, t: pb.Task, state: dict, md: list, stub, channel):
    """(category, allowed status codes, zero-argument call) for one malformed message."""
    good = wire.encode_tensors({k: v * 1.01 for k, v in state.items()})
    uid = f"f{rng.getrandbits(48):x}"

    def header(data, **kw):
        h = dict(round_id=t.round_id, nonce=t.nonce, total_size=len(data), sha256=wire.sha256_hex(data),
                 kind=pb.LORA, upload_id=uid, stats=pb.TrainStats(num_examples=3))
        h.update(kw)
        return pb.UploadHeader(**h)

    def up(data, h=None, chunks=None, meta=md):
        it = chunks if chunks is not None else wire.upload_chunks(h or header(data), data, chunk_size=1024)
        return lambda: stub.UploadUpdate(iter(list(it)), metadata=meta, timeout=30)

    def tensors(fn):
        s = {k: v.clone() for k, v in state.items()}
        fn(s, rng.choice(sorted(s)))
        return wire.encode_tensors(s)

    bad = C.INVALID_ARGUMENT
    kind = rng.randrange(18)
    if kind == 0:
        data = rng.randbytes(rng.randrange(1, 5000))
        return "random_bytes", {bad}, up(data)
    if kind == 1:
        cut = rng.randrange(1, len(good))
        return "truncated", {bad}, up(good[:cut], header(good))
    if kind == 2:
        return "wrong_checksum", {bad}, up(good, header(good, sha256=f"{rng.getrandbits(256):064x}"))
    if kind == 3:
        flip = bytearray(good)
        flip[rng.randrange(len(flip))] ^= 1 << rng.randrange(8)
        return "bit_flip", {bad}, up(bytes(flip), header(good))
    if kind == 4:
        return "huge_size", {C.RESOURCE_EXHAUSTED}, up(good, header(good, total_size=rng.choice([CAP + 1, 2 ** 62])))
    if kind == 5:
        val = rng.choice([float("nan"), float("inf"), -float("inf")])
        return "nan_inf", {bad}, up(tensors(lambda s, k: s[k].view(-1).__setitem__(0, val)))
    if kind == 6:
        def wrong_rank(s, k):
            s[k] = torch.zeros(*(d + rng.randrange(1, 5) for d in s[k].shape))
        return "wrong_rank", {bad}, up(tensors(wrong_rank))
    if kind == 7:
        return "wrong_dtype", {bad}, up(tensors(lambda s, k: s.__setitem__(k, s[k].to(torch.int32))))
    if kind == 8:
        return "missing_key", {bad}, up(tensors(lambda s, k: s.pop(k)))
    if kind == 9:
        return "norm_bound", {bad}, up(tensors(lambda s, k: s.__setitem__(k, s[k] * 1e6 + 1e3)))
    if kind == 10:
        h = header(good, nonce=rng.choice(["", "0" * 32, f"{rng.getrandbits(128):032x}"]))
        return "replay_nonce", {C.FAILED_PRECONDITION}, up(good, h)
    if kind == 11:
        rid = rng.choice([0, t.round_id + rng.randrange(1, 10 ** 6), 2 ** 32 - 1])
        return "replay_round", {C.FAILED_PRECONDITION}, up(good, header(good, round_id=rid))
    if kind == 12:
        h = header(good)
        chunks = [pb.UploadChunk(header=h, offset=rng.randrange(1, 10 ** 9), data=good[:100])]
        return "bad_offset", {bad}, up(good, chunks=chunks)
    if kind == 13:
        meta = rng.choice([[], [("authorization", "Bearer " + rng.randbytes(16).hex())], [("authorization", "x")]])
        return "bad_token", {C.UNAUTHENTICATED}, up(good, meta=meta)
    if kind == 14:
        chunks = rng.choice([[], [pb.UploadChunk(offset=0, data=good[:10])],
                             [pb.UploadChunk(header=header(good, upload_id=""), data=good)],
                             [pb.UploadChunk(header=header(good, kind=pb.ZO), data=good)],
                             [pb.UploadChunk(header=header(good, upload_id="../../etc/passwd"), data=good)]])
        return "bad_stream", {bad}, up(good, chunks=chunks)
    if kind == 15:
        method = rng.choice(["Register", "GetTask", "Heartbeat", "UploadStatus", "SubmitZO"])
        raw = channel.unary_unary(f"/edgefed.v1.Federation/{method}", request_serializer=None,
                                  response_deserializer=None)
        data = rng.randbytes(rng.randrange(1, 300))
        return "raw_garbage", {C.INTERNAL, C.UNAUTHENTICATED, bad, C.UNKNOWN}, \
            lambda: raw(data, metadata=[] if method == "Register" else [("authorization", "Bearer nope")], timeout=30)
    if kind == 16:
        req = rng.choice([pb.RegisterRequest(plan_json=rng.randbytes(40).hex()),
                          pb.RegisterRequest(plan_json=json.dumps({"rank": -3})),
                          pb.RegisterRequest(plan_json=json.dumps({"rank": 4, "mode": "evil"})),
                          pb.RegisterRequest(plan_json=json.dumps({"rank": 4}), enrolment_token="et_" + "x" * 500)])
        return "bad_register", {bad, C.UNAUTHENTICATED, C.FAILED_PRECONDITION}, lambda: stub.Register(req, timeout=30)
    zo = pb.ZoUpdate(round_id=t.round_id, nonce=t.nonce, seeds=[1, 2, 3], grads=[float("nan"), 1.0], lr=1e-3)
    did, off = rng.choice([("nope", 0), ("nope", 10 ** 9), (t.download_id, 10 ** 9), ("", 0)])
    dl = pb.DownloadRequest(round_id=t.round_id, download_id=did, offset=off)
    return rng.choice([("bad_zo", {bad}, lambda: stub.SubmitZO(zo, metadata=md, timeout=30)),
                       ("bad_download", {C.FAILED_PRECONDITION, C.OUT_OF_RANGE},
                        lambda: list(stub.DownloadGlobal(dl, metadata=md, timeout=30)))])


def test_fuzz_every_message_refused_server_keeps_serving(live):
    proc, port, tmp = live
    target = f"127.0.0.1:{port}"
    dev = SimDevice(target, "legit")
    reply = dev.register()
    t = dev.wait_task()
    state = dev.download_state(t)
    md = [("authorization", f"Bearer {reply.device_token}")]
    channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)])
    stub = pbg.FederationStub(channel)
    rng = random.Random(1234)
    cases = [_mutations(rng, t, state, md, stub, channel) for _ in range(N)]
    rss_before = rss_mb(proc.pid)

    def run(case):
        cat, allowed, call = case
        try:
            call()
        except grpc.RpcError as e:
            return cat, e.code(), e.code() in allowed
        return cat, C.OK, False

    # the legitimate device's malformed uploads go one at a time (a device has one upload in flight; a new
    # one cancels its previous partial), everything else from 5 threads at the same time
    own = [c for c in cases if c[0] not in OTHERS]
    with ThreadPoolExecutor(max_workers=1) as seq, ThreadPoolExecutor(max_workers=5) as par:
        a, b = seq.map(run, own), par.map(run, [c for c in cases if c[0] in OTHERS])
        results = list(a) + list(b)
    rss_after = rss_mb(proc.pid)
    by_cat = Counter(cat for cat, _, _ in results)
    codes = Counter(code.name for _, code, _ in results)
    wrong = [(cat, code) for cat, code, ok in results if not ok]
    print(f"\n{N} malformed messages: categories {dict(sorted(by_cat.items()))}")
    print(f"status codes: {dict(codes)}; unexpected: {wrong[:10]}")
    print(f"server RSS before {rss_before:.1f} MiB, after {rss_after:.1f} MiB (+{rss_after - rss_before:.1f})")
    assert not wrong and len(results) == N and codes.get("OK", 0) == 0
    assert proc.poll() is None  # still running
    partials = list((tmp / "store" / "partial").glob("*.part"))
    assert len(partials) <= 1, f"abandoned partial uploads pile up: {len(partials)}"
    assert rss_after - rss_before < 150, "server memory grew under malformed traffic"
    # still serving: the legitimate device's upload goes through
    assert dev.upload(t, dev.update_bytes(state, seed=0)).accepted
    channel.close()
    dev.close()
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert coordinator_main(["status", "--store", str(tmp / "store"), "--json"]) == 0
    rejections = json.loads(buf.getvalue())["rejections"]
    print(f"refusals per reason (edge-coordinator status): {rejections}")
    assert sum(rejections.values()) >= 0.8 * N  # raw garbage that fails to parse never reaches the servicer
    for reason in ("checksum", "size_mismatch", "too_large", "non_finite", "shape", "replay", "unauthenticated",
                   "malformed", "norm_bound", "keys"):
        assert rejections.get(reason, 0) > 0, (reason, rejections)
