"""The training plan: what a device will run, as chosen by the planner (JSON-serialisable)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from protos.peft_names import DEFAULT_BOTTLENECK

MODES = ("lora", "zo")
BASE_PRECISIONS = ("fp32", "bf16", "fp16", "int8", "nf4", "int4")
UPLOAD_PRECISIONS = ("fp32", "fp16", "bf16", "int8")
OPTIMIZERS = ("adamw", "sgd")


class PlanError(ValueError):
    """A plan value is invalid; the message names the field and the expected form."""


@dataclass
class Plan:
    """A feasible fine-tuning configuration for one device.

    `rank` is the largest LoRA rank the device can hold; the coordinator may assign a lower one.
    `memory` is the estimator's output: {"total_bytes", "budget_bytes", "breakdown": {...}}.
    """

    mode: str = "lora"
    rank: int = 8
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    base_precision: str = "fp32"
    batch_size: int = 4
    seq_len: int = 128
    gradient_checkpointing: bool = False
    upload_precision: str = "fp32"
    lora_alpha: float = 16.0
    use_rslora: bool = False
    optimizer: str = "adamw"
    learning_rate: float = 5e-4
    grad_accum: int = 1
    local_steps: int = 20
    rank_pattern: dict[str, int] = field(default_factory=dict)
    zo_eps: float = 1e-3
    zo_seed_pool: int = 4096
    compute_dtype: str = "fp32"
    peft: str = "lora"  # protos.peft_names.PEFT_TYPES; a federation's download contract may set it
    virtual_tokens: int = 16  # prompt tuning's trainable prompt length (peft "prompt" only)
    bottleneck: int = DEFAULT_BOTTLENECK  # a bottleneck adapter's width (peft "adapter" only)
    memory: dict[str, Any] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(name: str, expected: str) -> PlanError:
            return PlanError(f"plan field '{name}'={getattr(self, name)!r} is invalid: expected {expected}")

        if self.mode not in MODES:
            raise bad("mode", f"one of {MODES}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise bad("rank", "an integer >= 1")
        if not self.target_modules or not all(isinstance(t, str) for t in self.target_modules):
            raise bad("target_modules", "a non-empty list of module names, e.g. ['q_proj','v_proj']")
        if self.base_precision not in BASE_PRECISIONS:
            raise bad("base_precision", f"one of {BASE_PRECISIONS}")
        if self.upload_precision not in UPLOAD_PRECISIONS:
            raise bad("upload_precision", f"one of {UPLOAD_PRECISIONS}")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"one of {OPTIMIZERS}")
        for name in ("batch_size", "seq_len", "grad_accum", "local_steps", "zo_seed_pool"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(name, "an integer >= 1")
        for name in ("lora_alpha", "learning_rate", "zo_eps"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v > 0:
                raise bad(name, "a positive number")
        if self.compute_dtype not in ("fp32", "bf16", "fp16"):
            raise bad("compute_dtype", "one of ('fp32','bf16','fp16')")
        from protos.peft_names import check_kind

        try:
            check_kind(self.peft, self.virtual_tokens, "plan field 'peft'", self.bottleneck)
        except ValueError as e:
            raise PlanError(str(e)) from None
        for k, r in self.rank_pattern.items():
            if not isinstance(r, int) or r < 1 or r > self.rank:
                raise PlanError(f"plan field 'rank_pattern[{k!r}]'={r!r} is invalid: expected 1..rank ({self.rank})")

    def scale(self, r: int | None = None) -> float:
        """LoRA scale s for rank r: alpha/r, or alpha/sqrt(r) with rsLoRA."""
        r = r or self.rank
        return self.lora_alpha / (r ** 0.5 if self.use_rslora else r)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise PlanError(f"plan has unknown field(s) {sorted(unknown)}; known fields: {sorted(known)}")
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise PlanError(f"plan file {p} does not exist; create one with `edge-runtime plan ... --json > {p}`")
        except json.JSONDecodeError as e:
            raise PlanError(f"plan file {p} is not valid JSON: {e}")
        if not isinstance(d, dict):
            raise PlanError(f"plan file {p} must hold a JSON object")
        return cls.from_dict(d)
