"""Streaming loader for causal LMs on CPU / unified memory: one tensor in flight, no file mapping.

The model skeleton is built with its parameters on the meta device; the checkpoint is then read
tensor by tensor with plain file reads (`os.preadv` into a fresh buffer, never a mmap, so no file
page is charged to the process and nothing keeps the file open afterwards). Each Linear weight is
quantized as it arrives:

- safetensors + nf4 / int8: bitsandbytes `Linear4bit` (nf4, double quantization; no-grad forwards dequantize
  by rows, `bnb_rows`) / `Linear8bitLt`;
  optimum-quanto `qint4` / `qint8` where bitsandbytes is not used; int4: quanto `qint4`;
- GGUF + any quantized plan: `GGUFLinear` keeps the file's Q4_0 / Q4_1 / Q8_0 blocks (no
  requantization; other GGUF types are dequantized and quantized with quanto at the plan's level);
- fp32 / bf16 / fp16 plans: each tensor converted to the plan's dtype.

Embeddings, norms, an untied lm_head and biases are kept in the compute dtype, except that a
quantized base computed in fp32 from an fp16 / bf16 checkpoint keeps the embeddings and lm_head in
the file's dtype (`stored16`: widened per use, exactly). Peak memory is
the quantized weights + the float embeddings / head + one tensor in flight (its file dtype,
fp32 copy and quantized copy) + the runtime.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from edge_runtime.training.bnb_rows import row_chunked
from edge_runtime.training.gguf_linear import NATIVE_TYPES, GGUFLinear
from edge_runtime.training.stored16 import STORED16, keep_16bit

log = logging.getLogger(__name__)
QUANTIZED = ("int8", "nf4", "int4")
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
               "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
               "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
SKIP_QUANT = ("lm_head", "score", "classifier")
Reader = Callable[[], Any]  # reads one tensor: a torch.Tensor, or (raw GGUF bytes, ggml type) for a block tensor


def _pread(path: Path, offset: int, nbytes: int) -> np.ndarray:
    """`nbytes` of `path` from `offset` into a fresh uint8 array (plain reads: no mapping); the
    file's page cache for that range is then dropped (POSIX_FADV_DONTNEED) where supported."""
    buf = np.empty(nbytes, dtype=np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        view, done = memoryview(buf), 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise OSError(f"{path}: unexpected end of file at byte {offset + done} (wanted {nbytes} from {offset})")
            done += n
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return buf


# ----------------------------------------------------------------------------- sources

def safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint files of an HF directory (single file or sharded index)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / n for n in names]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{directory} has no model.safetensors (or model.safetensors.index.json)")


def read_safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(byte offset of the data section, {name: {"dtype", "shape", "data_offsets"}})."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def safetensors_dtype(directory: Path) -> torch.dtype:
    """The floating dtype of the first floating tensor of the checkpoint (what is stored on disk)."""
    for path in safetensors_files(directory):
        _, header = read_safetensors_header(path)
        for info in header.values():
            dt = _ST_DTYPES.get(info["dtype"])
            if dt is not None and dt.is_floating_point:
                return dt
    return torch.float32


CHUNK_BYTES = 32 * 2**20  # a tensor converted to another dtype is read in row chunks of about this size


def _read_converted(path: Path, offset: int, stored: torch.dtype, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """A stored tensor read straight into a `dtype` tensor of `shape`, CHUNK_BYTES of rows at a time
    (never the whole tensor twice)."""
    out = torch.empty(shape, dtype=dtype)
    rows = shape[0] if shape else 1
    row_bytes = max(1, out.numel() // max(1, rows)) * torch.empty(0, dtype=stored).element_size()
    step = max(1, CHUNK_BYTES // row_bytes)
    flat = out.reshape(rows, -1)
    for a in range(0, rows, step):
        b = min(rows, a + step)
        chunk = torch.from_numpy(_pread(path, offset + a * row_bytes, (b - a) * row_bytes)).view(stored)
        flat[a:b].copy_(chunk.reshape(b - a, -1))
    return out


class RowSource:
    """Rows of a 2-D stored tensor, read from the file on demand (`src[a:b]` -> (b - a, in) tensor)."""

    def __init__(self, path: Path, offset: int, stored: torch.dtype, shape: list[int]) -> None:
        self.path, self.offset, self.stored, self.shape = path, offset, stored, torch.Size(shape)
        self.device = torch.device("cpu")
        self.row_bytes = int(shape[1]) * torch.empty(0, dtype=stored).element_size()

    def __getitem__(self, rows: slice) -> torch.Tensor:
        a, b, _ = rows.indices(self.shape[0])
        raw = torch.from_numpy(_pread(self.path, self.offset + a * self.row_bytes, (b - a) * self.row_bytes))
        return raw.view(self.stored).reshape(b - a, self.shape[1])


def safetensors_tensors(directory: Path) -> Iterator[tuple[str, Reader]]:
    """(name, reader) for every tensor of an HF safetensors checkpoint, in file order. `reader(dtype)`
    converts a floating tensor to `dtype` while reading (in chunks); `reader()` keeps the stored dtype;
    `reader(rows=True)` gives a 2-D tensor as a RowSource (read later, rows at a time)."""
    for path in safetensors_files(directory):
        start, header = read_safetensors_header(path)
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            def read(dtype: torch.dtype | None = None, rows: bool = False, info: dict[str, Any] = info,
                     path: Path = path) -> Any:
                lo, hi = info["data_offsets"]
                stored = _ST_DTYPES[info["dtype"]]
                if rows and len(info["shape"]) == 2:
                    return RowSource(path, start + lo, stored, info["shape"])
                if dtype is not None and stored.is_floating_point and dtype != stored and info["shape"]:
                    return _read_converted(path, start + lo, stored, info["shape"], dtype)
                raw = torch.from_numpy(_pread(path, start + lo, hi - lo))
                return raw.view(stored).reshape(info["shape"])
            yield name, read


def _unpermute_rows(out_features: int, n_head: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation (transformers' `_reverse_permute_weights`)."""
    rows = torch.arange(out_features)
    dim = out_features // n_head // 2
    return rows.reshape(n_head, dim, 2).transpose(1, 2).reshape(out_features)


def gguf_hf_name(name: str) -> str:
    """GGUF tensor name -> HF llama parameter name ('blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight')."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) >= 4 and parts[2] in _GGUF_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.{'.'.join(parts[3:])}"
    if parts[0] in _GGUF_NAMES:
        return f"{_GGUF_NAMES[parts[0]]}.{'.'.join(parts[1:])}"
    raise ValueError(f"GGUF tensor {name!r} has no Hugging Face llama name")


def gguf_tensors(path: Path, config: Any) -> Iterator[tuple[str, Reader]]:
    """(HF name, reader) for every tensor of a llama-family GGUF file. A reader returns a float
    tensor, or (raw bytes (out, row bytes), ggml type, row order) for a Q4_0 / Q4_1 / Q8_0 matrix."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    infos = [(t.name, int(t.tensor_type), [int(x) for x in t.shape], int(t.data_offset), int(t.n_bytes),
              t.data.dtype, tuple(t.data.shape)) for t in reader.tensors]
    del reader  # closes the header mapping: from here on only plain reads
    heads, kv = int(config.num_attention_heads), int(config.num_key_value_heads)
    for name, qtype, shape, offset, nbytes, np_dtype, np_shape in infos:
        hf = gguf_hf_name(name)
        rows = None
        if ".attn_q." in name or ".attn_k." in name:
            rows = _unpermute_rows(shape[-1], heads if ".attn_q." in name else kv)

        def read(dtype: torch.dtype | None = None, rows_ok: bool = False, qtype: int = qtype, offset: int = offset,
                 nbytes: int = nbytes,
                 np_dtype: Any = np_dtype, np_shape: tuple = np_shape, rows: torch.Tensor | None = rows,
                 shape: list[int] = shape) -> Any:  # rows_ok: accepted for the safetensors signature, unused
            raw = _pread(path, offset, nbytes).view(np_dtype).reshape(np_shape)
            if qtype in NATIVE_TYPES and len(shape) == 2 and dtype is None:
                return raw, qtype, rows
            return _dequantized((raw, qtype, rows), dtype or torch.float32)
        yield hf, read


# ----------------------------------------------------------------------------- quantizers

def bnb_linear(w: Any, bias: torch.Tensor | None, precision: str, compute: torch.dtype) -> nn.Module:
    """bitsandbytes Linear4bit (nf4, double quantization) / Linear8bitLt from an (out, in) weight, on CPU."""
    import bitsandbytes as bnb

    out_f, in_f = w.shape
    if precision == "nf4":
        lin = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=compute, quant_type="nf4",
                                compress_statistics=True, device="meta")
        packed, state = nf4_chunked(w, compute)
        lin.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=NF4_BLOCK,
                                       compress_statistics=True, quant_type="nf4", module=lin, bnb_quantized=True)
        lin.quant_state = state
        row_chunked(lin)  # no-grad CPU forwards (ZO) dequantize by rows, not the whole weight
    else:
        lin = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias is not None, has_fp16_weights=False, threshold=6.0,
                                  device="meta")
        w = w[:] if isinstance(w, RowSource) else w
        lin.weight = bnb.nn.Int8Params(w.to(torch.float16), requires_grad=False, has_fp16_weights=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.to(compute), requires_grad=False)
    return lin.to("cpu")


NF4_BLOCK = 64
QUANT_CHUNK_BYTES = 4 * 2**20  # fp32 rows quantized at once (the quantizer makes a few copies of them)


def nf4_chunked(w: Any, compute: torch.dtype) -> tuple[torch.Tensor, Any]:
    """bitsandbytes nf4 with double quantization of an (out, in) weight (a tensor or a RowSource), read,
    converted and quantized
    CHUNK_BYTES of rows at a time: the same bytes and QuantState as `bnb.functional.quantize_4bit`
    on the whole tensor (its first stage is per 64 consecutive values; the absmax statistics are
    double-quantized once, over the whole tensor), without its ~4 fp32 copies of the whole weight."""
    import bitsandbytes.functional as F

    out_f, in_f = w.shape
    step = max(1, QUANT_CHUNK_BYTES // (4 * in_f))
    if in_f % NF4_BLOCK:
        step = out_f  # rows do not end on block boundaries: one chunk
    packed = torch.empty((out_f * in_f // 2, 1), dtype=torch.uint8)  # outputs first: the chunks' temporaries
    flat = torch.empty(out_f * in_f // NF4_BLOCK, dtype=torch.float32)  # then reuse one region of the heap
    for a in range(0, out_f, step):
        b = min(out_f, a + step)
        q, m = torch.ops.bitsandbytes.quantize_4bit.default(w[a:b].to(compute).contiguous(), NF4_BLOCK,
                                                              "nf4", torch.uint8)
        packed[a * in_f // 2:b * in_f // 2] = q
        flat[a * in_f // NF4_BLOCK:b * in_f // NF4_BLOCK] = m
        del q, m
    offset = flat.mean()
    qabsmax, state2 = F.quantize_blockwise(flat - offset, blocksize=256)
    state = F.QuantState(absmax=qabsmax, shape=w.shape, dtype=compute, blocksize=NF4_BLOCK,
                         code=F.get_4bit_type("nf4", device=w.device), quant_type="nf4", offset=offset, state2=state2)
    return packed, state


def quanto_linear(w: torch.Tensor, bias: torch.Tensor | None, precision: str, compute: torch.dtype) -> nn.Module:
    """optimum-quanto QLinear (qint4 for int4 / nf4, qint8 for int8) from an (out, in) weight, frozen."""
    from optimum.quanto import QLinear, qint4, qint8

    out_f, in_f = w.shape
    with torch.device("meta"):
        lin = nn.Linear(in_f, out_f, bias=bias is not None)
    lin.weight = nn.Parameter(w.to(compute), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.to(compute), requires_grad=False)
    q = QLinear.from_module(lin, weights=qint8 if precision == "int8" else qint4)
    q.freeze()
    return q


# ----------------------------------------------------------------------------- the loader

def build_skeleton(config: Any, compute: torch.dtype) -> nn.Module:
    """The causal LM with its parameters on the meta device (buffers such as rotary tables real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=compute)
    return model


def _resolve(model: nn.Module, name: str, names: set[str]) -> str | None:
    """The model's parameter name for checkpoint name `name` (with or without the base prefix)."""
    if name in names:
        return name
    prefix = getattr(model, "base_model_prefix", "model")
    for cand in (f"{prefix}.{name}", name.removeprefix(f"{prefix}.")):
        if cand in names:
            return cand
    return None


class StreamLoader:
    """Fill a meta skeleton from (name, reader) pairs, quantizing each Linear weight as it arrives."""

    def __init__(self, model: nn.Module, precision: str, compute: torch.dtype, use_bnb: bool,
                 keep16: torch.dtype | None = None) -> None:
        self.model, self.precision, self.compute, self.use_bnb = model, precision, compute, use_bnb
        self.modules = dict(model.named_modules())
        # keep16: the file's 16-bit dtype, kept for the embeddings and lm_head (stored16.keep_16bit)
        tables = (model.get_input_embeddings(), model.get_output_embeddings()) if keep16 is not None else ()
        self.keep16 = {n for n, m in self.modules.items() if any(m is t for t in tables if t is not None)}
        self.keep16_dtype = keep16
        self.names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        self.pending_bias: dict[str, torch.Tensor] = {}
        self.kept: dict[str, str] = {}  # module name -> how its weight is kept (for tests / logs)

    def _quantizable(self, module_name: str) -> bool:
        mod = self.modules.get(module_name)
        return (self.precision in QUANTIZED and type(mod) is nn.Linear
                and module_name.rsplit(".", 1)[-1] not in SKIP_QUANT)

    def _replace(self, module_name: str, new: nn.Module) -> None:
        parent_name, _, child = module_name.rpartition(".")
        setattr(self.modules[parent_name] if parent_name else self.model, child, new)
        self.modules[module_name] = new

    def _set_param(self, pname: str, value: torch.Tensor) -> None:
        module_name, _, leaf = pname.rpartition(".")
        mod = self.modules[module_name] if module_name else self.model
        dtype = self._float_dtype(module_name) if value.is_floating_point() else value.dtype
        mod._parameters[leaf] = nn.Parameter(value.to(dtype), requires_grad=False)

    def _float_dtype(self, module_name: str) -> torch.dtype:
        """The dtype a float tensor of `module_name` is kept in: the file's 16-bit dtype for the
        embeddings / head under keep16, else the compute dtype."""
        return self.keep16_dtype if module_name in self.keep16 and self.keep16_dtype else self.compute

    def put(self, name: str, read: Reader) -> None:
        """Load one checkpoint tensor: a quantizable Linear weight is quantized, anything else set."""
        pname = _resolve(self.model, name, self.names)
        if pname is None:
            log.debug("checkpoint tensor %s has no parameter in the model; skipped", name)
            return
        module_name, _, leaf = pname.rpartition(".")
        if not self._quantizable(module_name) and not isinstance(self.modules.get(module_name), nn.Linear):
            self._set_param(pname, read(self._float_dtype(module_name)))  # converted while read (embeddings, norms)
            return
        if leaf == "bias":
            mod = self.modules[module_name]
            if type(mod) is not nn.Linear:  # already replaced by a quantized Linear
                mod.bias = nn.Parameter(read().to(self.compute), requires_grad=False)
            elif mod._parameters["weight"].is_meta:  # weight not read yet: it takes the bias along
                self.pending_bias[module_name] = read()
            else:
                self._set_param(pname, read())
            return
        if not self._quantizable(module_name):
            self._linear_weight(module_name, read(self._float_dtype(module_name)))
        elif self.use_bnb and self.precision == "nf4":  # quantized rows at a time, straight from the file
            self._linear_weight(module_name, read(None, True))
        else:
            self._linear_weight(module_name, read())

    def _linear_weight(self, module_name: str, value: Any) -> None:
        bias = self.pending_bias.pop(module_name, None)
        if isinstance(value, tuple):  # GGUF blocks
            raw, qtype, rows = value
            if self._quantizable(module_name):
                old = self.modules[module_name]
                lin = GGUFLinear.from_raw(raw, qtype, old.out_features, old.in_features, rows)
                if bias is not None:
                    lin.bias = nn.Parameter(bias.to(self.compute), requires_grad=False)
                self._replace(module_name, lin)
                self.kept[module_name] = f"gguf-{lin.qtype_name}"
                return
            value = _dequantized(value, self.compute)
        if not self._quantizable(module_name):
            self._set_param(f"{module_name}.weight", value)
            if bias is not None:
                self._set_param(f"{module_name}.bias", bias)
            self.kept[module_name] = str(self._float_dtype(module_name)).replace("torch.", "")
            return
        make = bnb_linear if self.use_bnb else quanto_linear
        self._replace(module_name, make(value, bias, self.precision, self.compute))
        self.kept[module_name] = f"{'bnb' if self.use_bnb else 'quanto'}-{self.precision}"

    def finish(self) -> nn.Module:
        """Tie the output embedding if the config says so; fail on any parameter left unloaded."""
        model = self.model
        if getattr(model.config, "tie_word_embeddings", False):
            out, inp = model.get_output_embeddings(), model.get_input_embeddings()
            if out is not None and inp is not None and out.weight.is_meta:
                out.weight = inp.weight
        missing = [n for n, p in model.named_parameters() if p.is_meta] + [f"{m}.bias" for m in self.pending_bias]
        if missing:
            raise ValueError(f"the checkpoint has no tensor for {len(missing)} parameter(s), e.g. {missing[:3]}")
        model.eval()
        return model


def _dequantized(value: tuple, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A GGUF tensor read as its file bytes (raw, ggml type, row order) -> `dtype`, dequantized in
    row chunks of about CHUNK_BYTES (gguf-py's dequantization)."""
    from gguf.quants import dequantize

    raw, qtype, rows = value
    if raw.ndim < 2:
        return torch.from_numpy(np.array(dequantize(raw, qtype), dtype=np.float32)).to(dtype)
    first = dequantize(raw[:1], qtype)                      # (1, in) -> the logical row width
    out = torch.empty((raw.shape[0], first.shape[-1]), dtype=dtype)
    step = max(1, CHUNK_BYTES // (4 * first.shape[-1]))
    for a in range(0, raw.shape[0], step):
        out[a:a + step] = torch.from_numpy(np.asarray(dequantize(raw[a:a + step], qtype), dtype=np.float32))
    return out[rows].contiguous() if rows is not None else out


def tables_kept_16bit(directory: Path, gguf: str | None, precision: str, compute: torch.dtype) -> torch.dtype | None:
    """The file's dtype when the embeddings and lm_head stay 16-bit (`stored16`): a quantized base
    computed in fp32 from an fp16 / bf16 safetensors checkpoint (memory.tables_16bit mirrors this); else None."""
    if gguf or precision not in QUANTIZED or compute != torch.float32:
        return None
    stored = safetensors_dtype(directory)
    return stored if stored in STORED16 else None


def stream_load_causal_lm(directory: Path, gguf: str | None, config: Any, precision: str, compute: torch.dtype,
                          use_bnb: bool) -> tuple[nn.Module, dict[str, str]]:
    """(model, {module: how its weight is kept}) loaded tensor by tensor; see the module docstring."""
    from edge_runtime.training.model_loading import malloc_trim

    dtype = compute if precision in QUANTIZED else {"fp32": torch.float32, "bf16": torch.bfloat16,
                                                     "fp16": torch.float16}[precision]
    keep16 = tables_kept_16bit(directory, gguf, precision, dtype)
    loader = StreamLoader(build_skeleton(config, dtype), precision, dtype, use_bnb, keep16)
    source = gguf_tensors(directory / gguf, config) if gguf else safetensors_tensors(directory)
    for i, (name, read) in enumerate(source):
        loader.put(name, read)
        if i % 16 == 15:
            malloc_trim()
    model = loader.finish()
    if keep16 is not None:
        for name in keep_16bit(model, dtype):
            loader.kept[name] = f"{str(keep16).replace('torch.', '')} (computed in {str(dtype).replace('torch.', '')})"
    malloc_trim()
    if use_bnb and precision in ("nf4", "int8"):
        model.is_loaded_in_4bit = precision == "nf4"  # what peft reads to wrap bitsandbytes layers
        model.is_loaded_in_8bit = precision == "int8"
    return model, loader.kept
