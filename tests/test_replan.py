"""Per-round re-planning: the pure policy, and the coordinator applying it behind `replan=True`."""
import json

import pytest

from coordinator.replan import RoundReport, rank_after_report, replan, reported_plan


def _kw(**over):
    return {"plan_ranks": {"fast": 8, "slow": 8, "gone": 8}, "target_steps": 20, "max_rank": 8, "margin": 0.8,
            **over}


def test_slow_device_gets_fewer_steps_fast_device_keeps_target():
    reports = {"fast": RoundReport(rank=8, steps=20, train_time_s=10.0, upload_time_s=1.0),
               "slow": RoundReport(rank=8, steps=20, train_time_s=200.0, upload_time_s=2.0)}
    cur = {"fast": (8, 20), "slow": (8, 20)}
    out = replan(reports, 100.0, cur, **_kw())
    assert out["fast"] == (8, 20)
    r, k = out["slow"]
    assert r == 8 and k == 7  # floor((80 - 2) / 10)
    assert reports["slow"].predict_s(r, k) <= 0.8 * 100.0 < reports["slow"].predict_s(r, k + 1)


def test_rank_drops_only_when_min_steps_do_not_fit_and_never_above_plan():
    # upload dominates: 90 s at rank 8 -> 45 s at rank 4 -> fits with the 80 s budget
    rep = {"slow": RoundReport(rank=8, steps=10, train_time_s=10.0, upload_time_s=90.0)}
    out = replan(rep, 100.0, {"slow": (8, 10)}, **_kw(min_steps=2))
    assert out["slow"][0] == 4 and out["slow"][1] >= 2
    assert 10 * out["slow"][1] / 10 + 45 <= 80
    rep = {"fast": RoundReport(rank=2, steps=5, train_time_s=1.0)}  # could grow, but the plan allows only 4
    assert replan(rep, 100.0, {"fast": (2, 5)}, **_kw(plan_ranks={"fast": 4})) == {"fast": (4, 20)}
    hopeless = {"slow": RoundReport(rank=8, steps=1, train_time_s=500.0)}
    assert replan(hopeless, 100.0, {"slow": (8, 1)}, **_kw(min_steps=3, min_rank=2)) == {"slow": (2, 3)}


def test_missing_report_halves_steps_then_rank():
    out = replan({}, 100.0, {"gone": (8, 20)}, **_kw())
    assert out["gone"] == (8, 10)
    assert replan({"gone": None}, 100.0, {"gone": (8, 1)}, **_kw()) == {"gone": (4, 1)}


def test_bad_arguments_and_stats_parsing():
    with pytest.raises(ValueError, match="deadline_s"):
        replan({}, 0.0, {}, **_kw())
    with pytest.raises(ValueError, match="margin"):
        replan({}, 10.0, {}, **_kw(margin=1.5))
    assert RoundReport.from_stats({"steps": 0, "train_time_s": 3.0}, 4) is None
    r = RoundReport.from_stats({"steps": 4, "train_time_s": 2.0, "upload_time_s": 1.0, "download_time_s": 1.0}, 4)
    assert r.predict_s(2, 8) == pytest.approx(4.0 + 1.0)
    assert reported_plan({"extra_json": json.dumps({"plan": {"rank": 2}})}) == {"rank": 2}
    assert reported_plan({"extra_json": "not json"}) is None and reported_plan({}) is None
    assert rank_after_report(8, 8, 2) == (2, 2) and rank_after_report(4, 2, 8) == (4, 2)


def test_coordinator_replans_after_a_round(tmp_path):
    """A real coordinator (SQLite store, tiny BERT) with replan on: after a round whose device
    reported a slow train time, the next task carries fewer local steps, and a reported
    step-down lowers the rank it is assigned."""
    from edge_runtime.training.tiny import make_tiny_bert
    from coordinator.service import Coordinator, CoordinatorConfig
    from protos import wire

    model = make_tiny_bert(tmp_path / "bert", hidden=32, vocab_size=300)
    clock = [1000.0]
    c = Coordinator(CoordinatorConfig(model=str(model), store=str(tmp_path / "s"), strategy="zero_pad", rounds=3,
                                      local_steps=20, max_rank=8, round_timeout_s=100.0, replan=True),
                    clock=lambda: clock[0])
    plan = json.dumps({"rank": 8, "mode": "lora"})
    reg = c.register("{}", plan, "", "dev")
    dev = reg["device_id"]
    t = c.get_task(dev)
    assert t["state"] == "TRAIN" and t["local_steps"] == 20
    state = wire.decode_tensors(c.download(dev, t["round_id"], t["download_id"]))[0]
    data = wire.encode_tensors(state, {"rank": 8})
    c.upload_append(dev, "u1", 0, data, len(data))
    stats = {"num_examples": 10, "steps": 20, "train_time_s": 160.0, "upload_time_s": 0.0, "download_time_s": 0.0,
             "extra_json": json.dumps({"plan": {"rank": 4, "mode": "lora"}})}
    c.finish_upload(dev, {"round_id": t["round_id"], "nonce": t["nonce"], "upload_id": "u1", "total_size": len(data),
                          "sha256": wire.sha256_hex(data), "stats": stats}, len(data))
    t2 = c.get_task(dev)
    assert t2["round_id"] == t["round_id"] + 1 and t2["state"] == "TRAIN"
    assert t2["local_steps"] == 10  # 8 s/step, 80 s budget
    assert t2["assigned_rank"] == 4 and "rank4" in t2["download_id"]
    kinds = [e["kind"] for e in c.store.events()]
    assert "plan_stepped_down" in kinds and "replan" in kinds
    c.close()


def test_late_upload_report_replans_the_straggler(tmp_path):
    """A device that misses the deadline gets no accepted update, but its refused late upload's
    header carries its measured train time: the coordinator re-plans it from that report at
    once (measured fit, not a blind halving) and the next task carries the fitted steps."""
    import grpc  # noqa: F401  (the domain error maps to FAILED_PRECONDITION in the servicer)

    from coordinator import rounds as R
    from coordinator.service import Coordinator, CoordinatorConfig
    from edge_runtime.training.tiny import make_tiny_bert

    model = make_tiny_bert(tmp_path / "bert", hidden=32, vocab_size=300)
    clock = [1000.0]
    c = Coordinator(CoordinatorConfig(model=str(model), store=str(tmp_path / "s"), strategy="zero_pad", rounds=4,
                                      min_devices=2, quorum=0.5, local_steps=20, max_rank=8, round_timeout_s=100.0,
                                      replan=True), clock=lambda: clock[0])
    plan = json.dumps({"rank": 8, "mode": "lora"})
    fast = c.register("{}", plan, "", "fast")["device_id"]
    slow = c.register("{}", plan, "", "slow")["device_id"]
    tf, ts = c.get_task(fast), c.get_task(slow)
    assert ts["local_steps"] == 20
    from protos import wire
    state = wire.decode_tensors(c.download(fast, tf["round_id"], tf["download_id"]))[0]
    data = wire.encode_tensors(state, {"rank": 8})
    c.upload_append(fast, "f1", 0, data, len(data))
    c.finish_upload(fast, {"round_id": tf["round_id"], "nonce": tf["nonce"], "upload_id": "f1",
                           "total_size": len(data), "sha256": wire.sha256_hex(data),
                           "stats": {"num_examples": 5, "steps": 20, "train_time_s": 10.0}}, len(data))
    clock[0] += 101.0  # the deadline passes without the slow device
    c.tick()
    assert c.get_task(slow)["local_steps"] == 10  # blind halving at the close: no report yet
    with pytest.raises(R.LateUpload):  # 20 steps took 400 s: 20 s/step; budget 0.8 * 100 s -> 4 steps
        c.upload_precheck(slow, ts["round_id"], ts["nonce"], {"steps": 20, "train_time_s": 400.0})
    assert c.get_task(slow)["local_steps"] == 4
    late = [e for e in c.store.events("replan") if e.get("late")]
    assert late and late[0]["device_id"] == slow and late[0]["assignments"][slow] == [8, 4]
    c.close()


def test_coordinator_trains_one_cohort_per_round(tmp_path):
    """A real coordinator with --cohorts 2 and two devices: each round one of them trains, the other
    waits; over a pass (two rounds) each trained once."""
    from edge_runtime.training.tiny import make_tiny_bert
    from coordinator.round_policy import RoundPolicy
    from coordinator.service import Coordinator, CoordinatorConfig
    from protos import wire

    model = make_tiny_bert(tmp_path / "bert", hidden=32, vocab_size=300)
    c = Coordinator(CoordinatorConfig(model=str(model), store=str(tmp_path / "s"), strategy="zero_pad", rounds=2,
                                      local_steps=2, max_rank=4, min_devices=2, policy=RoundPolicy(cohorts=2)))
    assert c.cfg.round_config().cohorts == 2
    with pytest.raises(ValueError, match="--secagg with --cohorts 2"):
        CoordinatorConfig(model="m", store="s", secagg=True, min_devices=2, policy=RoundPolicy(cohorts=2))
    plan = json.dumps({"rank": 4, "mode": "lora"})
    devs = [c.register("{}", plan, "", f"dev{i}")["device_id"] for i in range(2)]
    trained = []
    for rnd in (1, 2):
        tasks = {d: c.get_task(d) for d in devs}
        train = [d for d, t in tasks.items() if t["state"] == "TRAIN"]
        assert len(train) == 1 and tasks[train[0]]["round_id"] == rnd, tasks
        d, t = train[0], tasks[train[0]]
        state = wire.decode_tensors(c.download(d, t["round_id"], t["download_id"]))[0]
        data = wire.encode_tensors(state, {"rank": 4})
        c.upload_append(d, f"u{rnd}", 0, data, len(data))
        stats = {"num_examples": 10, "steps": 2, "train_time_s": 1.0, "upload_time_s": 0.0, "download_time_s": 0.0}
        c.finish_upload(d, {"round_id": rnd, "nonce": t["nonce"], "upload_id": f"u{rnd}", "total_size": len(data),
                            "sha256": wire.sha256_hex(data), "stats": stats}, len(data))
        trained.append(d)
    assert sorted(trained) == sorted(devs)
    c.close()
