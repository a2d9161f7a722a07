"""MemoryGuard: trips over budget, interrupts a runaway step, and training keeps the last good adapter."""
import time

import pytest
import torch

from edge_runtime.data import load_sst2
from edge_runtime.plan import Plan
from edge_runtime.training.guard import MemoryBudgetExceeded, MemoryGuard, max_rss_bytes, rss_bytes
from edge_runtime.training.session import LocalTrainer
from edge_runtime.training.tiny import make_tiny_llama

torch.set_num_threads(1)
MiB = 2**20


def test_guard_records_peak_and_trips_on_check():
    with MemoryGuard(None) as g:
        g.check()
    assert g.peak_bytes > 0 and max_rss_bytes() >= g.peak_bytes * 0.5
    with MemoryGuard(rss_bytes() + 64 * MiB, interrupt=False) as g:
        g.check()
        ballast = torch.ones(160 * MiB // 4)  # 160 MiB resident
        with pytest.raises(MemoryBudgetExceeded) as e:
            g.check()
        del ballast
    msg = str(e.value)
    assert msg.startswith("memory budget exceeded: peak ") and "MiB > budget" in msg and "batch_size" in msg
    assert isinstance(e.value, MemoryError) and e.value.peak_bytes > e.value.budget_bytes


def test_guard_interrupts_a_long_running_step():
    g = MemoryGuard(rss_bytes() + 64 * MiB, interval_s=0.01)
    t0 = time.perf_counter()
    with pytest.raises(MemoryBudgetExceeded):
        with g:
            ballast = torch.ones(160 * MiB // 4)
            while time.perf_counter() - t0 < 10:  # a "step" that never calls check()
                ballast.add_(0)
    assert time.perf_counter() - t0 < 5
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
    t.memory_budget_bytes = rss_bytes() // 2  # already far over: the next run must stop
    with pytest.raises(MemoryBudgetExceeded) as e:
        t.train(recs, steps=5, progress=False, checkpoint_dir=tmp_path / "ckpt")
    assert e.value.result.stopped_early and e.value.result.steps == 0
    now = t.adapter_state()
    assert all(torch.equal(now[k], good[k]) for k in good)
    m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(src), tmp_path / "ckpt")
    saved = get_peft_model_state_dict(m)
    assert all(torch.equal(saved[k].float(), good[k]) for k in good)
