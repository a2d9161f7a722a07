"""coordinator.store + restart: atomic blobs with checksums; a restarted coordinator resumes the open
round with its accepted updates and finishes it."""
import json
import os

import pytest
import torch

from coordinator.service import Coordinator, CoordinatorConfig
from coordinator.store import Store, StoreError, atomic_write
from protos import wire

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from edge_runtime.training.tiny import make_tiny_bert
    return make_tiny_bert(tmp_path_factory.mktemp("m") / "bert", hidden=32, vocab_size=300)


def test_atomic_write_replaces_whole_files(tmp_path):
    p = tmp_path / "a" / "b.bin"
    sha = atomic_write(p, b"hello")
    assert p.read_bytes() == b"hello" and sha == wire.sha256_hex(b"hello")
    atomic_write(p, b"world!")
    assert p.read_bytes() == b"world!"
    assert [f.name for f in p.parent.iterdir()] == ["b.bin"]  # no temp files left behind


def test_corrupted_blob_is_refused(tmp_path):
    s = Store(tmp_path)
    sha = s.write_blob("x/blob.bin", b"payload")
    assert s.read_blob("x/blob.bin", sha) == b"payload"
    (tmp_path / "x" / "blob.bin").write_bytes(b"tampered")
    with pytest.raises(StoreError, match="sha256"):
        s.read_blob("x/blob.bin", sha)


def test_partial_uploads_append_only_at_the_current_offset(tmp_path):
    s = Store(tmp_path)
    assert s.append_partial("up-1", 0, b"abc") == 3
    with pytest.raises(ValueError, match="offset 1"):
        s.append_partial("up-1", 1, b"x")
    assert s.append_partial("up-1", 3, b"de") == 5 and s.partial_size("up-1") == 5
    with pytest.raises(ValueError, match="upload_id"):
        s.partial_path("../../etc")


def _upload(c: Coordinator, dev: str, scale: float = 1.01) -> None:
    t = c.get_task(dev)
    assert t["state"] == "TRAIN"
    tensors, _ = wire.decode_tensors(c.download(dev, t["round_id"], t["download_id"]))
    data = wire.encode_tensors({k: v * scale for k, v in tensors.items()})
    c.upload_append(dev, "u1", 0, data, len(data))
    c.finish_upload(dev, {"round_id": t["round_id"], "nonce": t["nonce"], "total_size": len(data),
                          "sha256": wire.sha256_hex(data), "upload_id": "u1", "stats": {"num_examples": 10}}, len(data))


def test_restart_resumes_open_round_without_losing_accepted_updates(tiny_model, tmp_path):
    cfg = CoordinatorConfig(model=str(tiny_model), store=str(tmp_path / "store"), strategy="zero_pad", rounds=1,
                            min_devices=2, max_rank=4)
    c = Coordinator(cfg)
    plan = json.dumps({"rank": 4, "mode": "lora"})
    r0 = c.register("{}", plan, "", "dev0")
    r1 = c.register("{}", plan, "", "dev1")
    _upload(c, r0["device_id"])
    assert c.fed.current.accepted == (r0["device_id"],)
    c.close()  # "crash": nothing else is flushed

    c2 = Coordinator(cfg)
    assert c2.fed.current.round_id == 1 and c2.fed.current.state == "open"
    assert c2.fed.current.accepted == (r0["device_id"],)  # reloaded from SQLite + disk
    assert c2.authenticate(r1["device_token"]) == r1["device_id"]  # tokens survive too
    _upload(c2, r1["device_id"], scale=0.99)
    assert c2.fed.current.state == "aggregated" and c2.fed.done
    rd = tmp_path / "store" / "rounds" / "0001"
    assert (rd / "global.safetensors").exists()
    cfgjson = json.loads((rd / "peft" / "adapter_config.json").read_text())
    assert cfgjson["r"] == 4 and cfgjson["peft_type"] == "LORA"
    from safetensors.torch import load_file
    keys = set(load_file(rd / "peft" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_A.weight") for k in keys) and any("classifier" in k for k in keys)
    ups = c2.store.updates(1)
    assert {u["device_id"] for u in ups} == {r0["device_id"], r1["device_id"]}
    for u in ups:  # every accepted blob is on disk and matches its recorded checksum
        c2.store.read_blob(u["path"], u["sha256"])
    assert not os.listdir(tmp_path / "store" / "partial")
    c2.close()
    c3 = Coordinator(cfg)  # a finished federation stays finished
    assert c3.fed.done and c3.get_task(r0["device_id"])["state"] == "DONE"
    c3.close()


def test_restart_with_different_strategy_is_refused(tiny_model, tmp_path):
    cfg = CoordinatorConfig(model=str(tiny_model), store=str(tmp_path / "s"), strategy="svd", max_rank=4)
    Coordinator(cfg).close()
    with pytest.raises(ValueError, match="strategy"):
        Coordinator(CoordinatorConfig(model=str(tiny_model), store=str(tmp_path / "s"), strategy="stack", max_rank=4))
