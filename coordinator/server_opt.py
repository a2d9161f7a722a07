"""Server-side optimisation of the aggregated update (FedAvgM, FedAdam, FedYogi; Reddi et al. 2021).

The round's aggregate g_agg is treated as a pseudo-gradient step Delta = g_agg - g_old, and the
next global is g_old + lr * direction(Delta, optimizer state). The state lives where the method's
global lives:

- element space (methods whose global is a fixed-shape adapter: `Method.factor_space` False):
  first/second moments per tensor of A, B (at the old global's scale) and every extra (head);
- factor space (svd / stack: the global is a low-rank sum of products): the momentum of the
  effective update s B A is kept as low-rank factors (M_B (out, R), M_A (R, in)), recompressed by a
  factor SVD to `cap_rank`; FedAdam/FedYogi keep an Adafactor-style factored second moment
  (row (out,) and column (in,) sums of Delta^2), so the preconditioned step stays low-rank:
  diag(1/(a + sqrt(tau))) M diag(1/(b + sqrt(tau))). Extras always use element space.

Extra coordinator memory (per module): element space 1x (avgm) or 2x (adam/yogi) the global
adapter; factor space (out + in) * cap_rank floats for the momentum plus out + in for the second
moment. `state_nbytes` reports it (docs/federated.md has the LLaMA-2-7B figure).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from .aggregation import GlobalState, LoraUpdate, factor_svd, to_scale
from .aggregation.svd import factors_from_svd

KINDS = ("none", "avgm", "adam", "yogi")


@dataclass(frozen=True)
class ServerOptConfig:
    """kind: none | avgm | adam | yogi; lr: server learning rate; beta1: momentum; beta2 / tau: adam/yogi."""

    kind: str = "none"
    lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"--server-opt {self.kind!r}: choose one of {KINDS}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--server-lr {self.lr!r}: expected a positive number")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise ValueError(f"--server-{name} {v!r}: expected a number in [0, 1)")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"--server-tau {self.tau!r}: expected a positive number")

    @property
    def active(self) -> bool:
        return self.kind != "none"


@dataclass
class ServerOptState:
    """Moments by key: element space `<module>.A` / `<module>.B` / `extra:<key>`; factor space
    `<module>` -> (M_B (out, R), M_A (R, in)) and `<module>` -> (row (out,), col (in,)) sums."""

    m: dict[str, torch.Tensor] = field(default_factory=dict)
    v: dict[str, torch.Tensor] = field(default_factory=dict)
    mf: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    vf: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    progress_ref: float | None = None  # the LoRA devices' mean loss progress of the last round that had them

    def nbytes(self) -> int:
        ts = list(self.m.values()) + list(self.v.values())
        ts += [t for pair in list(self.mf.values()) + list(self.vf.values()) for t in pair]
        return sum(t.numel() * t.element_size() for t in ts)


def _second(cfg: ServerOptConfig, v: torch.Tensor | None, d2: torch.Tensor) -> torch.Tensor:
    """Adam / Yogi second-moment update for squared step `d2`."""
    if v is None:
        v = torch.full_like(d2, cfg.tau ** 2)
    if cfg.kind == "yogi":
        return v - (1 - cfg.beta2) * d2 * torch.sign(v - d2)
    return cfg.beta2 * v + (1 - cfg.beta2) * d2


def element_step(cfg: ServerOptConfig, st: ServerOptState, key: str, old: torch.Tensor,
                 new: torch.Tensor) -> torch.Tensor:
    """The next value of one tensor: old + lr * direction(new - old) (float64 maths, float32 out)."""
    d = new.double() - old.double()
    m = st.m.get(key)
    m = None if m is None else m.double()
    if cfg.kind == "avgm":
        m = d if m is None else cfg.beta1 * m + d
        step = m
    else:
        m = (1 - cfg.beta1) * d if m is None else cfg.beta1 * m + (1 - cfg.beta1) * d
        v = _second(cfg, None if key not in st.v else st.v[key].double(), d * d)
        st.v[key] = v.float()
        step = m / (v.clamp_min(0).sqrt() + cfg.tau)
    st.m[key] = m.float()
    return (old.double() + cfg.lr * step).float()


def _concat(*parts: tuple[torch.Tensor, torch.Tensor, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_i c_i B_i A_i as factors (B (out, sum r), A (sum r, in)), float64."""
    B = torch.cat([c * b.double() for b, _, c in parts], dim=1)
    A = torch.cat([a.double() for _, a, _ in parts], dim=0)
    return B, A


def _compress(B: torch.Tensor, A: torch.Tensor, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD-ordered factors of B @ A at rank <= cap (B = U sqrt(S), A = sqrt(S) Vh)."""
    U, S, Vh = factor_svd(B, A)
    k = max(1, min(cap, int((S > S[0] * 1e-10).sum()) if S.numel() else 0))  # numerically zero directions dropped
    root = S[:k].sqrt()
    return U[:, :k] * root, root[:, None] * Vh[:k]


def _row_col_sq(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row (out,) and column (in,) sums of (B @ A)^2, from the factors."""
    rows = ((B @ (A @ A.T)) * B).sum(1)
    cols = ((A.T @ (B.T @ B)) * A.T).sum(1)
    return rows.clamp_min(0), cols.clamp_min(0)


def factor_step(cfg: ServerOptConfig, st: ServerOptState, name: str, old: LoraUpdate, new: LoraUpdate,
                cap: int) -> LoraUpdate:
    """The next module of a factor-space global: old + lr * direction(new - old), SVD-ordered, scale 1."""
    dB, dA = _concat((new.B, new.A, new.scale), (old.B, old.A, -old.scale))
    first = 1.0 if cfg.kind == "avgm" else 1 - cfg.beta1
    prev = st.mf.get(name)
    mB, mA = (first * dB, dA) if prev is None else _concat((prev[0], prev[1], cfg.beta1), (dB, dA, first))
    mB, mA = _compress(mB, mA, cap)
    st.mf[name] = (mB.float(), mA.float())
    sB, sA = mB, mA
    if cfg.kind != "avgm":
        r2, c2 = _row_col_sq(dB, dA)
        pr, pc = st.vf.get(name, (None, None))
        vr = _second(cfg, None if pr is None else pr.double(), r2)
        vc = _second(cfg, None if pc is None else pc.double(), c2)
        st.vf[name] = (vr.float(), vc.float())
        norm = vr.clamp_min(0).sum().clamp_min(1e-30) ** 0.25
        a, b = vr.clamp_min(0).sqrt() / norm, vc.clamp_min(0).sqrt() / norm
        sB, sA = mB / (a + cfg.tau ** 0.5)[:, None], mA / (b + cfg.tau ** 0.5)[None, :]
    B, A = _compress(*_concat((old.B, old.A, old.scale), (sB, sA, cfg.lr)), cap)
    return LoraUpdate(A=A.float(), B=B.float(), scale=1.0, weight=new.weight)


def apply_server_opt(cfg: ServerOptConfig, st: ServerOptState, old: GlobalState, new: GlobalState,
                     factor_space: bool, cap: int) -> GlobalState:
    """The next global from the round's aggregate `new` and the previous global `old`."""
    if not cfg.active:
        return new
    mods: dict[str, LoraUpdate] = {}
    for name, n in new.modules.items():
        o = old.modules[name]
        if factor_space:
            mods[name] = factor_step(cfg, st, name, o, n, cap)
            continue
        if o.A.shape != n.A.shape or o.B.shape != n.B.shape:
            raise ValueError(f"server optimizer: module {name!r} changed shape {tuple(o.A.shape)} -> "
                             f"{tuple(n.A.shape)}; element-space moments need a fixed-shape global")
        n = to_scale(n, o.scale) if o.scale != n.scale and o.scale != 0 else n
        mods[name] = LoraUpdate(A=element_step(cfg, st, name + ".A", o.A, n.A),
                                B=element_step(cfg, st, name + ".B", o.B, n.B), scale=o.scale, weight=n.weight)
    extra = {k: element_step(cfg, st, "extra:" + k, old.extra[k], t) if k in old.extra else t
             for k, t in new.extra.items()}
    return replace(new, modules=mods, extra=extra)


def interpolate(old: GlobalState, new: GlobalState, t: float, factor_space: bool, cap: int) -> GlobalState:
    """old + t (new - old), 0 < t <= 1: a momentum-free server step of rate t (element or factor space;
    a module whose element-space shape changed takes `new` as is)."""
    cfg, st = ServerOptConfig("avgm", lr=t, beta1=0.0), ServerOptState()
    if factor_space:
        return apply_server_opt(cfg, st, old, new, True, cap)
    same = all(old.modules[n].A.shape == u.A.shape and old.modules[n].B.shape == u.B.shape
               for n, u in new.modules.items() if n in old.modules)
    return apply_server_opt(cfg, st, old, new, False, cap) if same and set(new.modules) <= set(old.modules) else new


def state_nbytes(shapes: dict[str, tuple[int, int]], cfg: ServerOptConfig, factor_space: bool, rank: int,
                 cap: int) -> int:
    """Extra coordinator bytes (float32 moments) for modules of (out, in) shapes at global `rank`."""
    if not cfg.active:
        return 0
    n = 0
    for out, inp in shapes.values():
        if factor_space:
            n += (out + inp) * cap + ((out + inp) if cfg.kind != "avgm" else 0)
        else:
            n += (out + inp) * rank * (1 if cfg.kind == "avgm" else 2)
    return 4 * n


def state_to_tensors(st: ServerOptState) -> dict[str, torch.Tensor]:
    """Flat name -> tensor form of the moments (for a safetensors blob)."""
    out = {f"m/{k}": t for k, t in st.m.items()} | {f"v/{k}": t for k, t in st.v.items()}
    for k, (b, a) in st.mf.items():
        out[f"mfB/{k}"], out[f"mfA/{k}"] = b, a
    for k, (r, c) in st.vf.items():
        out[f"vfr/{k}"], out[f"vfc/{k}"] = r, c
    if st.progress_ref is not None:
        out["ref/progress"] = torch.tensor([st.progress_ref], dtype=torch.float64)
    return out


def state_from_tensors(ts: dict[str, torch.Tensor]) -> ServerOptState:
    st = ServerOptState()
    for name, t in ts.items():
        kind, key = name.split("/", 1)
        if kind in ("m", "v"):
            getattr(st, kind)[key] = t
        elif kind == "ref":
            st.progress_ref = float(t.reshape(-1)[0])
        elif kind in ("mfB", "vfr"):
            other = ts[name.replace("mfB/", "mfA/", 1) if kind == "mfB" else name.replace("vfr/", "vfc/", 1)]
            (st.mf if kind == "mfB" else st.vf)[key] = (t, other)
    return st
