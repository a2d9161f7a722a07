"""Bad input to `edge-runtime train` gets a clear message: a causal LM whose tokenizer has no EOS
token (a BERT-style tokenizer: its SEP token ends responses, or the error says what to add) and a
data file that is not text (the error names the file)."""
import json
import math

import pytest
import torch

from edge_runtime.data import DataError, load_records
from edge_runtime.plan import Plan
from edge_runtime.training.model_loading import ModelLoadError
from edge_runtime.training.session import LocalTrainer
from edge_runtime.training.tiny import make_tiny_llama
from tests.models import minilm_dir

torch.set_num_threads(1)
RECORDS = [{"instruction": f"repeat the word {w}", "input": "", "output": w} for w in ["good", "bad"] * 2]
PLAN = Plan(rank=2, target_modules=["q_proj", "v_proj"], batch_size=2, seq_len=32)


def _llama_with_tokenizer_of(src, out):
    """A tiny random Llama whose tokenizer files are those of `src` (vocab resized to fit)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(src)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out, tok


def test_causal_lm_with_bert_tokenizer_ends_responses_with_sep(tmp_path):
    model, tok = _llama_with_tokenizer_of(minilm_dir(), tmp_path / "llama-bert-tok")
    assert tok.eos_token is None and tok.sep_token == "[SEP]"
    t = LocalTrainer(model, PLAN, "causal_lm")
    assert t.tokenizer.eos_token == "[SEP]"
    res = t.train(RECORDS, steps=1, lr=1e-3, progress=False)
    assert res.steps == 1 and math.isfinite(res.loss_first)


def test_causal_lm_without_any_end_token_says_what_to_add(tmp_path):
    src = make_tiny_llama(tmp_path / "src")
    cfg_path = src / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("eos_token", None)
    cfg.pop("sep_token", None)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"no EOS token.*eos_token.*tokenizer_config\.json"):
        LocalTrainer(src, PLAN, "causal_lm")


@pytest.mark.parametrize("name", ["train.jsonl", "train.tsv", "train.csv", "train.jsonl.gz"])
def test_binary_data_file_is_named(tmp_path, name):
    f = tmp_path / name
    f.write_bytes(b"\xd8\xff\xe0\x00\x10JFIF\x00\x01" + bytes(range(256)) * 4)
    with pytest.raises(DataError, match=rf"{name}.*(UTF-8|gzip)"):
        load_records(f)
