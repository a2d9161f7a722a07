"""A causal-LM checkpoint without its output head (what a tied-embedding GGUF is) must load with
the head tied to the input embeddings on both sides, never with a random head."""
import json

import torch

from coordinator.model import load_base_model
from edge_runtime.plan import Plan
from edge_runtime.training.model_loading import load_base
from edge_runtime.training.tiny import make_tiny_llama


def _headless_untied(tmp_path):
    d = make_tiny_llama(tmp_path / "m")  # tied: the safetensors file holds no lm_head.weight
    cfg = json.loads((d / "config.json").read_text())
    cfg["tie_word_embeddings"] = False  # the config no longer says so: transformers would init a random head
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_plain_transformers_leaves_a_random_head_here(tmp_path):
    from transformers import AutoModelForCausalLM

    d = _headless_untied(tmp_path)
    m, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
    assert "lm_head.weight" in info["missing_keys"]
    assert not torch.equal(m.lm_head.weight, m.model.embed_tokens.weight)


def test_both_sides_tie_a_missing_head_to_the_embeddings(tmp_path, caplog):
    d = _headless_untied(tmp_path)
    plan = Plan(rank=2, target_modules=["q_proj", "v_proj"], batch_size=1, seq_len=16)
    dev, _ = load_base(d, plan, "causal_lm", seed=0)
    coord, _ = load_base_model(d, "causal_lm", 0, seed=1)
    for m in (dev, coord):
        assert m.lm_head.weight is m.model.embed_tokens.weight
    assert torch.equal(dev.lm_head.weight, coord.lm_head.weight)
    assert "tied it to the input embeddings" in caplog.text
    ids = torch.tensor([[4, 10, 11, 12]])
    with torch.no_grad():
        assert torch.allclose(dev(input_ids=ids).logits, coord(input_ids=ids).logits, atol=1e-5)


def test_concurrent_loads_leave_transformers_tie_weights_intact(tmp_path):
    """transformers' `no_tie_weights()` swaps PreTrainedModel.tie_weights for a no-op while a model
    loads; interleaved loads in threads can leave the no-op installed for good. Our loads serialise
    on LOAD_LOCK: a load waits while the lock is held, and after many concurrent loads on both sides
    tie_weights is still transformers' own and a tied model still ties."""
    import threading

    from transformers import AutoModelForCausalLM, PreTrainedModel

    from protos.model_load import LOAD_LOCK

    d = make_tiny_llama(tmp_path / "tied")
    original = PreTrainedModel.tie_weights
    plan = Plan(rank=2, target_modules=["q_proj", "v_proj"], batch_size=1, seq_len=16)
    done = threading.Event()
    with LOAD_LOCK:
        th = threading.Thread(target=lambda: (load_base(d, plan, "causal_lm", seed=0), done.set()), daemon=True)
        th.start()
        assert not done.wait(1.0)  # blocked behind the lock
    assert done.wait(60)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(3):
                if i % 2:
                    load_base(d, plan, "causal_lm", seed=i)
                else:
                    load_base_model(d, "causal_lm", 0, seed=i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert PreTrainedModel.tie_weights is original
    m = AutoModelForCausalLM.from_pretrained(d)
    assert m.lm_head.weight is m.model.embed_tokens.weight
