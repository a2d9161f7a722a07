"""LocalTrainer on tiny random models: LoRA learns, ranks, adapter state I/O, base merges, determinism."""
import pytest
import torch

from edge_runtime.data import load_sst2
from edge_runtime.plan import Plan
from edge_runtime.training.session import LocalTrainer
from edge_runtime.training.tiny import make_tiny_bert, make_tiny_llama

torch.set_num_threads(1)  # 2 shared cores: 1 thread avoids oversubscription stalls
QV = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("m") / "llama")


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("m") / "bert")


@pytest.fixture(scope="module")
def recs():
    return load_sst2("train", limit=256)


def test_causal_lora_loss_decreases(llama, recs):
    t = LocalTrainer(llama, Plan(rank=4, target_modules=QV, batch_size=8, learning_rate=1e-2), "causal_lm")
    before = t.evaluate(recs[:64])
    r = t.train(recs, steps=15, progress=False)
    after = t.evaluate(recs[:64])
    assert r.steps == 15 and r.examples_seen == 120 and r.zo_pairs is None
    assert after["loss"] < before["loss"] - 0.3
    assert 0.0 <= after["accuracy"] <= 1.0 and after["n"] == 64
    assert r.peak_rss_bytes > 0 and r.seconds > 0


def test_classification_head_trains_and_keys(bert, recs):
    t = LocalTrainer(bert, Plan(rank=4, target_modules=["query", "value"], batch_size=16, learning_rate=1e-2),
                     "classification", seed=1)
    keys = list(t.adapter_state())
    assert "base_model.model.classifier.weight" in keys and "base_model.model.classifier.bias" in keys
    assert any(k.endswith("attention.self.query.lora_A.weight") for k in keys)
    r = t.train(recs, steps=25, progress=False)
    assert r.mean_loss < r.loss_first + 0.1
    ev = t.evaluate(recs[:128])
    assert ev["loss"] < 0.69 and ev["accuracy"] > 0.5


def test_rank_pattern_and_configure(llama):
    plan = Plan(rank=8, target_modules=QV, rank_pattern={"v_proj": 2}, lora_alpha=16)
    t = LocalTrainer(llama, plan, "causal_lm")
    s = t.adapter_state()
    assert s["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, 64)
    assert s["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape[1] == 2
    t.configure(rank=4, lora_alpha=8, use_rslora=True, seed=5)
    s4 = t.adapter_state()
    assert s4["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    assert s4["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"].shape == (2, 64)
    assert t.scale() == pytest.approx(8 / 2.0)
    assert sum(p.requires_grad for p in t.model.parameters()) == len(s4)
    with pytest.raises(ValueError, match="within 1..8"):
        t.configure(rank=16)


def test_same_seed_same_start_and_state_roundtrip(bert):
    plan = Plan(rank=4, target_modules=["query", "value"])
    a = LocalTrainer(bert, plan, "classification", seed=7)
    b = LocalTrainer(bert, plan, "classification", seed=7)
    sa, sb = a.adapter_state(), b.adapter_state()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    a.configure(seed=7)  # rebuilding keeps the head's initial values and reseeds LoRA
    assert all(torch.equal(a.adapter_state()[k], sa[k]) for k in sa)
    mod = {k: v + 0.5 for k, v in sa.items()}
    b.load_adapter_state(mod)
    assert all(torch.equal(b.adapter_state()[k], mod[k]) for k in mod)
    a.configure(rank=2)
    with pytest.raises(ValueError, match="shape"):
        a.load_adapter_state(mod)
    with pytest.raises(ValueError, match="missing"):
        b.load_adapter_state({k: v for k, v in mod.items() if "classifier" not in k})


def test_merge_base_delta_fp_equals_active_adapter(llama, recs):
    t = LocalTrainer(llama, Plan(rank=4, target_modules=QV, batch_size=8, learning_rate=1e-2), "causal_lm")
    t.train(recs, steps=3, progress=False)
    state = t.adapter_state()
    probe = recs[:16]
    with_adapter = t.evaluate(probe)["loss"]
    factors = {k[: -len(".lora_A.weight")]: (v, state[k.replace("lora_A", "lora_B")], t.scale())
               for k, v in state.items() if k.endswith(".lora_A.weight")}
    t.configure(rank=4, seed=0)
    zero_b = {k: (torch.zeros_like(v) if "lora_B" in k else v) for k, v in t.adapter_state().items()}
    t.load_adapter_state(zero_b)
    plain = t.evaluate(probe)["loss"]
    t.merge_base_delta(factors)
    merged = t.evaluate(probe)["loss"]
    assert merged == pytest.approx(with_adapter, abs=1e-4) and abs(plain - with_adapter) > 1e-3
    with pytest.raises(ValueError, match="not a LoRA module"):
        t.merge_base_delta({"model.nope": next(iter(factors.values()))})
    key, (A, B, s) = next(iter(factors.items()))
    with pytest.raises(ValueError, match="do not fit"):
        t.merge_base_delta({key: (A.T, B, s)})


def test_saved_adapter_loads_with_plain_peft(llama, recs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t = LocalTrainer(llama, Plan(rank=4, target_modules=QV, batch_size=4, learning_rate=1e-2), "causal_lm")
    t.train(recs[:32], steps=2, progress=False, checkpoint_dir=tmp_path / "ad")
    m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama), tmp_path / "ad")
    from peft import get_peft_model_state_dict
    loaded = get_peft_model_state_dict(m)
    mine = t.adapter_state()
    assert set(loaded) == set(mine) and all(torch.equal(loaded[k].float(), mine[k]) for k in mine)


def test_instruction_records_mask_prompt(llama):
    t = LocalTrainer(llama, Plan(rank=2, target_modules=QV, seq_len=64), "causal_lm")
    ex = t.encode([{"instruction": "say hello world", "input": "", "output": "hello world"}])[0]
    assert ex.labels[: ex.prompt_len] == [-100] * ex.prompt_len
    resp = t.tokenizer.decode(ex.input_ids[ex.prompt_len:])
    assert resp.startswith("hello world")
    with pytest.raises(ValueError, match="classification task"):
        LocalTrainer(llama, Plan(rank=2, target_modules=QV), "classification").encode(
            [{"instruction": "a", "input": "", "output": "b"}])
