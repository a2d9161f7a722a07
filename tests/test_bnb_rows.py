"""Row-chunked no-grad CPU forward of bitsandbytes 4-bit Linears (edge_runtime/training/bnb_rows.py).

- `chunked_forward` gives bitsandbytes' own result (its CPU gemm_4bit over the whole dequantized weight)
  on real Linear4bit layers, with and without double quantization, with and without bias, for output
  sizes the chunk does not divide, and dequantizes only (rows, in) pieces (torch profiler: the
  `bitsandbytes::dequantize_4bit` calls' packed inputs);
- `RowChunkedLinear4bit` takes that path only without autograd: with grad enabled it is bitsandbytes'
  forward and backward unchanged;
- the streaming loader builds its nf4 Linears as `RowChunkedLinear4bit`, and the chunk's row count has one
  home (`edge_runtime.dequant_rows`), which the estimator counts.
"""
import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from edge_runtime.training import bnb_rows  # noqa: E402
from edge_runtime.training.bnb_rows import chunkable, chunked_forward, row_chunked  # noqa: E402

torch.set_num_threads(1)


def _linear4bit(out_f: int, in_f: int, double_quant: bool, bias: bool, seed: int = 0) -> torch.nn.Module:
    """A real bitsandbytes nf4 Linear4bit (fp32 compute) over a random (out, in) weight, on CPU."""
    g = torch.Generator().manual_seed(seed)
    lin = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=torch.float32, quant_type="nf4",
                            compress_statistics=double_quant)
    lin.weight = bnb.nn.Params4bit(torch.randn(out_f, in_f, generator=g) * 0.05, requires_grad=False,
                                   compress_statistics=double_quant, quant_type="nf4")
    if bias:
        lin.bias = torch.nn.Parameter(torch.randn(out_f, generator=g), requires_grad=False)
    return lin.to("cpu")


def _bnb_reference(lin: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' own CPU product: the whole weight dequantized (gemm_4bit), no avx512 repack."""
    with torch.no_grad():
        return bnb.matmul_4bit(x, lin.weight, bias=lin.bias, quant_state=lin.weight.quant_state)


@pytest.mark.parametrize("out_f,in_f,double_quant,bias", [(1000, 256, True, True), (777, 128, False, False),
                                                          (333, 192, True, False)])
def test_chunked_forward_equals_bitsandbytes_and_dequantizes_by_rows(out_f, in_f, double_quant, bias):
    lin = _linear4bit(out_f, in_f, double_quant, bias)
    assert lin.weight.quant_state.nested == double_quant and chunkable(lin)
    x = torch.randn(2, 5, in_f, generator=torch.Generator().manual_seed(1))
    rows = 68  # does not divide any out_f above: a short last chunk
    chunk_bytes = rows * in_f * 4
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        y = chunked_forward(lin, x, chunk_bytes=chunk_bytes)
    ref = _bnb_reference(lin, x)
    assert y.shape == ref.shape == (2, 5, out_f)
    assert ((y - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    packed = [ev.input_shapes[0] for ev in prof.events() if ev.name == "bitsandbytes::dequantize_4bit"]
    assert len(packed) == -(-out_f // rows)  # one call per chunk of rows
    assert max(torch.Size(s).numel() * 2 for s in packed) == rows * in_f  # never the (out, in) weight


def test_row_chunked_linear_only_without_autograd(monkeypatch):
    lin = row_chunked(_linear4bit(300, 128, True, True))
    assert isinstance(lin, bnb.nn.Linear4bit) and type(lin).__name__ == "RowChunkedLinear4bit"
    calls = []
    monkeypatch.setattr(bnb_rows, "chunked_forward", lambda m, x: calls.append(x.shape) or _bnb_reference(m, x))
    x = torch.randn(3, 128, requires_grad=True)
    with torch.no_grad():
        lin(x)
    assert calls == [torch.Size((3, 128))]
    y = lin(x)  # grad enabled: bitsandbytes' own forward (and backward)
    assert calls == [torch.Size((3, 128))]
    y.sum().backward()
    ref_x = x.detach().clone().requires_grad_(True)
    bnb.matmul_4bit(ref_x, lin.weight, bias=lin.bias, quant_state=lin.weight.quant_state).sum().backward()
    assert torch.equal(x.grad, ref_x.grad)
    with pytest.raises(TypeError, match="Linear4bit"):
        row_chunked(torch.nn.Linear(4, 4))


def test_rows_have_one_home_and_streamed_nf4_linears_use_them():
    from edge_runtime import dequant_rows, memory
    from edge_runtime.training.stream_load import bnb_linear
    assert bnb_rows.dequant_chunk_rows is dequant_rows.dequant_chunk_rows  # one home, which the estimator uses
    assert memory.row_chunk_bytes is dequant_rows.row_chunk_bytes
    assert dequant_rows.dequant_chunk_rows(4096) == 1024 and dequant_rows.dequant_chunk_rows(11008) == 381
    lin = bnb_linear(torch.randn(96, 64), torch.randn(96), "nf4", torch.float32)
    assert type(lin).__name__ == "RowChunkedLinear4bit" and chunkable(lin)
    x = torch.randn(4, 64)
    with torch.no_grad():
        y = lin(x)
    ref = _bnb_reference(lin, x)
    assert ((y - ref).abs().max() / ref.abs().max()).item() <= 1e-5


def test_row_chunked_linear_pickles_and_deep_copies():
    import copy
    import io

    lin = row_chunked(_linear4bit(70, 64, True, False))
    buf = io.BytesIO()
    torch.save(lin, buf)
    buf.seek(0)
    for other in (torch.load(buf, weights_only=False), copy.deepcopy(lin)):
        assert type(other) is type(lin)
        x = torch.randn(2, 64)
        with torch.no_grad():
            assert torch.equal(other(x), lin(x))
