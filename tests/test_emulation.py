"""Emulated device limits: bandwidth shaping, compute pacing, availability, hard memory cap."""
import subprocess
import sys
import textwrap
import time

import pytest

from edge_runtime.emulation import AvailabilityModel, ComputePacer, ShapedLink, remove_empty_cgroups


def test_shaped_link_enforces_rate_and_latency():
    link = ShapedLink(mbps=16.0, latency_ms=100)  # 2 MB/s
    t0 = time.monotonic()
    for _ in range(20):
        link(50_000)  # 1 MB in one transfer
    elapsed = time.monotonic() - t0
    # 0.1 s latency + (1 MB - 64 kB burst) / 2 MB/s ~= 0.57 s
    assert 0.5 < elapsed < 1.0, elapsed
    assert link.transfers == 1 and link.bucket.total_bytes == 1_000_000


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


def test_pacing_stops_when_the_round_has_closed_but_reports_the_full_cost():
    """A straggler stops sleeping once told its round is over, yet returns the extra time its
    round really needs (what it reports for re-planning)."""
    import time as _time

    from edge_runtime.emulation import ComputePacer

    p = ComputePacer(device_gflops=5.0, host_gflops=40.0)  # x8 slower
    t0 = _time.monotonic()
    assert p.pace(1.0, stop=lambda: _time.monotonic() - t0 > 0.3) == pytest.approx(7.0)
    assert _time.monotonic() - t0 < 1.5 and 0.2 < p.slept_s < 1.0
    assert p.pace(0.01) == pytest.approx(0.07) and p.slept_s < 1.2


def test_pacing_counts_work_not_contention():
    """A phase that took 2 s of wall but only 0.5 s of CPU (the core was shared) did 0.5 s of host
    work: a device 4x slower than one host thread needs 2 s in all, so no extra sleep."""
    from edge_runtime.emulation import ComputePacer

    p = ComputePacer(device_gflops=10.0, host_gflops=40.0)
    assert p.target_s(2.0, cpu_seconds=0.5) == pytest.approx(2.0)
    assert p.pace(2.0, cpu_seconds=0.5) == 0.0
    assert p.target_s(1.0, cpu_seconds=1.0) == pytest.approx(4.0)  # uncontended: x4
    assert ComputePacer(device_gflops=80.0, host_gflops=40.0).target_s(1.0, cpu_seconds=1.0) == 1.0
