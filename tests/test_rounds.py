"""coordinator.rounds: the pure round state machine (selection, quorum, deadline, stragglers, dropouts)."""
import pytest

from coordinator import rounds as R


def fed(n=4, **kw):
    cfg = R.RoundConfig(**{"total_rounds": 2, "min_devices": 2, "round_timeout_s": 100.0,
                           "heartbeat_timeout_s": 30.0, "max_rank": 8, **kw})
    devices = {}
    for i in range(n):
        d = R.enrol(devices, f"d{i}", f"dev{i}", plan_rank=4 * (i + 1), mode="lora", cfg=cfg, now=0.0)
        devices[d.device_id] = d
    return cfg, devices


def nonces(devices):
    return {d: f"n-{d}" for d in devices}


def test_assigned_rank_capped_by_plan_and_max_rank():
    cfg, devices = fed(4, max_rank=8)
    assert [devices[f"d{i}"].assigned_rank for i in range(4)] == [4, 8, 8, 8]
    with pytest.raises(R.EnrolmentRefused, match="--max-rank 4"):
        R.assign_rank(4, R.RoundConfig(strategy="fedavg", common_rank=True, max_rank=8))
    assert R.assign_rank(16, R.RoundConfig(strategy="fedavg", common_rank=True, max_rank=8)) == 8


def test_re_enrolling_the_same_name_keeps_the_id():
    cfg, devices = fed(2)
    again = R.enrol(devices, "new-id", "dev1", plan_rank=2, mode="zo", cfg=cfg, now=5.0)
    assert again.device_id == "d1" and again.assigned_rank == 2 and again.mode == "zo"


def test_selection_needs_min_devices_and_is_deterministic():
    cfg, devices = fed(4, fraction=0.5, min_devices=2)
    r1 = R.open_round(devices, cfg, 1, now=1.0, nonce_of=nonces(devices))
    assert len(r1.selected) == 2 and r1.deadline == 101.0
    assert R.open_round(devices, cfg, 1, now=1.0, nonce_of=nonces(devices)).selected == r1.selected
    cfg3, few = fed(1, min_devices=2)
    assert R.open_round(few, cfg3, 1, now=1.0, nonce_of=nonces(few)) is None


def test_silent_devices_are_not_available():
    cfg, devices = fed(3, min_devices=3)
    assert R.open_round(devices, cfg, 1, now=31.0, nonce_of=nonces(devices)) is None  # all silent for 31 s
    assert R.available(devices, cfg, now=30.0) == ["d0", "d1", "d2"]


def test_round_closes_when_all_uploaded_and_aggregates():
    cfg, devices = fed(3, min_devices=3)
    r = R.open_round(devices, cfg, 1, now=0.0, nonce_of=nonces(devices))
    for d in r.selected:
        R.check_upload(r, 1, d, f"n-{d}")
        r = R.accept(r, d)
        assert R.should_close(r, 1.0) == (d == r.selected[-1])
    assert R.close(r, cfg, 1.0).state == R.AGGREGATED


def test_deadline_with_and_without_quorum():
    cfg, devices = fed(4, min_devices=4, quorum=0.5)
    r = R.open_round(devices, cfg, 1, now=0.0, nonce_of=nonces(devices))
    r = R.accept(r, "d0")
    assert not R.should_close(r, 50.0) and R.should_close(r, 100.0)
    assert R.quorum_size(r, cfg) == 2
    assert R.close(r, cfg, 100.0).state == R.FAILED
    assert R.close(R.accept(r, "d1"), cfg, 100.0).state == R.AGGREGATED


def test_stragglers_wrong_round_nonce_and_duplicates():
    cfg, devices = fed(2, min_devices=2)
    r = R.open_round(devices, cfg, 3, now=0.0, nonce_of=nonces(devices))
    with pytest.raises(R.LateUpload):
        R.check_upload(r, 2, "d0", "n-d0")  # an older round: a straggler
    with pytest.raises(R.WrongRound, match="does not exist"):
        R.check_upload(r, 4, "d0", "n-d0")
    with pytest.raises(R.WrongRound, match="nonce"):
        R.check_upload(r, 3, "d0", "stale")
    with pytest.raises(R.NotSelected):
        R.check_upload(r, 3, "zz", "n-zz")
    r = R.accept(r, "d0")
    with pytest.raises(R.DuplicateUpload):
        R.check_upload(r, 3, "d0", "n-d0")
    closed = R.close(r, cfg, 200.0)
    with pytest.raises(R.LateUpload, match="late uploads are rejected"):
        R.check_upload(closed, 3, "d1", "n-d1")
    assert R.count_late(closed).late == 1
    assert R.LateUpload.code == "FAILED_PRECONDITION" and R.UnknownDevice.code == "UNAUTHENTICATED"


def test_dropouts_end_the_wait_early():
    cfg, devices = fed(3, min_devices=3, quorum=0.6)
    r = R.open_round(devices, cfg, 1, now=0.0, nonce_of=nonces(devices))
    r = R.accept(R.accept(r, "d0"), "d1")
    assert not R.should_close(r, 20.0)
    devices = {k: (v if k == "d2" else R.Device(**{**v.__dict__, "last_seen": 25.0})) for k, v in devices.items()}
    r2 = R.mark_dropouts(r, devices, cfg, now=31.0)  # d2 silent since t=0
    assert r2.dropped == ("d2",) and R.should_close(r2, 31.0)
    assert R.close(r2, cfg, 31.0).state == R.AGGREGATED  # 2 of 3 >= ceil(0.6 * 3)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="quorum"):
        R.RoundConfig(quorum=0.0)
    with pytest.raises(ValueError, match="min_devices"):
        R.RoundConfig(min_devices=0)


def test_cohorts_train_every_device_once_per_pass():
    cfg, devices = fed(7, cohorts=3, min_devices=2)
    names = sorted(devices)
    for p in range(3):  # passes
        groups = [R.open_round(devices, cfg, 3 * p + i + 1, now=1.0, nonce_of=nonces(devices)).selected
                  for i in range(3)]
        assert sorted(x for g in groups for x in g) == names  # each device exactly once per pass
        assert sorted(len(g) for g in groups) == [2, 2, 3]
    assert R.cohort(names, 3, 0, 1) == R.cohort(names, 3, 0, 1) != R.cohort(names, 3, 1, 1)  # seeded
    assert {R.cohort(names, 3, 0, 1), R.cohort(names, 3, 0, 4)} != {R.cohort(names, 3, 0, 1)}  # reshuffled per pass
    assert R.cohort(names, 1, 0, 5) == tuple(names)
    assert all(len(R.cohort(["a", "b"], 5, 0, r)) == 1 for r in range(1, 11))  # fewer devices than cohorts
    with pytest.raises(ValueError, match="cohorts=2 with fraction=0.5: choose one"):
        R.RoundConfig(cohorts=2, fraction=0.5)
    with pytest.raises(ValueError, match="cohorts=0"):
        R.RoundConfig(cohorts=0)
