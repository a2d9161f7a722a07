"""`edge-runtime plan/estimate/profile` through the real argument parser and entry points."""
import argparse
import json
import subprocess
from pathlib import Path

from edge_runtime import cli_plan
from edge_runtime.plan import Plan
from models import console_script, minilm_dir

ROOT = Path(__file__).resolve().parents[1]


def _run(argv, capsys):
    ap = argparse.ArgumentParser(prog="edge-runtime")
    cli_plan.register(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(argv)
    rc = args.func(args)
    return rc, capsys.readouterr().out


def test_plan_json_parses_as_plan_and_estimate_agrees(tmp_path, capsys):
    model = minilm_dir()
    rc, out = _run(["plan", "--profile", str(ROOT / "profiles/emu-medium-700mb.yaml"), "--model", str(model),
                    "--json", "--out", str(tmp_path / "plan.json")], capsys)
    assert rc == 0
    p = Plan.from_dict(json.loads(out))
    assert p.memory["total_bytes"] <= p.memory["budget_bytes"] and p.reasons
    assert Plan.load(tmp_path / "plan.json") == p
    rc, out = _run(["estimate", "--model", str(model), "--plan", str(tmp_path / "plan.json"), "--json"], capsys)
    mem = json.loads(out)
    assert rc == 0 and mem["total_bytes"] == p.memory["total_bytes"]
    assert sum(mem["breakdown"].values()) == mem["total_bytes"]


def test_plan_table_output(capsys):
    rc, out = _run(["plan", "--profile", str(ROOT / "profiles/desktop-gpu-24gb.yaml"),
                    "--model", str(ROOT / "models/tinyllama-1.1b")], capsys)
    assert rc == 0 and "memory breakdown" in out and "why" in out and "weights_linear" in out


def test_profile_quick_json(tmp_path, capsys):
    rc, out = _run(["profile", "--quick", "--json", "--out", str(tmp_path / "me.yaml")], capsys)
    d = json.loads(out)
    assert rc == 0 and d["kind"] == "measured" and d["compute_gflops"]["fp32"] > 0
    from edge_runtime.profile import load_profile
    assert load_profile(tmp_path / "me.yaml").memory_total_bytes == d["memory_total_bytes"]


def test_console_script_reports_errors(tmp_path):
    """The installed `edge-runtime` console script (not `python -m`): a missing profile is exit 2."""
    r = subprocess.run([str(console_script("edge-runtime")), "plan", "--profile", str(tmp_path / "none.yaml"),
                        "--model", str(minilm_dir())],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_plan_peft_adapter_counts_the_bottleneck_adapters(capsys):
    """`edge-runtime plan --peft adapter`: a plan of that type at the default width, whose estimate counts
    one bottleneck adapter per layer (BERT: MiniLM; Llama: the config-only TinyLlama)."""
    from edge_runtime.memory import trainable_params
    from edge_runtime.modelspec import load_model_spec
    from protos.peft_names import trainable_count

    for model, task in ((minilm_dir(), "classification"), (ROOT / "models/tinyllama-1.1b", "causal_lm")):
        rc, out = _run(["plan", "--profile", str(ROOT / "profiles/desktop-gpu-24gb.yaml"), "--model", str(model),
                        "--peft", "adapter", "--json"], capsys)
        p = Plan.from_dict(json.loads(out))
        spec = load_model_spec(model)
        n = spec.layers * (2 * spec.hidden * p.bottleneck + p.bottleneck + spec.hidden)
        assert rc == 0 and p.peft == "adapter" and p.bottleneck == 16 and any("peft adapter" in r for r in p.reasons)
        assert trainable_count("adapter", spec.architecture, {}, spec.hidden, spec.layers, bottleneck=16) == n
        head = 2 * spec.hidden + 2 if task == "classification" else 0  # a trainable 2-label head
        assert p.memory["breakdown"]["adapter_params"] == 4 * trainable_params(spec, p, task) == 4 * (n + head), model
