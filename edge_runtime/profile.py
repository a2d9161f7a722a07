"""Device profiles: what a device has (memory, compute, bandwidth, availability).

Profiles come from `profiles/*.yaml` (published specs of real devices, or small emulated
devices) or from measuring this machine (`edge_runtime.measure`). Loading validates every
field; a bad profile raises ProfileError naming the field and the expected form.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
PRECISIONS = ("fp32", "bf16", "fp16", "int8", "nf4", "int4")


class ProfileError(ValueError):
    """A profile field is missing or malformed."""


def parse_bytes(value: Any, field_name: str = "value") -> int:
    """'8GiB' / '512 MB' / 1234 -> bytes. Raises ProfileError naming `field_name`."""
    if isinstance(value, bool):
        raise ProfileError(f"profile field '{field_name}'={value!r}: expected a size like '8GiB' or a byte count")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ProfileError(f"profile field '{field_name}'={value!r}: expected a non-negative size")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ProfileError(f"profile field '{field_name}'={value!r}: expected a size like '8GiB', '512MiB' or '4GB'")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass
class DeviceProfile:
    """One device. Sizes in bytes, compute in GFLOP/s, bandwidth in Mbit/s.

    memory_budget_bytes: what fine-tuning may use (total minus OS/other apps).
    compute_gflops: sustained GEMM throughput per dtype, e.g. {"fp32": 50.0, "fp16": 400.0}.
    precisions: base precisions this device can run (e.g. nf4 needs bitsandbytes or quanto).
    availability: probability the device is online for a round; dropout: probability it
    drops out mid-round.
    budget_excludes_runtime: the budget is on top of the runtime overhead (the killable memory,
    as the MemoryGuard counts it with `guard.anon_bytes`, of the imported torch/transformers/peft,
    shared by every emulated device on one host); the process may use memory_budget_bytes + that
    overhead. Emulated profiles set it.
    max_rank: optional cap on the LoRA rank for this device class (an operator's tiering, as in
    HetLoRA/FlexLoRA deployments: it bounds per-round compute and upload); the planner never
    exceeds it, and memory may force a lower rank still.
    """

    name: str
    memory_total_bytes: int
    memory_budget_bytes: int
    compute_gflops: dict[str, float]
    kind: str = "real"  # "real" | "emulated" | "measured"
    accelerator: str = "cpu"  # "cpu" | "cuda" | "jetson" | "npu"
    accelerator_name: str = ""
    unified_memory: bool = True
    precisions: list[str] = field(default_factory=lambda: list(PRECISIONS))
    uplink_mbps: float = 10.0
    downlink_mbps: float = 50.0
    latency_ms: float = 50.0
    availability: float = 1.0
    dropout: float = 0.0
    round_deadline_s: float = 600.0
    budget_excludes_runtime: bool = False
    max_rank: int | None = None
    source: str = ""
    notes: str = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def err(f: str, expected: str) -> ProfileError:
            return ProfileError(f"profile '{self.name}': field '{f}'={getattr(self, f)!r} is invalid: expected {expected}")

        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", self.name or ""):
            raise ProfileError(f"profile field 'name'={self.name!r}: expected letters, digits, '-', '_' or '.'")
        if self.kind not in ("real", "emulated", "measured"):
            raise err("kind", "'real', 'emulated' or 'measured'")
        if self.accelerator not in ("cpu", "cuda", "jetson", "npu", "mps"):
            raise err("accelerator", "one of cpu, cuda, jetson, npu, mps")
        for f in ("memory_total_bytes", "memory_budget_bytes"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise err(f, "a positive size")
        if self.memory_budget_bytes > self.memory_total_bytes:
            raise err("memory_budget_bytes", f"at most memory_total ({self.memory_total_bytes} bytes)")
        if not isinstance(self.compute_gflops, dict) or "fp32" not in self.compute_gflops:
            raise err("compute_gflops", "a mapping with at least 'fp32', e.g. {fp32: 50, fp16: 400}")
        for k, v in self.compute_gflops.items():
            if k not in ("fp32", "fp16", "bf16", "int8") or not isinstance(v, (int, float)) or v <= 0:
                raise err("compute_gflops", "keys among fp32/fp16/bf16/int8 with positive GFLOP/s values")
        if not self.precisions or any(p not in PRECISIONS for p in self.precisions):
            raise err("precisions", f"a non-empty list among {PRECISIONS}")
        for f in ("uplink_mbps", "downlink_mbps", "round_deadline_s"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise err(f, "a positive number")
        if self.max_rank is not None and (not isinstance(self.max_rank, int) or isinstance(self.max_rank, bool)
                                          or self.max_rank < 1):
            raise err("max_rank", "an integer >= 1 (the device class's LoRA rank cap) or absent")
        if not isinstance(self.budget_excludes_runtime, bool):
            raise err("budget_excludes_runtime", "true or false")
        for f in ("name", "accelerator_name", "source", "notes"):
            if not isinstance(getattr(self, f), str):
                raise err(f, "a string")
        if not isinstance(self.unified_memory, bool):
            raise err("unified_memory", "true or false")
        if not isinstance(self.latency_ms, (int, float)) or self.latency_ms < 0:
            raise err("latency_ms", "a non-negative number of milliseconds")
        for f in ("availability", "dropout"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise err(f, "a probability between 0 and 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_SIZE_FIELDS = {"memory_total": "memory_total_bytes", "memory_budget": "memory_budget_bytes"}


def profile_from_dict(d: dict[str, Any], origin: str = "<dict>") -> DeviceProfile:
    """Build a profile from YAML-style keys (`memory_total: 8GiB` or `memory_total_bytes: ...`)."""
    if not isinstance(d, dict):
        raise ProfileError(f"{origin}: a profile must be a YAML mapping, got {type(d).__name__}")
    d = dict(d)
    for short, long in _SIZE_FIELDS.items():
        if short in d:
            d[long] = parse_bytes(d.pop(short), short)
        elif long in d:
            d[long] = parse_bytes(d[long], long)
    if "memory_budget_bytes" not in d and "memory_total_bytes" in d:
        raise ProfileError(f"{origin}: missing field 'memory_budget' (e.g. memory_budget: 5GiB)")
    known = set(DeviceProfile.__dataclass_fields__)
    unknown = set(d) - known
    if unknown:
        raise ProfileError(f"{origin}: unknown field(s) {sorted(unknown)}; known fields: {sorted(known)}")
    missing = [f for f in ("name", "memory_total_bytes", "memory_budget_bytes", "compute_gflops") if f not in d]
    if missing:
        raise ProfileError(f"{origin}: missing field(s) {missing}")
    try:
        return DeviceProfile(**d)
    except ProfileError as e:
        raise ProfileError(f"{origin}: {e}") from None
    except TypeError as e:
        raise ProfileError(f"{origin}: {e}") from None


def load_profile(path: str | Path) -> DeviceProfile:
    """Load and validate one `profiles/*.yaml` file."""
    p = Path(path)
    if not p.exists():
        raise ProfileError(f"profile file {p} does not exist (see profiles/ for examples)")
    try:
        d = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ProfileError(f"{p}: not valid YAML: {e}") from None
    return profile_from_dict(d, str(p))


def save_profile(profile: DeviceProfile, path: str | Path) -> None:
    d = profile.to_dict()
    d["memory_total"] = d.pop("memory_total_bytes")
    d["memory_budget"] = d.pop("memory_budget_bytes")
    Path(path).write_text(yaml.safe_dump(d, sort_keys=False))
