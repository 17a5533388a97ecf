"""Tests for scaleclr.optim.schedulers: fvcore scheduler math (spec 6.2) and VISSL LR auto-scaling (spec 6.1).

References: the spec's test vector 6 and section 6.1 examples (values printed with 6-7 significant digits,
compared with abs tolerance 1e-6: half a unit of the printed last digit of values <= 4.8), and closed-form
formulas written out here. Everything is Python float64: a closed form and the scheduler evaluate the same
formula in another order, <~ 10 u = 1e-15 relative apart (rel 1e-12); ``pytest.approx``'s default (rel 1e-6)
only where the expected value is itself a short float expression (exact to ~1e-16).
"""
import copy
import math

import pytest

from scaleclr.optim import auto_scale_lr, build_scheduler

SIMCLR_8NODE_LR = {
    "auto_lr_scaling": {"auto_scale": True, "base_value": 0.3, "base_lr_batch_size": 256},
    "name": "composite",
    "schedulers": [{"name": "linear", "start_value": 0.6, "end_value": 4.8},
                   {"name": "cosine", "start_value": 4.8, "end_value": 0.0}],
    "update_interval": "step",
    "interval_scaling": ["rescaled", "fixed"],
    "lengths": [0.1, 0.9],
}
STEPS = 31_200  # 100 epochs x 312 iterations (spec 6.4)


def _reference_simclr_lr(where, start=0.6, peak=4.8, warm=0.1):
    """Linear warmup (rescaled) then cosine on the *global* progress (fixed), fvcore boundary epsilon."""
    if where + 1e-6 <= warm:
        t = where / warm
        return peak * t + start * (1 - t)
    return 0.5 * peak * (1 + math.cos(math.pi * where))


# ------------------------------------------------------------------------------------ test vector 6
def test_test_vector_6_8node_schedule():
    cfg, info = auto_scale_lr(SIMCLR_8NODE_LR, batch_size_per_replica=64, num_proc_per_node=8, num_nodes=8)
    assert info["scaled_lr"] == pytest.approx(4.8, abs=1e-12)
    assert info["warmup_start"] == pytest.approx(0.6, abs=1e-12) and info["warmup_removed"] is False
    lr = build_scheduler(cfg)
    expected = {0: 0.6, 1: 0.601346, 1560: 2.7, 3119: 4.798654, 3120: 4.682536}
    for step, value in expected.items():
        assert lr(step / STEPS) == pytest.approx(value, abs=1e-6), step
    assert lr(0.5) == pytest.approx(2.4, abs=1e-6)
    assert lr(0.9) == pytest.approx(0.117464, abs=1e-6)
    assert lr((STEPS - 1) / STEPS) == pytest.approx(1.2e-8, abs=1e-9)
    for step in range(0, STEPS, 97):
        assert lr(step / STEPS) == pytest.approx(_reference_simclr_lr(step / STEPS), rel=1e-12, abs=1e-15)


def test_auto_scale_does_not_mutate_input():
    before = copy.deepcopy(SIMCLR_8NODE_LR)
    new, _ = auto_scale_lr(SIMCLR_8NODE_LR, 64, 8, 1)
    assert SIMCLR_8NODE_LR == before
    assert new is not SIMCLR_8NODE_LR and new["auto_lr_scaling"] is not SIMCLR_8NODE_LR["auto_lr_scaling"]


# ------------------------------------------------------------------------------- spec 6.1 examples
def test_one_gpu_cosine_without_warmup():
    cfg, info = auto_scale_lr(SIMCLR_8NODE_LR, 64, 1, 1)
    assert cfg["name"] == "cosine" and "schedulers" not in cfg and "lengths" not in cfg
    assert cfg["start_value"] == pytest.approx(0.075) and cfg["end_value"] == 0.0
    assert info["warmup_removed"] is True
    lr = build_scheduler(cfg)
    assert lr(0.0) == pytest.approx(0.075) and lr(0.5) == pytest.approx(0.0375)


def test_one_node_cosine_without_warmup():
    cfg, info = auto_scale_lr(SIMCLR_8NODE_LR, 64, 8, 1)
    assert cfg["name"] == "cosine" and info["warmup_removed"] is True
    assert (cfg["start_value"], cfg["end_value"]) == (pytest.approx(0.6), 0.0)


@pytest.mark.parametrize("bs,nodes,start,end", [(64, 2, 0.6, 1.2), (128, 4, 1.2, 4.8), (32, 16, 0.3, 4.8)])
def test_multi_node_warmup(bs, nodes, start, end):
    cfg, info = auto_scale_lr(SIMCLR_8NODE_LR, bs, 8, nodes)
    warm, cos = cfg["schedulers"]
    assert (warm["start_value"], warm["end_value"]) == (pytest.approx(start), pytest.approx(end))
    assert (cos["start_value"], cos["end_value"]) == (pytest.approx(end), 0.0)
    assert cfg["lengths"] == [0.1, 0.9] and cfg["interval_scaling"] == ["rescaled", "fixed"]
    lr = build_scheduler(cfg)
    assert lr(0.0) == pytest.approx(start)
    assert lr(0.05) == pytest.approx((start + end) / 2)
    assert lr(0.5) == pytest.approx(end / 2)
    assert info["warmup_removed"] is False


@pytest.mark.parametrize("scaling_type,expected", [("linear", 0.3 * 0.125), ("sqrt", 0.3 * math.sqrt(0.125))])
def test_quick_simclr_linear_vs_sqrt(scaling_type, expected):
    cfg = {"name": "linear", "start_value": 0.0, "end_value": 0.1,
           "auto_lr_scaling": {"auto_scale": True, "base_value": 0.3, "base_lr_batch_size": 256,
                               "scaling_type": scaling_type}}
    new, info = auto_scale_lr(cfg, 32, 1, 1)
    assert new["end_value"] == pytest.approx(expected, rel=1e-12)
    assert new["start_value"] == 0.0
    assert info["factor"] == pytest.approx(expected / 0.3, rel=1e-12)


def test_auto_scale_other_schedulers():
    auto = {"auto_scale": True, "base_value": 0.01, "base_lr_batch_size": 256}
    cos, _ = auto_scale_lr({"name": "cosine", "start_value": 0.1, "end_value": 0.001, "auto_lr_scaling": auto},
                           32, 8, 2)  # factor 2
    assert (cos["start_value"], cos["end_value"]) == (pytest.approx(0.02), pytest.approx(0.0002))
    ms, _ = auto_scale_lr({"name": "multistep", "values": [0.01, 0.001, 0.0001], "milestones": [8, 16],
                           "auto_lr_scaling": auto}, 32, 8, 2)
    assert ms["values"] == [0.02, 0.002, 0.0002]
    const, _ = auto_scale_lr({"name": "constant", "value": 1.0, "auto_lr_scaling": auto}, 32, 8, 2)
    assert const["value"] == pytest.approx(0.02)
    off, info = auto_scale_lr({"name": "constant", "value": 1.0}, 32, 8, 2)
    assert off == {"name": "constant", "value": 1.0} and info["auto_scale"] is False
    with pytest.raises(ValueError, match="scaling_type"):
        auto_scale_lr({"name": "constant", "value": 1.0, "auto_lr_scaling": {**auto, "scaling_type": "log"}},
                      32, 8, 2)
    with pytest.raises(ValueError, match="start_value 0"):
        auto_scale_lr({"name": "cosine", "start_value": 0.0, "end_value": 0.1, "auto_lr_scaling": auto}, 32, 8, 2)


def test_single_node_three_children_removes_warmup_and_renormalises():
    cfg = {"name": "composite", "auto_lr_scaling": {"auto_scale": True, "base_value": 0.1,
                                                    "base_lr_batch_size": 256},
           "schedulers": [{"name": "linear", "start_value": 0.0, "end_value": 1.0},
                          {"name": "constant", "value": 1.0},
                          {"name": "cosine", "start_value": 1.0, "end_value": 0.0}],
           "lengths": [0.2, 0.3, 0.5], "interval_scaling": ["rescaled", "rescaled", "rescaled"]}
    new, info = auto_scale_lr(cfg, 64, 4, 1)  # scaled 0.1, one node -> warmup pointless
    assert info["warmup_removed"] is True
    assert [c["name"] for c in new["schedulers"]] == ["constant", "cosine"]
    assert new["lengths"] == [pytest.approx(0.375), pytest.approx(0.625)]
    lr = build_scheduler(new)
    assert lr(0.1) == pytest.approx(0.1) and lr(0.375 + 0.625 / 2) == pytest.approx(0.05)


# -------------------------------------------------------------------------------------- scheduler math
def test_basic_schedulers():
    assert build_scheduler({"name": "constant", "value": 0.3})(0.7) == 0.3
    lin = build_scheduler({"name": "linear", "start_value": 1.0, "end_value": 3.0})
    assert lin(0.25) == pytest.approx(1.5)
    cos = build_scheduler({"name": "cosine", "start_value": 1.0, "end_value": 0.2})
    assert cos(0.0) == pytest.approx(1.0) and cos(1.0) == pytest.approx(0.2)
    assert cos(1 / 3) == pytest.approx(0.2 + 0.4 * (1 + math.cos(math.pi / 3)))


def test_multistep_linear_eval_schedule():
    lr = build_scheduler({"name": "multistep", "values": [0.01, 0.001, 0.0001, 0.00001],
                          "milestones": [8, 16, 24], "num_epochs": 28})
    for epoch, value in [(0, 0.01), (7.99, 0.01), (8, 0.001), (15.5, 0.001), (16, 0.0001), (24, 0.00001),
                         (27.9, 0.00001)]:
        assert lr(epoch / 28) == value, epoch
    # num_epochs taken from the caller (VISSL fills it from OPTIMIZER.num_epochs); equal-width default
    default = build_scheduler({"name": "multistep", "values": [1.0, 0.1, 0.01]}, num_epochs=90)
    assert [default(e / 90) for e in (29, 30, 59, 60)] == [1.0, 0.1, 0.1, 0.01]
    with pytest.raises(ValueError, match="milestones"):
        build_scheduler({"name": "multistep", "values": [1.0, 0.1], "milestones": [5, 8], "num_epochs": 10})


def test_step_schedulers():
    step = build_scheduler({"name": "step", "values": [1.0, 0.5, 0.25, 0.125], "num_epochs": 120})
    assert [step(e / 120) for e in (0, 29, 30, 89, 90, 119)] == [1.0, 1.0, 0.5, 0.25, 0.125, 0.125]
    fixed = build_scheduler({"name": "step_with_fixed_gamma", "base_value": 0.1, "gamma": 0.1, "num_decays": 3,
                             "num_epochs": 120})
    assert fixed(65 / 120) == pytest.approx(0.001)


def test_composite_semantics_and_validation():
    comp = build_scheduler({"name": "composite", "lengths": [0.3, 0.7],
                            "schedulers": [{"name": "constant", "value": 0.42},
                                           {"name": "linear", "start_value": 1.0, "end_value": 0.0}]})
    assert comp(0.29) == 0.42
    assert comp(0.3 + 0.35) == pytest.approx(0.5)  # default interval scaling: rescaled
    with pytest.raises(ValueError, match="sum to 1"):
        build_scheduler({"name": "composite", "lengths": [0.1, 0.8],
                         "schedulers": [{"name": "constant", "value": 1}, {"name": "constant", "value": 2}]})
    # within 1e-3 is accepted (last length adjusted)
    ok = build_scheduler({"name": "composite", "lengths": [0.5, 0.4995],
                          "schedulers": [{"name": "constant", "value": 1}, {"name": "constant", "value": 2}]})
    assert ok(0.99) == 2
    with pytest.raises(ValueError, match="interval_scaling"):
        build_scheduler({"name": "composite", "lengths": [1.0], "interval_scaling": ["stretched"],
                         "schedulers": [{"name": "constant", "value": 1}]})
    with pytest.raises(ValueError, match="must match"):
        build_scheduler({"name": "composite", "lengths": [1.0], "interval_scaling": ["fixed", "fixed"],
                         "schedulers": [{"name": "constant", "value": 1}]})


def test_bad_name_and_where():
    with pytest.raises(ValueError, match=r"'cosine_warm_restart'.*allowed: constant, linear, cosine"):
        build_scheduler({"name": "cosine_warm_restart", "start_value": 1.0, "end_value": 0.0})
    with pytest.raises(ValueError, match="missing"):
        build_scheduler({"name": "cosine", "start_value": 1.0})
    with pytest.raises(ValueError, match="where"):
        build_scheduler({"name": "constant", "value": 1.0})(1.5)


def test_merged_config_with_leftover_keys_is_accepted():
    """VISSL-merged configs carry keys of other schedulers; they are ignored like in ClassyVision."""
    lr = build_scheduler({"name": "cosine", "start_value": 1.0, "end_value": 0.0, "values": [0.1, 0.01],
                          "milestones": [30], "lengths": [], "update_interval": "step"})
    assert lr(0.5) == pytest.approx(0.5)


def test_accepts_omegaconf_containers():
    omegaconf = pytest.importorskip("omegaconf")
    node = omegaconf.OmegaConf.create(SIMCLR_8NODE_LR)
    new, info = auto_scale_lr(node, 64, 8, 8)
    assert type(new) is dict and new == auto_scale_lr(SIMCLR_8NODE_LR, 64, 8, 8)[0]
    assert build_scheduler(omegaconf.OmegaConf.create(new))(0.5) == pytest.approx(2.4)
