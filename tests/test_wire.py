"""protos.wire: safetensors round trips at every upload precision, chunking, checksums, overhead."""
import time

import pytest
import torch

from protos import federation_pb2 as pb
from protos import wire


def minilm_adapter(rank: int = 8, layers: int = 6, hidden: int = 384) -> dict[str, torch.Tensor]:
    """Adapter state shaped like all-MiniLM-L6-v2 with LoRA on query/value + a 2-class head."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for i in range(layers):
        for m in ("query", "value"):
            k = f"base_model.model.bert.encoder.layer.{i}.attention.self.{m}"
            out[k + ".lora_A.weight"] = torch.randn(rank, hidden, generator=g)
            out[k + ".lora_B.weight"] = torch.randn(hidden, rank, generator=g) * 0.01
    out["base_model.model.classifier.weight"] = torch.randn(2, hidden, generator=g)
    out["base_model.model.classifier.bias"] = torch.zeros(2)
    return out


def test_fp32_round_trip_is_exact_and_keeps_metadata():
    t = minilm_adapter()
    data = wire.encode_tensors(t, {"lora_alpha": 16.0, "use_rslora": 0, "rank": 8})
    back, meta = wire.decode_tensors(data)
    assert meta["precision"] == "fp32" and meta["lora_alpha"] == "16.0" and meta["rank"] == "8"
    assert set(back) == set(t)
    for k in t:
        assert torch.equal(back[k], t[k]) and back[k].dtype == torch.float32


@pytest.mark.parametrize("precision,tol", [("fp16", 1e-3), ("bf16", 8e-3), ("int8", 5e-3)])
def test_lossy_precisions_decode_to_fp32_close(precision, tol):
    t = minilm_adapter()
    back, meta = wire.decode_tensors(wire.encode_tensors(t, {}, precision))
    assert meta["precision"] == precision
    for k, v in t.items():
        assert back[k].dtype == torch.float32 and back[k].shape == v.shape
        rel = (back[k] - v).abs().max() / v.abs().max().clamp_min(1e-12)
        assert rel <= tol, (k, float(rel))


def test_int8_uses_one_scale_per_channel():
    x = torch.tensor([[1.0, -2.0, 0.5], [100.0, 0.0, -50.0], [0.0, 0.0, 0.0]])
    q, s = wire.quantize_int8(x)
    assert q.dtype == torch.int8
    assert s.shape == (3, 1)
    assert torch.allclose(s[:2, 0], torch.tensor([2.0 / 127, 100.0 / 127]))
    assert torch.allclose(wire.dequantize_int8(q, s), x, atol=0.5)
    assert wire.dequantize_int8(q, s)[2].abs().sum() == 0
    # int8 payload is ~4x smaller than fp32
    t = minilm_adapter()
    assert len(wire.encode_tensors(t, {}, "int8")) < 0.3 * len(wire.encode_tensors(t, {}, "fp32"))


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_bytes_on_the_wire_within_2_percent_of_tensor_bytes(precision):
    t = minilm_adapter()
    data = wire.encode_tensors(t, {"lora_alpha": 16.0, "rank": 8, "use_rslora": 0}, precision)
    header = pb.UploadHeader(round_id=3, nonce="ab" * 16, total_size=len(data), sha256=wire.sha256_hex(data),
                             kind=pb.LORA, upload_id="r3-abababababab",
                             stats=pb.TrainStats(num_examples=100, train_loss=0.5, train_time_s=1.0))
    on_wire = wire.wire_bytes(wire.upload_chunks(header, data, chunk_size=64 << 10))
    payload = wire.tensor_bytes(t, precision)
    ratio = on_wire / payload
    print(f"\n{precision}: tensor bytes {payload}, bytes on the wire {on_wire}, ratio {ratio:.4f}")
    assert ratio <= 1.02


def test_chunking_covers_the_blob_and_resumes_from_an_offset():
    data = bytes(range(256)) * 40  # 10240 bytes
    pieces = list(wire.chunks(data, 3000))
    assert [o for o, _ in pieces] == [0, 3000, 6000, 9000]
    assert b"".join(p for _, p in pieces) == data
    down = list(wire.download_chunks(data, start=6000, chunk_size=3000))
    assert down[0].offset == 6000 and down[0].sha256 == wire.sha256_hex(data)
    assert down[1].sha256 == "" and down[0].total_size == len(data)
    assert b"".join(c.data for c in down) == data[6000:]
    up = list(wire.upload_chunks(pb.UploadHeader(upload_id="x"), data, start=3000, chunk_size=5000))
    assert up[0].HasField("header") and not up[1].HasField("header")
    assert [c.offset for c in up] == [3000, 8000]


def test_malformed_blobs_raise_wire_errors():
    with pytest.raises(wire.WireError):
        wire.decode_tensors(b"not a safetensors file at all")
    data = wire.encode_tensors({"a": torch.ones(4, 4)})
    with pytest.raises(wire.WireError):
        wire.decode_tensors(data[: len(data) // 2])
    with pytest.raises(wire.WireError, match="precision"):
        wire.encode_tensors({"a": torch.ones(2)}, precision="fp8")
    with pytest.raises(wire.BlobTooLarge, match="cap"):
        wire.check_size(11, cap=10)


def test_token_bucket_paces_bytes():
    slept = []
    clock = [0.0]
    bucket = wire.TokenBucket(1000.0, burst_bytes=100, clock=lambda: clock[0], sleep=slept.append)
    bucket(100)  # within the burst
    bucket(500)  # 500 bytes at 1000 B/s -> wait 0.5 s
    assert slept == [pytest.approx(0.5)]
    assert bucket.total_bytes == 600
    real = wire.TokenBucket(200_000.0, burst_bytes=10_000)
    t0 = time.perf_counter()
    for _ in range(5):
        real(10_000)
    assert time.perf_counter() - t0 >= 0.15  # 40 kB beyond the burst at 200 kB/s


def test_int8_scales_follow_the_short_axis_of_lora_b():
    B = torch.randn(384, 8)  # (out, r): 8 column scales, not 384 row scales
    q, s = wire.quantize_int8(B)
    assert s.shape == (1, 8)
    assert (wire.dequantize_int8(q, s) - B).abs().max() <= s.max() / 2 + 1e-6


def test_unpacked_format_is_plain_safetensors():
    from safetensors.torch import load

    t = {"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.zeros(3, 2)}
    plain = load(wire.encode_tensors(t, {"format": "pt"}, packed=False))
    assert set(plain) == set(t)
    back, _ = wire.decode_tensors(wire.encode_tensors(t, packed=False))
    assert all(torch.equal(back[k], t[k]) for k in t)
