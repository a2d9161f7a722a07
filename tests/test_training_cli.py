"""`edge-runtime train / generate / export` through the argparse entry points."""
import argparse
import json

import pytest
import torch

from edge_runtime import cli_train
from edge_runtime.plan import Plan
from edge_runtime.training.tiny import make_tiny_llama

torch.set_num_threads(1)


def run(argv):
    """edge_runtime.cli.main when all command modules exist, else a parser with only cli_train."""
    try:
        from edge_runtime.cli import main
        return main(argv)
    except ModuleNotFoundError:
        p = argparse.ArgumentParser()
        cli_train.register(p.add_subparsers(dest="command", required=True))
        args = p.parse_args(argv)
        return args.func(args)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    model = make_tiny_llama(d / "llama")
    data = d / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"repeat the word {w}", "input": "", "output": w}) + "\n"
                            for w in ["good", "bad", "film", "movie"] * 4))
    plan = d / "plan.json"
    plan.write_text(Plan(rank=4, target_modules=["q_proj", "v_proj"], batch_size=4, learning_rate=1e-2).to_json())
    return d, model, data, plan


def test_train_writes_peft_adapter_and_metrics(setup, capsys):
    d, model, data, plan = setup
    rc = run(["train", "--model", str(model), "--data", str(data), "--plan", str(plan), "--out", str(d / "out"),
              "--steps", "4", "--json", "--threads", "1"])
    assert rc == 0
    m = json.loads((d / "out" / "train_metrics.json").read_text())
    assert m["task"] == "causal_lm" and m["train"]["steps"] == 4 and m["rank"] == 4
    assert json.loads(capsys.readouterr().out)["train"]["steps"] == 4
    assert (d / "out" / "adapter_config.json").is_file() and (d / "out" / "adapter_model.safetensors").is_file()
    rc = run(["generate", "--model", str(model), "--adapter", str(d / "out"), "--prompt", "repeat the word good",
              "--max-new-tokens", "3", "--json"])
    assert rc == 0 and "completion" in json.loads(capsys.readouterr().out)


def test_export_adapter_state(setup, capsys):
    from safetensors.torch import save_file

    from edge_runtime.training.session import LocalTrainer

    d, model, data, plan = setup
    t = LocalTrainer(model, Plan.load(plan), "causal_lm")
    state = {k: v + 0.25 for k, v in t.adapter_state().items()}
    save_file(state, str(d / "state.safetensors"), metadata={"lora_alpha": "8"})
    rc = run(["export", "--model", str(model), "--adapter-state", str(d / "state.safetensors"), "--plan", str(plan),
              "--out", str(d / "exp"), "--task", "causal_lm", "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["lora_alpha"] == 8.0
    cfg = json.loads((d / "exp" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0


def test_train_bad_plan_is_an_error(setup, capsys):
    d, model, data, _ = setup
    bad = d / "bad.json"
    bad.write_text(json.dumps({"rank": 0}))
    with pytest.raises(ValueError, match="rank"):
        cli_train.cmd_train(argparse.Namespace(plan=str(bad), data=str(data), model=str(model)))
