"""Peak-memory estimator for one training process running a Plan.

Predicts the PEAK RESIDENT MEMORY of the `edge-runtime train` process (on a discrete CUDA
GPU: the CUDA peak allocated). Pure functions of (ModelSpec, Plan, task); the only measured
inputs are the runtime overhead (the killable memory, `guard.anon_bytes`, after importing
torch+transformers+peft, see `edge_runtime.measure.measure_runtime_overhead`: what the MemoryGuard
counts, so a plan's total and the guard's limit use one measure) and the coefficients in
`Calibration`, fitted on this machine by `tools/bench_memory.py` (docs/memory.md).

    peak = max(load peak, training peak)

Load peak = overhead + what loading the base costs, by source (`load_peak_bytes`): a GGUF file
is dequantized to fp32 before the model exists (~1.4 x the fp32 weights + the mmapped file), a
quantized base on CPU is read at full precision and quantized, a same-dtype safetensors dir is
only mmapped. Training peak = overhead + weights (+ what the load leaves resident) + adapter
(params, grads, optimizer) + the dynamic part: saved activations, logits and their gradients, a ZO
forward, dequantization temporaries, added up on glibc's default heap (as fitted); where freed memory
leaves the RSS at once (`mmap_served`), kept values + the larger of the loss-chunk and decoder-layer
phases (`alive_at_peak`). The breakdown carries `load_peak_excess` = max(0, load - training).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from edge_runtime.dequant_rows import row_chunk_bytes
from edge_runtime.modelspec import ModelSpec
from edge_runtime.plan import Plan

TASKS = ("classification", "causal_lm")
BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "nf4": 0.5, "int4": 0.5}
# Quantization constants per weight: nf4 blockwise absmax (block 64) with double quantization
# (8-bit absmax + one fp32 per 256 blocks); int4 groups of 128 with fp32 scale+shift;
# int8 (LLM.int8 / quanto) one fp32 scale per output row (added per module, not per weight).
QUANT_CONST = {"nf4": 1 / 64 + 4 / (64 * 256), "int4": 8 / 128, "int8": 0.0}
QUANTIZED = ("int8", "nf4", "int4")
LOGIT_CHUNK_ROWS = 256  # edge_runtime.training.losses.CHUNK_TOKENS
HEAD_SLICE_ROWS = 1024  # 16-bit LM head rows widened to fp32 at a time (stored16.Head16 imports it): 17 MB at 7B


@dataclass(frozen=True)
class Calibration:
    """Coefficients fitted against measured peaks (tools/bench_memory.py on this machine).

    Activation coefficients count saved values per token per layer, in units of the named
    dimension (x act dtype bytes). Logit coefficients count (batch, seq, vocab) fp32 copies
    alive at the peak.
    """

    # Refit on the trainer harness: two full runs of tools/bench_memory.py (28 configurations each,
    # 1 thread), least squares on the relative error; validated on a third run (docs/bench_memory.json).
    # Backprop without checkpointing: saved values per token per layer.
    act_hidden: float = 3.85        # saved values ~ act_hidden * hidden per token per layer
    act_inter: float = 4.3          # ... + act_inter * intermediate
    act_kv: float = 4.0             # ... + act_kv * kv_dim (k/v projections, rope)
    act_hidden_encoder: float = 6.2  # encoders: + this * hidden (LayerNorms, GELU, dropout masks)
    attn_eager: float = 4.0         # materialized attention (see `_dynamic_bytes`): copies of (b, heads, s, s)
    # Checkpointing: kept layer inputs + the recomputed layers alive at the backward peak.
    ckpt_hidden: float = 3.95       # kept values ~ ckpt_hidden * hidden per token per layer (input, its grad, residual)
    ckpt_layers: float = 2.5        # layers' activations alive at once (recomputed layer, its grads, allocator reuse)
    embed_grad_input: float = 1.0   # checkpointing + enable_input_require_grads: grad of embeddings output
    # Causal-LM head (losses.py: <= 256 rows per chunk).
    logits_train: float = 5.3       # fp32 (rows, V) copies alive in a chunk's backward: logits, log-softmax, grads
    logits_zo: float = 2.9          # ... in a no-grad forward
    # ... counted (torch profiler), not fitted, where freed memory leaves the RSS (`mmap_served`): log-softmax,
    live_logits_train: float = 3.0  # NLL grad, logits grad in a chunk's backward; logits + log-softmax without grad
    live_logits_zo: float = 2.0
    fwd_transient: float = 2.85     # no-grad forward: live values ~ fwd_transient * intermediate per token
    alloc_slack: float = 0.05       # allocator fragmentation on the dynamic part
    # Quantized base on CPU.
    dequant_copies: float = 2.05    # fp32 copies of the largest quantized Linear in flight
    live_dequant_copies: float = 1.0  # ... in backprop, counted where freed memory leaves the RSS (`mmap_served`):
    #                                   bitsandbytes' CPU gemm_4bit and its backward widen the weight once (profiler)
    dequant_saved: float = 0.03     # bitsandbytes backprop: fp32 Linear weights' worth kept alive (fraction of all)
    quanto_saved_int8: float = 1.0  # optimum-quanto (GGUF sources, int4) backprop, qint8: the same fraction
    quanto_saved_4bit: float = 0.55  # ... qint4
    int8_inputs: float = 2.1        # bitsandbytes int8 on CPU: Linear inputs kept on the matmul's ctx (copies: the
    #                                 last step's graph, holding its ctx, lives until the next loss replaces it)
    # Load.
    load_gguf_dequant: float = 1.39  # GGUF via transformers (CUDA route): fp32 tensors + conversion temporaries / fp32 weights
    gguf_residue_per_vocab: float = 1430.0  # bytes left after a GGUF load per vocab entry (tokenizer, heap not returned)
    # Streaming loader: bytes per weight of the largest Linear in flight above its file bytes (measured on a
    # 4096 x 11008 fp16 weight): bitsandbytes nf4 quantized in row chunks, bitsandbytes int8, quanto (x compute
    # bytes), GGUF blocks kept (x the file's bytes per weight)
    stream_nf4_bnb: float = 1.3    # (no file bytes: its rows are read and quantized 4 MiB at a time)
    # allocations >= 128 KiB served by mmap (quantized streamed base on CPU, `model_loading.heap_mmap_threshold`):
    # the activation terms' share that is alive (`served_dynamic`), fitted on the 17 quantized streamed rows with
    # the phase model (`alive_at_peak`): in-sample max |error| 5.5 %, leave-one-out max 6.5 % (docs/memory.md)
    mmap_dynamic: float = 0.85
    mmap_dynamic_ckpt: float = 0.5  # ... with gradient checkpointing
    mmap_per_weight: float = 0.1    # ... bytes per Linear weight resident while training on a quantized base
    ckpt_dequant_layers: float = 0.0   # ... under checkpointing: layers' worth of fp32 Linear weights alive (was 2.0)
    stream_int8_bnb: float = 8.0
    stream_quanto: float = 3.3
    stream_gguf_blocks: float = 2.0


DEFAULT_CALIBRATION = Calibration()


@dataclass
class MemoryEstimate:
    """total_bytes: predicted peak; breakdown: named parts that sum to total_bytes."""

    total_bytes: int
    budget_bytes: int
    breakdown: dict[str, int] = field(default_factory=dict)
    load_peak_bytes: int = 0  # peak while loading the base (incl. overhead); 0 = not modelled

    @property
    def training_peak_bytes(self) -> int:
        """The peak once the model is loaded (total minus the load-peak excess)."""
        return self.total_bytes - int(self.breakdown.get("load_peak_excess", 0))

    @property
    def load_bound(self) -> bool:
        """True when loading the base, not training, sets the peak."""
        return self.breakdown.get("load_peak_excess", 0) > 0

    @property
    def fits(self) -> bool:
        return self.budget_bytes <= 0 or self.total_bytes <= self.budget_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"total_bytes": int(self.total_bytes), "budget_bytes": int(self.budget_bytes),
                "load_peak_bytes": int(self.load_peak_bytes),
                "breakdown": {k: int(v) for k, v in self.breakdown.items()}}


def weight_bytes(spec: ModelSpec, precision: str, task: str, compute_dtype: str = "fp32",
                 tables_16bit: bool = False) -> dict[str, int]:
    """Frozen base weights by part: quantizable Linear layers at `precision` (+ constants),
    embeddings / norms / untied LM head / task head at the compute dtype (never quantized); with
    `tables_16bit` (see `tables_16bit`) the token embeddings and the LM head at 2 bytes."""
    lin = spec.linear_params
    other = max(0, spec.n_params - lin)
    keep = BYTES[precision] if precision not in QUANTIZED else BYTES[compute_dtype]
    table = 2.0 if tables_16bit else keep
    emb = min(other, spec.vocab * spec.hidden) if tables_16bit else 0
    blocks = gguf_blocks_kept(spec, precision)  # GGUF Q4_0/Q4_1/Q8_0 Linears: the file's bytes, constants included
    rest = lin - (spec.gguf_block_params if blocks else 0)
    out = {"weights_linear": int(rest * BYTES[precision] + blocks),
           "weights_embed_norm": int(emb * table + (other - emb) * keep)}
    if precision in QUANTIZED:
        rows = sum(o for o, _ in spec.linear_shapes.values()) if rest else 0
        out["quant_constants"] = int(rest * QUANT_CONST[precision] + 4 * rows)
    head = 0
    if task == "causal_lm" and not spec.tie_embeddings:
        head = spec.vocab * spec.hidden
    elif task == "classification":
        head = spec.hidden * 2 + (spec.hidden * spec.hidden + spec.hidden if spec.architecture == "bert" else 0)
    out["weights_head"] = int(head * (table if task == "causal_lm" else keep))
    return out


def tables_16bit(spec: ModelSpec, plan: Plan, task: str, device: str = "cpu", unified_memory: bool = False) -> bool:
    """Whether the token embeddings and lm_head stay in the checkpoint's 16-bit dtype, widened per use
    (`training/stored16.py`, chosen by `stream_load.tables_kept_16bit`): a streamed quantized base
    computed in fp32 from an fp16 / bf16 safetensors checkpoint (CPU boards such as the Raspberry Pi 5)."""
    return (plan.base_precision in QUANTIZED and plan.compute_dtype == "fp32" and spec.source_format != "gguf"
            and stored_dtype(spec) in ("fp16", "bf16") and streamed(spec, plan, task, device, unified_memory))


def gguf_blocks_kept(spec: ModelSpec, precision: str) -> int:
    """Bytes of the GGUF Linear blocks a quantized plan keeps as they are (0: none kept)."""
    return spec.gguf_block_bytes if spec.source_format == "gguf" and precision in QUANTIZED else 0


def streamed(spec: ModelSpec, plan: Plan, task: str, device: str = "cpu", unified_memory: bool = False) -> bool:
    """Whether the base loads through the streaming loader (`training/stream_load.py`, chosen by
    `model_loading.streams`): a causal LM on CPU or unified memory, from GGUF (any precision) or from
    safetensors / a config-only model at a quantized precision or another dtype than stored."""
    if task != "causal_lm" or (device != "cpu" and not unified_memory):
        return False
    return spec.source_format == "gguf" or plan.base_precision in QUANTIZED or stored_dtype(spec) != plan.base_precision


def mmap_served(spec: ModelSpec, plan: Plan, task: str, device: str) -> bool:
    """Whether the training process serves allocations >= 128 KiB with mmap (a quantized streamed base on
    CPU: `model_loading.heap_mmap_threshold`): freed temporaries leave the RSS at once."""
    return device == "cpu" and plan.base_precision in QUANTIZED and streamed(spec, plan, task, device)


def trainable_params(spec: ModelSpec, plan: Plan, task: str) -> int:
    """LoRA factors r*(in+out) per target (rank_pattern honoured), or the plan's other PEFT type's
    tensors (prompt / (IA)3 / biases / adapters: `protos.peft_names.trainable_count`), + a trainable task head."""
    if plan.peft != "lora":
        from protos.peft_names import trainable_count

        n = trainable_count(plan.peft, spec.architecture, spec.linear_shapes, spec.hidden, spec.layers,
                            plan.virtual_tokens, plan.bottleneck)
    else:
        n = sum(next((v for k, v in plan.rank_pattern.items() if name.endswith(k)), plan.rank) * (o + i)
                for name, (o, i) in spec.target_shapes(plan.target_modules).items())
    if task == "classification":
        n += spec.hidden * 2 + 2  # modules_to_save copy of the classifier
    return n


def fp32_weight_bytes(spec: ModelSpec, task: str) -> int:
    """Every base parameter (body, embeddings, an untied LM head) as fp32: what a load materialises."""
    n = spec.n_params + (spec.vocab * spec.hidden if task == "causal_lm" and not spec.tie_embeddings else 0)
    return 4 * int(n)


def stored_dtype(spec: ModelSpec) -> str:
    """Dtype of the weights on disk for an HF source ('fp32' unless the config says otherwise)."""
    d = str(spec.config.get("torch_dtype") or spec.config.get("dtype") or "float32").replace("torch.", "")
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(d, "fp32")


def gguf_load_bytes(fp32_weights: int, file_bytes: int, dequant: float) -> int:
    """Bytes above the runtime overhead at the peak of loading a GGUF file with transformers.

    Every tensor of the mmapped file is read (`file_bytes` of page cache in the RSS) and
    dequantized to fp32 before the model exists; the fp32 tensors, their torch copies and the
    conversion temporaries peak at `dequant` x the fp32 weights (measured ~1.39 for SmolLM2).
    """
    return int(file_bytes + dequant * fp32_weights)


def quantize_pass_bytes(biggest_linear: int) -> int:
    """Extra bytes while an fp32-materialised base is quantized in place (quanto, bnb on load):
    one Linear in flight as fp32 plus its quantized copy and rounding temporaries (~2 fp32 copies)."""
    return int(2 * 4 * biggest_linear)


def hf_load_bytes(stored_bytes: int, target_bytes: int, same_dtype: bool) -> int:
    """Bytes above the overhead at the peak of `from_pretrained` on a safetensors directory (CPU).

    Same dtype on disk and in memory: parameters are views of the mmapped file, nothing is read at
    load (the pages come in during the first forward and are counted as weights). Otherwise the
    whole file is read (page cache in the RSS) and converted copies are made.
    """
    return 0 if same_dtype else int(stored_bytes + target_bytes)


def bnb_cpu_load_bytes(linear_stored: int, quantized: int, biggest_linear: int) -> int:
    """HF source quantized on CPU (bitsandbytes int8 / nf4 at load, quanto int4 after it): every Linear
    weight's file pages are read and stay resident (`linear_stored`; the embeddings keep the mmap
    open), the quantized copies are built beside them, one Linear in flight as fp32."""
    return int(linear_stored + quantized + quantize_pass_bytes(biggest_linear))


def stream_load_bytes(weights: int, biggest_linear: int, per_weight: float) -> int:
    """Bytes above the overhead at the peak of the streaming loader: the weights as they are kept
    (quantized Linears, float embeddings / norms / head) + the largest Linear in flight
    (`per_weight` bytes per value: its file bytes and the quantizer's temporaries). Float tensors are
    converted while read, in chunks; no file page is mapped."""
    return int(weights + biggest_linear * per_weight)


def stream_inflight_per_weight(spec: ModelSpec, plan: Plan, cal: Calibration) -> float:
    """Bytes per value of the Linear being quantized by the streaming loader (see `stream_load_bytes`)."""
    prec = plan.base_precision
    if prec not in QUANTIZED:
        return 0.0
    if gguf_blocks_kept(spec, prec):
        return cal.stream_gguf_blocks * spec.gguf_block_bytes / max(1, spec.gguf_block_params)
    stored = 4.0 if spec.source_format == "gguf" else BYTES[stored_dtype(spec)]
    if spec.source_format == "gguf" or prec == "int4":  # quanto
        return stored + cal.stream_quanto * BYTES[plan.compute_dtype]
    return cal.stream_nf4_bnb if prec == "nf4" else stored + cal.stream_int8_bnb


def cuda_load_bytes(weights: int, biggest_linear: int) -> int:
    """Discrete GPU: CUDA-allocated peak while loading = the weights at the plan's precision plus
    one fp32 Linear in flight (bnb quantizes tensor by tensor on the device; a float base is copied
    with `.to("cuda")`). The host-side load (GGUF dequantization, fp32 materialisation) happens in
    host RAM, which a discrete GPU's budget does not cover. Never above the training peak in practice."""
    return int(weights + 4 * biggest_linear)


def load_peak_bytes(spec: ModelSpec, plan: Plan, task: str, *, device: str = "cpu", unified_memory: bool = False,
                    calibration: Calibration = DEFAULT_CALIBRATION) -> int:
    """Peak memory of loading the base (bytes above the runtime overhead), by source and device.

    CPU (and unified-memory accelerators, whose GPU shares host RAM): GGUF -> dequantized to fp32
    (+ a quantization pass for an int8/nf4/int4 plan, quanto); HF safetensors -> mmap views (same
    dtype) or a converted copy; HF + int8/nf4/int4 -> quantized from the mmapped file (bitsandbytes;
    quanto for int4). A unified-memory device then
    copies the float weights to the device (`.to("cuda")`): + the weights at the plan's precision.
    Discrete CUDA GPU: `cuda_load_bytes` (GPU allocations only).
    """
    cal = calibration
    t16 = tables_16bit(spec, plan, task, device, unified_memory)
    w = weight_bytes(spec, plan.base_precision, task, plan.compute_dtype, t16)
    resident = sum(w.values())
    biggest = max((o * i for o, i in spec.linear_shapes.values()), default=0)
    quantized = plan.base_precision in QUANTIZED
    if device == "cuda" and not unified_memory:
        return cuda_load_bytes(resident, biggest)
    if streamed(spec, plan, task, device, unified_memory):
        return stream_load_bytes(resident + sum(gguf_residue(spec, cal).values()), biggest,
                                 stream_inflight_per_weight(spec, plan, cal))
    fp32 = fp32_weight_bytes(spec, task)
    if spec.source_format == "gguf":
        host = gguf_load_bytes(fp32, spec.source_bytes, cal.load_gguf_dequant)
        if quantized:
            host += quantize_pass_bytes(biggest)
    elif quantized:  # bitsandbytes (int8 / nf4) or quanto (int4) on the mmapped safetensors
        host = bnb_cpu_load_bytes(int(spec.linear_params * BYTES[stored_dtype(spec)]), resident, biggest)
    else:
        same = stored_dtype(spec) == plan.base_precision
        host = hf_load_bytes(spec.source_bytes or int(spec.n_params * BYTES[stored_dtype(spec)]), resident, same)
    if device == "cuda" and not quantized:
        host += resident
    return int(host)


def load_description(spec: ModelSpec, plan: Plan) -> str:
    """Words for what loading `spec` at `plan.base_precision` does (planner messages)."""
    quantized = plan.base_precision in QUANTIZED
    if spec.source_format == "gguf" and quantized:
        return "loading the GGUF file tensor by tensor (its Q4_0/Q4_1/Q8_0 Linears kept as they are)"
    if spec.source_format == "gguf":
        return "loading the GGUF file tensor by tensor, dequantized to fp32"
    if quantized and plan.base_precision != "int4":
        return f"loading the safetensors weights and quantizing them to {plan.base_precision} (bitsandbytes)"
    if quantized:
        return f"loading the safetensors weights in fp32, then quantizing them to {plan.base_precision}"
    return "loading the safetensors weights"


def source_residue_bytes(spec: ModelSpec, plan: Plan, device: str, cal: Calibration,
                         task: str = "causal_lm") -> dict[str, int]:
    """Resident bytes a load leaves behind on CPU, beyond the weights themselves.

    GGUF: the tokenizer converted from the GGUF vocabulary and heap pages the fp32 load does not
    return (`gguf_residue_per_vocab` x vocab). HF source quantized on CPU: the Linear weights' file
    pages, read to quantize them, stay mapped (the embeddings keep the file open) and resident, so
    a quantized base saves no memory on CPU (measured: llama-95m nf4 peaks above fp32).
    """
    if device != "cpu":
        return {}
    if spec.source_format == "gguf":
        return gguf_residue(spec, cal)
    if plan.base_precision in QUANTIZED and not streamed(spec, plan, task, device):
        return {"source_pages": int(spec.linear_params * BYTES[stored_dtype(spec)])}
    return {}


def gguf_residue(spec: ModelSpec, cal: Calibration) -> dict[str, int]:
    """What a GGUF load leaves resident besides the weights: the tokenizer converted from the GGUF
    vocabulary and heap pages not returned (`gguf_residue_per_vocab` x vocab); {} for other sources."""
    return {"load_residue": int(cal.gguf_residue_per_vocab * spec.vocab)} if spec.source_format == "gguf" else {}


def _default_overhead(device: str, unified_memory: bool) -> int:
    """Runtime overhead when none is given: 0 for a discrete GPU's CUDA-allocated peak, else the
    measured RSS after imports (cached per process)."""
    if device == "cuda" and not unified_memory:
        return 0
    from edge_runtime.measure import measure_runtime_overhead
    return measure_runtime_overhead()


def _quantized_cpu_bytes(spec: ModelSpec, plan: Plan, cal: Calibration, tokens: int, act_b: int,
                         served: bool) -> dict[str, float]:
    """Dequantization temporaries (and bitsandbytes int8 saved inputs) of a quantized base on CPU."""
    zo = plan.mode == "zo"
    L, h, inter = spec.layers, spec.hidden, spec.intermediate or 4 * spec.hidden
    biggest = max((o * i for o, i in spec.linear_shapes.values()), default=0)
    out: dict[str, float] = {}
    # forward: fp32 copies of the Linear in flight; backward keeps more (fitted fraction of all Linear weights, fp32)
    quanto = spec.source_format == "gguf" or plan.base_precision == "int4"  # model_loading's quanto route
    frac = (cal.quanto_saved_int8 if plan.base_precision == "int8" else cal.quanto_saved_4bit) if quanto else cal.dequant_saved
    # GGUF blocks (GGUFLinear) save nothing for backward: they dequantize again
    kept = spec.gguf_block_params if gguf_blocks_kept(spec, plan.base_precision) else 0
    saved = 0.0 if zo else frac * (spec.linear_params - kept) * 4
    if plan.gradient_checkpointing:  # saved tensors of the recomputed layer(s) only
        layers = cal.ckpt_dequant_layers if served else frac
        saved = saved / frac * layers / max(1, L) if frac else 0.0
    if zo and served and plan.base_precision == "nf4" and not quanto:  # bitsandbytes: no-grad forwards by rows
        return {"dequant_chunk": row_chunk_bytes(spec, tokens, act_b)}  # (training/bnb_rows.py), counted
    copies = cal.live_dequant_copies if served and not zo else cal.dequant_copies
    out["dequant_temporaries"] = copies * biggest * 4 + (0.0 if served else saved)
    if served:  # kept through the backward, not only while a Linear is in flight (+ per quantized weight)
        out["dequant_resident"] = saved + (0.0 if zo else cal.mmap_per_weight * spec.linear_params)
    if not zo and plan.base_precision == "int8" and spec.source_format != "gguf":
        # bitsandbytes' CPU int8 matmul (MatMul8bitFp) keeps each Linear's input on its ctx, outside
        # save_for_backward, so checkpointing does not drop it: ~(3h + I) values per token per layer
        out["int8_saved_inputs"] = cal.int8_inputs * tokens * L * (3 * h + inter) * act_b
    return out


def _dynamic_bytes(spec: ModelSpec, plan: Plan, task: str, n_train: int, device: str, attn_implementation: str,
                   cal: Calibration, response_tokens: int | None) -> dict[str, float]:
    """Training-time dynamic memory (activations, logits, ZO perturbation, dequant temporaries),
    before allocator slack."""
    act_b = BYTES[plan.compute_dtype]
    b, s, L = plan.batch_size, plan.seq_len, spec.layers
    h, inter = spec.hidden, spec.intermediate or 4 * spec.hidden
    kv = spec.kv_heads * spec.head_dim
    tokens = b * s
    cpu, zo, served = device == "cpu", plan.mode == "zo", mmap_served(spec, plan, task, device)
    per_layer = cal.act_hidden * h + cal.act_inter * inter + cal.act_kv * kv  # values / token / layer
    # BERT-style encoders save more per layer (two LayerNorms, GELU, dropout masks): fitted on the
    # non-checkpointed rows; under checkpointing `ckpt_layers` already covers the recomputed layer
    enc_extra = cal.act_hidden_encoder * h if spec.task_kind == "encoder" else 0.0
    # (b, heads, s, s) scores: eager attention, encoders with a padding mask, and (default-heap fit) SDPA on CPU;
    # torch 2.13's CPU SDPA runs its flash kernel with or without a mask (profiler): the mmap-served model drops it
    materialized = attn_implementation == "eager" or (cpu and not served) or spec.task_kind == "encoder"
    attn = cal.attn_eager * spec.heads * s * s * b * act_b if materialized else 0.0
    # the trainer's causal-LM loss runs lm_head only on response tokens, LOGIT_CHUNK_ROWS rows at a
    # time under checkpointing: one chunk's fp32 logits (rows, V) are alive at a time
    n_resp = tokens if response_tokens is None else max(1, min(int(response_tokens), tokens))
    logits = min(n_resp, LOGIT_CHUNK_ROWS) * spec.vocab * 4 if task == "causal_lm" else 0
    dyn: dict[str, float] = {}
    if zo:
        dyn["zo_perturbation"] = 2 * 4 * n_train  # clean copy + z
        dyn["activations_forward"] = tokens * cal.fwd_transient * inter * act_b + attn / max(1.0, cal.attn_eager)
        dyn["logits"] = (cal.live_logits_zo if served else cal.logits_zo) * logits
    else:
        if plan.gradient_checkpointing:
            kept = tokens * L * cal.ckpt_hidden * h * act_b + tokens * cal.embed_grad_input * h * 4
            dyn["activations"] = kept  # + the recomputed layer(s), alive only while a layer is in backward
            dyn["activations_layer"] = cal.ckpt_layers * (tokens * per_layer * act_b + attn)
        else:
            dyn["activations"] = tokens * L * (per_layer + enc_extra) * act_b + attn * L
        dyn["logits"] = (cal.live_logits_train if served else cal.logits_train) * logits
    if plan.base_precision in QUANTIZED and cpu:
        dyn.update(_quantized_cpu_bytes(spec, plan, cal, tokens, act_b, served))
    return dyn


HEAD_PHASE = ("logits", "head_slice")
LAYER_PHASE = ("activations_layer", "activations_forward", "dequant_temporaries", "dequant_chunk")
COUNTED = ("logits", "head_slice", "int8_saved_inputs", "dequant_chunk")  # live copies counted from the code


def served_dynamic(dyn: dict[str, float], plan: Plan, cal: Calibration) -> dict[str, float]:
    """Mmap-served heap: activation terms (fitted on glibc's heap) x `mmap_dynamic` / `mmap_dynamic_ckpt`;
    counted live copies (`COUNTED`; in backprop the dequantized Linear, `live_dequant_copies`) as they are."""
    f = cal.mmap_dynamic_ckpt if plan.gradient_checkpointing else cal.mmap_dynamic
    counted = COUNTED if plan.mode == "zo" else COUNTED + ("dequant_temporaries",)
    return {k: v if k in counted else v * f for k, v in dyn.items()}


def alive_at_peak(dyn: dict[str, float]) -> dict[str, float]:
    """Parts alive at the peak where freed memory leaves the RSS (`mmap_served`): the loss chunk (`HEAD_PHASE`)
    and a decoder layer (`LAYER_PHASE`: recomputed activations, ZO forward, dequantized Linear) never overlap, so
    the smaller phase's parts count 0; kept values (checkpoints, saved activations, ZO copies) count in both."""
    head = sum(dyn.get(k, 0.0) for k in HEAD_PHASE)
    layer = sum(dyn.get(k, 0.0) for k in LAYER_PHASE)
    gone = LAYER_PHASE if head > layer else HEAD_PHASE
    return {k: 0.0 if k in gone else v for k, v in dyn.items()}


def estimate(spec: ModelSpec, plan: Plan, task: str = "classification", overhead_bytes: int | None = None,
             budget_bytes: int = 0, *, device: str = "cpu", attn_implementation: str = "sdpa",
             calibration: Calibration = DEFAULT_CALIBRATION, response_tokens: int | None = None,
             unified_memory: bool = False) -> MemoryEstimate:
    """Predicted peak memory of loading `spec` and training it under `plan`: max(load peak,
    training peak). The breakdown's values sum to the total; `load_peak_excess` is
    max(0, load peak - training peak) and `load_peak_bytes` in `to_dict()` is the load peak itself.

    overhead_bytes: runtime overhead (killable memory after imports, `measure_runtime_overhead`);
    None -> measured once per process (cached). Pass 0 for a discrete GPU's CUDA-allocated peak (`device="cuda"` does that).
    response_tokens: target (response) tokens per batch for a causal LM; None -> batch * seq_len
    (the upper bound). Only these rows go through lm_head (edge_runtime/training/losses.py).
    unified_memory: a CUDA device whose GPU shares host RAM (Jetson): the host-side load counts.
    """
    if task not in TASKS:
        raise ValueError(f"task {task!r} is invalid: expected one of {TASKS}")
    spec.check_targets(plan.target_modules)
    cal = calibration
    if overhead_bytes is None:
        overhead_bytes = _default_overhead(device, unified_memory)

    parts: dict[str, int] = {"runtime_overhead": int(overhead_bytes)}
    t16 = tables_16bit(spec, plan, task, device, unified_memory)
    parts.update(weight_bytes(spec, plan.base_precision, task, plan.compute_dtype, t16))
    parts.update(source_residue_bytes(spec, plan, device, cal, task))
    n_train = trainable_params(spec, plan, task)
    parts["adapter_params"] = 4 * n_train
    zo = plan.mode == "zo"
    parts["adapter_grads"] = 0 if zo else 4 * n_train
    parts["optimizer_state"] = 0 if zo or plan.optimizer == "sgd" else 8 * n_train

    dyn = _dynamic_bytes(spec, plan, task, n_train, device, attn_implementation, cal, response_tokens)
    if t16 and task == "causal_lm":  # stored16.Head16: one widened (slice, H) fp32 block of the head in flight
        dyn["head_slice"] = min(HEAD_SLICE_ROWS, spec.vocab) * spec.hidden * 4
    if mmap_served(spec, plan, task, device):
        dyn = alive_at_peak(served_dynamic(dyn, plan, cal))
    elif "activations_layer" in dyn:  # the default heap keeps what a phase freed: the parts add up (as fitted)
        dyn["activations"] += dyn.pop("activations_layer")
    dyn_total = sum(dyn.values())
    dyn["allocator_slack"] = cal.alloc_slack * dyn_total
    parts.update({k: int(v) for k, v in dyn.items()})
    train_total = sum(parts.values())
    load = int(overhead_bytes) + load_peak_bytes(spec, plan, task, device=device, unified_memory=unified_memory,
                                                 calibration=cal)
    parts["load_peak_excess"] = max(0, load - train_total)
    total = sum(parts.values())
    return MemoryEstimate(total_bytes=int(total), budget_bytes=int(budget_bytes), breakdown=parts, load_peak_bytes=load)


def calibration_dict(cal: Calibration = DEFAULT_CALIBRATION) -> dict[str, float]:
    return asdict(cal)
