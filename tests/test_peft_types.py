"""Prompt tuning, (IA)3, BitFit and bottleneck adapters as federated methods: each over real gRPC with two emulated
devices of different plans (MiniLM, SST-2 rows), and the refusals of bad input (names, shapes,
PEFT types) with messages that say what is wrong."""
from __future__ import annotations

import json

import pytest
import torch

from coordinator.engine import RoundEngine
from coordinator.methods import MethodConfig, make_method
from coordinator.validation import UpdateInvalid
from protos import peft_types
from protos.adapter import DeviceContract
from protos.wire import split_download
from tests.waiting import run_devices

KINDS = ("prompt", "ia3", "bitfit", "adapter")  # PEFT types
METHOD = {"prompt": "prompt_tuning", "ia3": "ia3", "bitfit": "bitfit", "adapter": "adapter"}  # who trains each


@pytest.fixture(scope="module")
def minilm():
    from tests.models import minilm_dir

    return minilm_dir()


@pytest.fixture(scope="module")
def base(minilm):
    from coordinator.model import load_base_model

    return load_base_model(minilm, "classification", 2, 0)[0]


def _engine(base, kind: str) -> tuple[RoundEngine, dict[str, torch.Tensor]]:
    from coordinator.model import initial_adapter_state

    method = make_method(MethodConfig(METHOD[kind], max_rank=4))
    init = initial_adapter_state(base, ["query", "value"], 4, 16.0, False, 0, method.peft, method.virtual_tokens,
                                 method.bottleneck)
    engine = RoundEngine(method, method.initial(init), 1)
    return engine, split_download(engine.download(2, "lora", 0))[0]


@pytest.mark.parametrize("kind", KINDS)
def test_download_is_the_named_tensors_and_bad_uploads_are_refused(base, kind):
    engine, sent = _engine(base, kind)
    assert sent and not any(".lora_" in k for k in sent)  # no LoRA factors: the PEFT type's own tensors
    assert any(peft_types.is_head_key(k) for k in sent) and not all(peft_types.is_head_key(k) for k in sent)
    contract = DeviceContract.from_meta({"device_contract": engine.method.contract("lora").to_meta()})
    assert contract.peft == kind
    key = next(k for k in sorted(sent) if not peft_types.is_head_key(k))
    renamed = {(k + ".x" if k == key else k): v for k, v in sent.items()}
    with pytest.raises(UpdateInvalid, match=r"missing \[.*" + key.split(".")[-1]):
        engine.validate(renamed, sent, "lora")
    reshaped = {**sent, key: torch.zeros(*sent[key].shape[:-1], sent[key].shape[-1] + 1)}
    with pytest.raises(UpdateInvalid, match=f"upload tensor {key} has shape"):
        engine.validate(reshaped, sent, "lora")
    with pytest.raises(UpdateInvalid, match="non-finite"):
        engine.validate({**sent, key: sent[key] * float("nan")}, sent, "lora")


def test_initial_state_of_another_type_and_unknown_types_are_refused(base):
    from coordinator.model import initial_adapter_state
    from edge_runtime.plan import Plan, PlanError

    lora = initial_adapter_state(base, ["query", "value"], 4, 16.0, False, 0)
    with pytest.raises(ValueError, match=r"initial_adapter_state\(\.\.\., peft='ia3'\)"):
        make_method(MethodConfig("ia3", max_rank=4)).initial(lora)
    with pytest.raises(PlanError, match="'peft'='adapters': choose one of lora, prompt, ia3, bitfit, adapter"):
        Plan(peft="adapters")
    with pytest.raises(ValueError, match="virtual_tokens >= 1"):
        DeviceContract(peft="prompt")
    with pytest.raises(ValueError, match="no bias parameters"):
        peft_types.build(torch.nn.Sequential(torch.nn.Linear(3, 3, bias=False)), "bitfit")
    with pytest.raises(ValueError, match="--init federa: strategy 'bitfit'"):
        make_method(MethodConfig("bitfit", max_rank=4, init="federa"))


def test_averaging_is_by_example_weight(base):
    """Two uploads folded with weights 1 and 3: the global is their weighted mean, tensor by tensor."""
    from coordinator.round_policy import RoundPolicy

    engine, sent = _engine(base, "ia3")
    engine = RoundEngine(engine.method, engine.g, 1, policy=RoundPolicy.plain())
    a = {k: v + 1.0 for k, v in sent.items()}
    b = {k: v - 1.0 for k, v in sent.items()}
    engine.accept("a", a, 1.0, sent, "lora")
    engine.accept("b", b, 3.0, sent, "lora")
    g, _ = engine.close()
    assert set(g.extra) == set(sent) and not g.modules
    for k, v in sent.items():
        assert torch.allclose(g.extra[k], v - 0.5, atol=1e-6), k


@pytest.mark.parametrize("kind", KINDS)
def test_federation_over_grpc(minilm, tmp_path, kind):
    from coordinator.round_policy import RoundPolicy
    from coordinator.server import create_server
    from coordinator.service import Coordinator, CoordinatorConfig
    from edge_runtime.client import JoinConfig, run_join
    from edge_runtime.data import load_sst2, partition
    from edge_runtime.plan import Plan
    from edge_runtime.profile import DeviceProfile
    from edge_runtime.training.session import LocalTrainer

    torch.set_num_threads(1)
    rows = load_sst2("train", limit=240)
    shards = partition(rows, 2, scheme="iid", seed=0)
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps(r) + "\n" for r in load_sst2("dev", limit=64)))
    coord = Coordinator(CoordinatorConfig(model=str(minilm), store=str(tmp_path / "store"), strategy=METHOD[kind],
                                          rounds=2, min_devices=2, local_steps=4, lr=1e-2, max_rank=8, round_timeout_s=120,
                                          poll_interval_s=0.2, policy=RoundPolicy(logit_adjust=0.0),
                                          eval_data=str(dev)))
    g0 = {k: v.clone() for k, v in coord.global_state.extra.items()}
    server, port = create_server("127.0.0.1:0", coord, tick_interval_s=0.2)
    server.start()
    trainers, outs = {}, {}

    def device(i: int, rank: int, budget: int, train: list[dict]) -> None:
        def factory(model, p, task, memory_budget_bytes=None, seed=0, threads=None):
            trainers[i] = LocalTrainer(model, p, task, seed=seed)  # built as LoRA: the download's contract decides
            return trainers[i]

        plan = Plan(rank=rank, target_modules=["query", "value"], batch_size=8, seq_len=48, learning_rate=1e-2)
        prof = DeviceProfile(name=f"d{i}", memory_total_bytes=4 << 30, memory_budget_bytes=budget,
                             compute_gflops={"fp32": 10.0})
        outs[i] = run_join(JoinConfig(target=f"127.0.0.1:{port}", model=str(minilm), plan=plan, profile=prof,
                                      records=train, name=f"d{i}", heartbeat_s=1.0, max_poll_s=0.3, stepdown=False),
                           factory)

    run_devices(server, [(device, (0, 8, 2 << 30, shards[0])), (device, (1, 2, 1 << 30, shards[1]))])
    assert len(outs) == 2 and all(len(o["rounds"]) == 2 and all(x["accepted"] for x in o["rounds"])
                                  for o in outs.values()), outs
    g = coord.global_state
    assert not g.modules and set(g.extra) == set(g0)
    for t in trainers.values():  # both devices (plan ranks 8 and 2) trained the federation's PEFT type
        assert t.peft == kind and set(t.adapter_state()) == set(g.extra)
    moved = [k for k in g0 if not peft_types.is_head_key(k) and not torch.equal(g.extra[k], g0[k])]
    assert moved, "the global's PEFT tensors did not change"
    m = coord.store.rounds()[-1]["metrics"]  # the coordinator evaluated the global through the same wrapper
    assert 0.0 <= m["accuracy"] <= 1.0 and m["loss"] > 0, m
    n = sum(v.numel() for v in g.extra.values())
    sizes = [u["size"] for u in coord.store.updates(2)]
    assert all(4 * n <= s < 4 * n + 64 * 1024 for s in sizes), (sizes, n)  # float32 tensors + header
    coord.close()


@pytest.mark.parametrize("kind", KINDS)
def test_estimator_and_planner_know_the_trainable_size(minilm, base, kind):
    """The estimator's count (from the model's config only) equals what the built model trains, and
    `plan(..., peft=kind)` plans that type with its own adapter, gradient and Adam-state bytes."""
    import copy
    from pathlib import Path

    from edge_runtime.memory import trainable_params
    from edge_runtime.modelspec import load_model_spec
    from edge_runtime.plan import Plan
    from edge_runtime.planner import plan
    from edge_runtime.profile import load_profile

    spec = load_model_spec(minilm)
    built = peft_types.build(copy.deepcopy(base), kind, Plan().virtual_tokens, bottleneck=Plan().bottleneck)
    pooler = sum(p.numel() for k, p in peft_types.trainable(built).items() if ".pooler." in k)  # a kept CLS
    n = sum(p.numel() for p in peft_types.trainable(built).values()) - pooler  # pooler's bias: not counted (doc)
    assert trainable_params(spec, Plan(peft=kind), "classification") == n
    prof = load_profile(Path(__file__).resolve().parents[1] / "profiles" / "emu-small-450mb.yaml")
    p = plan(prof, spec, "classification", overhead_bytes=150 << 20, peft=kind)
    parts = p.memory["breakdown"]
    assert p.peft == kind and p.mode == "lora" and any(f"peft {kind}" in r for r in p.reasons)
    assert parts["adapter_params"] == 4 * n and parts["adapter_grads"] == 4 * n and parts["optimizer_state"] == 8 * n
    assert Plan.from_dict(json.loads(p.to_json())).peft == kind


def test_trainable_count_refuses_unknown_layouts():
    from protos.peft_names import trainable_count

    with pytest.raises(ValueError, match="'llama' has no bias layout"):
        trainable_count("bitfit", "llama", {"model.layers.0.self_attn.q_proj": (8, 8)}, 8, 1)
    with pytest.raises(ValueError, match="no default \\(IA\\)3 targets known for model type 'gpt_neox'"):
        trainable_count("ia3", "gpt_neox", {}, 8, 1)


def test_evaluator_applies_the_type_to_its_own_model(minilm):
    """(IA)3's, BitFit's and the bottleneck adapters' initial states leave the model unchanged: the
    coordinator's evaluation of them equals the base model's, and the base is itself again afterwards
    (the wrapper is applied in place: a deep copy would keep the masked mean pooler's hook bound to the
    original model)."""
    from coordinator.model import Evaluator, initial_adapter_state, load_base_model
    from edge_runtime.data import load_sst2

    model, tok = load_base_model(minilm, "classification", 2, 0)
    ev = Evaluator(model, tok, load_sst2("dev", limit=48))
    plain = ev.evaluate({}, {})
    for kind, width in (("ia3", 0), ("bitfit", 0), ("adapter", 16)):
        init = initial_adapter_state(model, [], 1, 16.0, False, 0, kind, bottleneck=width)
        assert ev.evaluate({}, init, kind, bottleneck=width) == pytest.approx(plain, abs=1e-6), kind
    assert ev.evaluate({}, {}) == pytest.approx(plain, abs=1e-6)
