"""Import footprint of the device runtime, checked in fresh interpreters with real imports.

- The modules an idle `edge-runtime join` loads do not import torch / transformers / peft /
  numpy, and a real join that has registered and is polling has not imported them either.
- An fp32 training process keeps bitsandbytes out (peft would import it); an nf4 plan in the
  same process (an out-of-memory step-down) still gets bitsandbytes' LoRA layers.
See docs/footprint.md.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "numpy")
IDLE_MODULES = ("edge_runtime.cli", "edge_runtime.cli_join", "edge_runtime.client", "edge_runtime.data",
                "edge_runtime.profile", "edge_runtime.plan", "edge_runtime.planner", "edge_runtime.modelspec",
                "edge_runtime.emulation", "edge_runtime.metrics", "protos.wire")


def _child(code: str, timeout: float = 120) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON line last."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "TRANSFORMERS_VERBOSITY": "error"}
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def _loaded(names: tuple[str, ...] = HEAVY) -> str:
    return f"{{m: sys.modules.get(m) is not None for m in {names!r}}}"


def test_idle_join_modules_do_not_import_the_training_stack():
    code = (f"import importlib, json, sys\n"
            f"for m in {IDLE_MODULES!r}:\n    importlib.import_module(m)\n"
            f"import edge_runtime.cli\nedge_runtime.cli.build_parser()\n"
            f"print(json.dumps({_loaded()}))")
    assert _child(code) == {m: False for m in HEAVY}


def test_registered_waiting_device_has_not_imported_torch(tmp_path):
    from coordinator.server import create_server
    from coordinator.service import Coordinator, CoordinatorConfig
    from edge_runtime.data import load_sst2
    from edge_runtime.plan import Plan
    from edge_runtime.training.tiny import make_tiny_bert

    model = make_tiny_bert(tmp_path / "bert")
    (tmp_path / "plan.json").write_text(Plan(target_modules=["query", "value"]).to_json())
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in load_sst2("train", limit=32)))
    coord = Coordinator(CoordinatorConfig(model=str(model), store=str(tmp_path / "store"), min_devices=100,
                                          poll_interval_s=0.2))
    server, port = create_server("127.0.0.1:0", coord, tick_interval_s=0.2)
    server.start()
    args = ["join", f"127.0.0.1:{port}", "--insecure", "--profile", str(ROOT / "profiles" / "jetson-nano-4gb.yaml"),
            "--model", str(model), "--data", str(tmp_path / "data.jsonl"), "--plan", str(tmp_path / "plan.json")]
    # the child records what its GetTask polls answer and reports its modules once it has been told
    # WAIT twice (the round needs 100 devices): registered, and idling in the poll loop
    code = (f"import json, os, sys, threading\nfrom edge_runtime import cli, client\n"
            f"waited, states = threading.Event(), []\n"
            f"get_task = client.FederationClient.get_task\n"
            f"def polling_get_task(self):\n"
            f"    t = get_task(self)\n"
            f"    states.append(t.state)\n"
            f"    if states.count(type(t).WAIT) >= 2:\n"
            f"        waited.set()\n"
            f"    return t\n"
            f"client.FederationClient.get_task = polling_get_task\n"
            f"threading.Thread(target=cli.main, args=({args!r},), daemon=True).start()\n"
            f"assert waited.wait(60), f'no two WAIT answers to GetTask within 60 s (states {{states}})'\n"
            f"print(json.dumps({_loaded()}), flush=True)\nos._exit(0)")
    try:
        out = _child(code)
        assert len(coord.fed.devices) == 1  # it did register
    finally:
        server.stop(0)
        coord.close()
    assert out == {m: False for m in HEAVY}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from edge_runtime.training.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("m") / "llama")


def test_fp32_training_hides_bitsandbytes_and_nf4_step_down_loads_it(llama):
    code = f"""
import json, sys
import torch
torch.set_num_threads(1)
from edge_runtime.data import load_sst2
from edge_runtime.plan import Plan
from edge_runtime.training.session import LocalTrainer
recs = load_sst2("train", limit=8)
out = {{}}
qv = ["q_proj", "v_proj"]
t = LocalTrainer({str(llama)!r}, Plan(rank=2, target_modules=qv, base_precision="fp32", batch_size=4), "causal_lm")
out["fp32"] = {_loaded()}
out["fp32_steps"] = t.train(recs, steps=1, progress=False).steps
del t
t = LocalTrainer({str(llama)!r}, Plan(rank=2, target_modules=qv, base_precision="nf4", batch_size=4), "causal_lm")
out["nf4"] = {_loaded()}
layer = t.model.base_model.model.model.layers[0].self_attn.q_proj
out["nf4_layers"] = [type(layer).__module__, type(layer.base_layer).__name__]
out["nf4_steps"] = t.train(recs, steps=1, progress=False).steps
print(json.dumps(out))
"""
    out = _child(code, timeout=240)
    assert out["fp32"]["peft"] and not out["fp32"]["bitsandbytes"], out
    assert out["fp32_steps"] == 1
    assert out["nf4"]["bitsandbytes"], out
    # peft's bitsandbytes LoRA layer (not its plain Linear one): the caches filled while hidden were cleared
    assert out["nf4_layers"] == ["peft.tuners.lora.bnb", "RowChunkedLinear4bit"], out
    assert out["nf4_steps"] == 1
