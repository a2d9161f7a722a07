"""OOM step-down: the ladder is a pure function; a device whose real memory is below what its
plan assumed steps down and still finishes its round, and the coordinator accepts the upload."""
import json
from dataclasses import replace

import pytest
import torch

from edge_runtime.data import load_sst2
from edge_runtime.plan import Plan
from edge_runtime.profile import DeviceProfile
from edge_runtime.stepdown import (AdaptiveTrainer, EstimatorError, grow_state, is_oom, next_plan, next_rung,
                                   shrink_state, step_down)
from edge_runtime.training.guard import MemoryBudgetExceeded, anon_bytes
from edge_runtime.training.model_loading import malloc_trim

torch.set_num_threads(1)
MiB = 2**20


def _profile(precisions=("fp32", "int8", "nf4")) -> DeviceProfile:
    return DeviceProfile(name="emu", memory_total_bytes=2 << 30, memory_budget_bytes=1 << 30,
                         compute_gflops={"fp32": 10.0}, precisions=list(precisions))


def test_ladder_order_and_end():
    p = Plan(rank=4, batch_size=4, grad_accum=1, base_precision="fp32", target_modules=["query"])
    seen = []
    while True:
        r = next_rung(p, _profile())
        if r is None:
            break
        seen.append(r[0])
        q = r[1]
        assert q.batch_size * q.grad_accum >= 4 or q.mode == "zo"  # effective batch kept while in LoRA mode
        p = q
    assert seen == ["micro_batch", "micro_batch", "checkpointing", "rank", "rank", "seq_len", "seq_len", "int8", "4bit",
                    "zo"]
    assert (p.mode, p.rank, p.base_precision, p.batch_size, p.seq_len) == ("zo", 1, "nf4", 1, 32)
    assert next_plan(p, _profile()) is None


def test_a_zeroth_order_plan_still_steps_down_its_batch_then_its_base():
    p = Plan(mode="zo", rank=4, batch_size=2, base_precision="fp32", target_modules=["query"])
    seen = []
    while (r := next_rung(p, _profile())) is not None:
        seen.append(r[0])
        p = r[1]
        assert p.mode == "zo" and p.grad_accum == 1
    assert seen == ["micro_batch", "seq_len", "seq_len", "int8", "4bit"]  # longer texts: shorter sequences first
    assert (p.batch_size, p.base_precision, p.rank, p.seq_len) == (1, "nf4", 4, 32)
    only_fp32 = Plan(mode="zo", rank=4, batch_size=2, target_modules=["query"])
    assert [n for n, _ in [next_rung(only_fp32, _profile(("fp32",)))]] == ["micro_batch"]
    assert next_rung(replace(only_fp32, batch_size=1), _profile(("fp32",)))[0] == "seq_len"
    assert next_rung(replace(only_fp32, batch_size=1, seq_len=32), _profile(("fp32",))) is None


def test_ladder_respects_profile_precisions():
    p = Plan(rank=1, batch_size=1, seq_len=32, gradient_checkpointing=True, target_modules=["query"])
    assert next_rung(p, _profile(("fp32", "int4")))[1].base_precision == "int4"  # no int8: straight to 4-bit
    r = next_rung(p, _profile(("fp32",)))
    assert r[0] == "zo" and r[1].base_precision == "fp32"


def test_step_down_skips_rungs_the_estimator_rejects():
    p = Plan(rank=8, batch_size=8, target_modules=["query"])
    predict = lambda q: q.batch_size * 100 + (0 if q.gradient_checkpointing else 1000)  # noqa: E731
    new, taken = step_down(p, _profile(), predict, limit_bytes=1000)
    assert taken == ["micro_batch"] * 3 + ["checkpointing"] and new.batch_size == 1 and new.grad_accum == 8
    bottom, all_rungs = step_down(p, _profile(), predict, limit_bytes=-1)  # nothing fits: the lowest rung
    assert all_rungs[-1] == "zo" and (bottom.mode, bottom.batch_size, bottom.base_precision) == ("zo", 1, "nf4")
    assert step_down(bottom, _profile(), predict, limit_bytes=-1) is None
    assert step_down(p, _profile())[1] == ["micro_batch"]
    assert EstimatorError(100, 150, 120).to_dict()["error_bytes"] == 50
    assert is_oom(MemoryBudgetExceeded(2, 1)) and not is_oom(ValueError())


def test_shrink_grow_roundtrip_keeps_effective_update():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(8, 6, generator=g), torch.randn(5, 8, generator=g)
    st = {"m.lora_A.weight": A, "m.lora_B.weight": B, "head.weight": torch.ones(2, 3)}
    s8, s2 = 16 / 8, 16 / 2
    head, tail = shrink_state(st, 2, s8, s2)
    assert head["m.lora_A.weight"].shape == (2, 6) and tail["m"][0].shape == (6, 6)
    full = s8 * B @ A
    parts = s2 * head["m.lora_B.weight"] @ head["m.lora_A.weight"] + tail["m"][2] * tail["m"][1] @ tail["m"][0]
    assert torch.allclose(full, parts, atol=1e-5)
    back = grow_state(head, tail, s8, s2)
    assert all(torch.allclose(back[k], st[k]) for k in st)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from edge_runtime.training.tiny import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("sd") / "bert")


def _records(n: int = 128) -> list[dict]:
    return [dict(r, text=(r["text"] + " ") * 8) for r in load_sst2("train", limit=n)]  # long rows: big activations


def test_trainer_steps_down_and_finishes(bert):
    """Real memory 100 MiB above the warm process, a plan (batch 64, seq 128) that needs ~+240 MiB."""
    from edge_runtime.training.session import LocalTrainer

    recs = _records()
    plan = Plan(rank=4, target_modules=["query", "value"], batch_size=4, seq_len=128, learning_rate=1e-2)
    t = LocalTrainer(bert, plan, "classification")
    t.train(recs, steps=1, progress=False)  # warm the allocator / kernels at a small batch
    t.plan = replace(plan, batch_size=64)
    start = t.adapter_state()
    malloc_trim()
    t.memory_budget_bytes = anon_bytes() + 100 * MiB
    a = AdaptiveTrainer(t, _profile())
    res = a.train(recs, steps=4, progress=False)
    assert a.last_events, "the plan should have run out of memory and stepped down"
    assert res.steps == 4 and not res.stopped_early and len(res.losses) == 4
    assert a.plan.batch_size < 64 and a.plan.batch_size * a.plan.grad_accum == 64
    ev = a.last_events[0]
    assert ev["rungs"][0] == "micro_batch" and ev["estimator"]["measured_peak_bytes"] > ev["estimator"]["budget_bytes"]
    assert a.report()["plan"]["batch_size"] == a.plan.batch_size
    end = a.adapter_state()
    assert any(not torch.equal(end[k], start[k]) for k in start)  # it trained


def test_rank_step_down_uploads_at_the_assigned_rank(bert):
    """Training below the assigned rank returns an adapter at the assigned rank whose first
    components moved and whose frozen tail did not."""
    from edge_runtime.training.session import LocalTrainer

    recs = _records(64)
    t = LocalTrainer(bert, Plan(rank=8, target_modules=["query", "value"], batch_size=4, seq_len=32,
                                learning_rate=1e-2), "classification")
    a = AdaptiveTrainer(t, _profile())
    a.plan = replace(a.plan, rank=2)  # as after a 'rank' rung
    g = torch.Generator().manual_seed(1)
    st = {k: (torch.randn(v.shape, generator=g) * 0.1 if "lora_B" in k else v) for k, v in a.adapter_state().items()}
    a.load_adapter_state(st)
    a.train(recs, steps=3, progress=False)
    out = a.adapter_state()
    assert a.rank == 8 and all(out[k].shape == st[k].shape for k in st)
    kA = next(k for k in st if k.endswith("lora_A.weight"))
    assert torch.equal(out[kA][2:], st[kA][2:]) and not torch.equal(out[kA][:2], st[kA][:2])


def test_join_steps_down_and_the_round_is_accepted(bert, tmp_path):
    """An emulated device whose real memory is 100 MiB above its warm process while its plan needs
    far more: it steps down, its uploads are accepted, and the coordinator lowers nothing it
    need not (a micro-batch step-down keeps the rank) but records the reported plan."""
    from coordinator.server import create_server
    from coordinator.service import Coordinator, CoordinatorConfig
    from edge_runtime.client import JoinConfig, run_join
    from edge_runtime.training.session import LocalTrainer

    recs = _records(128)
    ev = tmp_path / "eval.jsonl"
    ev.write_text("\n".join(json.dumps(r) for r in load_sst2("dev", limit=32)))
    coord = Coordinator(CoordinatorConfig(model=str(bert), store=str(tmp_path / "store"), strategy="zero_pad",
                                          rounds=2, local_steps=3, lr=1e-2, max_rank=4, round_timeout_s=120,
                                          poll_interval_s=0.2))
    server, port = create_server("127.0.0.1:0", coord, tick_interval_s=0.2)
    server.start()
    plan = Plan(rank=4, target_modules=["query", "value"], batch_size=64, seq_len=128, learning_rate=1e-2)

    def factory(model, p, task, memory_budget_bytes=None, seed=0, threads=None):
        t = LocalTrainer(model, replace(p, batch_size=4), task, seed=seed)
        t.train(recs, steps=1, progress=False)  # warm up small, then claim the real (smaller) memory
        t.plan = p
        malloc_trim()
        t.memory_budget_bytes = anon_bytes() + 100 * MiB
        return t

    try:
        out = run_join(JoinConfig(target=f"127.0.0.1:{port}", model=str(bert), plan=plan, profile=_profile(),
                                  records=recs, name="small", heartbeat_s=1.0, max_poll_s=0.3), factory)
    finally:
        server.stop(0)
    rounds = out["rounds"]
    assert len(rounds) == 2 and all(r["accepted"] for r in rounds)
    assert rounds[0].get("stepdown"), "round 1 should have stepped down"
    ups = coord.store.updates()
    assert len(ups) == 2
    extra = json.loads(ups[0]["stats"]["extra_json"])
    assert extra["plan"]["batch_size"] < 64 and extra["stepdown"][0]["estimator"]["measured_peak_bytes"] > 0
    assert coord.fed.current.state == "aggregated"
    coord.close()
