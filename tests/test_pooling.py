"""A sentence-embedding checkpoint's own pooling (protos.pooling) on both sides, with the real MiniLM."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from protos.pooling import NORMALIZED_SCALE, SentencePooler, checkpoint_pooling, use_checkpoint_pooling
from tests.models import minilm_dir


def test_minilm_declares_mean_pooling_and_normalize():
    assert checkpoint_pooling(minilm_dir()) == ("mean", True)


def write_sentence_pipeline(tmp_path: Path, pooling: dict | None = None, normalize: bool = True) -> Path:
    """Make `tmp_path` a sentence-transformers checkpoint: modules.json + 1_Pooling (mean by default)."""
    pooling = {"pooling_mode_mean_tokens": True} if pooling is None else pooling
    mods = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        mods.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (tmp_path / "1_Pooling").mkdir(parents=True)
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (tmp_path / "modules.json").write_text(json.dumps(mods))
    return tmp_path


def test_checkpoint_pooling_reads_the_pipeline_and_keeps_the_pooler_otherwise(tmp_path, caplog):
    assert checkpoint_pooling(tmp_path) is None  # no modules.json: a plain checkpoint
    d = write_sentence_pipeline(tmp_path / "cls", {"pooling_mode_cls_token": True}, normalize=False)
    assert checkpoint_pooling(d) == ("cls", False)
    m = write_sentence_pipeline(tmp_path / "max", {"pooling_mode_max_tokens": True}, normalize=True)
    with caplog.at_level(logging.WARNING):
        assert checkpoint_pooling(m) is None
    assert "not implemented" in caplog.text
    (m / "modules.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert checkpoint_pooling(m) is None
    assert "cannot read" in caplog.text
    with pytest.raises(ValueError, match="pooling mode 'max'"):
        SentencePooler("max", True)
    with pytest.raises(ValueError, match="pooling scale 0"):
        SentencePooler("mean", True, scale=0)


def _both_sides():
    from coordinator.model import load_base_model
    from edge_runtime.plan import Plan
    from edge_runtime.training.model_loading import TrainTask, load_base

    dev, tok = load_base(minilm_dir(), Plan(rank=2, batch_size=2, seq_len=32), TrainTask("classification", 2), seed=3)
    coord, _ = load_base_model(minilm_dir(), "classification", 2, seed=3)
    return dev.eval(), coord.eval(), tok


def test_both_sides_classify_the_checkpoints_normalized_mean_and_padding_does_not_matter():
    dev, coord, tok = _both_sides()
    assert isinstance(dev.bert.pooler, SentencePooler) and isinstance(coord.bert.pooler, SentencePooler)
    texts = ["a gripping, beautifully acted film", "dull"]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = dev.bert(**batch).last_hidden_state  # (2, T, 384)
        m = batch["attention_mask"].unsqueeze(-1).float()
        want = F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1) * NORMALIZED_SCALE
        got = dev.bert(**batch).pooler_output
        assert torch.allclose(got, want, atol=1e-5)
        assert torch.allclose(got.norm(dim=-1), torch.full((2,), NORMALIZED_SCALE), atol=1e-4)
        both = dev(**batch).logits
        alone = dev(**tok(texts[1:], return_tensors="pt")).logits
        assert torch.allclose(both[1], alone[0], atol=1e-5)  # the padded row equals the unpadded one
        assert torch.allclose(coord(**batch).logits, both, atol=1e-6)  # same function on both sides


def test_a_plain_checkpoint_keeps_its_pooler_and_prompt_tuning_reads_the_mean(tmp_path):
    from protos import peft_types

    plain = tmp_path / "plain"
    shutil.copytree(minilm_dir(), plain, ignore=shutil.ignore_patterns("modules.json"))
    from coordinator.model import load_base_model

    model, tok = load_base_model(plain, "classification", 2, seed=0)
    assert not isinstance(model.bert.pooler, SentencePooler)
    assert use_checkpoint_pooling(model, plain) is None
    _, coord, _ = _both_sides()
    wrapped = peft_types.build(coord, "prompt", 4, seed=0)
    batch = tok(["fine", "not fine at all"], padding=True, return_tensors="pt")
    out = wrapped(**batch).logits
    assert out.shape == (2, 2) and torch.isfinite(out).all()
    pooler = coord.bert.pooler
    assert pooler.mask is not None and pooler.mask.shape[1] == batch["input_ids"].shape[1] + 4  # prompt + text


def test_a_second_call_keeps_the_one_pooler_and_its_hook():
    _, coord, tok = _both_sides()
    pooler = coord.bert.pooler
    hooks = len(coord.bert._forward_pre_hooks)
    assert use_checkpoint_pooling(coord, minilm_dir()) == f"mean+normalize*{NORMALIZED_SCALE:g}"
    assert coord.bert.pooler is pooler and len(coord.bert._forward_pre_hooks) == hooks
    with torch.no_grad():
        coord(**tok(["fine"], return_tensors="pt"))
    assert pooler.mask is not None
