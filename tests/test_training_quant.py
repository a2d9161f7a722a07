"""Quantized bases train on CPU: bitsandbytes nf4 / int8, optimum-quanto int4; merges go through a hook."""
import pytest
import torch

from edge_runtime.data import load_sst2
from edge_runtime.plan import Plan
from edge_runtime.training.model_loading import ModelLoadError, load_base
from edge_runtime.training.session import LocalTrainer
from edge_runtime.training.tiny import make_tiny_llama

torch.set_num_threads(1)
QV = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("m") / "llama")


@pytest.fixture(scope="module")
def recs():
    return load_sst2("train", limit=64)


@pytest.mark.parametrize("precision,backend,layer_type", [
    ("nf4", "auto", "RowChunkedLinear4bit"), ("int8", "auto", "Linear8bitLt"),
    ("int4", "auto", "QLinear"), ("int8", "quanto", "QLinear")])
def test_quantized_base_lora_steps(llama, recs, precision, backend, layer_type):
    plan = Plan(rank=4, target_modules=QV, base_precision=precision, batch_size=4, learning_rate=1e-2)
    t = LocalTrainer(llama, plan, "causal_lm", quant_backend=backend)
    base = t.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(base).__name__ == layer_type
    start = t.adapter_state()
    r = t.train(recs, steps=3, progress=False)
    assert r.steps == 3 and all(l == l for l in r.losses)
    end = t.adapter_state()
    assert any(not torch.equal(start[k], end[k]) for k in start if "lora_B" in k)


def test_quantized_merge_uses_hook(llama, recs):
    plan = Plan(rank=4, target_modules=QV, base_precision="int4", batch_size=4)
    t = LocalTrainer(llama, plan, "causal_lm")
    before = t.evaluate(recs[:8])["loss"]
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(2, 64, generator=g), torch.randn(64, 2, generator=g)
    t.merge_base_delta({key: (A, B, 1.0)})
    after = t.evaluate(recs[:8])["loss"]
    assert after != pytest.approx(before, abs=1e-4)
    t.merge_base_delta({key: (-A, B, 1.0)})  # the opposite update cancels it again
    assert t.evaluate(recs[:8])["loss"] == pytest.approx(before, abs=1e-4)


def test_unusable_precision_is_a_clear_error(llama):
    with pytest.raises(FileNotFoundError):
        load_base(llama / "nope", Plan(), "causal_lm")
    with pytest.raises(ValueError, match="task kind"):
        load_base(llama, Plan(), "regression")
