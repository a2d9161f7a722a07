"""Model shapes for planning, read without loading weights.

`load_model_spec(path)` accepts a Hugging Face model directory, a config-only directory
(just `config.json`), a GGUF file, or a directory holding one GGUF file. HF configs are
instantiated on the meta device (no weights read, no memory used); GGUF shapes come from
the file's header (metadata + tensor infos), never from dequantizing tensors.
"""
from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Default LoRA targets per architecture family (peft's defaults for the common ones).
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"], "phi3": ["qkv_proj"], "gpt2": ["c_attn"], "opt": ["q_proj", "v_proj"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "distilbert": ["q_lin", "v_lin"],
}
# Modules that are never LoRA targets (heads, poolers): excluded from `linear_shapes`.
_HEAD_NAMES = ("lm_head", "classifier", "score", "pooler", "cls")


class ModelSpecError(ValueError):
    """The model path is missing or not a supported HF/GGUF model."""


@dataclass
class ModelSpec:
    """Architecture shapes of a transformer, enough to estimate training memory.

    linear_shapes: {module name: (out_features, in_features)} for every Linear inside the
    transformer body (LoRA candidates), e.g. {"model.layers.0.self_attn.q_proj": (576, 576)}.
    n_params: parameters of the base model body + embeddings (no task head).
    """

    architecture: str            # model_type, e.g. "llama", "bert"
    task_kind: str               # "causal_lm" | "encoder"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_positions: int
    tie_embeddings: bool
    n_params: int
    linear_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    default_targets: list[str] = field(default_factory=list)
    source: str = ""             # path it was read from
    source_format: str = "hf"    # "hf" | "config" | "gguf"
    source_bytes: int = 0        # size of the weight file(s) on disk (0 for a config-only dir)
    # GGUF: Linear weights stored as Q4_0 / Q4_1 / Q8_0 blocks, which a quantized plan keeps as they are
    # (edge_runtime.training.gguf_linear): their parameter count and their bytes in the file
    gguf_block_params: int = 0
    gguf_block_bytes: int = 0
    config: dict[str, Any] = field(default_factory=dict)  # HF-style config dict

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def linear_params(self) -> int:
        return sum(o * i for o, i in self.linear_shapes.values())

    def target_shapes(self, targets: list[str]) -> dict[str, tuple[int, int]]:
        """Linear modules whose last name component is in `targets` -> (out, in)."""
        key = tuple(targets)
        cache = self.__dict__.setdefault("_target_cache", {})
        if key not in cache:
            wanted = set(targets)
            cache[key] = {n: s for n, s in self.linear_shapes.items() if n.rsplit(".", 1)[-1] in wanted}
        return cache[key]

    def lora_params(self, targets: list[str], rank: int) -> int:
        """Number of LoRA parameters: sum over targets of r * (in + out)."""
        return sum(rank * (o + i) for o, i in self.target_shapes(targets).values())

    def check_targets(self, targets: list[str]) -> None:
        if self.target_shapes(targets) and len({n.rsplit(".", 1)[-1] for n in self.target_shapes(targets)}) == len(set(targets)):
            return
        names = {n.rsplit(".", 1)[-1] for n in self.linear_shapes}
        missing = [t for t in targets if t not in names]
        if missing:
            raise ModelSpecError(f"target module(s) {missing} not found in {self.architecture} model; "
                                 f"available Linear names: {sorted(names)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["linear_shapes"] = {k: list(v) for k, v in self.linear_shapes.items()}
        return d


def load_model_spec(path: str | Path) -> ModelSpec:
    """Read a ModelSpec from an HF model dir, a config-only dir, a GGUF file or a dir with one."""
    p = Path(path)
    if not p.exists():
        raise ModelSpecError(f"model path {p} does not exist: give a Hugging Face model directory, "
                             "a directory with a config.json, or a .gguf file")
    if p.is_file() and p.suffix == ".gguf":
        return spec_from_gguf(p)
    if p.is_dir():
        if (p / "config.json").exists():
            return spec_from_hf_dir(p)
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return spec_from_gguf(ggufs[0])
        if len(ggufs) > 1:
            raise ModelSpecError(f"{p} holds several GGUF files {[g.name for g in ggufs]}: pass one file")
    raise ModelSpecError(f"{p} is neither a directory with config.json nor a .gguf file (or a directory with one)")


# ----------------------------------------------------------------------------- HF configs

def spec_from_hf_dir(path: str | Path) -> ModelSpec:
    """Instantiate the config's model on the meta device and read Linear shapes (no weights)."""
    from transformers import AutoConfig

    p = Path(path)
    try:
        config = AutoConfig.from_pretrained(str(p))
    except (ValueError, OSError, KeyError) as e:
        raise ModelSpecError(f"{p}/config.json could not be read as a transformers config: {e}") from None
    files = [*p.glob("*.safetensors"), *p.glob("*.bin")]
    spec = spec_from_config(config, source=str(p), source_format="hf" if files else "config")
    spec.source_bytes = sum(f.stat().st_size for f in files)
    return spec


def spec_from_config(config: Any, source: str = "", source_format: str = "config") -> ModelSpec:
    """ModelSpec from a transformers PretrainedConfig (meta-device instantiation)."""
    import torch
    from transformers import AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(config)
    linear: dict[str, tuple[int, int]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and not any(h in name.split(".") for h in _HEAD_NAMES):
            linear[name] = (int(mod.out_features), int(mod.in_features))
    n_params = sum(int(t.numel()) for n, t in model.named_parameters() if "pooler" not in n)
    archs = list(getattr(config, "architectures", None) or [])
    mt = config.model_type
    causal = any(a.endswith("ForCausalLM") for a in archs) or (not config.is_encoder_decoder and mt not in
                                                                 ("bert", "roberta", "distilbert", "deberta", "deberta-v2", "electra", "xlm-roberta"))
    heads = int(_first(config, "num_attention_heads", "n_head"))
    return ModelSpec(
        architecture=mt,
        task_kind="causal_lm" if causal else "encoder",
        hidden=int(_first(config, "hidden_size", "n_embd", "dim")),
        layers=int(_first(config, "num_hidden_layers", "n_layer")),
        heads=heads,
        kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        intermediate=int(_first(config, "intermediate_size", "n_inner", "ffn_dim", default=0) or 0),
        vocab=int(config.vocab_size),
        max_positions=int(_first(config, "max_position_embeddings", "n_positions", default=0) or 0),
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
        n_params=n_params,
        linear_shapes=linear,
        default_targets=list(DEFAULT_TARGETS.get(mt, ["q_proj", "v_proj"])),
        source=source,
        source_format=source_format,
        config=config.to_dict(),
    )


def _first(config: Any, *names: str, default: Any = None) -> Any:
    """First non-None attribute among `names` (configs name the same thing differently)."""
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    if default is None:
        raise ModelSpecError(f"config has none of {names}: cannot read the model's shape")
    return default


# ----------------------------------------------------------------------------- GGUF

_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
# GGUF llama tensor name -> HF module name within model.layers.N
_GGUF_TO_HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}


# ggml types a quantized plan keeps as blocks of 32 weights: type id -> bytes per block (Q4_0, Q4_1, Q8_0)
GGUF_BLOCK_BYTES = {2: 18, 3: 20, 8: 34}


class _Cursor:
    """Sequential little-endian reader over a bytes-like buffer (an mmap)."""

    def __init__(self, buf: Any) -> None:
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str) -> Any:
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.unpack("<Q")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int, keep: bool = True) -> Any:
        if vtype in _GGUF_SCALARS:
            return self.unpack(_GGUF_SCALARS[vtype])
        if vtype == _GGUF_STRING:
            return self.string()
        if vtype == _GGUF_ARRAY:
            etype, n = self.unpack("<I"), self.unpack("<Q")
            if etype in _GGUF_SCALARS:  # skip fixed-size arrays in one jump
                size = struct.calcsize(_GGUF_SCALARS[etype])
                self.pos += size * n
                return n
            out = [self.value(etype, keep) for _ in range(n)]
            return out if keep else len(out)
        raise ModelSpecError(f"GGUF metadata value type {vtype} is not supported")


def read_gguf_header(path: str | Path) -> tuple[dict[str, Any], dict[str, tuple[list[int], int]]]:
    """(metadata, {tensor name: (shape ne0.., ggml type)}) from a GGUF file's header only.

    Arrays of numbers are returned as their length; arrays of strings (the vocabulary) are
    skipped over and also returned as their length.
    """
    import mmap

    p = Path(path)
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        c = _Cursor(mm)
        if bytes(mm[:4]) != b"GGUF":
            raise ModelSpecError(f"{p} is not a GGUF file (bad magic {bytes(mm[:4])!r})")
        c.pos = 4
        version = c.unpack("<I")
        if version < 2:
            raise ModelSpecError(f"{p}: GGUF version {version} is too old (need >= 2)")
        n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = c.string()
            vtype = c.unpack("<I")
            keep = not key.startswith("tokenizer.ggml.")
            meta[key] = c.value(vtype, keep)
        tensors: dict[str, tuple[list[int], int]] = {}
        for _ in range(n_tensors):
            name = c.string()
            nd = c.unpack("<I")
            shape = [c.unpack("<Q") for _ in range(nd)]
            ttype = c.unpack("<I")
            c.unpack("<Q")  # offset
            tensors[name] = (shape, ttype)
    return meta, tensors


def spec_from_gguf(path: str | Path) -> ModelSpec:
    """ModelSpec of a llama-family GGUF file (SmolLM2, TinyLlama, Llama-2 ...) from its header."""
    p = Path(path)
    meta, tensors = read_gguf_header(p)
    arch = meta.get("general.architecture")
    if arch not in ("llama", "mistral", "qwen2"):
        raise ModelSpecError(f"{p}: GGUF architecture {arch!r} is not supported (llama, mistral, qwen2)")

    def m(key: str, default: Any = None) -> Any:
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            raise ModelSpecError(f"{p}: GGUF metadata '{arch}.{key}' is missing")
        return v

    hidden, layers = int(m("embedding_length")), int(m("block_count"))
    heads = int(m("attention.head_count"))
    kv_heads = int(m("attention.head_count_kv", heads))
    vocab = int(m("vocab_size", 0) or tensors["token_embd.weight"][0][1])
    linear: dict[str, tuple[int, int]] = {}
    n_params = block_params = block_bytes = 0
    for name, (shape, _t) in tensors.items():
        numel = 1
        for d in shape:
            numel *= d
        if name != "output.weight":
            n_params += numel
        parts = name.split(".")
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in _GGUF_TO_HF:
            linear[f"layers.{parts[1]}.{_GGUF_TO_HF[parts[2]]}"] = (int(shape[1]), int(shape[0]))  # ne=[in,out]
            if _t in GGUF_BLOCK_BYTES and parts[3] == "weight":
                block_params += numel
                block_bytes += numel // 32 * GGUF_BLOCK_BYTES[_t]
    tied = "output.weight" not in tensors
    config = {
        "model_type": arch, "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "intermediate_size": int(m("feed_forward_length")), "vocab_size": vocab,
        "max_position_embeddings": int(m("context_length", 2048)), "tie_word_embeddings": tied,
        "rms_norm_eps": float(m("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(m("rope.freq_base", 10000.0)),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"), "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    return ModelSpec(
        architecture=arch, task_kind="causal_lm", hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
        intermediate=config["intermediate_size"], vocab=vocab, max_positions=config["max_position_embeddings"],
        tie_embeddings=tied, n_params=n_params, linear_shapes=linear,
        default_targets=list(DEFAULT_TARGETS.get(arch, ["q_proj", "v_proj"])),
        source=str(p), source_format="gguf", source_bytes=p.stat().st_size, config=config,
        gguf_block_params=block_params, gguf_block_bytes=block_bytes,
    )


def write_config_dir(spec_or_config: ModelSpec | dict[str, Any], out_dir: str | Path) -> Path:
    """Write a config-only directory (config.json) for a spec or a config dict."""
    cfg = spec_or_config.config if isinstance(spec_or_config, ModelSpec) else spec_or_config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return out
