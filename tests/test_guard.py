"""MemoryGuard: trips over budget, interrupts a runaway step, and training keeps the last good adapter."""
import time

import pytest
import torch

from edge_runtime.data import load_sst2
from edge_runtime.plan import Plan
from edge_runtime.training.guard import MemoryBudgetExceeded, MemoryGuard, anon_bytes, max_rss_bytes, rss_bytes
from edge_runtime.training.session import LocalTrainer
from edge_runtime.training.tiny import make_tiny_llama

torch.set_num_threads(1)
MiB = 2**20


def test_guard_records_peak_and_trips_on_check():
    with MemoryGuard(None) as g:
        g.check()
    assert g.peak_bytes > 0 and max_rss_bytes() >= g.peak_bytes * 0.5
    with MemoryGuard(anon_bytes() + 64 * MiB, interrupt=False) as g:
        g.check()
        ballast = torch.ones(160 * MiB // 4)  # 160 MiB resident
        with pytest.raises(MemoryBudgetExceeded) as e:
            g.check()
        del ballast
    msg = str(e.value)
    assert msg.startswith("memory budget exceeded: peak ") and "MiB > budget" in msg and "batch_size" in msg
    assert isinstance(e.value, MemoryError) and e.value.peak_bytes > e.value.budget_bytes


def test_guard_interrupts_a_long_running_step():
    g = MemoryGuard(anon_bytes() + 64 * MiB, interval_s=0.01)
    t0 = time.perf_counter()
    with pytest.raises(MemoryBudgetExceeded):
        with g:
            ballast = torch.ones(160 * MiB // 4)
            # a "step" that never calls check() and never ends by itself: only the guard's interrupt
            # gets out of it (the deadline is a safety net against a hang, not a timing window)
            while time.perf_counter() - t0 < 120:
                ballast.add_(0)
            pytest.fail("the guard did not interrupt a step that never calls check() (120 s)")
    assert g.tripped
    with pytest.raises(ValueError):
        MemoryGuard(0)


def test_training_stops_and_keeps_last_good_adapter(tmp_path):
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    src = make_tiny_llama(tmp_path / "m")
    recs = load_sst2("train", limit=64)
    t = LocalTrainer(src, Plan(rank=4, target_modules=["q_proj", "v_proj"], batch_size=4, learning_rate=1e-2),
                     "causal_lm")
    t.train(recs, steps=3, progress=False)
    good = t.adapter_state()
    t.memory_budget_bytes = anon_bytes() // 2  # already far over: the next run must stop
    with pytest.raises(MemoryBudgetExceeded) as e:
        t.train(recs, steps=5, progress=False, checkpoint_dir=tmp_path / "ckpt")
    assert e.value.result.stopped_early and e.value.result.steps == 0
    now = t.adapter_state()
    assert all(torch.equal(now[k], good[k]) for k in good)
    m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(src), tmp_path / "ckpt")
    saved = get_peft_model_state_dict(m)
    assert all(torch.equal(saved[k].float(), good[k]) for k in good)


def test_model_load_is_guarded_and_reported_as_out_of_memory(tmp_path):
    """The guard also watches the model load (limit = budget x1.25 + 96 MiB, below the emulator's hard
    cap): over it, construction stops with LoadOutOfMemory; the CLI exits 3 with the reason."""
    import subprocess
    import sys

    from edge_runtime.training.guard import LoadOutOfMemory, hard_cap_bytes, load_limit_bytes

    src = make_tiny_llama(tmp_path / "m")
    plan = Plan(rank=2, target_modules=["q_proj", "v_proj"], batch_size=2, seq_len=16)
    assert load_limit_bytes(1000 * MiB) < hard_cap_bytes(1000 * MiB)
    budget = int((anon_bytes() - 200 * MiB) / 1.25)  # limit already below this process's RSS
    with pytest.raises(LoadOutOfMemory) as e:
        LocalTrainer(src, plan, "causal_lm", memory_budget_bytes=budget)
    assert "out of memory while loading m at fp32" in str(e.value) and "edge-runtime plan" in str(e.value)
    t = LocalTrainer(src, plan, "causal_lm", memory_budget_bytes=anon_bytes() + 256 * MiB)  # room: loads
    assert t.load_peak_sampled_bytes > 0
    assert LocalTrainer(src, plan, "causal_lm", memory_budget_bytes=budget, guard_load=False).base is not None
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "Say hi.", "output": "hi"}\n')
    (tmp_path / "plan.json").write_text(plan.to_json())
    proc = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "train", "--model", str(src), "--data", str(data),
                           "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "out"), "--task", "causal_lm",
                           "--budget", "1", "--steps", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-1500:]
    assert "out of memory while loading" in proc.stderr


def test_guard_counts_anonymous_memory_not_clean_file_pages(tmp_path):
    """What an OOM killer counts: a mmapped file read end to end (clean file pages, reclaimable)
    raises the RSS but not the guard's figure; the same bytes copied into the heap raise both."""
    import mmap

    f = tmp_path / "blob.bin"
    f.write_bytes(b"\x01" * (96 * MiB))
    with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
        rss0, anon0 = rss_bytes(), anon_bytes()
        total = sum(m[i] for i in range(0, len(m), 4096))  # touch every page
        rss1, anon1 = rss_bytes(), anon_bytes()
        heap = bytearray(m[:])  # 96 MiB of anonymous memory
        anon2 = anon_bytes()
        del heap
    assert total == len(range(0, 96 * MiB, 4096))
    assert rss1 - rss0 > 80 * MiB  # the file's pages are resident ...
    assert anon1 - anon0 < 16 * MiB  # ... but not anonymous
    assert anon2 - anon1 > 80 * MiB
    with MemoryGuard(None) as g:
        assert abs(g.sample() - anon_bytes()) < 16 * MiB


def test_runtime_overhead_is_counted_as_the_guard_counts(tmp_path, monkeypatch):
    """One measure of memory: the runtime overhead the planner adds to a "budget excludes the runtime"
    budget (and the Flower guard limit) is the killable memory of a fresh torch+transformers+peft
    interpreter, not its RSS (the libraries' clean file pages, ~90 MiB, are not what the guard counts)."""
    import json

    import peft  # noqa: F401  (this process then holds at least what the measured interpreter holds)
    import transformers  # noqa: F401

    from edge_runtime import measure
    from edge_runtime.flower_client import runtime_overhead_here

    monkeypatch.setattr(measure, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(measure, "_OVERHEAD", None)
    ov = measure.measure_runtime_overhead(refresh=True)
    assert json.loads((tmp_path / "runtime_overhead.json").read_text())["key"].endswith(",anon")
    assert 100 * MiB < ov <= anon_bytes() + 16 * MiB, (ov, anon_bytes())  # the guard's measure ...
    assert rss_bytes() - anon_bytes() > 40 * MiB  # ... which leaves the mapped libraries' pages out
    assert ov < rss_bytes() - 40 * MiB, (ov, rss_bytes())
    assert abs(runtime_overhead_here() - max(ov, anon_bytes())) < 16 * MiB
