"""Tiny random models saved as real Hugging Face directories, for tests, demos and benchmarks.

`make_tiny_llama(dir)`: a 2-layer LlamaForCausalLM with a word-level tokenizer over SST-2
words and a small chat template. `make_tiny_bert(dir)`: a 2-layer BERT with the same kind of
tokenizer. Both are built from seeds, so every call gives identical files.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<s>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]


def _vocab(size: int) -> list[str]:
    from edge_runtime.data import DEFAULT_TEMPLATE, load_sst2

    counts = Counter(w for r in load_sst2("train", limit=20000) for w in r["text"].lower().split())
    words = [w for w in ("positive", "negative", "hello", "world") + tuple(DEFAULT_TEMPLATE.lower().split())]
    words += [w for w, _ in counts.most_common(size)]
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w, None)
    return list(seen)[: size - len(SPECIALS)]


def make_tokenizer(vocab_size: int = 2000):
    """A word-level PreTrainedTokenizerFast (lower-cased, whitespace + punctuation split)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + _vocab(vocab_size))}
    tk = Tokenizer(WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]", bos_token="<s>", eos_token="<|end|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|system|>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_tiny_llama(out: str | Path, hidden: int = 64, layers: int = 2, vocab_size: int = 2000, seed: int = 0) -> Path:
    """Save a random tiny Llama + tokenizer to `out` (an HF model dir) and return it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    tok = make_tokenizer(vocab_size)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=True)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_tiny_bert(out: str | Path, hidden: int = 64, layers: int = 2, vocab_size: int = 2000, seed: int = 0) -> Path:
    """Save a random tiny BERT encoder + tokenizer to `out` and return it."""
    from transformers import BertConfig, BertModel

    out = Path(out)
    tok = make_tokenizer(vocab_size)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                     num_attention_heads=4, max_position_embeddings=512, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out
