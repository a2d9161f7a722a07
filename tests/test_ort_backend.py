"""ORT-training backend: export, torch parity, adapter-state round trip, torch-free trainer, errors.

Tiny random models (Llama h64 L2, BERT h64 L2), real peft/transformers/onnxruntime-training.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_runtime.ort_backend import ort_available

pytestmark = pytest.mark.skipif(not ort_available(), reason="onnxruntime-training not installed (pip install .[ort])")

ROOT = Path(__file__).resolve().parents[1]
LOSS_TOL = 1e-4      # |loss_torch - loss_ort| per step (observed ~5e-7)
PARAM_TOL = 1e-4     # max |adapter_torch - adapter_ort| after all steps (observed ~2e-6)
STEPS = 6
LR = 1e-2


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                        max_position_embeddings=128))


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                    num_attention_heads=4, vocab_size=256, max_position_embeddings=128,
                                                    num_labels=3, hidden_dropout_prob=0.0,
                                                    attention_probs_dropout_prob=0.0))


def _nonzero_b(pm) -> None:
    """Give LoRA B a non-zero start so gradients reach A from step 1 (a stricter parity check)."""
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(hash(n) % 2**31))


def _batches(task: str, n: int, seq: int = 12, seed: int = 5):
    """(ids [3,S], mask [3,S] with right padding in row 1, labels) torch int64."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 256, (3, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[1, seq - 4:] = 0
        if task == "causal_lm":
            lab = ids.clone()
            lab[mask == 0] = -100
        else:
            lab = torch.randint(0, 3, (3,), generator=g)
        out.append((ids, mask, lab))
    return out


def _export(tmp_path_factory, task: str):
    from peft import get_peft_model_state_dict

    from edge_runtime.ort_backend import AdamWConfig, LoraSpec, add_lora, export_artifacts

    torch.set_num_threads(1)
    targets = ("q_proj", "v_proj") if task == "causal_lm" else ("query", "value")
    pm = add_lora(_llama() if task == "causal_lm" else _bert(), task,
                  LoraSpec(rank=4, lora_alpha=8.0, target_modules=targets))
    _nonzero_b(pm)
    init = {k: v.clone() for k, v in get_peft_model_state_dict(pm).items()}
    d = export_artifacts(pm, tmp_path_factory.mktemp(task), task, AdamWConfig(lr=LR, weight_decay=0.01))
    return pm, init, d


@pytest.fixture(scope="module")
def llama_art(tmp_path_factory):
    return _export(tmp_path_factory, "causal_lm")


@pytest.fixture(scope="module")
def bert_art(tmp_path_factory):
    return _export(tmp_path_factory, "classification")


def _torch_reference(pm, init, batches):
    """Plain torch+peft loop: same start, same batches, torch.optim.AdamW(lr, betas, eps=1e-8, wd=0.01)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    set_peft_model_state_dict(pm, init)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    pm.eval()  # no dropout, as exported
    losses = []
    for ids, mask, lab in batches:
        loss = pm(input_ids=ids, attention_mask=mask, labels=lab).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses, {k: v.clone() for k, v in get_peft_model_state_dict(pm).items()}


@pytest.mark.parametrize("which", ["llama", "bert"])
def test_parity_with_torch_adamw(which, llama_art, bert_art):
    from edge_runtime.ort_backend import OrtTrainer

    pm, init, d = llama_art if which == "llama" else bert_art
    task = "causal_lm" if which == "llama" else "classification"
    tr = OrtTrainer(d, threads=1)
    start = tr.adapter_state()
    assert list(start) == list(init)                                   # exact peft keys, same order
    assert all(v.dtype == torch.float32 for v in start.values())
    assert max(float((start[k] - init[k]).abs().max()) for k in init) == 0.0
    if task == "classification":
        assert any(k.startswith("base_model.model.classifier.") for k in start)   # head is trainable
    batches = _batches(task, STEPS)
    ort_losses = [tr.train_step(ids.numpy(), m.numpy(), lab.numpy()) for ids, m, lab in batches]
    ref_losses, ref_state = _torch_reference(pm, init, batches)
    diffs = [abs(a - b) for a, b in zip(ort_losses, ref_losses)]
    assert max(diffs) < LOSS_TOL, (ort_losses, ref_losses)
    end = tr.adapter_state()
    assert max(float((end[k] - ref_state[k]).abs().max()) for k in ref_state) < PARAM_TOL
    assert max(float((end[k] - init[k]).abs().max()) for k in init) > 1e-3    # it did train


def test_new_round_resets_adapter_and_optimizer(llama_art):
    from edge_runtime.ort_backend import OrtTrainer

    _, init, d = llama_art
    tr = OrtTrainer(d, threads=1)
    batches = [(i.numpy(), m.numpy(), lab.numpy()) for i, m, lab in _batches("causal_lm", 3)]
    first = tr.train(batches)
    trained = tr.adapter_arrays()
    tr.load_adapter_state(init)                                       # global adapter of round 2
    assert all(np.array_equal(tr.adapter_arrays()[k], init[k].numpy()) for k in init)
    assert tr.train(batches) == pytest.approx(first, abs=1e-6)        # fresh AdamW: same trajectory
    tr.load_adapter_state(trained, reset_optimizer=False)             # numpy arrays work too
    assert all(np.array_equal(tr.adapter_arrays()[k], trained[k]) for k in trained)
    key = next(iter(init))
    with pytest.raises(ValueError, match="shape"):
        tr.load_adapter_state({**init, key: torch.zeros(5, 5)})
    with pytest.raises(ValueError, match="missing keys"):
        tr.load_adapter_state({key: init[key]})
    with pytest.raises(ValueError, match="labels shape"):
        tr.train_step(batches[0][0], batches[0][1], batches[0][2][:, :3])


def test_padding_and_other_seq_len_match_torch(llama_art):
    from peft import set_peft_model_state_dict

    from edge_runtime.ort_backend import OrtTrainer

    pm, init, d = llama_art
    tr = OrtTrainer(d, threads=1)
    set_peft_model_state_dict(pm, init)
    pm.eval()
    for seq in (7, 30):                                               # export example used S=16
        ids, mask, lab = _batches("causal_lm", 1, seq=seq, seed=seq)[0]
        with torch.no_grad():
            ref = float(pm(input_ids=ids, attention_mask=mask, labels=lab).loss)
        assert tr.eval_loss(ids.numpy(), mask.numpy(), lab.numpy()) == pytest.approx(ref, abs=LOSS_TOL)


def _run(code: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


def test_trainer_runs_without_torch_and_memory_estimate(llama_art):
    """Fresh process where `import torch` is impossible: the trainer still trains; RSS vs estimate."""
    _, _, d = llama_art
    p = _run(f"""
        import sys, json
        sys.modules["torch"] = None          # any torch import now raises ImportError
        import numpy as np
        from edge_runtime.ort_backend import OrtTrainer
        tr = OrtTrainer({str(d)!r}, threads=1)
        rng = np.random.default_rng(0)
        ids = rng.integers(0, 256, (4, 64)); losses = [tr.train_step(ids, np.ones_like(ids), ids) for _ in range(3)]
        hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]  # kB, this exec only
        print(json.dumps({{"losses": losses, "peak": hwm * 1024,
                          "keys": len(tr.adapter_arrays())}}))
    """)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["losses"][-1] < out["losses"][0] and out["keys"] == 8
    from edge_runtime.ort_backend import ort_memory_bytes

    shape = {"hidden": 64, "layers": 2, "heads": 4, "intermediate": 128, "vocab": 256,
             "n_params": sum(p.numel() for p in _llama().parameters()), "n_trainable": 2048, "task_kind": "causal_lm"}
    est = ort_memory_bytes(shape, {"batch_size": 4, "seq_len": 64})
    assert 0.6 * out["peak"] < est < 1.6 * out["peak"], (est, out["peak"])


def test_missing_and_shadowed_onnxruntime_give_actionable_errors(tmp_path):
    p = _run("""
        import sys; sys.modules["onnxruntime"] = None
        from edge_runtime.ort_backend import require_ort_training
        require_ort_training()
    """)
    assert p.returncode != 0 and "pip install .[ort]" in p.stderr
    # a plain onnxruntime (no training API, own dist-info) ahead on sys.path shadows the training build
    pkg = tmp_path / "onnxruntime"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("__version__ = '1.32.0'\n")
    dist = tmp_path / "onnxruntime-1.32.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime\nVersion: 1.32.0\n")
    p = _run("""
        from edge_runtime.ort_backend import OrtTrainer
        OrtTrainer("unused")
    """, {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    assert p.returncode != 0
    assert "shadowed by plain onnxruntime 1.32.0" in p.stderr and "pip uninstall -y onnxruntime" in p.stderr


def test_memory_estimate_shape_and_errors():
    from edge_runtime.ort_backend import ort_memory_estimate

    spec = {"hidden": 576, "layers": 30, "heads": 9, "intermediate": 1536, "vocab": 49152,
            "n_params": 134_515_008, "n_trainable": 460_800, "task_kind": "causal_lm"}
    small = ort_memory_estimate(spec, {"batch_size": 1, "seq_len": 128})
    big = ort_memory_estimate(spec, {"batch_size": 4, "seq_len": 256})
    assert big.total_bytes > small.total_bytes == sum(small.breakdown.values())
    assert small.breakdown["weights"] >= 134_515_008 * 4                  # fp32 base, always
    assert big.breakdown["weights"] == small.breakdown["weights"]
    with pytest.raises(ValueError, match="lack"):
        ort_memory_estimate({"hidden": 1}, {"batch_size": 1, "seq_len": 8})
    with pytest.raises(ValueError, match="n_trainable"):
        ort_memory_estimate({k: v for k, v in spec.items() if k != "n_trainable"}, {"batch_size": 1, "seq_len": 8})


def test_missing_artifacts_dir_error(tmp_path):
    from edge_runtime.ort_backend import OrtBackendError, OrtTrainer

    with pytest.raises(OrtBackendError, match="export_artifacts"):
        OrtTrainer(tmp_path)


def test_parity_with_project_local_trainer(tmp_path):
    """Same tiny Llama, same adapter, same batches as edge_runtime.training.session.LocalTrainer."""
    session = pytest.importorskip("edge_runtime.training.session")
    from edge_runtime.ort_backend import AdamWConfig, OrtTrainer, export_artifacts
    from edge_runtime.plan import Plan
    from edge_runtime.training import batching
    from edge_runtime.training.tiny import make_tiny_llama

    model_dir = make_tiny_llama(tmp_path / "m", hidden=64, layers=2, vocab_size=300)
    plan = Plan(rank=4, target_modules=["q_proj", "v_proj"], batch_size=2, seq_len=32, learning_rate=LR)
    lt = session.LocalTrainer(model_dir, plan, task="causal_lm", threads=1)
    art = export_artifacts(lt.model, tmp_path / "art", "causal_lm", AdamWConfig(lr=LR, weight_decay=0.0))
    records = [{"instruction": f"repeat number {i}", "input": "", "output": f"number {i} done"} for i in range(8)]
    examples = lt.encode(records)
    stream = batching.bucketed_batches([len(e.input_ids) for e in examples], plan.batch_size, 0)
    batches = [lt._collate(examples, next(stream)) for _ in range(5)]
    tr = OrtTrainer(art, threads=1)
    ort_losses = [tr.train_step(b["input_ids"], b["attention_mask"], b["labels"]) for b in batches]
    res = lt.train(records, steps=5, lr=LR, seed=0, progress=False)
    assert max(abs(a - b) for a, b in zip(ort_losses, res.losses)) < LOSS_TOL, (ort_losses, res.losses)
    ref, got = lt.adapter_state(), tr.adapter_state()
    assert list(got) == list(ref)
    assert max(float((got[k] - ref[k]).abs().max()) for k in ref) < PARAM_TOL
