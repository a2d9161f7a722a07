"""Memory estimator: breakdown sums, monotonicity, ZO and quantization behave as physics says."""
from pathlib import Path

import pytest

from edge_runtime.memory import (Calibration, bnb_cpu_load_bytes, cuda_load_bytes, estimate, fp32_weight_bytes,
                                 gguf_load_bytes, hf_load_bytes, load_peak_bytes, quantize_pass_bytes,
                                 stream_load_bytes, streamed)
from edge_runtime.modelspec import load_model_spec
from edge_runtime.plan import Plan
from models import minilm_dir, smollm2_gguf

ROOT = Path(__file__).resolve().parents[1]
OV = 400 * 2**20
SPECS = {  # name: (where the model is, found when the fixture runs; task)
    "minilm": (minilm_dir, "classification"),
    "smollm2": (smollm2_gguf, "causal_lm"),
    "llama7b": (lambda: ROOT / "models/llama-2-7b", "causal_lm"),
}


@pytest.fixture(scope="module")
def specs():
    return {k: (load_model_spec(where()), t) for k, (where, t) in SPECS.items()}


def _est(spec, task, **kw):
    kw.setdefault("target_modules", spec.default_targets)
    return estimate(spec, Plan(**kw), task, overhead_bytes=OV)


@pytest.mark.parametrize("name", list(SPECS))
def test_breakdown_sums_to_total(specs, name):
    spec, task = specs[name]
    for kw in ({}, {"gradient_checkpointing": True}, {"mode": "zo", "optimizer": "sgd"}, {"base_precision": "nf4"}):
        e = _est(spec, task, **kw)
        assert sum(e.breakdown.values()) == e.total_bytes
        assert all(v >= 0 for v in e.breakdown.values())
        assert e.breakdown["runtime_overhead"] == OV
        assert e.breakdown["load_peak_excess"] == max(0, e.load_peak_bytes - e.training_peak_bytes)
        assert e.total_bytes == max(e.load_peak_bytes, e.training_peak_bytes)
        d = e.to_dict()
        assert set(d) == {"total_bytes", "budget_bytes", "load_peak_bytes", "breakdown"}


@pytest.mark.parametrize("name", list(SPECS))
def test_monotone_in_rank_batch_seq_precision(specs, name):
    spec, task = specs[name]
    # the training peak grows strictly; the total (max with the load peak, flat in these) never shrinks
    for key, values in (("rank", (1, 4, 16, 64)), ("batch_size", (1, 2, 4, 8)), ("seq_len", (32, 64, 128))):
        ests = [_est(spec, task, **{key: v}) for v in values]
        train = [e.training_peak_bytes for e in ests]
        assert train == sorted(train) and train[0] < train[-1], key
        totals = [e.total_bytes for e in ests]
        assert totals == sorted(totals), key
    w = [sum(v for k, v in _est(spec, task, base_precision=p).breakdown.items() if k.startswith(("weights", "quant")))
         for p in ("fp32", "int8", "nf4", "int4")]
    if spec.source_format == "gguf":  # every quantized plan keeps the file's own Q4_1 blocks
        assert w[0] > w[1] == w[2] == w[3]
    else:
        assert w[0] > w[1] > w[2] and w[3] >= w[2]  # int4 groups of 128 carry more constants than nf4's double quant
    bf16 = sum(v for k, v in _est(spec, task, base_precision="bf16", compute_dtype="bf16").breakdown.items()
               if k.startswith("weights"))
    assert bf16 * 2 == pytest.approx(w[0], rel=0.01)


def test_checkpointing_and_zo_save_memory(specs):
    spec, task = specs["smollm2"]
    full = _est(spec, task, batch_size=8, seq_len=128)
    ckpt = _est(spec, task, batch_size=8, seq_len=128, gradient_checkpointing=True)
    zo = _est(spec, task, batch_size=8, seq_len=128, mode="zo", optimizer="sgd")
    assert zo.total_bytes < ckpt.total_bytes < full.total_bytes
    assert zo.breakdown["adapter_grads"] == 0 and zo.breakdown["optimizer_state"] == 0
    sgd = _est(spec, task, optimizer="sgd")
    assert sgd.breakdown["optimizer_state"] == 0 < _est(spec, task).breakdown["optimizer_state"]


def test_published_7b_figures(specs):
    """QLoRA 7B ~5-6 GB and LoRA 16-bit 7B ~15-16 GB on a GPU (small batch, seq 512, checkpointing)."""
    spec, task = specs["llama7b"]
    common = dict(rank=16, batch_size=1, seq_len=512, gradient_checkpointing=True, target_modules=spec.default_targets)
    q = estimate(spec, Plan(base_precision="nf4", compute_dtype="bf16", **common), task, device="cuda")
    lo = estimate(spec, Plan(base_precision="bf16", compute_dtype="bf16", **common), task, device="cuda")
    assert 3.5e9 < q.total_bytes < 6.5e9, q.total_bytes
    assert 13e9 < lo.total_bytes < 17e9, lo.total_bytes


def test_bad_inputs(specs):
    spec, _ = specs["minilm"]
    with pytest.raises(ValueError, match="task"):
        estimate(spec, Plan(target_modules=["query"]), "translation", overhead_bytes=0)
    with pytest.raises(ValueError, match="q_proj"):
        estimate(spec, Plan(target_modules=["q_proj"]), "classification", overhead_bytes=0)


# ----------------------------------------------------------------------------- load-time peak

def test_load_term_pure_functions():
    MiB = 2**20
    # GGUF: the mmapped file + dequant x fp32 weights
    assert gguf_load_bytes(513 * MiB, 94 * MiB, 1.39) == int(94 * MiB + 1.39 * 513 * MiB)
    assert gguf_load_bytes(100, 0, 2.0) == 200
    # safetensors in the dtype it is stored in: mmap views, nothing read at load
    assert hf_load_bytes(400 * MiB, 400 * MiB, same_dtype=True) == 0
    assert hf_load_bytes(200 * MiB, 400 * MiB, same_dtype=False) == 600 * MiB
    # quantizing: one fp32 Linear in flight plus its quantized copy
    assert quantize_pass_bytes(1000) == 8000
    assert bnb_cpu_load_bytes(270 * MiB, 40 * MiB, 1000) == 310 * MiB + 8000
    assert cuda_load_bytes(1000, 10) == 1040
    # streaming loader: the kept weights + the largest Linear in flight, no file pages
    assert stream_load_bytes(300 * MiB, 1000, 1.5) == 300 * MiB + 1500


def test_gguf_4bit_plan_keeps_the_file_blocks_and_lowers_load_and_training(specs):
    """SmolLM2 from GGUF through the streaming loader: a 4-bit plan's Linear weights are the file's Q4_1
    blocks (no constants on top); its load and training peaks are both below the fp32 plan's; the
    load is the kept weights + one tensor in flight (no mapped file, no fp32 copy of the model)."""
    spec, task = specs["smollm2"]
    kw = dict(rank=1, batch_size=1, seq_len=64, gradient_checkpointing=True)
    fp32, q4 = _est(spec, task, **kw), _est(spec, task, base_precision="nf4", **kw)
    assert q4.breakdown["weights_linear"] == spec.gguf_block_bytes == 20 * spec.linear_params // 32
    assert q4.breakdown["quant_constants"] == 0 and "source_pages" not in q4.breakdown
    assert q4.load_peak_bytes < fp32.load_peak_bytes and q4.training_peak_bytes < fp32.training_peak_bytes
    assert fp32.load_peak_bytes < OV + fp32_weight_bytes(spec, task) * 1.3  # was file + 1.39 x fp32 before streaming
    assert streamed(spec, Plan(target_modules=spec.default_targets), task)


def test_estimator_counts_no_source_pages_for_streamed_bases(specs):
    """What an OOM killer counts: the streaming loader maps no file, so a quantized causal LM has no
    `source_pages`; a classification model (transformers' loader, file kept mapped) still has them."""
    spec, task = specs["llama7b"]
    q = _est(spec, task, base_precision="nf4", gradient_checkpointing=True)
    assert "source_pages" not in q.breakdown
    assert q.total_bytes < 0.45 * _est(spec, task, base_precision="fp32", gradient_checkpointing=True).total_bytes
    spec, task = specs["minilm"]
    assert _est(spec, task, base_precision="int8").breakdown["source_pages"] > 0
    assert not streamed(spec, Plan(base_precision="int8", target_modules=spec.default_targets), task)


def test_hf_source_load_not_binding_and_cuda_branch(specs):
    spec, task = specs["minilm"]  # safetensors stored fp32: parameters are mmap views at load
    for kw in ({}, {"mode": "zo", "optimizer": "sgd", "batch_size": 1, "seq_len": 32}):
        e = _est(spec, task, **kw)
        assert not e.load_bound and e.load_peak_bytes == OV
    spec, task = specs["smollm2"]
    plan = Plan(rank=1, batch_size=1, seq_len=64, target_modules=spec.default_targets)
    # discrete GPU: only CUDA allocations count; the host-side GGUF dequantization does not
    gpu = load_peak_bytes(spec, plan, task, device="cuda")
    cpu = load_peak_bytes(spec, plan, task, device="cpu")
    assert gpu < cpu and gpu < fp32_weight_bytes(spec, task) * 1.1
    assert not estimate(spec, plan, task, device="cuda").load_bound
    # a unified-memory device (Jetson) shares host RAM: the streaming load is what it holds, as on CPU
    assert load_peak_bytes(spec, plan, task, device="cuda", unified_memory=True) == cpu


def test_load_term_scales_with_calibration(specs):
    spec, task = specs["smollm2"]
    plan = Plan(rank=1, batch_size=1, seq_len=64, base_precision="nf4", target_modules=spec.default_targets)
    lo = load_peak_bytes(spec, plan, task, calibration=Calibration(stream_gguf_blocks=1.0))
    hi = load_peak_bytes(spec, plan, task, calibration=Calibration(stream_gguf_blocks=2.0))
    biggest = max(o * i for o, i in spec.linear_shapes.values())
    assert hi - lo == pytest.approx(biggest * spec.gguf_block_bytes / spec.gguf_block_params, abs=2)


def test_mmap_served_peak_holds_one_phase_loss_chunk_or_decoder_layer(specs):
    """A quantized base on CPU returns freed memory at once: the loss chunk (logits, head slice) and a
    decoder layer (recomputed activations, the dequantized Linear in flight) never overlap."""
    from edge_runtime.memory import HEAD_SLICE_ROWS, alive_at_peak, mmap_served
    assert alive_at_peak({"activations": 5.0, "logits": 3.0, "head_slice": 1.0, "dequant_temporaries": 2.0}) == \
        {"activations": 5.0, "logits": 3.0, "head_slice": 1.0, "dequant_temporaries": 0.0}
    assert alive_at_peak({"activations": 5.0, "logits": 1.0, "activations_layer": 2.0, "dequant_temporaries": 2.0}) == \
        {"activations": 5.0, "logits": 0.0, "activations_layer": 2.0, "dequant_temporaries": 2.0}
    spec, task = specs["llama7b"]  # the largest Linear, 11008 x 4096 widened to fp32, outweighs a 256-row chunk
    plan = Plan(rank=8, batch_size=2, seq_len=256, gradient_checkpointing=True, base_precision="nf4",
                target_modules=spec.default_targets)
    assert mmap_served(spec, plan, task, "cpu")
    b = estimate(spec, plan, task, overhead_bytes=OV).breakdown
    assert b["dequant_temporaries"] == 4 * 11008 * 4096 and b["activations_layer"] > 0
    assert b["logits"] == 0 and b["head_slice"] == 0
    gpu = estimate(spec, plan, task, overhead_bytes=OV, device="cuda", unified_memory=True).breakdown
    assert gpu["logits"] > 0 and "activations_layer" not in gpu  # not mmap-served: the parts add up
    zo = estimate(spec, Plan(**{**plan.to_dict(), "mode": "zo", "optimizer": "sgd", "batch_size": 1, "seq_len": 64}),
                  task, overhead_bytes=OV).breakdown
    assert "dequant_temporaries" not in zo and min(zo["head_slice"], zo["dequant_chunk"]) == 0  # one phase


def test_zo_nf4_on_cpu_counts_one_row_chunk_not_the_whole_weight(specs):
    """bitsandbytes nf4 ZO forwards on CPU dequantize by rows (training/bnb_rows.py): the estimator counts one
    (rows, in) fp32 chunk, its (tokens, rows) product and the weight's fp32 absmax, unscaled; int8 keeps its term."""
    from edge_runtime.dequant_rows import dequant_chunk_rows, row_chunk_bytes
    spec, task = specs["llama7b"]
    rows = dequant_chunk_rows(4096)
    assert rows == 1024 and row_chunk_bytes(spec, 64, 4) == rows * 4096 * 4 + 64 * rows * 4 + 11008 * 4096 // 16
    zo = dict(mode="zo", optimizer="sgd", rank=1, batch_size=1, seq_len=64, target_modules=spec.default_targets)
    nf4 = estimate(spec, Plan(base_precision="nf4", **zo), task, overhead_bytes=OV, response_tokens=8).breakdown
    assert "dequant_temporaries" not in nf4 and nf4["dequant_chunk"] == row_chunk_bytes(spec, 64, 4)  # layer phase
    int8 = estimate(spec, Plan(base_precision="int8", **zo), task, overhead_bytes=OV).breakdown
    assert "dequant_chunk" not in int8 and int8["dequant_temporaries"] > 2 * 11008 * 4096 * 4 * 0.5
