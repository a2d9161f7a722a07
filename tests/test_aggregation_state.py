"""State-dict level aggregation on real peft adapters (tiny BERT with a classification head).

The maths (`coordinator.aggregation.aggregate_modules` with a pure combine function) builds the
global; what a device downloads comes from the method (`RoundEngine.download`)."""
from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import BertConfig, BertForSequenceClassification

from coordinator.aggregation import (DeviceState, GlobalState, LoraUpdate, aggregate_modules, effective, factor_svd,
                                     fedavg, fedsa, module_updates, stack, validate_updates, zero_pad)
from coordinator.aggregation.svd import factors_from_svd, stacked_factors
from coordinator.engine import RoundEngine
from coordinator.methods import MethodConfig, make_method
from protos.wire import split_download

torch.set_num_threads(1)
warnings.filterwarnings("ignore")
CFG = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=48, num_labels=3)
TARGETS = ["query", "value"]
DEVICES = [(2, 4.0, False, 10.0), (4, 16.0, True, 30.0), (8, 16.0, False, 60.0)]  # rank, alpha, rslora, weight
MAX_RANK = 8


def svd_combine(ups: list[LoraUpdate]) -> LoraUpdate:
    """The exact weighted sum as SVD-ordered factors (scale 1), at its full rank."""
    ups = validate_updates(ups)
    U, S, Vh = factor_svd(*stacked_factors(ups))
    return factors_from_svd(U, S, Vh, int(S.shape[0]), 1.0, float(sum(u.weight for u in ups)))


def fedsa_combine(ups: list[LoraUpdate]) -> LoraUpdate:
    A = fedsa(ups, MAX_RANK)  # only A is global
    return LoraUpdate(A=A, B=torch.zeros(ups[0].shape[0], A.shape[0]), scale=1.0, weight=float(sum(u.weight for u in ups)))


COMBINE = {"zero_pad": lambda ups: zero_pad(ups, MAX_RANK), "svd": svd_combine, "stack": stack,
           "fedsa": fedsa_combine, "fedavg": fedavg, "zo": fedavg}


def aggregate(method: str, devices) -> GlobalState:
    g = aggregate_modules(devices, COMBINE[method])
    return GlobalState(method, g.modules, g.extra, g.total_weight)


def download(g: GlobalState, method: str, rank: int, alpha: float, rslora: bool, *, seed: int = 0,
             mode: str = "lora", max_rank: int = MAX_RANK):
    """(adapter state, base delta) a device of `rank` with this alpha / rsLoRA downloads under `method`."""
    m = make_method(MethodConfig(method, max_rank=max_rank, lora_alpha=alpha, use_rslora=rslora))
    return split_download(RoundEngine(m, g, 1).download(rank, mode, seed))


def peft_model(rank: int, alpha: float, rslora: bool):
    torch.manual_seed(0)  # same base weights on every device
    base = BertForSequenceClassification(CFG)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora, target_modules=TARGETS,
                     modules_to_save=["classifier"], task_type="SEQ_CLS")
    return get_peft_model(base, cfg)


def trained_state(rank, alpha, rslora, seed):
    model = peft_model(rank, alpha, rslora)
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in get_peft_model_state_dict(model).items()}
    return state


@pytest.fixture(scope="module")
def uploads():
    return [DeviceState(trained_state(r, a, rs, 100 + i), a, rs, w) for i, (r, a, rs, w) in enumerate(DEVICES)]


def expected_sum(uploads, module):
    total = sum(d.weight for d in uploads)
    return sum((d.weight / total) * effective(module_updates(d)[module]) for d in uploads)


def peft_delta(model, module_key):
    """scale * B @ A of the loaded peft layer for a state-dict module key."""
    name = module_key.replace("base_model.model.", "")
    layer = model.base_model.model.get_submodule(name)
    return layer.get_delta_weight("default").detach().double()


def load(state, rank, alpha, rslora):
    model = peft_model(rank, alpha, rslora)
    result = set_peft_model_state_dict(model, state)
    assert not [k for k in result.unexpected_keys if "lora" in k or "classifier" in k]
    return model


def test_module_grouping_and_head_average(uploads):
    g = aggregate("zero_pad", uploads)
    assert g.strategy == "zero_pad" and aggregate_modules(uploads, COMBINE["zero_pad"]).strategy == ""
    assert len(g.modules) == 4 and all(k.endswith(("query", "value")) for k in g.modules)
    assert all(u.rank == MAX_RANK for u in g.modules.values())
    assert set(g.extra) == {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    total = sum(d.weight for d in uploads)
    assert g.total_weight == total
    ref = sum(d.weight / total * d.state["base_model.model.classifier.weight"].double() for d in uploads)
    assert torch.allclose(g.extra["base_model.model.classifier.weight"].double(), ref, atol=1e-6)


@pytest.mark.parametrize("method", ["svd", "zero_pad"])
def test_devices_load_their_rank(uploads, method):
    g = aggregate(method, uploads)
    for r, a, rs, _ in DEVICES:
        state, delta = download(g, method, r, a, rs)
        assert delta == {}
        model = load(state, r, a, rs)
        for key, glob in g.modules.items():
            delta = peft_delta(model, key)
            if method == "svd":
                U, S, Vh = torch.linalg.svd(expected_sum(uploads, key), full_matrices=False)
                ref = (U[:, :r] * S[:r]) @ Vh[:r]
            else:
                ref = effective(glob.__class__(A=glob.A[:r], B=glob.B[:, :r], scale=glob.scale))
            assert float((delta - ref).norm() / ref.norm()) < 1e-5, (method, r, key)


def test_stack_merges_exact_sum_into_base(uploads):
    g = aggregate("stack", uploads)
    for r, a, rs, _ in DEVICES:
        state, base_delta = download(g, "stack", r, a, rs, seed=r)
        model = load(state, r, a, rs)
        assert set(base_delta) == set(g.modules)
        for key in g.modules:
            layer = model.base_model.model.get_submodule(key.replace("base_model.model.", ""))
            B, A = base_delta[key]
            assert torch.count_nonzero(layer.lora_B["default"].weight) == 0  # fresh adapter
            assert layer.lora_A["default"].weight.shape == (r, CFG.hidden_size)
            ref = expected_sum(uploads, key)
            assert float(((B.double() @ A.double()) - ref).norm() / ref.norm()) < 1e-5
            before = layer.base_layer.weight.detach().clone()
            with torch.no_grad():
                layer.base_layer.weight += B @ A
            assert torch.allclose(layer.base_layer.weight - before, ref.float(), atol=1e-5)


def test_fedsa_sends_only_a(uploads):
    g = aggregate("fedsa", uploads)
    state, _ = download(g, "fedsa", 4, 16.0, True)
    assert not [k for k in state if "lora_B" in k]
    a_keys = [k for k in state if "lora_A" in k]
    assert len(a_keys) == 4 and all(state[k].shape == (4, CFG.hidden_size) for k in a_keys)
    for k in a_keys:
        assert torch.allclose(state[k], g.modules[k[: -len(".lora_A.weight")]].A[:4])
    # a ZO device cannot keep B: it gets one (zeros until the coordinator has kept one for it)
    zo, _ = download(g, "fedsa", 4, 16.0, True, mode="zo")
    b_keys = [k for k in zo if "lora_B" in k]
    assert len(b_keys) == 4 and all(zo[k].shape == (CFG.hidden_size, 4) and not zo[k].any() for k in b_keys)


def test_fedavg_and_zo_need_equal_ranks(uploads):
    same = [DeviceState(trained_state(4, 8.0, False, 7 + i), 8.0, False, 1.0 + i) for i in range(3)]
    for method in ("fedavg", "zo"):
        g = aggregate(method, same)
        state, _ = download(g, method, 4, 8.0, False, max_rank=4)
        model = load(state, 4, 8.0, False)
        key = next(iter(g.modules))
        assert torch.allclose(peft_delta(model, key), effective(g.modules[key]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="update 1: rank 4 differs"):
        aggregate_modules(uploads, fedavg)


def test_bad_states_name_the_device(uploads):
    broken = dict(uploads[1].state)
    broken.pop(next(k for k in broken if k.endswith("lora_B.weight")))
    with pytest.raises(ValueError, match="device 1: module .* only one of lora_A/lora_B"):
        aggregate_modules([uploads[0], DeviceState(broken, 16.0, True, 1.0)], svd_combine)
    with pytest.raises(ValueError, match="unknown method 'median'"):
        make_method(MethodConfig("median", max_rank=MAX_RANK))
    with pytest.raises(ValueError, match="cannot serve rank 8"):
        download(aggregate("fedavg", [uploads[1], uploads[1]]), "fedavg", 8, 16.0, False)
