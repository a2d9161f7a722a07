"""Every registered aggregation method through the one round engine, the registry, and the rule that a
method's name is spelled only in its own module (no `if name == "fedsa"` branches elsewhere)."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

from coordinator.aggregation import GlobalState
from coordinator.round_policy import RoundPolicy
from coordinator.engine import RoundEngine, aggregate
from coordinator.methods import METHODS, NAMES, Method, MethodConfig, make_method, method_class
from protos.adapter import A_SUFFIX, B_SUFFIX, DeviceContract
from protos.wire import BASE_DELTA, read_metadata, split_download

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
MODS = {"m0": (12, 10), "m1": (6, 8)}  # name -> (out, in)
HEAD = "head.weight"
MAX_RANK = 4
LORA = tuple(n for n in NAMES if METHODS[n].peft == "lora")  # the non-LoRA PEFT methods: tests/test_peft_types.py


def _init_state(max_rank: int) -> dict[str, torch.Tensor]:
    """A peft-like round-1 adapter at max_rank: A random, B zero, plus a head."""
    g = torch.Generator().manual_seed(0)
    state = {HEAD: torch.randn(2, 4, generator=g)}
    for n, (o, i) in MODS.items():
        state[n + A_SUFFIX] = torch.randn(max_rank, i, generator=g) * 0.3
        state[n + B_SUFFIX] = torch.zeros(o, max_rank)
    return state


def _round_start(name: str) -> tuple[Method, GlobalState]:
    """The method and a global after one round, so every factor (B included) is non-trivial."""
    method = make_method(MethodConfig(name, max_rank=MAX_RANK))
    g = method.initial(_init_state(MAX_RANK))
    warm = [_device(method, g, f"w{k}", r, "lora", 100 + k)[1:] for k, r in enumerate(_ranks(method))]
    return method, aggregate(method, g, [(f"w{k}", up, w) for k, (up, w, _) in enumerate(warm)])


def _ranks(method: Method) -> list[int]:
    return [MAX_RANK] * 4 if method.common_rank else [1, MAX_RANK, 2, 3]


def _device(method: Method, g: GlobalState, device_id: str, rank: int, plan_mode: str, seed: int):
    """(mode, upload, weight, download) of one device: it downloads, 'trains', and uploads what its
    contract says (a ZO device: seeds + scalars, replayed by the coordinator from the download)."""
    mode = method.device_mode(plan_mode)
    sent = RoundEngine(method, g, 1).download(rank, mode, seed)
    gen = torch.Generator().manual_seed(seed)
    if mode == "zo":
        pairs = [(seed * 1000 + t, float(torch.randn(1, generator=gen))) for t in range(4)]
        upload = RoundEngine.replay_zo(sent, pairs, 1e-2)
    else:
        adapter, _ = split_download(sent)
        contract = method.contract(mode)
        upload = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in sorted(adapter.items())
                  if not contract.is_local(k)}  # what the device keeps local never leaves it
    return mode, upload, float(1 + seed % 5), sent


def _local_b(method: Method, g: GlobalState, rank: int, mode: str):
    """(key, shape) of the B factors a device keeps local under this method's contract."""
    contract = method.contract(mode)
    return [(n + B_SUFFIX, (g.modules[n].shape[0], rank)) for n in g.modules if contract.is_local(n + B_SUFFIX)]


def _devices(method: Method, g: GlobalState):
    """Heterogeneous ranks; one ZO device (every device under an all-ZO method)."""
    out = []
    for k, r in enumerate(_ranks(method)):
        mode, up, w, sent = _device(method, g, f"d{k}", r, "zo" if k == 2 else "lora", k + 1)
        out.append((f"d{k}", r, mode, up, w, sent))
    return out


def _dense(g: GlobalState) -> dict[str, torch.Tensor]:
    return {n: (u.B.double() * u.scale) @ u.A.double() for n, u in g.modules.items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / max(float(b.norm()), 1e-12))


def _assert_same_global(a: GlobalState, b: GlobalState, method: Method, tol: float = 1e-6) -> None:
    assert a.strategy == b.strategy == method.name
    assert set(a.modules) == set(b.modules) == set(MODS) and set(a.extra) == set(b.extra) == {HEAD}
    da, db = _dense(a), _dense(b)
    for n in MODS:
        assert _rel(da[n], db[n]) < tol, (method.name, n, _rel(da[n], db[n]))
        if not method.shares_b:  # only A is global: compare it directly
            assert _rel(a.modules[n].A, b.modules[n].A) < tol, (method.name, n)
        dl_a, dl_b = method.deltas(a), method.deltas(b)
        assert set(dl_a) == set(dl_b)
    assert _rel(a.extra[HEAD], b.extra[HEAD]) < tol
    assert a.total_weight == pytest.approx(b.total_weight)


# -- (a) every method through the round engine ---------------------------------------------------
@pytest.mark.parametrize("name", LORA)
def test_fold_order_does_not_change_the_global(name):
    method, g = _round_start(name)
    devs = _devices(method, g)
    forward = RoundEngine(method, g, 2, policy=RoundPolicy.plain())
    for device_id, _, mode, up, w, sent in devs:
        forward.accept(device_id, up, w, sent, mode)  # validated against what it downloaded, then folded
    got, metrics = forward.close()
    assert forward.count == len(devs) and metrics["stream_rel_error"] == 0.0
    for order in (devs[::-1], [devs[i] for i in (2, 0, 3, 1)]):
        other = RoundEngine(method, g, 2, policy=RoundPolicy.plain())
        for device_id, _, _, up, w, _ in order:
            other.fold(device_id, up, w)
        _assert_same_global(other.close()[0], got, method)
    batch = aggregate(method, g, [(d, up, w) for d, _, _, up, w, _ in devs[::-1]], round_id=2)
    _assert_same_global(batch, got, method)
    # the global moved: a round is not a no-op for any method
    assert any(_rel(_dense(got)[n], _dense(g)[n]) > 1e-3 for n in MODS) or any(
        _rel(got.modules[n].A, g.modules[n].A) > 1e-3 for n in MODS)


@pytest.mark.parametrize("name", LORA)
def test_download_has_the_upload_shapes_the_method_expects(name):
    method, g = _round_start(name)
    for device_id, rank, mode, up, w, sent in _devices(method, g):
        shapes = method.upload_shapes(sent, mode, 2)
        contract = method.contract(mode, 2)
        adapter, delta = split_download(sent)
        assert not [k for k in shapes if k.startswith(BASE_DELTA)]  # the base delta is merged, never uploaded
        assert set(shapes) == {k for k in adapter if not contract.is_local(k)}, (name, mode)
        assert {k: tuple(v.shape) for k, v in up.items()} == shapes, (name, mode)
        for n, (o, i) in MODS.items():
            assert shapes[n + A_SUFFIX] == (rank, i)
            if contract.is_local(n + B_SUFFIX):
                assert n + B_SUFFIX not in sent  # kept on the device: not downloaded either
            else:
                assert shapes[n + B_SUFFIX] == (o, rank)
        assert shapes[HEAD] == (2, 4)
        served = method.serve(g, rank, 0)
        assert set(delta) == set(served.base_delta)
        assert RoundEngine(method, g, 2, policy=RoundPolicy.plain()).validate(up, sent, mode) > 0
        meta = read_metadata(RoundEngine(method, g, 2, policy=RoundPolicy.plain()).blob(sent, rank, mode))
        assert DeviceContract.from_meta(meta) == contract and int(meta["rank"]) == rank
        # a wrong rank, a missing key, a non-finite value, a local key uploaded: each is refused
        a_key = next(k for k in sorted(up) if k.endswith(A_SUFFIX))
        bad_rank = {**up, a_key: torch.zeros(rank + 1, up[a_key].shape[1])}
        missing = {k: v for k, v in up.items() if k != HEAD}
        nan = {**up, HEAD: torch.full_like(up[HEAD], float("nan"))}
        for bad, why in ((bad_rank, "has shape"), (missing, "missing"), (nan, "non-finite")):
            with pytest.raises(ValueError, match=why):
                RoundEngine(method, g, 2, policy=RoundPolicy.plain()).validate(bad, sent, mode)
        for key, shape in _local_b(method, g, rank, mode):
            with pytest.raises(ValueError, match="unexpected"):
                RoundEngine(method, g, 2, policy=RoundPolicy.plain()).validate({**up, key: torch.zeros(shape)}, sent, mode)


def test_every_method_serves_the_ranks_it_can():
    for name, cls in ((n, METHODS[n]) for n in LORA):
        m = make_method(MethodConfig(name, max_rank=MAX_RANK))
        assert m.name == name and type(m) is cls and method_class(name) is cls
        assert m.device_mode("lora") == ("zo" if cls.all_zo else "lora") and m.device_mode("zo") == "zo"
        if not cls.common_rank:  # a heterogeneous method serves every rank up to max_rank
            g = m.initial(_init_state(MAX_RANK))
            for r in range(1, MAX_RANK + 1):
                assert all(u.A.shape[0] == r for u in m.serve(g, r, 0).adapter.values())
        else:
            g = m.initial(_init_state(MAX_RANK))
            with pytest.raises(ValueError, match="cannot serve rank"):
                m.serve(g, MAX_RANK - 1, 0)


# -- (b) the registry --------------------------------------------------------------------------------
def test_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match="unknown method 'nope'") as ei:
        make_method(MethodConfig(name="nope", max_rank=4))
    assert all(n in str(ei.value) for n in NAMES)
    with pytest.raises(ValueError, match="unknown method"):
        method_class("FedAvg")  # names are exact
    assert NAMES == tuple(METHODS) and set(NAMES) == {"fedavg", "zero_pad", "stack", "svd", "fedsa", "zo", "ffa", "rolora", "fedex", "hetlora", "feddpa",
                                                  "prompt_tuning", "ia3", "bitfit", "adapter"}
    assert all(METHODS[n].name == n for n in NAMES)
    with pytest.raises(ValueError, match="max_rank"):
        MethodConfig("fedavg", max_rank=8, cap_rank=4)


# -- (c) method names live in one place ---------------------------------------------------------------
def _own_module(name: str) -> Path:
    return Path(inspect.getsourcefile(METHODS[name])).resolve().relative_to(ROOT)


def _allowed_nodes(tree: ast.AST, rel: Path) -> set[int]:
    """ids of string constants that are not a method name in use: `__all__` entries (Python names of
    the pure maths functions `fedavg`, `stack`, ...), in coordinator/cli.py a `default=` value, and in
    edge_runtime/ort_backend the "adapter" key of its artifacts' ort_meta.json (format 1: a file
    format's field, written as a dict key and read as a subscript; not the `adapter` method)."""
    ok: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            ok.update(id(c) for c in ast.walk(node.value))
        if rel.as_posix() == "coordinator/cli.py" and isinstance(node, ast.Call):
            ok.update(id(kw.value) for kw in node.keywords if kw.arg == "default")
        if rel.parent.as_posix() == "edge_runtime/ort_backend":
            keys = node.keys if isinstance(node, ast.Dict) else [node.slice] if isinstance(node, ast.Subscript) else []
            ok.update(id(k) for k in keys if isinstance(k, ast.Constant) and k.value == "adapter")
    return ok


def test_method_names_are_spelled_only_in_their_own_module():
    names = set(NAMES) - {"zo"}  # "zo" is also a device training mode, spelled wherever modes are
    own = {n: _own_module(n) for n in names}
    registry = Path("coordinator/methods/registry.py")
    assert all(p.parent == Path("coordinator/methods") for p in own.values()), own
    violations = []
    for top in ("coordinator", "edge_runtime"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT)
            tree = ast.parse(path.read_text(), str(rel))
            ok = _allowed_nodes(tree, rel)
            for node in ast.walk(tree):
                if not (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names):
                    continue
                if rel == registry or rel == own[node.value] or id(node) in ok:
                    continue
                violations.append(f"{rel}:{node.lineno}: {node.value!r}")
    assert not violations, ("method names outside their own module (dispatch through coordinator.methods "
                            "instead):\n" + "\n".join(violations))


def test_the_source_check_sees_a_branch_on_a_method_name(tmp_path):
    """The scanner above would catch `if method.name == "fedsa"` (the check can fail)."""
    tree = ast.parse('def f(m):\n    return m.name == "fedsa"\n__all__ = ["stack"]\n')
    rel = Path("coordinator/service.py")
    ok = _allowed_nodes(tree, rel)
    hits = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in NAMES and id(n) not in ok]
    assert hits == ["fedsa"]


def test_fedex_global_is_exactly_the_average_of_the_device_models():
    """FedEx-LoRA: adapter mean(B) mean(A) plus the residual in the base == sum_k p_k s B_k A_k, over rounds."""
    R, OUT, IN = 4, 12, 10
    method = make_method(MethodConfig("fedex", max_rank=R, cap_rank=64))
    gen = torch.Generator().manual_seed(0)
    g = method.initial({"m" + A_SUFFIX: torch.randn(R, IN, generator=gen), "m" + B_SUFFIX: torch.zeros(OUT, R)})
    s = method.cfg.scale(R)
    for rnd in (1, 2):
        engine = RoundEngine(method, g, rnd, policy=RoundPolicy.plain())
        want = torch.zeros(OUT, IN, dtype=torch.float64)
        for k, w in enumerate((1.0, 2.0, 3.0)):
            sent = engine.download(R, "lora", rnd)
            up = {"m" + A_SUFFIX: sent["m" + A_SUFFIX] + 0.3 * torch.randn(R, IN, generator=gen),
                  "m" + B_SUFFIX: sent["m" + B_SUFFIX] + 0.3 * torch.randn(OUT, R, generator=gen)}
            engine.accept(f"d{k}", up, w, sent, "lora")
            base = sum((B.double() @ A.double() for key, (B, A) in [(n, (sent[f"base_delta.{n}.B"], sent[f"base_delta.{n}.A"]))
                        for n in ["m"] if f"base_delta.{n}.B" in sent]), torch.zeros(OUT, IN, dtype=torch.float64))
            want += w / 6.0 * (s * up["m" + B_SUFFIX].double() @ up["m" + A_SUFFIX].double() + base)
        g, metrics = engine.close()
        B, A = method.deltas(g)["m"]
        got = B.double() @ A.double()
        assert float((got - want).norm() / want.norm()) < 1e-5, rnd
        assert metrics["recompress_rel_error"] == 0.0 and g.base["m"].rank <= 64
    assert float(g.base["m"].B.norm()) > 0  # the residual is real: mean(B) mean(A) alone is not the average


@pytest.mark.parametrize("round_id", [1, 2])
def test_rolora_and_ffa_rounds_average_the_products_exactly(round_id):
    """With the other factor frozen and shared, the global's product moves by exactly the weighted
    average of the devices' product changes, for devices of different ranks (RoLoRA B and A rounds)."""
    for name in ("rolora", "ffa"):
        if name == "ffa" and round_id == 2:
            continue
        R, OUT, IN = 4, 12, 10
        method = make_method(MethodConfig(name, max_rank=R))
        gen = torch.Generator().manual_seed(round_id)
        g = method.initial({"m" + A_SUFFIX: torch.randn(R, IN, generator=gen),
                            "m" + B_SUFFIX: torch.randn(OUT, R, generator=gen)})
        engine = RoundEngine(method, g, round_id, policy=RoundPolicy.plain())
        frozen = method.contract("lora", round_id).frozen
        G = g.modules["m"]
        want = G.scale * G.B.double() @ G.A.double()
        for k, (r, w) in enumerate(((1, 1.0), (4, 2.0), (2, 3.0))):
            sent = engine.download(r, "lora", round_id)
            up = {key: t + (0 if any(key.endswith(f) for f in frozen) else 0.3 * torch.randn(t.shape, generator=gen))
                  for key, t in sent.items()}
            s_k = method.cfg.scale(r)
            change = up["m" + B_SUFFIX].double() @ up["m" + A_SUFFIX].double() - \
                sent["m" + B_SUFFIX].double() @ sent["m" + A_SUFFIX].double()
            want += w / 6.0 * s_k * change
            engine.accept(f"d{k}", up, w, sent, "lora")
        new = engine.close()[0].modules["m"]
        got = new.scale * new.B.double() @ new.A.double()
        assert float((got - want).norm() / want.norm()) < 1e-5, (name, round_id)
