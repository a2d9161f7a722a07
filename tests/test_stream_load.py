"""Streaming quantized loader and the GGUF-block Linear: correctness against the reference paths.

- `GGUFLinear` dequantizes Q4_0 / Q4_1 / Q8_0 blocks exactly as gguf-py does, its forward and
  input gradient equal a float Linear over that weight, and peft wraps it with LoRA;
- the streaming loader gives the same model as `from_pretrained` (fp32 from an fp16 checkpoint,
  bitsandbytes nf4 with double quantization) on a tiny random Llama, and as transformers' GGUF
  loader on SmolLM2; the 4-bit SmolLM2 base keeps the file's own blocks (no requantization);
- after a streamed load no mapping of the checkpoint file is left in the process.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_runtime.plan import Plan
from edge_runtime.training.gguf_linear import GGUFLinear
from edge_runtime.training.model_loading import apply_lora, load_base
from edge_runtime.training.tiny import make_tiny_llama
from tests.models import smollm2_gguf

torch.set_num_threads(1)
QV = ["q_proj", "v_proj"]


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_linear_matches_gguf_py_dequantization(qtype):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    t = GGMLQuantizationType[qtype]
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 96)).astype(np.float32)
    raw = quantize(w, t)                                   # (48, 96 / 32 * block bytes) uint8
    ref = torch.from_numpy(dequantize(raw, t))             # (48, 96) fp32
    rows = torch.randperm(48, generator=torch.Generator().manual_seed(0))
    lin = GGUFLinear.from_raw(raw, int(t), 48, 96, rows)
    assert torch.equal(lin.weight, ref[rows])
    assert lin.storage_bytes() == raw.nbytes
    x = torch.randn(3, 5, 96, requires_grad=True)
    y = lin(x)
    y.backward(torch.ones_like(y))
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = x_ref @ ref[rows].T
    y_ref.backward(torch.ones_like(y_ref))
    assert torch.allclose(y, y_ref, atol=1e-5) and torch.allclose(x.grad, x_ref.grad, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_fp16(tmp_path_factory):
    """A tiny random Llama saved as fp16 safetensors."""
    from transformers import AutoModelForCausalLM
    d = tmp_path_factory.mktemp("stream")
    src = make_tiny_llama(d / "fp32", hidden=64)
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16).save_pretrained(d / "fp16")
    for f in src.iterdir():
        if "token" in f.name:
            (d / "fp16" / f.name).write_bytes(f.read_bytes())
    return d / "fp16"


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _file_mapped(path: Path) -> bool:
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


def test_streaming_loader_equals_from_pretrained(tiny_fp16):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    ids = torch.randint(10, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    streamed, _ = load_base(tiny_fp16, Plan(rank=2, target_modules=QV, base_precision="fp32"), "causal_lm")
    assert streamed.model.embed_tokens.weight.dtype == torch.float32
    assert not _file_mapped(tiny_fp16 / "model.safetensors")
    ref = AutoModelForCausalLM.from_pretrained(tiny_fp16, dtype=torch.float32)
    assert torch.equal(_logits(streamed, ids), _logits(ref, ids))
    nf4, _ = load_base(tiny_fp16, Plan(rank=2, target_modules=QV, base_precision="nf4"), "causal_lm")
    assert type(nf4.model.layers[0].mlp.down_proj).__name__ == "RowChunkedLinear4bit"  # training/bnb_rows.py
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.float32)
    ref4 = AutoModelForCausalLM.from_pretrained(tiny_fp16, quantization_config=qc, device_map="cpu", dtype=torch.float32)
    for a, b in zip(nf4.state_dict().values(), ref4.state_dict().values()):  # same packed bytes and quant state
        assert torch.equal(a, b)
    for m in ref4.modules():  # bitsandbytes' fp32 product (a CPU without avx512-bf16), not its bf16 repack
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    # no-grad logits: nf4's weights dequantized by rows, ref4's whole (same values, summation order aside)
    assert torch.allclose(_logits(nf4, ids), _logits(ref4, ids), rtol=1e-5, atol=1e-5)
    peft_model = apply_lora(nf4, Plan(rank=2, target_modules=QV, base_precision="nf4"), 2, 4.0, False, 0)
    assert "Linear4bit" in type(peft_model.base_model.model.model.layers[0].self_attn.q_proj).__module__ + \
        type(peft_model.base_model.model.model.layers[0].self_attn.q_proj).__name__


def test_smollm2_gguf_streamed_on_its_own_blocks_equals_transformers_gguf_load():
    """The 4-bit plan keeps every Linear as the file's Q4_1 blocks and computes what transformers'
    GGUF loader (dequantized to fp32) computes; LoRA trains on it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from edge_runtime.modelspec import spec_from_gguf
    from edge_runtime.training.stream_load import stream_load_causal_lm
    gguf = smollm2_gguf()
    ids = torch.randint(10, 5000, (1, 10), generator=torch.Generator().manual_seed(0))
    plan = Plan(rank=2, target_modules=QV, base_precision="nf4")
    cfg = dict(spec_from_gguf(gguf).config)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    q4, kept = stream_load_causal_lm(gguf.parent, gguf.name, config, "nf4", torch.float32, use_bnb=False)
    assert set(kept.values()) == {"gguf-Q4_1"}
    assert not _file_mapped(gguf)
    blocks = [m for m in q4.modules() if isinstance(m, GGUFLinear)]
    assert len(blocks) == 30 * 7 and {m.qtype_name for m in blocks} == {"Q4_1"}
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    assert torch.allclose(_logits(q4, ids), _logits(ref, ids), atol=1e-4)
    del ref
    model = apply_lora(q4, plan, 2, 4.0, False, 0)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert len(grads) == 30 * 2 * 2 and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
