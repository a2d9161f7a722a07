"""Emulated device limits: bandwidth shaping, compute pacing, availability, hard memory cap."""
import subprocess
import sys
import textwrap
import time

import pytest

from edge_runtime.emulation import AvailabilityModel, ComputePacer, ShapedLink, remove_empty_cgroups


class FakeTime:
    """A virtual clock for `edge_runtime.emulation` (its `time.monotonic` / `time.sleep`, and its
    links' token buckets): sleeping advances the clock at once and is recorded."""

    def __init__(self) -> None:
        self.now, self.sleeps = 1000.0, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


@pytest.fixture
def fake_time(monkeypatch):
    import functools

    from edge_runtime import emulation

    ft = FakeTime()
    monkeypatch.setattr(emulation, "time", ft)
    monkeypatch.setattr(emulation, "TokenBucket",
                        functools.partial(emulation.TokenBucket, clock=ft.monotonic, sleep=ft.sleep))
    return ft


def test_shaped_link_enforces_rate_and_latency(fake_time):
    link = ShapedLink(mbps=16.0, latency_ms=100)  # 2 MB/s
    t0 = fake_time.now
    for _ in range(20):
        link(50_000)  # 1 MB in one transfer
    # 0.1 s latency + (1 MB - 64 kB burst) / 2 MB/s ~= 0.57 s
    assert fake_time.sleeps[0] == pytest.approx(0.1)
    assert fake_time.now - t0 == pytest.approx(0.1 + (1_000_000 - 64 * 1024) / 2e6)
    assert link.transfers == 1 and link.bucket.total_bytes == 1_000_000
    fake_time.now += 0.6  # silence longer than idle_s: the next call is a new transfer, latency again
    n = len(fake_time.sleeps)
    link(1000)
    assert link.transfers == 2 and fake_time.sleeps[n] == pytest.approx(0.1)


def test_shaped_link_really_sleeps():
    """With the real clock: never faster than the link (a lower bound; sleeps never end early)."""
    link = ShapedLink(mbps=16.0, latency_ms=100)  # 2 MB/s
    t0 = time.monotonic()
    for _ in range(20):
        link(50_000)
    assert time.monotonic() - t0 >= 0.1 + (1_000_000 - 64 * 1024) / 2e6


def test_shaped_link_rejects_bad_rate():
    with pytest.raises(ValueError, match="rate"):
        ShapedLink(0)


def test_compute_pacer_slows_to_device_speed():
    pacer = ComputePacer(device_gflops=10.0, host_gflops=40.0)
    assert pacer.factor == 4.0
    t0 = time.monotonic()
    extra = pacer.pace(0.05)
    assert abs(extra - 0.15) < 1e-9
    assert time.monotonic() - t0 >= 0.15
    assert ComputePacer(device_gflops=400.0, host_gflops=40.0).factor == 1.0


def test_availability_is_seeded_and_matches_rates():
    m = AvailabilityModel(availability=0.7, dropout=0.2, seed=3)
    assert [m.decide(r) for r in range(50)] == [m.decide(r) for r in range(50)]
    decisions = [m.decide(r) for r in range(4000)]
    online = sum(o for o, _ in decisions) / len(decisions)
    drops = sum(d for _, d in decisions) / max(1, sum(o for o, _ in decisions))
    assert abs(online - 0.7) < 0.03 and abs(drops - 0.2) < 0.03


def test_hard_memory_cap_stops_a_runaway_process():
    code = textwrap.dedent("""
        import sys
        from edge_runtime.emulation import apply_memory_cap
        print(apply_memory_cap(300 * 2**20, "test"), flush=True)
        blocks = []
        for _ in range(40):
            blocks.append(bytearray(50 * 2**20))  # touches the pages
        print("not stopped", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    remove_empty_cgroups("edgefed-test-")
    assert "not stopped" not in proc.stdout, proc.stdout
    assert proc.returncode != 0
    print("cap:", proc.stdout.strip().splitlines()[0], "rc:", proc.returncode)


def test_pacing_stops_when_the_round_has_closed_but_reports_the_full_cost(fake_time):
    """A straggler stops sleeping once told its round is over, yet returns the extra time its
    round really needs (what it reports for re-planning)."""
    p = ComputePacer(device_gflops=5.0, host_gflops=40.0)  # x8 slower
    checks = []

    def round_closed() -> bool:  # the round closes at the third check
        checks.append(fake_time.now)
        return len(checks) >= 3

    assert p.pace(1.0, stop=round_closed) == pytest.approx(7.0)
    assert len(checks) == 3  # it stopped when told, not after the full 7 s
    assert fake_time.sleeps == [pytest.approx(0.25), pytest.approx(0.25)]
    assert p.slept_s == pytest.approx(0.5)  # what it really slept, not the 7 s it reports
    assert p.pace(0.01) == pytest.approx(0.07) and p.slept_s == pytest.approx(0.57)


def test_pacing_counts_work_not_contention():
    """A phase that took 2 s of wall but only 0.5 s of CPU (the core was shared) did 0.5 s of host
    work: a device 4x slower than one host thread needs 2 s in all, so no extra sleep."""
    from edge_runtime.emulation import ComputePacer

    p = ComputePacer(device_gflops=10.0, host_gflops=40.0)
    assert p.target_s(2.0, cpu_seconds=0.5) == pytest.approx(2.0)
    assert p.pace(2.0, cpu_seconds=0.5) == 0.0
    assert p.target_s(1.0, cpu_seconds=1.0) == pytest.approx(4.0)  # uncontended: x4
    assert ComputePacer(device_gflops=80.0, host_gflops=40.0).target_s(1.0, cpu_seconds=1.0) == 1.0
