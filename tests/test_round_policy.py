"""Round policy (weights, the devices' recipe), server optimizers, and the trainer obeying the recipe."""
import pytest
import torch

from coordinator.aggregation import GlobalState, LoraUpdate
from coordinator.engine import RoundEngine
from coordinator.methods import MethodConfig, make_method
from coordinator.round_policy import RoundPolicy
from coordinator.server_opt import ServerOptConfig, ServerOptState, apply_server_opt, state_nbytes
from protos.adapter import A_SUFFIX, B_SUFFIX, TrainingRecipe, loss_progress

torch.set_num_threads(1)
OUT, IN, R = 12, 10, 4


def _g(seed: int, scale: float = 2.0, name: str = "zero_pad") -> GlobalState:
    gen = torch.Generator().manual_seed(seed)
    mods = {"m": LoraUpdate(A=torch.randn(R, IN, generator=gen), B=torch.randn(OUT, R, generator=gen), scale=scale)}
    return GlobalState(name, mods, {"head": torch.randn(2, IN, generator=gen)}, 1.0)


def _dense(g: GlobalState) -> torch.Tensor:
    u = g.modules["m"]
    return u.scale * u.B.double() @ u.A.double()


def test_server_momentum_element_space():
    old, agg1, agg2 = _g(0), _g(1), _g(2)
    plain = apply_server_opt(ServerOptConfig(), ServerOptState(), old, agg1, False, 64)
    assert plain is agg1  # "none": the aggregate is the next global
    st, cfg = ServerOptState(), ServerOptConfig("avgm", lr=1.0, beta1=0.5)
    g1 = apply_server_opt(cfg, st, old, agg1, False, 64)
    assert torch.allclose(g1.modules["m"].A, agg1.modules["m"].A, atol=1e-6)  # first step: plain step
    g2 = apply_server_opt(cfg, st, g1, agg2, False, 64)
    d1, d2 = agg1.modules["m"].A - old.modules["m"].A, agg2.modules["m"].A - g1.modules["m"].A
    assert torch.allclose(g2.modules["m"].A, g1.modules["m"].A + 0.5 * d1 + d2, atol=1e-5)
    assert torch.allclose(g2.extra["head"], g1.extra["head"] + 0.5 * (agg1.extra["head"] - old.extra["head"])
                          + (agg2.extra["head"] - g1.extra["head"]), atol=1e-5)
    assert st.nbytes() > 0


@pytest.mark.parametrize("kind", ["adam", "yogi"])
def test_adaptive_server_step_is_bounded_and_signed(kind):
    old, agg = _g(0), _g(1)
    cfg = ServerOptConfig(kind, lr=0.01, beta1=0.0, beta2=0.0, tau=1e-9)
    g = apply_server_opt(cfg, ServerOptState(), old, agg, False, 64)
    step = g.modules["m"].A - old.modules["m"].A
    d = agg.modules["m"].A - old.modules["m"].A
    assert torch.allclose(step.abs(), torch.full_like(step, 0.01), atol=1e-4)  # |m / sqrt(v)| = 1 per element
    assert torch.equal(torch.sign(step), torch.sign(d))


@pytest.mark.parametrize("kind", ["avgm", "adam", "yogi"])
def test_factor_space_optimizer_for_svd(kind):
    old, agg = _g(0, 1.0, "svd"), _g(1, 1.0, "svd")
    cfg = ServerOptConfig(kind, lr=1.0 if kind == "avgm" else 0.05, beta1=0.0 if kind == "avgm" else 0.9)
    st = ServerOptState()
    g = apply_server_opt(cfg, st, old, agg, True, 64)
    assert g.modules["m"].rank <= (R if kind == "avgm" else 3 * R) and g.modules["m"].scale == 1.0
    if kind == "avgm":  # beta 0, lr 1: exactly the aggregate's product
        assert float((_dense(g) - _dense(agg)).norm() / _dense(agg).norm()) < 1e-6
    else:  # a step towards the aggregate
        assert float((_dense(g) - _dense(agg)).norm()) < float((_dense(old) - _dense(agg)).norm())
    assert set(st.mf) == {"m"} and (kind == "avgm") == (not st.vf)


def test_server_state_memory_for_llama_7b_shapes():
    shapes = {f"l{i}.{m}": (4096, 4096) for i in range(32) for m in ("q", "v")}
    fact = state_nbytes(shapes, ServerOptConfig("avgm"), True, 16, 64)
    elem = state_nbytes(shapes, ServerOptConfig("adam"), False, 16, 64)
    assert fact == 64 * (8192 * 64) * 4  # 128 MiB of low-rank momentum at cap rank 64
    assert elem == 64 * (8192 * 16) * 2 * 4  # 64 MiB: first + second moments of the rank-16 factors
    assert state_nbytes(shapes, ServerOptConfig(), True, 16, 64) == 0


def test_policy_weights_and_recipe():
    p = RoundPolicy(weight_temper=0.5, weight_cap=400, lr_decay=0.5, prox_mu=0.01, logit_adjust=1.0)
    assert p.weight(100) == pytest.approx(10.0) and p.weight(10_000) == pytest.approx(20.0)
    assert RoundPolicy.plain().weight(100) == 100 and RoundPolicy(weight_temper=0).weight(100) == 1
    assert RoundPolicy().weight(100) == pytest.approx(10.0) and RoundPolicy().recipe(1).logit_adjust == 1.0
    r3 = p.recipe(3)
    assert (r3.lr_scale, r3.prox_mu, r3.logit_adjust) == (0.25, 0.01, 1.0)
    assert TrainingRecipe.from_meta({"recipe": r3.to_meta()}) == r3
    frozen = RoundPolicy(freeze_head=True).recipe(2)
    assert frozen.freeze_head and TrainingRecipe.from_meta({"recipe": frozen.to_meta()}) == frozen
    assert RoundPolicy.zo_factor(0.05, 0.1) == 0.5 and RoundPolicy.zo_factor(0.5, 0.1) == 1.0
    assert RoundPolicy.zo_factor(0.0, 0.1) == 0.01 and RoundPolicy.zo_factor(0.3, None) == 1.0
    for bad in (dict(weight_temper=2), dict(lr_decay=0), dict(prox_mu=-1), dict(weight_cap=-1)):
        with pytest.raises(ValueError):
            RoundPolicy(**bad)
    with pytest.raises(ValueError, match="server-opt"):
        ServerOptConfig("sgdm")
    assert loss_progress([1.0, 1.0, 0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.5)
    assert loss_progress([1.0]) == 0.0 and loss_progress([1.0, 2.0, 3.0]) == 0.0


def test_cohorts_decay_the_learning_rate_per_pass():
    p = RoundPolicy(lr_decay=0.5, cohorts=3)  # rounds 1-3 are pass 1, 4-6 pass 2
    assert [p.recipe(r).lr_scale for r in (1, 3, 4, 6, 7)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="--cohorts"):
            RoundPolicy(cohorts=bad)


def test_method_lr_factor_reaches_the_recipe():
    """A method's learning-rate factor multiplies the round's schedule in what devices download."""
    from protos.wire import decode_tensors
    for name, factor in (("fedavg", 1.0), ("ffa", 2.0)):
        method = make_method(MethodConfig(name, max_rank=R))
        g = method.initial({"m" + A_SUFFIX: torch.randn(R, IN), "m" + B_SUFFIX: torch.zeros(OUT, R)})
        e = RoundEngine(method, g, 3, policy=RoundPolicy(lr_decay=0.5))
        _, meta = decode_tensors(e.blob(e.download(R, "lora", 0), R, "lora"))
        recipe = TrainingRecipe.from_meta(meta)
        assert recipe.lr_scale == pytest.approx(factor * 0.25)
        assert recipe.lr_scale * recipe.head_ratio == pytest.approx(0.25)  # the head: the schedule only


def test_zo_device_weighted_by_its_progress():
    method = make_method(MethodConfig("fedavg", max_rank=R))
    g = method.initial({"m" + A_SUFFIX: torch.randn(R, IN), "m" + B_SUFFIX: torch.zeros(OUT, R)})
    lora = {"m" + A_SUFFIX: torch.randn(R, IN), "m" + B_SUFFIX: torch.ones(OUT, R)}
    zo = {"m" + A_SUFFIX: g.modules["m"].A.clone(), "m" + B_SUFFIX: torch.zeros(OUT, R)}  # it learned nothing
    by_examples = RoundEngine(method, g, 1, policy=RoundPolicy(zo_progress=False))
    by_progress = RoundEngine(method, g, 1)
    for e in (by_examples, by_progress):
        e.fold("lora", lora, 100, "lora", progress=0.2)
        e.fold("zo", zo, 100, "zo", progress=0.0)
    (ge, _), (gp, mp) = by_examples.close(), by_progress.close()
    assert torch.allclose(ge.modules["m"].B, torch.full((OUT, R), 0.5))  # diluted by half
    assert torch.allclose(gp.modules["m"].B, torch.full((OUT, R), 1 / 1.01), atol=1e-6)
    assert mp["zo_weight_factor"] == pytest.approx(0.01)


def test_device_weighted_by_its_training_loss():
    """q-FFL-style loss weight: under logit adjustment a one-sided shard's loss is near 0, so its update
    barely counts; the factor is min(1, loss / ln K) ** q, off for non-classification tasks (K = 0)."""
    import math
    p = RoundPolicy(weight_temper=0.5, loss_weight=1.0, num_labels=2)
    assert p.weight(100, math.log(2)) == pytest.approx(10.0) and p.weight(100, 5.0) == pytest.approx(10.0)
    assert p.weight(100, 0.25 * math.log(2)) == pytest.approx(2.5) and p.weight(100, 0.0) == pytest.approx(0.01)
    assert p.weight(100, None) == p.weight(100, float("nan")) == pytest.approx(10.0)  # nothing reported: examples
    assert RoundPolicy(loss_weight=2.0, num_labels=4).loss_factor(math.log(4) / 2) == pytest.approx(0.25)
    assert p.for_task("causal_lm", 2).weight(100, 0.0) == pytest.approx(10.0)
    assert p.for_task("classification", 4).num_labels == 4 and RoundPolicy.plain().loss_weight == 0
    for bad in (dict(loss_weight=-1), dict(loss_weight=float("inf")), dict(num_labels=1)):
        with pytest.raises(ValueError):
            RoundPolicy(**bad)
    method = make_method(MethodConfig("fedavg", max_rank=R))
    g = method.initial({"m" + A_SUFFIX: torch.randn(R, IN), "m" + B_SUFFIX: torch.zeros(OUT, R)})
    ups = {"taught": torch.ones(OUT, R), "one_sided": torch.full((OUT, R), -1.0)}
    e = RoundEngine(method, g, 1)  # the defaults weigh by loss
    for dev, b in ups.items():
        e.fold(dev, {"m" + A_SUFFIX: g.modules["m"].A.clone(), "m" + B_SUFFIX: b}, 100, "lora",
               loss=0.69 if dev == "taught" else 0.0069)
    B = e.close()[0].modules["m"].B
    assert torch.allclose(B, torch.full((OUT, R), (1 - 0.01) / 1.01), atol=1e-3)  # the one-sided device: 1 %


def test_a_round_of_untrusted_devices_moves_the_global_only_as_far_as_their_trust():
    """A cohort's weights are normalised over its few devices: a round holding only a one-sided shard
    (or ZO devices that barely moved) would otherwise take the whole step; the round's step is the
    largest trust of its devices (1 once one device is fully trusted)."""
    from coordinator.server_opt import ServerOptState
    method = make_method(MethodConfig("fedavg", max_rank=R))
    g = method.initial({"m" + A_SUFFIX: torch.randn(R, IN), "m" + B_SUFFIX: torch.zeros(OUT, R)})
    same_a = {"m" + A_SUFFIX: g.modules["m"].A.clone()}
    policy, st = RoundPolicy(cohorts=2, num_labels=2), ServerOptState()
    assert policy.trust(0.69) == 1.0 and policy.trust(0.0069) == pytest.approx(0.04, rel=0.01)
    assert RoundPolicy.plain().trust(0.0) == 1.0 and policy.round_step([]) == 1.0
    assert RoundPolicy().round_step([0.01]) == 1.0  # parallel rounds: the plain normalised mean
    e = RoundEngine(method, g, 1, policy=policy, opt_state=st)
    e.fold("one_sided", {**same_a, "m" + B_SUFFIX: torch.full((OUT, R), -1.0)}, 100, "lora", progress=0.5,
           loss=0.0069)
    g1, m = e.close()
    assert m["round_step"] == pytest.approx(0.04, rel=0.01)
    assert torch.allclose(g1.modules["m"].B, torch.full((OUT, R), -m["round_step"]), atol=1e-5)
    assert st.progress_ref == 0.5  # kept for a later round of ZO devices only (and across a restart)
    from coordinator.server_opt import state_from_tensors, state_to_tensors
    assert state_from_tensors(state_to_tensors(st)).progress_ref == 0.5
    e2 = RoundEngine(method, g1, 2, policy=policy, opt_state=st)
    e2.fold("zo", {**same_a, "m" + B_SUFFIX: torch.ones(OUT, R)}, 100, "zo", progress=0.05, loss=0.69)
    g2, m2 = e2.close()  # its progress 0.05 against the reference 0.5: a tenth of a step
    assert m2["zo_weight_factor"] == pytest.approx(0.1) and m2["round_step"] == pytest.approx(0.1)
    want = g1.modules["m"].B + 0.1 * (1 - g1.modules["m"].B)
    assert torch.allclose(g2.modules["m"].B, want, atol=1e-5)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from edge_runtime.training.tiny import make_tiny_bert
    return make_tiny_bert(tmp_path_factory.mktemp("m") / "bert")


def _trainer(bert):
    from edge_runtime.plan import Plan
    from edge_runtime.training.session import LocalTrainer
    return LocalTrainer(bert, Plan(rank=4, target_modules=["query", "value"], batch_size=8, learning_rate=5e-2),
                        {"kind": "classification", "num_labels": 2}, seed=0, threads=1)


def test_trainer_obeys_frozen_and_recipe(bert):
    from edge_runtime.data import load_sst2
    recs = [r for r in load_sst2("train", limit=400) if r["label"] == 1][:64]  # a one-sided shard
    t = _trainer(bert)
    start = t.adapter_state()
    t.frozen = (A_SUFFIX,)
    t.train(recs, 3, seed=0, progress=False)
    after = t.adapter_state()
    assert all(torch.equal(after[k], start[k]) for k in start if k.endswith(A_SUFFIX))
    assert any(not torch.equal(after[k], start[k]) for k in start if k.endswith(B_SUFFIX))
    moved = {}
    for recipe in (TrainingRecipe(), TrainingRecipe(prox_mu=1e4), TrainingRecipe(logit_adjust=1.0)):
        t.frozen, t.recipe = (), recipe
        t.load_adapter_state(start)
        t.train(recs, 3, seed=0, progress=False)
        s = t.adapter_state()
        moved[recipe] = sum(float((s[k] - start[k]).norm()) for k in start)
    plain, prox, la = moved.values()
    assert prox < 0.5 * plain  # the proximal term holds the adapter near what was downloaded
    assert la < plain  # logit adjustment: a one-sided shard pushes the shared head less
    t.recipe = TrainingRecipe(freeze_head=True)
    t.load_adapter_state(start)
    t.train(recs, 3, seed=0, progress=False)
    s = t.adapter_state()
    lora = [k for k in start if k.endswith((A_SUFFIX, B_SUFFIX))]
    assert len(lora) < len(start) and all(torch.equal(s[k], start[k]) for k in start if k not in lora)
    assert any(not torch.equal(s[k], start[k]) for k in lora)  # FedBABU: only LoRA trains
    t.recipe = TrainingRecipe(lr_scale=1e-6)
    t.load_adapter_state(start)
    t.train(recs, 2, seed=0, progress=False)
    assert sum(float((t.adapter_state()[k] - start[k]).norm()) for k in start) < 1e-3 * plain
    t.recipe = TrainingRecipe(lr_scale=1.0, head_lr_scale=1e-6)  # a method's factor: not the head's
    t.load_adapter_state(start)
    t.train(recs, 2, seed=0, progress=False)
    s = t.adapter_state()
    head = sum(float((s[k] - start[k]).norm()) for k in start if k not in lora)
    assert head < 1e-3 * plain and any(not torch.equal(s[k], start[k]) for k in lora)
    with pytest.raises(ValueError, match="head_lr_scale"):
        TrainingRecipe(head_lr_scale=-1.0)
