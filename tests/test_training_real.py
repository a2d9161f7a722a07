"""Real small models: all-MiniLM-L6-v2 (classification, a few steps) and SmolLM2-135M GGUF (slow)."""
import pytest
import torch

from edge_runtime.data import load_sst2
from edge_runtime.plan import Plan
from edge_runtime.training.session import LocalTrainer
from models import minilm_dir, smollm2_gguf

torch.set_num_threads(1)


def test_minilm_sst2_lora_steps():
    model = minilm_dir()
    recs = load_sst2("train", limit=256)
    plan = Plan(rank=8, target_modules=["query", "value"], batch_size=16, seq_len=64, learning_rate=1e-3)
    t = LocalTrainer(model, plan, "classification", seed=0)
    r = t.train(recs, steps=8, progress=False)
    assert r.steps == 8 and r.examples_seen == 128
    assert r.mean_loss == r.mean_loss and 0.3 < r.loss_first < 1.2
    ev = t.evaluate(load_sst2("dev")[:64])
    assert ev["n"] == 64 and 0.0 <= ev["accuracy"] <= 1.0


@pytest.mark.slow
def test_smollm2_gguf_loads_and_one_lora_step():
    plan = Plan(rank=4, target_modules=["q_proj", "v_proj"], batch_size=1, seq_len=64, learning_rate=1e-4)
    t = LocalTrainer(smollm2_gguf(), plan, "causal_lm", seed=0)
    assert "chat_template" in dir(t.tokenizer) and t.tokenizer.chat_template
    rec = [{"instruction": "Say hello.", "input": "", "output": "Hello!"}]
    ex = t.encode(rec)[0]
    assert t.tokenizer.decode(ex.input_ids[ex.prompt_len:]).startswith("Hello!")
    assert t.model.get_output_embeddings().weight is t.model.get_input_embeddings().weight  # the GGUF's tied head
    r = t.train(rec, steps=1, progress=False)
    assert r.steps == 1 and 0 < r.loss_first < 8  # ~2.6 nats; a random head gives ~21
    assert len(t.adapter_state()) == 30 * 2 * 2  # a hung load is caught by pytest-timeout, not a wall-clock bound
