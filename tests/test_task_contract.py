"""The coordinator's task contract reaches the devices: a causal LM's label words over real gRPC
(TrainingConfig.label_words) and Flower's run config, validated with the field named."""
import pytest
import torch

from coordinator.config import CoordinatorConfig
from coordinator.flower_run import flower_config
from coordinator.server import create_server
from coordinator.service import Coordinator
from edge_runtime.client import FederationClient, task_from_config
from edge_runtime.plan import Plan
from edge_runtime.training.model_loading import resolve_task
from edge_runtime.training.tiny import make_tiny_llama
from protos.task import check_label_words, label_words_from_json

torch.set_num_threads(1)


def test_label_words_are_checked_where_they_are_given():
    assert check_label_words(["bad", "good"]) == ("bad", "good") and check_label_words([]) == ()
    for bad in (["good", "good"], ["good"], ["", "x"]):
        with pytest.raises(ValueError, match="--label-words .*distinct non-empty"):
            CoordinatorConfig(model="m", store="s", task="causal_lm", label_words=bad)
    assert label_words_from_json('["no", "yes", "maybe"]') == ("no", "yes", "maybe")
    with pytest.raises(ValueError, match="run config label-words 'no,yes': not a JSON list"):
        flower_config({"task": "causal_lm", "label-words": "no,yes"})
    assert flower_config({"task": "causal_lm", "label-words": '["no", "yes"]'}).label_words == ("no", "yes")
    assert flower_config({}).label_words == ()


def test_devices_receive_the_coordinators_label_words_over_grpc(tmp_path):
    llama = make_tiny_llama(tmp_path / "llama")
    c = Coordinator(CoordinatorConfig(model=str(llama), store=str(tmp_path / "store"), strategy="zero_pad",
                                      rounds=1, min_devices=1, max_rank=2, task="causal_lm",
                                      label_words=["terrible", "great"]))
    server, port = create_server("127.0.0.1:0", c, credentials=None)
    server.start()
    client = FederationClient(f"127.0.0.1:{port}")
    try:
        reply = client.register("{}", Plan(rank=2, target_modules=["q_proj", "v_proj"]).to_json(), "dev0")
        task = resolve_task(task_from_config(reply.config))
        assert (task.kind, task.label_words) == ("causal_lm", ("terrible", "great"))
    finally:
        client.close()
        server.stop(0)


def test_flower_fit_config_carries_the_label_words():
    from coordinator.flower_strategy import ClientInfo, HeteroLoraStrategy
    from protos import flower_pack as P

    init = {"m.lora_A.weight": torch.zeros(2, 4), "m.lora_B.weight": torch.zeros(4, 2)}
    s = HeteroLoraStrategy(init, task="causal_lm", label_words=("no", "yes"), max_rank=2, strategy="zero_pad")
    sent = s._fit_config(ClientInfo(plan_rank=2, mode="lora", rank=2), 1, {})[P.CFG_LABEL_WORDS]
    assert label_words_from_json(sent) == ("no", "yes")  # what edge_runtime.flower_client reads back
    with pytest.raises(ValueError, match="label_words"):
        HeteroLoraStrategy(init, task="causal_lm", label_words=("no", "no"), max_rank=2, strategy="zero_pad")
