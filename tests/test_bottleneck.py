"""Bottleneck adapters (peft kind "adapter", `protos.bottleneck`) on real models: a wrapped model starts
exactly at its base and `unload` gives the pristine base back; the trainable tensors are one adapter
per layer's feed-forward output (+ the head) with the documented shapes; BERT and Llama layouts; the
width travels in plans and download contracts; bad widths and unknown model types are refused with
messages that say what to do. The federated runs (gRPC, Flower, secure aggregation) are in
tests/test_peft_types.py, tests/test_flower_methods.py and tests/test_secagg_grpc.py."""
from __future__ import annotations

import copy

import pytest
import torch

from protos import peft_types
from protos.adapter import DeviceContract
from protos.bottleneck import CHILD


@pytest.fixture(scope="module")
def minilm():
    from coordinator.model import load_base_model
    from tests.models import minilm_dir

    return load_base_model(minilm_dir(), "classification", 2, 0)


def _logits(model, enc) -> torch.Tensor:
    with torch.no_grad():
        return model(**enc).logits


def test_starts_at_the_base_and_unload_restores_it_exactly(minilm):
    base, tok = minilm
    base.eval()
    enc = tok(["a gripping, funny film", "dull"], return_tensors="pt", padding=True)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    want = _logits(base, enc)
    model = peft_types.build(base, "adapter", bottleneck=8, seed=0)
    assert torch.equal(_logits(model, enc), want)  # W_up = 0: exactly the base's function
    params = peft_types.trainable(model)
    with torch.no_grad():  # as after training: the adapters and the head move
        for p in params.values():
            p.add_(0.05)
    assert not torch.allclose(_logits(model, enc), want, atol=1e-3)
    back = peft_types.unload(model)
    assert back is base and set(back.state_dict()) == set(before)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in before.items())
    assert not any(m._forward_hooks or CHILD in m._modules for m in back.modules())
    assert torch.equal(_logits(back, enc), want)


def test_trainable_tensors_are_one_adapter_per_ffn_and_the_head(minilm):
    base, _ = minilm
    model = peft_types.build(copy.deepcopy(base), "adapter", bottleneck=8, seed=0)
    params = peft_types.trainable(model)
    H, L = base.config.hidden_size, base.config.num_hidden_layers
    prefix = "base_model.bert.encoder.layer.{}.output.dense." + CHILD
    want = {f"{prefix.format(i)}.{n}": s for i in range(L) for n, s in
            (("down.weight", (8, H)), ("down.bias", (8,)), ("up.weight", (H, 8)), ("up.bias", (H,)))}
    want.update({"base_model.classifier.weight": (2, H), "base_model.classifier.bias": (2,)})
    assert {k: tuple(p.shape) for k, p in params.items()} == want
    assert all(not p.requires_grad for n, p in base.named_parameters() if ".attention." in n)
    ups = [p for k, p in params.items() if k.endswith("up.weight") or k.endswith("up.bias")]
    assert all(not p.any() for p in ups)  # zero-initialised
    again = peft_types.trainable(peft_types.build(copy.deepcopy(base), "adapter", bottleneck=8, seed=0))
    other = peft_types.trainable(peft_types.build(copy.deepcopy(base), "adapter", bottleneck=8, seed=1))
    down = prefix.format(0) + ".down.weight"
    assert torch.equal(again[down], params[down]) and not torch.equal(other[down], params[down])  # seeded


def test_llama_layout_trains_through_the_mlp_outputs(tmp_path):
    """A tiny Llama: adapters on `model.layers.N.mlp`, the count the estimator predicts, the base's
    logits at the start and gradients reaching every adapter."""
    from transformers import AutoModelForCausalLM

    from edge_runtime.training.tiny import make_tiny_llama
    from protos.peft_names import trainable_count

    base = AutoModelForCausalLM.from_pretrained(make_tiny_llama(tmp_path / "llama", hidden=32, layers=2)).eval()
    ids = torch.tensor([[5, 9, 14, 3, 7]])
    want = _logits(base, {"input_ids": ids})
    model = peft_types.build(base, "adapter", bottleneck=4, seed=0)
    params = peft_types.trainable(model)
    assert sorted({k.rsplit(".", 2)[0] for k in params}) == [f"base_model.model.layers.{i}.mlp.{CHILD}"
                                                            for i in range(2)]
    assert sum(p.numel() for p in params.values()) == trainable_count("adapter", "llama", {}, 32, 2, bottleneck=4)
    assert torch.equal(_logits(model, {"input_ids": ids}), want)
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for k, p in params.items() if ".up." in k)
    assert torch.equal(_logits(peft_types.unload(model), {"input_ids": ids}), want)


def test_bad_widths_and_unknown_model_types_are_refused():
    from transformers import GPT2Config, GPT2Model

    from edge_runtime.plan import Plan, PlanError

    with pytest.raises(ValueError, match="peft='adapter' needs bottleneck >= 1 .*got 0"):
        peft_types.build(torch.nn.Linear(2, 2), "adapter")
    with pytest.raises(PlanError, match="plan field 'peft'='adapter' needs bottleneck >= 1"):
        Plan(peft="adapter", bottleneck=0)
    with pytest.raises(PlanError, match="bottleneck=-3: expected an integer"):
        Plan(bottleneck=-3)
    with pytest.raises(ValueError, match="device contract peft='adapter' needs bottleneck >= 1"):
        DeviceContract(peft="adapter")
    gpt2 = GPT2Model(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="no feed-forward block known for model type 'gpt2'.*choose 'lora'"):
        peft_types.build(gpt2, "adapter", bottleneck=4)


def test_the_width_travels_in_the_contract_and_the_device_rebuilds(tmp_path):
    """A download's contract names the width; a device planned at another width (and as LoRA) switches
    to the contract's type and width, a second identical contract changes nothing, and it trains
    (W_up leaves zero) with gradient checkpointing."""
    from edge_runtime.device_round import obey_peft
    from edge_runtime.plan import Plan
    from edge_runtime.training.session import LocalTrainer
    from edge_runtime.training.tiny import make_tiny_bert

    c = DeviceContract.from_meta({"device_contract": DeviceContract(peft="adapter", bottleneck=8).to_meta()})
    assert (c.peft, c.bottleneck) == ("adapter", 8)
    plan = Plan(rank=2, target_modules=["query", "value"], batch_size=2, seq_len=16, bottleneck=4,
                gradient_checkpointing=True)  # the hooks run again in the recomputed forward
    t = LocalTrainer(make_tiny_bert(tmp_path / "bert", hidden=32, layers=2), plan, "classification", seed=0)
    assert obey_peft(t, c) and t.plan.bottleneck == 8 and t.plan.peft == "adapter"
    t.configure()
    shapes = {k: tuple(v.shape) for k, v in t.adapter_state().items() if k.endswith("down.weight")}
    assert t.peft == "adapter" and len(shapes) == 2 and set(shapes.values()) == {(8, 32)}, shapes
    assert not obey_peft(t, c)
    t.train([{"text": "good fun", "label": 1}, {"text": "bad", "label": 0}], 2, lr=1e-2)
    assert any(v.any() for k, v in t.adapter_state().items() if k.endswith("up.weight"))
