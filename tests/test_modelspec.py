"""ModelSpec from HF dirs, config-only dirs and GGUF files (no weights read)."""
import dataclasses
import json
import resource
from pathlib import Path

import pytest

from edge_runtime.modelspec import ModelSpecError, load_model_spec, read_gguf_header, write_config_dir
from models import minilm_dir, smollm2_gguf

ROOT = Path(__file__).resolve().parents[1]


def _shapes(spec) -> dict:
    """The spec without where it was read from (path, file size)."""
    return {k: v for k, v in dataclasses.asdict(spec).items() if k not in ("source", "source_bytes")}


def test_smollm2_gguf_shapes_from_header_only(tmp_path):
    smol = smollm2_gguf()
    # the weights are never read: a copy cut off after its first quarter (the header and vocabulary
    # are a few MB; the Q4_1 tensors are the other ~90 MB) gives the same spec as the whole file
    head = tmp_path / smol.name
    with open(smol, "rb") as f:
        head.write_bytes(f.read(smol.stat().st_size // 4))
    spec, full = load_model_spec(head), load_model_spec(smol)
    assert _shapes(spec) == _shapes(full)
    assert (spec.layers, spec.hidden, spec.heads, spec.kv_heads, spec.vocab) == (30, 576, 9, 3, 49152)
    assert spec.intermediate == 1536 and spec.tie_embeddings and spec.task_kind == "causal_lm"
    assert spec.linear_shapes["layers.0.self_attn.q_proj"] == (576, 576)
    assert spec.linear_shapes["layers.0.self_attn.k_proj"] == (192, 576)
    assert spec.linear_shapes["layers.29.mlp.down_proj"] == (576, 1536)
    assert 130e6 < spec.n_params < 140e6
    assert spec.default_targets == ["q_proj", "v_proj"]
    assert spec.lora_params(["q_proj", "v_proj"], 8) == 30 * 8 * ((576 + 576) + (192 + 576))
    # a directory holding one GGUF file works too
    assert load_model_spec(smol.parent).layers == 30


def test_gguf_header_skips_vocab():
    meta, tensors = read_gguf_header(smollm2_gguf())
    assert meta["tokenizer.ggml.tokens"] == 49152  # the vocabulary is skipped, only counted
    assert tensors["token_embd.weight"][0] == [576, 49152]


def test_minilm_hf_dir():
    spec = load_model_spec(minilm_dir())
    assert spec.architecture == "bert" and spec.task_kind == "encoder" and spec.source_format == "hf"
    assert (spec.layers, spec.hidden, spec.heads, spec.intermediate, spec.vocab) == (6, 384, 12, 1536, 30522)
    assert spec.default_targets == ["query", "value"]
    assert spec.linear_shapes["encoder.layer.0.attention.self.query"] == (384, 384)
    assert 22e6 < spec.n_params < 23e6


def test_config_only_published_llamas():
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    big = load_model_spec(ROOT / "models/llama-2-7b")
    # meta device: no 7B allocation (27 GB in fp32); the peak RSS grows by far less than 1 GB
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_kib < 2**20
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
