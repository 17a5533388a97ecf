"""Tests for scaleclr.optim: param groups (spec 5.3), LARC with apex semantics (spec 5.2, test vector 7),
build_optimizer.

LARC is checked against an independent float64 NumPy re-implementation of apex LARC + torch SGD momentum.
"""
import io
import re

import numpy as np
import pytest
import torch
from torch import nn

from scaleclr.models import ResNet, SimCLRModel, build_heads
from scaleclr.optim import LARC, build_optimizer, build_param_groups, local_norms


# ---------------------------------------------------------------------------------------- param groups
def _simclr_model():
    return SimCLRModel(ResNet(depth=18), build_heads([["mlp", {"dims": [512, 64], "use_relu": True,
                                                                "skip_last_layer_relu_bn": False}],
                                                       ["mlp", {"dims": [64, 16]}]]))


def _expected_regularized(name, regularize_bn, regularize_bias):
    """Name-based reference for a ResNet + mlp-heads model (independent of the module-type walk)."""
    is_norm = re.search(r"(^|\.)bn\d\.|downsample\.1\.", name) is not None
    is_bias = name.endswith(".bias")
    if is_norm:
        return regularize_bn and (regularize_bias or not is_bias)
    return regularize_bias or not is_bias


def _by_group(groups):
    return {g["name"]: g for g in groups}


@pytest.mark.parametrize("regularize_bn,regularize_bias", [(True, True), (False, True), (True, False),
                                                           (False, False)])
def test_param_groups_match_name_based_reference(regularize_bn, regularize_bias):
    model = _simclr_model()
    groups = build_param_groups(model, 1e-6, regularize_bn=regularize_bn, regularize_bias=regularize_bias,
                                head_weight_decay=1e-5)
    where = {}
    for g in groups:
        assert g["params"], "empty groups must be dropped"
        assert g["larc_exclude"] is False
        for p in g["params"]:
            assert id(p) not in where, "parameter in two groups"
            where[id(p)] = g
    names = dict(model.named_parameters())
    assert len(where) == len(names)
    for name, p in names.items():
        g = where[id(p)]
        part = "head" if name.startswith("heads.") else "trunk"
        reg = _expected_regularized(name, regularize_bn, regularize_bias)
        assert g["name"] == f"{part}_{'regularized' if reg else 'unregularized'}", name
        expected_wd = (1e-5 if part == "head" else 1e-6) if reg else 0.0
        assert g["weight_decay"] == expected_wd, name
    if regularize_bn and regularize_bias:  # the SimCLR config: everything decayed
        assert sorted(_by_group(groups)) == ["head_regularized", "trunk_regularized"]


def test_downsample_bn_counts_as_norm():
    model = ResNet(depth=18)
    groups = _by_group(build_param_groups(model, 1e-4, regularize_bn=False))
    unreg = {id(p) for p in groups["trunk_unregularized"]["params"]}
    assert id(model.layer2[0].downsample[1].weight) in unreg
    assert id(model.layer2[0].downsample[0].weight) not in unreg


def test_norm_types_custom_subclasses_and_remaining():
    class MyBN(nn.BatchNorm1d):
        pass

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.scale

    model = nn.Sequential(nn.Linear(4, 4), MyBN(4), nn.SyncBatchNorm(4), nn.LayerNorm(4), nn.GroupNorm(2, 4),
                          Scale())
    model.register_parameter("root_param", nn.Parameter(torch.zeros(3)))
    groups = _by_group(build_param_groups(model, 0.1, regularize_bn=False))
    unreg = groups["trunk_unregularized"]["params"]
    assert len(unreg) == 8  # weight + bias of the four norm layers
    assert {id(p) for p in groups["trunk_regularized"]["params"]} == {id(model[0].weight), id(model[0].bias)}
    assert {id(p) for p in groups["remaining_regularized"]["params"]} == {id(model[5].scale),
                                                                          id(model.root_param)}
    assert groups["remaining_regularized"]["weight_decay"] == 0.1


def test_exclude_bias_and_norm():
    model = _simclr_model()
    groups = build_param_groups(model, 1e-6, exclude_bias_and_norm=True)
    g = _by_group(groups)
    assert sorted(g) == ["head_excluded", "head_regularized", "trunk_excluded", "trunk_regularized"]
    for name in ("trunk_excluded", "head_excluded"):
        assert g[name]["larc_exclude"] is True and g[name]["weight_decay"] == 0.0
        assert all(p.ndim <= 1 for p in g[name]["params"])
    for name in ("trunk_regularized", "head_regularized"):
        assert g[name]["larc_exclude"] is False and g[name]["weight_decay"] == 1e-6
        assert all(p.ndim > 1 for p in g[name]["params"])
    n_1d = sum(1 for p in model.parameters() if p.ndim <= 1)
    assert len(g["trunk_excluded"]["params"]) + len(g["head_excluded"]["params"]) == n_1d


def test_non_regularized_and_frozen_parameters():
    model = _simclr_model()
    model.trunk.conv1.weight.requires_grad_(False)
    groups = _by_group(build_param_groups(model, 1e-4, non_regularized_parameters=["heads.1"]))
    all_ids = {id(p) for g in groups.values() for p in g["params"]}
    assert id(model.trunk.conv1.weight) not in all_ids
    assert {id(p) for p in groups["head_unregularized"]["params"]} == {id(p) for p in model.heads[1].parameters()}
    assert groups["head_unregularized"]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="list"):
        build_param_groups(model, 1e-4, non_regularized_parameters="heads")
    with pytest.raises(ValueError):
        build_param_groups(model, -1.0)


# --------------------------------------------------------------------------------------------- LARC
def test_larc_test_vector_7():
    """Spec test vector 7: ||p||=10, ||g||=0.5, wd 1e-6, tc 1e-3, eps 1e-8."""
    p0 = torch.tensor([6.0, 8.0, 0.0, 0.0])
    g0 = torch.tensor([0.3, 0.0, 0.4, 0.0])
    for clip, expected in [(False, 0.0199996), (True, 0.00416658)]:
        p = nn.Parameter(p0.clone())
        p.grad = g0.clone()
        opt = LARC(torch.optim.SGD([p], lr=4.8, momentum=0.9, weight_decay=1e-6), trust_coefficient=1e-3,
                   clip=clip, eps=1e-8)
        opt.step()
        local = opt.trust_ratios()[p]
        assert local == pytest.approx(expected, abs=5e-9)  # spec values are rounded to 6 significant digits
        exact = 1e-3 * 10 / (0.5 + 1e-6 * 10 + 1e-8)
        if clip:
            exact = min(exact / 4.8, 1.0)
        # fp32 parameters, norms of 4 elements and a few divisions: <~ 10 u = 6e-7 relative
        assert local == pytest.approx(exact, rel=1e-6)
        expected_grad = (g0 + 1e-6 * p0) * exact
        torch.testing.assert_close(p.grad, expected_grad, rtol=1e-6, atol=1e-12)
        # p0 - lr * g: one more rounding of values up to 8 (u * 8 = 5e-7 absolute for the entries ~0: atol 1e-9
        # suffices because those entries are exactly 0 - lr * g)
        torch.testing.assert_close(p.detach(), p0 - 4.8 * expected_grad, rtol=1e-6, atol=1e-9)
        assert opt.param_groups[0]["weight_decay"] == 1e-6  # restored
    assert 4.8 * (1e-3 * 10 / (0.5 + 1e-5 + 1e-8)) == pytest.approx(0.0959981, abs=5e-8)  # 6 printed digits


def _reference_larc_sgd(params, grads_per_step, groups, lrs_per_step, tc, eps, clip, momentum):
    """Independent float64 NumPy model of apex LARC + torch SGD (dampening 0, no nesterov).

    groups: list of (param indices, weight_decay, larc_exclude). grads_per_step[s][i] may be None.
    """
    params = [p.copy() for p in params]
    bufs = [None] * len(params)
    history = []
    for s, grads in enumerate(grads_per_step):
        for gi, (idx, wd, excluded) in enumerate(groups):
            lr = lrs_per_step[s][gi]
            for i in idx:
                if grads[i] is None:
                    continue
                g = grads[i].copy()
                if excluded:
                    g = g + wd * params[i]
                else:
                    pn, gn = np.linalg.norm(params[i]), np.linalg.norm(g)
                    if pn != 0 and gn != 0:
                        local = tc * pn / (gn + wd * pn + eps)
                        if clip:
                            local = min(local / lr, 1.0)
                        g = (g + wd * params[i]) * local
                bufs[i] = g.copy() if bufs[i] is None else momentum * bufs[i] + g
                params[i] = params[i] - lr * bufs[i]
        history.append([p.copy() for p in params])
    return history


def _make_case(seed=0, steps=5):
    rng = np.random.default_rng(seed)
    shapes = [(4, 3), (3,), (5,), (2, 2), (6,)]
    params = [rng.standard_normal(s) for s in shapes]
    params[1][:] = 0.0  # zero-norm parameter (e.g. a zero-initialised bias): plain SGD step, no wd
    grads = []
    for s in range(steps):
        step = [rng.standard_normal(sh) * 0.1 for sh in shapes]
        step[3] = np.zeros(shapes[3])  # zero gradient: untouched, no weight decay
        if s == 2:
            step[4] = None  # no gradient this step
        grads.append(step)
    groups = [([0, 1], 1e-2, False), ([2, 3], 0.0, False), ([4], 5e-2, True)]
    lrs = [[0.5 * (s + 1), 0.3, 0.1 + 0.05 * s] for s in range(steps)]
    return params, grads, groups, lrs


def _run_larc(params_np, grads, groups, lrs, clip, steps=None, opt_state=None, start=0, norm_fn=None):
    params = [nn.Parameter(torch.tensor(p, dtype=torch.float64)) for p in params_np]
    inner = torch.optim.SGD([{"params": [params[i] for i in idx], "weight_decay": wd, "larc_exclude": ex}
                             for idx, wd, ex in groups], lr=0.1, momentum=0.9)
    opt = LARC(inner, trust_coefficient=0.02, clip=clip, eps=1e-8, norm_fn=norm_fn)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    history = []
    for s in range(start, len(grads) if steps is None else steps):
        for gi, group in enumerate(opt.param_groups):
            group["lr"] = lrs[s][gi]
        opt.zero_grad()
        for p, g in zip(params, grads[s]):
            p.grad = None if g is None else torch.tensor(g, dtype=torch.float64)
        opt.step()
        history.append([p.detach().numpy().copy() for p in params])
    return history, opt, params


@pytest.mark.parametrize("clip", [False, True])
def test_larc_matches_float64_reference_over_steps(clip):
    params, grads, groups, lrs = _make_case()
    ref = _reference_larc_sgd(params, grads, groups, lrs, tc=0.02, eps=1e-8, clip=clip, momentum=0.9)
    got, opt, _ = _run_larc(params, grads, groups, lrs, clip)
    for s, (r, g) in enumerate(zip(ref, got)):
        for i, (a, b) in enumerate(zip(r, g)):
            # float64 torch vs float64 NumPy, 4 steps of norms over <= 12 elements and SGD: <~ 100 u = 1e-14
            np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14, err_msg=f"step {s} param {i}")
    # the zero-norm parameter's first step was plain SGD: p = -lr * g
    np.testing.assert_allclose(got[0][1], -lrs[0][0] * grads[0][1], rtol=1e-12)  # float64: one product
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-2, 0.0, 5e-2]


def test_larc_skips_excluded_group_and_zero_grads():
    params, grads, groups, lrs = _make_case(steps=1)
    _, opt, p = _run_larc(params, grads, groups, lrs, clip=False)
    ratios = opt.trust_ratios()
    assert p[0] in ratios and p[2] in ratios
    assert p[1] not in ratios  # zero norm
    assert p[3] not in ratios  # zero gradient
    assert p[4] not in ratios  # larc_exclude group


def test_larc_state_dict_roundtrip_continues_identically():
    params, grads, groups, lrs = _make_case(seed=1, steps=6)
    full, _, _ = _run_larc(params, grads, groups, lrs, clip=False)
    # train 3 steps, checkpoint (parameters + optimizer), restore into fresh objects, run 3 more
    part, opt, p = _run_larc(params, grads, groups, lrs, clip=False, steps=3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf)
    assert state["larc"] == {"trust_coefficient": 0.02, "clip": False, "eps": 1e-8}
    assert "state" in state and "param_groups" in state
    resumed_params = [x.detach().numpy().copy() for x in p]
    resumed, opt2, _ = _run_larc(resumed_params, grads, groups, lrs, clip=False, opt_state=state, start=3)
    for a, b in zip(full[3:], resumed):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    assert opt2.param_groups[2]["larc_exclude"] is True


def test_larc_load_state_dict_restores_hyperparameters_and_accepts_plain_dict():
    p = nn.Parameter(torch.ones(3))
    a = LARC(torch.optim.SGD([p], lr=0.1, momentum=0.9), trust_coefficient=0.005, clip=True, eps=1e-6)
    b = LARC(torch.optim.SGD([p], lr=0.1, momentum=0.9))
    b.load_state_dict(a.state_dict())
    assert (b.trust_coefficient, b.clip, b.eps) == (0.005, True, 1e-6)
    b.load_state_dict(a.optim.state_dict())  # e.g. from torch.distributed.checkpoint: no "larc" entry
    assert (b.trust_coefficient, b.clip, b.eps) == (0.005, True, 1e-6)
    with pytest.raises(ValueError, match="momentum"):
        b.load_state_dict({**a.state_dict(), "larc": {"momentum": 0.9}})


def test_larc_norm_fn_called_once_per_step():
    params, grads, groups, lrs = _make_case(steps=2)
    calls = []

    def spy(tensors):
        calls.append(len(tensors))
        return torch.stack([torch.linalg.vector_norm(t.detach()) for t in tensors])

    with_spy, _, _ = _run_larc(params, grads, groups, lrs, clip=False, norm_fn=spy)
    default, _, _ = _run_larc(params, grads, groups, lrs, clip=False)
    assert calls == [2 * 4, 2 * 4]  # params 0-3 carry grads in the adapted groups: params + grads, one call
    for a, b in zip(with_spy, default):
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, rtol=1e-12)  # float64, vector_norm vs _foreach_norm: ~10 u apart


def test_larc_drop_in_behaviour():
    w = nn.Parameter(torch.randn(3, 3))
    opt = LARC(torch.optim.SGD([w], lr=0.1, momentum=0.9))
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is opt.optim.param_groups
    opt.param_groups[0]["lr"] = 0.5
    assert opt.optim.param_groups[0]["lr"] == 0.5
    extra = nn.Parameter(torch.randn(2))
    opt.add_param_group({"params": [extra], "larc_exclude": True})
    assert len(opt.optim.param_groups) == 2
    w.grad = torch.ones(3, 3)
    loss = opt.step(closure=lambda: torch.tensor(1.5))
    assert loss == 1.5 and w in opt.state
    opt.zero_grad()
    assert w.grad is None
    seen = []
    opt.register_step_post_hook(lambda o, a, k: seen.append(1))
    w.grad = torch.ones(3, 3)
    opt.step()
    assert seen == [1]


def test_local_norms():
    ts = [torch.randn(3, 4), torch.randn(5, dtype=torch.float64), torch.randn(7).to(torch.bfloat16)]
    got = local_norms(ts)
    ref = [float(np.linalg.norm(t.double().numpy())) for t in ts]
    assert got.dtype == torch.float64 and got.shape == (3,)
    # the fp32 tensor's norm (12 terms) is fp32-accurate: <~ 12 u = 7e-7 (bf16 is accumulated in fp32, exactly)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6)
    assert local_norms([]).shape == (0,)


class _Shard(torch.Tensor):
    """Stands in for a ``DTensor``: a tensor subclass whose values are a local shard."""

    def to_local(self):
        return self.as_subclass(torch.Tensor)


class _Whole(torch.Tensor):
    """A tensor subclass holding a whole tensor (like the fake tensors of tests/fake_cuda.py)."""


def test_local_norms_rejects_shards_only():
    with pytest.raises(TypeError, match="sharding-aware norm_fn"):
        local_norms([torch.ones(2), torch.ones(3).as_subclass(_Shard)])
    assert local_norms([torch.ones(4).as_subclass(_Whole)]).tolist() == [2.0]


@pytest.mark.parametrize("kwargs", [dict(trust_coefficient=0.0), dict(eps=-1.0)])
def test_larc_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        LARC(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1), **kwargs)


# ----------------------------------------------------------------------------------- build_optimizer
def test_build_optimizer():
    model = _simclr_model()
    groups = build_param_groups(model, 1e-6)
    opt = build_optimizer(groups, "sgd", lr=0.3, momentum=0.9, nesterov=False, use_larc=True,
                          larc_config={"clip": False, "trust_coefficient": 0.001, "eps": 1e-8,
                                       "exclude_bias_and_norm": False})
    assert isinstance(opt, LARC) and isinstance(opt.optim, torch.optim.SGD)
    assert (opt.trust_coefficient, opt.clip, opt.eps) == (0.001, False, 1e-8)
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["dampening"] == 0.0
    assert opt.param_groups[0]["weight_decay"] == 1e-6 and opt.param_groups[0]["name"] == "trunk_regularized"
    plain = build_optimizer(build_param_groups(model, 1e-6), lr=0.1, nesterov=True)
    assert type(plain) is torch.optim.SGD and plain.param_groups[0]["nesterov"] is True
    with pytest.raises(ValueError, match="use_larc.*sgd"):
        build_optimizer(groups, "adamw", use_larc=True)
    with pytest.raises(ValueError, match="allowed: sgd"):
        build_optimizer(groups, "adam")
    with pytest.raises(ValueError, match="trust_coef"):
        build_optimizer(groups, use_larc=True, larc_config={"trust_coef": 0.1})


def test_larc_defaults_are_the_schema_defaults():
    """One source of defaults: LARC's keyword defaults (public API) equal config.OPTIMIZER.larc_config's, and
    build_optimizer has no fallback of its own (a missing key is an error)."""
    import inspect

    from scaleclr.config.schema import LarcConfig

    sig = inspect.signature(LARC.__init__).parameters
    schema = LarcConfig()
    assert {k: sig[k].default for k in ("trust_coefficient", "clip", "eps")} == \
        {"trust_coefficient": schema.trust_coefficient, "clip": schema.clip, "eps": schema.eps}
    model = _simclr_model()
    with pytest.raises(ValueError, match="missing"):
        build_optimizer(build_param_groups(model, 1e-6), use_larc=True, larc_config={"clip": False})
