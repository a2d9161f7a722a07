"""Flower's deployment engine for real (tools/flower_deploy.py): a `flower-superlink` process and five
`flower-supernode` processes on 127.0.0.1, TLS between them (development CA from `edge-coordinator
certs`), SuperNode authentication (EC keys registered with `flwr supernode register`), and the app
submitted with `flwr run` (pyproject.toml [tool.flwr.app]). A sixth SuperNode whose key was never
registered must be refused.

Four heterogeneous devices on a tiny BERT (tests/test_flower.py's fleet: LoRA plans capped to ranks
8/4/2 and one planned into zeroth-order mode), each planning for itself from the profile in its node
config and training under the memory guard, plus one whose given plan needs far more memory than its
profile allows: its guard trips and the OOM step-down finishes the round at a smaller micro-batch.
Two svd rounds; the ServerApp's round journal holds what each SuperNode was sent and uploaded (ZO:
seeds and scalars only). The test refolds those uploads with our own round engine
(coordinator.engine.RoundEngine) from an initial global it builds itself, checks every download
equals what the engine would send, and that the aggregated adapter Flower produced equals the
engine's within 1e-6, round after round.
"""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from test_flower import ALPHA, MAX_RANK, fleet  # noqa: F401  (module fixture: tiny BERT, shards, profiles)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
HAS_FLWR = importlib.util.find_spec("flwr") is not None
pytestmark = pytest.mark.skipif(not HAS_FLWR, reason="flwr is not installed (optional extra 'flower': "
                                                     "pip install flwr==1.42.0)")
ROUNDS, STRATEGY, SEED = 2, "svd", 0
MiB = 2**20


def _stepdown_node(fleet, out: Path) -> dict:
    """A fifth device whose plan (batch 64 x 256 tokens of long rows) needs several hundred MiB above the
    runtime while its profile allows 32 MiB above the ClientApp's runtime (counted as the guard counts it,
    killable memory, since issue 15; the generous margin dates from when it was RSS incl. file pages): its
    memory guard must trip and step it down."""
    import yaml

    from edge_runtime.data import load_sst2
    from edge_runtime.plan import Plan

    (out / "stepdown.yaml").write_text(yaml.safe_dump({
        "name": "emu-stepdown", "kind": "emulated", "memory_total": "2GiB", "memory_budget": 32 * MiB,
        "compute_gflops": {"fp32": 5.0}, "precisions": ["fp32"], "budget_excludes_runtime": True}))
    plan = Plan(rank=4, target_modules=["query", "value"], batch_size=64, seq_len=256, learning_rate=1e-2)
    (out / "stepdown-plan.json").write_text(plan.to_json())
    rows = [dict(r, text=(r["text"] + " ") * 16) for r in load_sst2("train", limit=160)[32:160]]
    (out / "stepdown.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": fleet["model"], "profile": str(out / "stepdown.yaml"), "data": str(out / "stepdown.jsonl"),
            "plan": str(out / "stepdown-plan.json"), "threads": 1}


def _deploy(fleet, out: Path) -> Path:  # noqa: F811
    """Run the federation on real Flower processes; returns the journal directory."""
    from coordinator.flower_run import read_journal
    from flower_deploy import Deployment, stage_app

    journal = out / "journal"
    rc = {"model": fleet["model"], "strategy": STRATEGY, "num-server-rounds": ROUNDS, "max-rank": MAX_RANK,
          "lora-alpha": ALPHA, "local-steps": 2, "lr": 1e-2, "zo-lr": 1e-3, "seed": SEED,
          "min-clients": len(fleet["nodes"]) + 1, "journal": str(journal), "journal-tensors": True}
    with Deployment(out, tls=True, auth=True) as dep:
        dep.start_superlink()
        nodes = {f"device{i}": {**nc, "enforce-budget": True} for i, nc in enumerate(fleet["nodes"])}  # guard on
        dep.start_supernodes({**nodes, "stepdown": _stepdown_node(fleet, out)})
        intruder = dep.start_supernodes({"intruder": fleet["nodes"][0]}, register=False)[0]  # key not registered
        run_id = dep.run(rc, stage_app(out))  # the project's pyproject.toml and packages, minus .venv to walk
        status = dep.wait(run_id, timeout_s=240,
                          near_end=lambda: any(r["round"] == ROUNDS for r in read_journal(journal)))
        registered = json.loads(dep.flwr("supernode", "ls", "local").stdout or "{}")
        assert status == "finished:completed", f"run {run_id}: {status}\n{dep.tail()}"
        log = (out / "logs" / "superlink.log").read_text()
        refused = intruder.poll() not in (None, 0) and "Failed to activate SuperNode" in \
            (out / "logs" / "supernode-intruder.log").read_text()
    assert refused, "a SuperNode with an unregistered key was not refused"
    assert "https://127.0.0.1" in log or "Uvicorn running on https" in log, "the SuperLink did not serve TLS"
    assert len(registered.get("nodes", [])) == len(fleet["nodes"]) + 1, registered  # all registered (node authentication)
    return journal


def _refold(fleet, journal: Path) -> list[float]:  # noqa: F811
    """Fold every journalled upload with our engine; per round the max |Flower global - engine global|."""
    from safetensors.torch import load_file

    from coordinator.engine import RoundEngine
    from coordinator.flower_strategy import export_state
    from coordinator.methods import MethodConfig, make_method
    from coordinator.model import initial_adapter_state, load_base_model, resolve_target_modules
    from coordinator.round_policy import RoundPolicy
    from coordinator.server_opt import ServerOptState

    model, _ = load_base_model(fleet["model"], "classification", 2, SEED)
    targets = resolve_target_modules(model, None)
    method = make_method(MethodConfig(name=STRATEGY, max_rank=MAX_RANK, lora_alpha=ALPHA, use_rslora=False,
                                      cap_rank=64))
    g = method.initial(initial_adapter_state(model, targets, MAX_RANK, ALPHA, False, SEED))
    opt, errors, ranks, zo_clients = ServerOptState(), [], set(), 0
    for r in range(1, ROUNDS + 1):
        tensors = load_file(str(journal / f"round-{r}.safetensors"))
        meta = json.loads((journal / f"round-{r}.json").read_text())
        assert len(meta["clients"]) == len(fleet["nodes"]) + 1, meta
        engine = RoundEngine(method, g, r, 1e4, RoundPolicy(), opt)
        for cid, info in sorted(meta["clients"].items()):
            sent = {k.split("/", 2)[2]: v for k, v in tensors.items() if k.startswith(f"sent/{cid}/")}
            mine = engine.download(info["rank"], info["mode"], SEED + r)
            assert sorted(mine) == sorted(sent) and all(torch.equal(mine[k], sent[k]) for k in mine), cid
            ranks.add(info["rank"])
            if info["mode"] == "zo":
                zo_clients += 1
                assert not any(k.startswith(f"upload/{cid}/") for k in tensors), "a ZO device uploaded tensors"
                state = RoundEngine.replay_zo(sent, [(int(s), float(v)) for s, v in info["zo"]], info["zo_lr"])
            else:
                state = {k.split("/", 2)[2]: v for k, v in tensors.items() if k.startswith(f"upload/{cid}/")}
            engine.accept(cid, state, float(max(info["examples"], 1)), sent, info["mode"], progress=info["progress"],
                          loss=info["train_loss"])
        g, _ = engine.close()
        ours = export_state(g, method)
        flower = {k[len("global/"):]: v for k, v in tensors.items() if k.startswith("global/")}
        assert sorted(ours) == sorted(flower)
        errors.append(max(float((ours[k].double() - flower[k].double()).abs().max()) for k in ours))
    assert ranks == {8, 4, 2} and zo_clients == ROUNDS, (ranks, zo_clients)  # heterogeneous ranks + a ZO device
    return errors


@pytest.mark.timeout(400)
def test_superlink_and_supernodes_fold_like_our_engine(fleet, tmp_path):  # noqa: F811
    journal = _deploy(fleet, tmp_path)
    errors = _refold(fleet, journal)
    assert max(errors) <= 1e-6, errors
    rows = [json.loads(line) for line in (journal / "rounds.jsonl").read_text().splitlines()]
    fits = [r for r in rows if r["kind"] == "fit"]
    assert [r["round"] for r in fits] == [1, 2] and all(r["uploads"] == 5 and r["rejected"] == 0 for r in fits)
    assert all(c["peak_rss_bytes"] for r in fits for c in r["clients"].values())  # trained in their own processes
    small = [c for r in fits for c in r["clients"].values() if c["profile"] == "emu-stepdown"]
    assert len(small) == ROUNDS and small[0]["stepdown"], "the over-budget plan did not step down"
    ev = small[0]["stepdown"][0]
    assert ev["error"] == "MemoryBudgetExceeded" and ev["to"]["batch_size"] < 64, ev
    assert ev["estimator"]["measured_peak_bytes"] > ev["estimator"]["budget_bytes"], ev


# -- bad input, the manifest (no processes) -------------------------------------------------------
def test_run_config_is_read_and_bad_values_name_the_key():
    from coordinator.flower_run import flower_config
    from coordinator.round_policy import RoundPolicy

    cfg = flower_config({"strategy": "zero_pad", "max-rank": 4, "zo-progress": "false", "lr-decay": 0.9,
                         "zo-local-steps": 7, "min-clients": 3})
    assert (cfg.strategy, cfg.max_rank, cfg.zo_local_steps, cfg.min_fit_clients) == ("zero_pad", 4, 7, 3)
    assert not cfg.policy.zo_progress and cfg.policy.lr_decay == 0.9
    assert flower_config({}).policy == RoundPolicy()  # serve's defaults
    with pytest.raises(ValueError, match=r"max-rank='eight': expected int .*--run-config"):
        flower_config({"max-rank": "eight"})
    with pytest.raises(ValueError, match="zo-progress='maybe'"):
        flower_config({"zo-progress": "maybe"})
    with pytest.raises(ValueError, match="run config: --lr-decay 0.0.*without '--'"):
        flower_config({"lr-decay": 0.0})


def test_server_app_without_a_model_says_how_to_set_it():
    from flwr.app import Context, RecordDict

    from coordinator.flower_strategy import server_fn

    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={"model": ""})
    with pytest.raises(ValueError, match="run config needs 'model'.*--run-config"):
        server_fn(ctx)


def test_manifest_is_valid_for_flower_and_every_key_is_read():
    """pyproject.toml's [tool.flwr.app] passes Flower's own validation (components importable), and every
    run-config key it declares is one the ServerApp reads (coordinator/flower_run.py, server_fn)."""
    import tomllib

    from flwr.common.config import validate_config

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    ok, errors, _ = validate_config(cfg, check_module=True, project_dir=ROOT)
    assert ok, errors
    read = (ROOT / "coordinator" / "flower_run.py").read_text() + (ROOT / "coordinator" / "flower_strategy.py").read_text()
    declared = cfg["tool"]["flwr"]["app"]["config"]
    unread = [k for k in declared if f'"{k}"' not in read]
    assert unread == [], f"run config keys nothing reads: {unread}"
    import dataclasses

    from coordinator.round_policy import RoundPolicy
    missing = [f.name for f in dataclasses.fields(RoundPolicy) if f.name != "server_opt"
               and f.name.replace("_", "-") not in declared]
    assert missing == [], f"round-policy settings the Flower app cannot set: {missing}"


def test_deploy_helpers_refuse_bad_input(tmp_path):
    from flower_deploy import Deployment, node_config_arg

    with pytest.raises(ValueError, match="needs TLS"):
        Deployment(tmp_path, tls=False, auth=True)
    with pytest.raises(ValueError, match="spaces"):
        node_config_arg({"data": "/my data/shard.jsonl"})
    assert node_config_arg({"model": "/m", "threads": 1, "enforce-budget": True}) == \
        'model="/m" threads=1 enforce-budget=true'


def test_relative_out_becomes_absolute(tmp_path, monkeypatch):
    """`--out runs/flower_demo` (the README's command): Flower's connection config refuses relative
    certificate paths, so the deployment works under the absolute path of `out`."""
    from flower_deploy import Deployment

    monkeypatch.chdir(tmp_path)
    dep = Deployment(Path("runs/flower_demo"), tls=True, auth=True)
    assert dep.out == tmp_path / "runs" / "flower_demo" and dep.pki.is_absolute() and dep.home.is_absolute()
