"""Logit adjustment of a causal LM's label words (classification data cast as instructions)."""
import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from edge_runtime.data import DEFAULT_LABEL_WORDS, classification_to_instructions, load_sst2
from edge_runtime.plan import Plan
from edge_runtime.training import batching, label_prior, losses
from edge_runtime.training.model_loading import resolve_task
from edge_runtime.training.session import LocalTrainer
from edge_runtime.training.tiny import make_tiny_llama
from protos.adapter import TrainingRecipe

torch.set_num_threads(1)
QV = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("m") / "llama")


def test_bias_adjustment_is_the_label_words_softmax_with_the_prior():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 40, generator=g) * 3
    y = torch.tensor([3, 7, 11, 3, 20])  # 20 is not a label word
    ids, vals = torch.tensor([3, 7, 11]), torch.tensor([-0.1, -4.0, -9.0])
    want = torch.zeros(())
    for zi, yi in zip(z, y):  # -log P(words) - log softmax(z_words + vals)[y]; plain CE when y is no word
        if yi in ids:
            k = int((ids == yi).nonzero())
            want += torch.logsumexp(zi, 0) - torch.logsumexp(zi[ids], 0) - torch.log_softmax(zi[ids] + vals, 0)[k]
        else:
            want += torch.logsumexp(zi, 0) - zi[yi]
    got = F.cross_entropy(z, y, reduction="sum") + losses.bias_adjustment(z, y, ids, vals)
    assert torch.allclose(got, want, atol=1e-4)


def test_causal_loss_adjusts_the_first_response_token_only(llama):
    t = LocalTrainer(llama, Plan(rank=2, target_modules=QV, seq_len=64), "causal_lm")
    ex = t.encode(load_sst2("train", limit=6))
    batch = t._collate(ex, range(len(ex)))
    ids, lp = label_prior.response_prior(ex, t.tokenizer, DEFAULT_LABEL_WORDS, 64)
    with torch.no_grad():
        got = losses.causal_lm_loss(t.model, batch, first_bias=(ids, lp))
        logits = t.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        first = torch.zeros(logits.shape[:2], dtype=torch.bool)
        first[torch.arange(len(ex)), batch["prompt_len"] - 1] = True
        target = batch["labels"][:, 1:]
        ce = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # (B, T-1), 0 at -100
        zf, yf = logits[first], target[first]  # the first response token: a 2-way softmax + log prior
        k = (yf[:, None] == ids[None, :]).float().argmax(-1)
        ce[first] = (torch.logsumexp(zf, -1) - torch.logsumexp(zf[:, ids], -1)
                     - torch.log_softmax(zf[:, ids] + lp, -1)[torch.arange(len(ex)), k])
        want = ce.sum() / (target != -100).sum()
    assert torch.allclose(got, want, atol=1e-4)


def _preference(t: LocalTrainer, ex: list[batching.Example], ids: torch.Tensor) -> float:
    """Mean logit of 'negative' minus 'positive' right after the prompt."""
    batch = t._collate(ex, range(len(ex)))
    with torch.no_grad():
        hs, head = losses.hidden_states(t.model, batch)
        z = head(hs[torch.arange(len(ex)), batch["prompt_len"] - 1]).float()
    return float((z[:, ids[0]] - z[:, ids[1]]).mean())


def test_a_one_sided_shard_pulls_the_label_word_less_under_logit_adjustment(llama):
    rows = load_sst2("train", limit=400)
    negatives = [r for r in rows if r["label"] == 0][:96]
    held = [r for r in rows[-40:]]
    shift = {}
    for tau in (0.0, 1.0):
        t = LocalTrainer(llama, Plan(rank=4, target_modules=QV, batch_size=8, learning_rate=1e-2, seq_len=64),
                         "causal_lm", seed=0)
        t.recipe = TrainingRecipe(logit_adjust=tau)
        ex = t.encode(held)
        ids = label_prior.response_prior(ex, t.tokenizer, DEFAULT_LABEL_WORDS, 64)[0]
        before = _preference(t, ex, ids)
        t.train(negatives, steps=12, progress=False)
        assert (t._word_prior is not None) == (tau > 0)
        shift[tau] = _preference(t, ex, ids) - before
    assert shift[0.0] > 0.3  # without: the model learns to answer 'negative'
    assert shift[1.0] < 0.5 * shift[0.0]  # with: the one-sided shard has little left to push


def test_words_that_do_not_start_the_responses_turn_the_adjustment_off(llama, caplog):
    t = LocalTrainer(llama, Plan(rank=2, target_modules=QV, seq_len=64), {"kind": "causal_lm",
                                                                          "label_words": ["bad", "good"]})
    assert t.task.label_words == ("bad", "good")
    spec = SimpleNamespace(kind="causal_lm", num_labels=2, label_words=["bad", "good"])  # a TaskSpec-like object
    assert resolve_task(spec).label_words == ("bad", "good")
    rows = load_sst2("train", limit=8)
    ex = t.encode(classification_to_instructions(rows))  # cast elsewhere with the default words
    with caplog.at_level(logging.WARNING):
        assert label_prior.response_prior(ex, t.tokenizer, t.task.label_words, 64) is None
    assert "does not start with its label word" in caplog.text
    ex = t.encode(rows)  # cast by the trainer: with the task's words, so the adjustment applies
    assert label_prior.response_prior(ex, t.tokenizer, t.task.label_words, 64) is not None
    with pytest.raises(ValueError, match="label_words"):
        LocalTrainer(llama, Plan(rank=2, target_modules=QV), {"kind": "causal_lm", "label_words": ["a", "a"]})
