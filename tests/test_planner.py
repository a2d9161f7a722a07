"""Planner: never over budget, ZO fallback, clear error when nothing fits."""
from pathlib import Path

import pytest

from edge_runtime.memory import estimate
from edge_runtime.modelspec import load_model_spec, write_config_dir
from edge_runtime.plan import Plan
from edge_runtime.planner import MIN_MARGIN_BYTES, PlanningError, margin_bytes, plan
from edge_runtime.profile import load_profile, profile_from_dict
from models import minilm_dir, smollm2_gguf

ROOT = Path(__file__).resolve().parents[1]
OV = 420 * 2**20
PROFILES = [load_profile(p) for p in sorted((ROOT / "profiles").glob("*.yaml"))]


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    tiny = write_config_dir({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                             "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                             "num_key_value_heads": 2, "vocab_size": 2000, "tie_word_embeddings": True,
                             "max_position_embeddings": 512}, tmp_path_factory.mktemp("m") / "tiny")
    smol = load_model_spec(smollm2_gguf())
    return {
        "minilm": (load_model_spec(minilm_dir()), "classification"),
        # SmolLM2's shapes as an fp32 safetensors source (no GGUF dequantization at load)
        "smollm2-hf": (load_model_spec(write_config_dir(smol, tmp_path_factory.mktemp("m") / "smol")), "causal_lm"),
        "tiny-llama": (load_model_spec(tiny), "causal_lm"),
        "smollm2": (smol, "causal_lm"),
        "tinyllama-1.1b": (load_model_spec(ROOT / "models/tinyllama-1.1b"), "causal_lm"),
        "llama-2-7b": (load_model_spec(ROOT / "models/llama-2-7b"), "causal_lm"),
    }


def test_never_over_budget_on_every_profile(specs):
    planned = 0
    for prof in PROFILES:
        for name, (spec, task) in specs.items():
            try:
                p = plan(prof, spec, task, overhead_bytes=OV)
            except PlanningError as e:
                assert "over by" in str(e)
                continue
            planned += 1
            assert p.memory["total_bytes"] <= p.memory["budget_bytes"], (prof.name, name)
            assert p.base_precision in prof.precisions
            # the plan's memory is what the estimator says for that plan
            gpu = prof.accelerator in ("cuda", "jetson")
            check = estimate(spec, Plan.from_dict({**p.to_dict(), "memory": {}, "reasons": []}), task,
                             overhead_bytes=p.memory["runtime_overhead_bytes"], device="cuda" if gpu else "cpu",
                             unified_memory=gpu and prof.unified_memory)
            assert check.total_bytes == p.memory["total_bytes"]
            assert p.reasons and any("rank" in r for r in p.reasons)
            Plan.from_dict(p.to_dict())  # JSON contract holds
    assert planned >= len(PROFILES) * 2


def test_emulated_profiles_give_different_plans(specs):
    emu = [p for p in PROFILES if p.kind == "emulated"]
    for name in ("minilm", "tiny-llama"):
        spec, task = specs[name]
        plans = []
        for prof in emu:
            try:
                plans.append(plan(prof, spec, task, overhead_bytes=OV))
            except PlanningError:
                continue
        keys = {(p.mode, p.rank, p.base_precision, p.batch_size, p.seq_len, p.gradient_checkpointing) for p in plans}
        assert len(keys) >= 3, (name, keys)
    spec, task = specs["minilm"]
    modes = {plan(p, spec, task, overhead_bytes=OV).mode for p in emu}
    assert modes == {"lora", "zo"}
    # SmolLM2 from GGUF: streamed onto its own 4-bit blocks, it fits the large, medium and small budgets
    # (before issue 15 the fp32 dequantizing load refused all but the largest); not the two smallest
    spec, task = specs["smollm2"]
    for prof in emu:
        if prof.name in ("emu-large-1200mb", "emu-medium-700mb", "emu-small-450mb"):
            p = plan(prof, spec, task, overhead_bytes=OV)
            assert p.mode == "lora" and p.base_precision in ("int8", "nf4", "int4"), prof.name
        else:
            with pytest.raises(PlanningError, match="does not fit by"):
                plan(prof, spec, task, overhead_bytes=OV)


def test_zo_fallback_when_backprop_does_not_fit(specs):
    spec, task = specs["smollm2-hf"]  # from GGUF every small plan's peak is the load peak (test below)
    lora_min = min(estimate(spec, Plan(rank=1, batch_size=1, seq_len=64, gradient_checkpointing=True, base_precision=pr,
                                       target_modules=spec.default_targets), task, overhead_bytes=0).total_bytes
                   for pr in ("fp32", "int8", "nf4", "int4"))
    zo_min = min(estimate(spec, Plan(mode="zo", optimizer="sgd", rank=1, batch_size=1, seq_len=64, base_precision=pr,
                                     target_modules=spec.default_targets), task, overhead_bytes=0).total_bytes
                 for pr in ("fp32", "int8", "nf4", "int4"))
    assert zo_min + MIN_MARGIN_BYTES < lora_min
    budget = lora_min  # LoRA would sit at exactly its budget: refused, a plan keeps a margin
    prof = profile_from_dict({"name": "squeeze", "memory_total": 2**31, "memory_budget": budget,
                              "compute_gflops": {"fp32": 10}, "precisions": ["fp32", "int8", "nf4", "int4"],
                              "budget_excludes_runtime": True, "kind": "emulated"})
    p = plan(prof, spec, task, overhead_bytes=0)
    assert p.mode == "zo" and p.optimizer == "sgd"
    assert p.memory["total_bytes"] <= budget - MIN_MARGIN_BYTES  # the margin is kept
    assert any("no backprop plan fits" in r for r in p.reasons)


def test_impossible_budget_says_by_how_much(specs):
    spec, task = specs["llama-2-7b"]
    prof = load_profile(ROOT / "profiles/jetson-nano-4gb.yaml")
    with pytest.raises(PlanningError) as ei:
        plan(prof, spec, task, overhead_bytes=OV)
    msg = str(ei.value)
    assert "over by" in msg and "bytes" in msg and "jetson-nano-4gb" in msg
    assert "Devices whose profile fits" in msg
    spec, task = specs["tinyllama-1.1b"]
    # a discrete GPU that lists only fp32 (on a CPU a quantized HF base saves nothing: its fp32 file
    # pages stay resident, see docs/memory.md)
    prof = profile_from_dict({"name": "fp32only", "memory_total": "4GiB", "memory_budget": "2GiB", "accelerator": "cuda",
                              "unified_memory": False, "compute_gflops": {"fp32": 10}, "precisions": ["fp32"]})
    with pytest.raises(PlanningError, match="nf4"):
        plan(prof, spec, task, overhead_bytes=OV)


def test_upload_precision_follows_uplink(specs):
    spec, task = specs["smollm2"]
    base = {"name": "net", "memory_total": "8GiB", "memory_budget": "6GiB", "compute_gflops": {"fp32": 100},
            "precisions": ["fp32"], "round_deadline_s": 60}
    fast = plan(profile_from_dict(dict(base, uplink_mbps=100)), spec, task, overhead_bytes=OV)
    slow = plan(profile_from_dict(dict(base, uplink_mbps=0.2)), spec, task, overhead_bytes=OV)
    assert fast.upload_precision == "fp32"
    assert slow.upload_precision in ("fp16", "bf16", "int8") and slow.upload_precision != fast.upload_precision


def test_data_examples_caps_batch(specs):
    spec, task = specs["minilm"]
    prof = load_profile(ROOT / "profiles/laptop-cpu-16gb.yaml")
    assert plan(prof, spec, task, overhead_bytes=OV, data_examples=3).batch_size <= 3


def test_gguf_budget_below_the_floor_is_refused_by_how_much(specs):
    """SmolLM2 from its GGUF file: the smallest plan (on the file's 4-bit blocks, streamed tensor by
    tensor) sets the floor; a budget below it is refused with the shortfall, the same budget plus the
    shortfall plans (and picks a quantized base: the fp32 load no longer sets every plan's peak)."""
    spec, task = specs["smollm2"]
    modes = (dict(mode="zo", optimizer="sgd"), dict(gradient_checkpointing=True))
    est = min((estimate(spec, Plan(rank=1, batch_size=1, seq_len=64, base_precision=pr,
                                   target_modules=spec.default_targets, **m), task, overhead_bytes=OV)
               for pr in ("fp32", "int8", "nf4", "int4") for m in modes), key=lambda e: e.total_bytes)
    budget = est.total_bytes - OV - 64 * 2**20  # 64 MiB short of the floor (above the runtime)
    prof = profile_from_dict({"name": "below-floor", "memory_total": 2**31, "memory_budget": budget,
                              "compute_gflops": {"fp32": 10}, "precisions": ["fp32", "int8", "nf4", "int4"],
                              "budget_excludes_runtime": True, "kind": "emulated"})
    with pytest.raises(PlanningError) as ei:
        plan(prof, spec, task, overhead_bytes=OV, alternatives=[])
    need = est.total_bytes - (budget + OV)
    assert f"does not fit by {need} bytes" in str(ei.value)
    ok = profile_from_dict({"name": "at-floor", "memory_total": 2**31, "memory_budget": budget + need + margin_bytes(est),
                            "compute_gflops": {"fp32": 10}, "precisions": ["fp32", "int8", "nf4", "int4"],
                            "budget_excludes_runtime": True, "kind": "emulated"})
    p = plan(ok, spec, task, overhead_bytes=OV)
    assert p.memory["total_bytes"] <= p.memory["budget_bytes"] and p.base_precision in ("int8", "nf4", "int4")


def test_llama7b_plans_a_4bit_base_on_8gb_boards_again():
    """Issue 15: with the streaming loader (no mapped fp16 file pages) LLaMA-2-7B plans again on 8 GB
    boards: QLoRA (a 4-bit base, backprop) on the Jetson Orin Nano (unified memory), ZO over a 4-bit
    base on the Raspberry Pi 5 (backprop through bitsandbytes on CPU does not fit: docs/memory.md)."""
    spec = load_model_spec(ROOT / "models/llama-2-7b")
    for name, modes in (("jetson-orin-nano-8gb", ("lora",)), ("raspberry-pi-5-8gb", ("lora", "zo"))):
        p = plan(load_profile(ROOT / f"profiles/{name}.yaml"), spec, "causal_lm", overhead_bytes=OV)
        assert p.mode in modes and p.base_precision in ("nf4", "int4"), name
        assert p.memory["total_bytes"] <= p.memory["budget_bytes"]


def test_emulated_demo_fleet_plans_hold(specs):
    """tools/demo_fleet.yaml: MiniLM gets ranks 16/8/4/2 on emu-large/medium/small/tiny and ZO on emu-zo-only."""
    spec, task = specs["minilm"]
    got = {p.name: plan(p, spec, task, overhead_bytes=OV) for p in PROFILES if p.kind == "emulated"}
    assert {n: (p.mode, p.rank) for n, p in got.items() if p.mode == "lora"} == {
        "emu-large-1200mb": ("lora", 16), "emu-medium-700mb": ("lora", 8), "emu-small-450mb": ("lora", 4),
        "emu-tiny-210mb": ("lora", 2)}
    assert got["emu-zo-only-98mb"].mode == "zo"
