"""A quantized base computed in fp32 keeps an fp16 checkpoint's embeddings and lm_head in fp16
(`training/stored16.py`): half their memory, the same function (fp16 -> fp32 widening is exact).

Real tiny Llama (untied head) saved as fp16 safetensors, the real streaming loader and bitsandbytes
nf4, the real LocalTrainer with checkpointing; the estimator models the same tables at 2 bytes.
"""
import pytest
import torch

from edge_runtime.memory import estimate, tables_16bit
from edge_runtime.modelspec import load_model_spec
from edge_runtime.plan import Plan
from edge_runtime.training.model_loading import load_base
from edge_runtime.training.stored16 import Embedding16, Head16

torch.set_num_threads(1)
QV = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def untied_fp16(tmp_path_factory):
    """A tiny random Llama with an untied lm_head, saved as fp16 safetensors + tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from edge_runtime.training.tiny import make_tokenizer
    d = tmp_path_factory.mktemp("stored16") / "fp16"
    tok = make_tokenizer(2000)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).half().save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_nf4_base_keeps_fp16_tables_and_computes_what_bitsandbytes_fp32_tables_compute(untied_fp16):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    ids = torch.randint(10, 1500, (2, 12), generator=torch.Generator().manual_seed(0))
    nf4, _ = load_base(untied_fp16, Plan(rank=2, target_modules=QV, base_precision="nf4"), "causal_lm")
    emb, head = nf4.get_input_embeddings(), nf4.get_output_embeddings()
    assert isinstance(emb, Embedding16) and isinstance(head, Head16)
    assert emb.weight.dtype == head.weight.dtype == torch.float16 and head.weight is not emb.weight
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(untied_fp16, quantization_config=qc, device_map="cpu", dtype=torch.float32)
    assert ref.get_input_embeddings().weight.dtype == torch.float32  # the reference widens the tables
    for m in ref.modules():  # bitsandbytes' fp32 product (a CPU without avx512-bf16), not its bf16 repack
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    # no-grad logits: nf4's 4-bit weights dequantized by rows (training/bnb_rows.py), ref's whole
    assert torch.allclose(_logits(nf4, ids), _logits(ref, ids), rtol=1e-5, atol=1e-5)
    fp32, _ = load_base(untied_fp16, Plan(rank=2, target_modules=QV, base_precision="fp32"), "causal_lm")
    assert fp32.get_input_embeddings().weight.dtype == torch.float32  # a float plan is left as it was


def test_head16_slices_forward_and_backward_like_a_widened_linear():
    w = torch.randn(1000, 64, generator=torch.Generator().manual_seed(1)).half()
    head = Head16(w, slice_rows=300)  # 4 slices, the last one short
    x = torch.randn(5, 7, 64, requires_grad=True)
    (head(x) ** 2).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    (torch.nn.functional.linear(x_ref, w.float()) ** 2).sum().backward()
    assert torch.allclose(head(x), torch.nn.functional.linear(x, w.float()), atol=1e-5)
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-4, atol=1e-3) and head.weight.grad is None


def test_head16_default_slice_is_the_estimators_and_gives_the_same_logits_as_one_wide_slice():
    from edge_runtime.memory import HEAD_SLICE_ROWS
    from edge_runtime.training import stored16

    assert stored16.HEAD_SLICE_ROWS is HEAD_SLICE_ROWS  # one home (memory.py), no copy to drift
    w = torch.randn(2 * HEAD_SLICE_ROWS + 77, 48, generator=torch.Generator().manual_seed(2)).half()
    x = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(3))
    default, whole = Head16(w), Head16(w, slice_rows=w.shape[0])  # 3 slices (last one short) vs 1
    assert default.slice_rows == HEAD_SLICE_ROWS
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = default(xa), whole(xb)
    assert torch.equal(ya, yb)  # each logit is the same dot product whatever the slicing
    (ya ** 2).sum().backward()
    (yb ** 2).sum().backward()
    assert torch.allclose(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)


def test_trainer_steps_on_fp16_tables_and_the_estimator_counts_them_at_2_bytes(untied_fp16):
    from edge_runtime.training.session import LocalTrainer
    plan = Plan(rank=2, target_modules=QV, base_precision="nf4", batch_size=2, seq_len=32, gradient_checkpointing=True)
    t = LocalTrainer(untied_fp16, plan, "causal_lm", seed=0, threads=1)
    rows = [{"instruction": "the movie is good " * 4, "input": "", "output": "yes it is " * 4}] * 4
    res = t.train(rows, steps=2, seed=0, progress=False)
    assert all(torch.isfinite(torch.tensor(res.losses))) and len(res.losses) == 2
    lora_b = [p for n, p in t.model.named_parameters() if "lora_B" in n]
    assert any(float(p.detach().abs().sum()) > 0 for p in lora_b)  # the adapter learned through the fp16 head
    spec = load_model_spec(untied_fp16)
    assert tables_16bit(spec, plan, "causal_lm") and not tables_16bit(spec, Plan(rank=2, target_modules=QV), "causal_lm")
    e16 = estimate(spec, plan, "causal_lm", overhead_bytes=0)
    e32 = estimate(spec, Plan(**{**plan.to_dict(), "compute_dtype": "bf16"}), "causal_lm", overhead_bytes=0)
    table = spec.vocab * spec.hidden
    assert e16.breakdown["weights_head"] == 2 * table
    model = t.model.get_base_model()
    kept = model.get_input_embeddings().weight.nbytes + model.get_output_embeddings().weight.nbytes
    assert kept == 2 * 2 * table and e16.breakdown["weights_embed_norm"] >= 2 * table
    assert e32.breakdown["weights_head"] == 2 * table and not tables_16bit(spec, Plan(**{**plan.to_dict(),
                                                                                       "compute_dtype": "bf16"}), "causal_lm")
