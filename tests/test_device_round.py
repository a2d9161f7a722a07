"""The device's round pipeline (edge_runtime.device_round) with a fake client and trainer: the
download's device contract decides what stays on the device, the report keys, and the
emulation wrapper (edge_runtime.emulation.EmulatedRound: offline, pacing, dropout)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from edge_runtime.client import DeltaTracker, JoinConfig
from edge_runtime.device_round import DeviceRound
from edge_runtime.emulation import DeviceEmulation
from edge_runtime.plan import Plan
from edge_runtime.trainer_protocol import RoundTrainer
from protos import federation_pb2 as pb
from protos import wire
from protos.adapter import A_SUFFIX, B_SUFFIX, CONTRACT_META, DeviceContract

KEYS = {"m" + A_SUFFIX: (2, 3), "m" + B_SUFFIX: (4, 2), "head.weight": (2, 4)}
REPORT_KEYS = ["round_id", "rank", "mode", "train_s", "paced_s", "train_loss", "peak_rss_bytes", "download_s",
               "download_bytes", "upload_s", "upload_bytes", "accepted"]


@dataclass
class FakeResult:
    steps: int = 2
    examples_seen: int = 8
    mean_loss: float = 0.5
    seconds: float = 0.01
    peak_rss_bytes: int = 1
    zo_pairs: list | None = None
    zo_lr: float | None = None
    losses: tuple[float, ...] = (0.6, 0.5, 0.4)


class FakeTrainer:
    """Adds 1 to every tensor when it trains."""

    def __init__(self) -> None:
        self.plan = Plan(rank=2, target_modules=["m"])
        self.rank, self.lora_alpha, self.use_rslora, self.seed = 2, 4.0, False, 0
        self.zo_pool_seed, self.zo_pool_size, self.memory_budget_bytes = 0, None, None
        self.last_events: list = []
        self.frozen: tuple[str, ...] = ()
        self.recipe = None
        self.state = {k: torch.zeros(s) for k, s in KEYS.items()}
        self.loaded: list[dict] = []

    def configure(self, rank=None, lora_alpha=None, use_rslora=None, seed=None) -> None:
        self.rank, self.lora_alpha = rank, lora_alpha

    def merge_base_delta(self, factors) -> None:
        pass

    def adapter_state(self):
        return {k: v.clone() for k, v in self.state.items()}

    def load_adapter_state(self, state) -> None:
        assert sorted(state) == sorted(self.state)
        self.loaded.append({k: v.clone() for k, v in state.items()})
        self.state = {k: v.clone() for k, v in state.items()}

    def train(self, records, steps, lr=None, seed=0, progress=True):
        self.state = {k: v + 1 for k, v in self.state.items()}
        return FakeResult()

    def report(self) -> dict:
        return {}


@dataclass
class FakeClient:
    contract: DeviceContract
    uploads: list = field(default_factory=list)

    def download(self, t: pb.Task) -> bytes:
        state = {k: torch.full(s, 10.0) for k, s in KEYS.items() if not self.contract.is_local(k)}
        return wire.encode_tensors(state, {CONTRACT_META: self.contract.to_meta()})

    def upload(self, t, data, stats) -> pb.UploadReply:
        self.uploads.append((wire.decode_tensors(data)[0], stats))
        return pb.UploadReply(accepted=True)


class FakeHeartbeat:
    status = "idle"

    def round_over(self, t) -> bool:
        return False


def _round(contract: DeviceContract) -> tuple[DeviceRound, FakeClient, FakeTrainer]:
    client, trainer = FakeClient(contract), FakeTrainer()
    cfg = JoinConfig(target="", model="", plan=trainer.plan, profile=None, records=[{"text": "x", "label": 0}] * 8)
    return DeviceRound(client, cfg, FakeHeartbeat(), DeltaTracker(), lambda: trainer), client, trainer


def _task(round_id: int) -> pb.Task:
    return pb.Task(state=pb.Task.TRAIN, round_id=round_id, assigned_rank=2, lora_alpha=4.0, local_steps=2, mode="lora")


def test_fake_trainer_is_a_round_trainer():
    assert isinstance(FakeTrainer(), RoundTrainer)


def test_keep_local_tensors_stay_on_the_device_across_rounds():
    rnd, client, trainer = _round(DeviceContract(keep_local=(B_SUFFIX,)))
    r1 = rnd.play(_task(1))
    assert list(r1) == REPORT_KEYS and r1["accepted"] and r1["upload_bytes"] > 0
    sent, stats = client.uploads[0]
    assert sorted(sent) == ["head.weight", "m" + A_SUFFIX]  # B is not uploaded
    assert stats.num_examples == 8
    assert torch.equal(trainer.loaded[0]["m" + B_SUFFIX], torch.zeros(4, 2))  # zeros at first
    assert torch.equal(rnd.kept["m" + B_SUFFIX], torch.ones(4, 2))  # the trained B is kept
    rnd.play(_task(2))
    assert torch.equal(trainer.loaded[1]["m" + B_SUFFIX], torch.ones(4, 2))  # ... and reused next round
    assert torch.equal(trainer.loaded[1]["m" + A_SUFFIX], torch.full((2, 3), 10.0))  # A from the download


def test_an_empty_contract_loads_and_sends_everything():
    rnd, client, trainer = _round(DeviceContract())
    rnd.play(_task(1))
    assert sorted(client.uploads[0][0]) == sorted(KEYS) and rnd.kept == {}


def test_emulated_dropout_trains_but_never_sends_then_sits_the_round_out():
    rnd, client, _ = _round(DeviceContract())
    paced = []

    def pace(seconds, stop=None, cpu_seconds=None):
        paced.append(seconds)
        return 3.0

    player = DeviceEmulation(pace=pace, availability=lambda r: (True, r == 1), offline_s=0.0).wrap(rnd)
    r = player.play(_task(1))
    assert list(r) == REPORT_KEYS + ["dropped"] and r["dropped"] and not r["accepted"] and r["paced_s"] == 3.0
    assert not client.uploads and paced and player.sits_out(_task(1)) and not player.sits_out(_task(2))
    r2 = player.play(_task(2))
    assert r2["accepted"] and r2["paced_s"] == 3.0 and client.uploads[0][1].train_time_s >= 3.0


def test_emulated_offline_round_is_not_played():
    rnd, client, trainer = _round(DeviceContract())
    player = DeviceEmulation(availability=lambda r: (False, False), offline_s=0.0).wrap(rnd)
    assert player.play(_task(1)) is None and player.sits_out(_task(1))
    assert not client.uploads and not trainer.loaded and rnd._trainer is None  # the model was never loaded
