"""scaleclr SyncBN vs torch BatchNorm on the concatenated group batch (gloo, CPU, data differs per rank).

Reference: ``nn.BatchNorm{1,2}d`` applied in one process to the concatenation of the group's local batches, with
the loss sum(y * g) over the whole batch. The SyncBN input gradient of each rank must equal the reference's rows
for that rank; weight/bias gradients are per-rank shares whose sum (what DDP's all-reduce adds) equals the
reference; running stats must equal the reference's and be bitwise identical on every rank of a group.
Tolerances (max abs error relative to max(1, max |reference|); per channel n <= 40 values, |mean| <= 7, std >= 1;
u: unit roundoff): float64 1e-10 (two summation orders of n terms differ by <~ n u |x| / std = 3e-14; 1e-10
leaves 3000x); float32 1e-5 (the same, typically sqrt(n) u |x| / std = 2.7e-6 with u = 6e-8; worst case n u
|x| / std = 1.7e-5 is not reached by random data); bf16 input with fp32 accumulation: outputs and input
gradients are rounded to bf16, <= u_bf16 = 3.9e-3 relative, of values up to ~3: 3e-2 = 8 u_bf16 at the scale 1,
leaves 2.5x for the gradient's own rounding; running statistics stay fp32-accurate on the same bf16 inputs: 1e-5.
"""
import logging
import sys
import types

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dist_helpers import run_distributed
from scaleclr.distributed.sync_bn import (
    ApexNotAvailableError,
    SyncBatchNorm,
    convert_sync_batchnorm,
    create_sync_bn_process_group,
    describe_sync_bn,
    is_apex_available,
)

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2}  # derived in the module docstring
STEPS = 3


# ---------------------------------------------------------------------------------------------------------------
# Cases and the single-process reference
# ---------------------------------------------------------------------------------------------------------------

def _make_case(name, sizes, channels, spatial=(), dtype=torch.float64, affine=True, bias=True, momentum=0.1,
               seed=0):
    """Global per-step data; rank r of the group owns rows [sum(sizes[:r]), sum(sizes[:r + 1]))."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    shape = (total, channels) + tuple(spatial)
    # Offset means and scales differ per channel and per step, so statistics are far from (0, 1).
    xs = [(torch.randn(shape, generator=gen, dtype=torch.float64) * (1 + 2 * torch.rand(channels, generator=gen,
           dtype=torch.float64)).view(1, -1, *[1] * len(spatial)) + 3 * step + 1).to(dtype) for step in range(STEPS)]
    gs = [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for _ in range(STEPS)]
    x_eval = (torch.randn((3, channels) + tuple(spatial), generator=gen, dtype=torch.float64) + 2).to(dtype)
    weight = 1 + torch.rand(channels, generator=gen, dtype=torch.float64)
    bias_v = torch.randn(channels, generator=gen, dtype=torch.float64)
    return dict(name=name, sizes=sizes, channels=channels, dtype=dtype, affine=affine, bias=bias, momentum=momentum,
                xs=xs, gs=gs, x_eval=x_eval, weight=weight, bias_v=bias_v, dim=2 + len(spatial))


def _param_dtype(case):
    return torch.float32 if case["dtype"] == torch.bfloat16 else case["dtype"]


def _init_bn(bn, case):
    bn.to(_param_dtype(case))
    with torch.no_grad():
        if case["affine"]:
            bn.weight.copy_(case["weight"])
            if case["bias"]:
                bn.bias.copy_(case["bias_v"])
    return bn


def _run_steps(bn, case, rows, loss_scale=1.0):
    """STEPS training steps on x[rows], then one eval forward; returns per-step records."""
    out = []
    for x_full, g_full in zip(case["xs"], case["gs"]):
        x = x_full[rows].clone().requires_grad_(True)
        bn.zero_grad(set_to_none=True)
        bn.train()
        y = bn(x)
        (y.to(torch.float64) * g_full[rows].to(torch.float64)).sum().mul(loss_scale).backward()
        out.append(dict(
            y=y.detach(), dx=x.grad.detach(),
            dw=None if bn.weight is None else bn.weight.grad.detach().clone(),
            db=None if bn.bias is None else bn.bias.grad.detach().clone(),
            rm=bn.running_mean.detach().clone(), rv=bn.running_var.detach().clone(),
            nbt=int(bn.num_batches_tracked)))
    bn.eval()
    with torch.no_grad():
        out.append(dict(y_eval=bn(case["x_eval"])))
    return out


def _rows(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _reference(case, group_ranks):
    """torch BatchNorm on the concatenation of the group's rows (computed in float64 for bf16 input)."""
    ref_case = dict(case)
    if case["dtype"] == torch.bfloat16:
        ref_case.update(dtype=torch.float64, xs=[x.double() for x in case["xs"]], gs=[g.double() for g in case["gs"]],
                        x_eval=case["x_eval"].double())
    cls = nn.BatchNorm1d if case["dim"] == 2 else nn.BatchNorm2d
    bn = _init_bn(cls(case["channels"], momentum=case["momentum"], affine=case["affine"], bias=case["bias"]), ref_case)
    starts = [sum(case["sizes"][:r]) for r in group_ranks]
    index = torch.cat([torch.arange(s, s + case["sizes"][r]) for s, r in zip(starts, group_ranks)])
    return _run_steps(bn, ref_case, index)


# ---------------------------------------------------------------------------------------------------------------
# Distributed bodies (module level: pickled into spawned ranks)
# ---------------------------------------------------------------------------------------------------------------

def _body_cases(rank, world, cases, group_size, num_proc_per_node):
    pg = create_sync_bn_process_group(group_size, num_proc_per_node)
    results = {}
    for case in cases:
        bn = _init_bn(SyncBatchNorm(case["channels"], momentum=case["momentum"], affine=case["affine"],
                                    bias=case["bias"], process_group=pg), case)
        results[case["name"]] = _run_steps(bn, case, _rows(case["sizes"], rank))
    return results


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _tiny_model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(3, 4), nn.BatchNorm1d(4)).double()


def _body_w2(rank, world, cases, x_model, g_model):
    """W=2, GROUP_SIZE=0: SyncBN cases, conversion of a small model, describe line, 'pytorch' fallback on gloo."""
    out = {"cases": _body_cases(rank, world, cases, 0, None)}

    handler = _ListHandler()
    logging.getLogger("scaleclr.distributed.sync_bn").addHandler(handler)
    model = convert_sync_batchnorm(_tiny_model(), "pytorch", process_group=None)
    out["fallback_log"] = handler.messages
    out["describe"] = describe_sync_bn(model)
    sizes = [2, 3]
    x = x_model[_rows(sizes, rank)].clone().requires_grad_(True)
    y = model(x)
    (y * g_model[_rows(sizes, rank)]).sum().backward()
    out["model"] = dict(y=y.detach(), dx=x.grad, grads={n: p.grad for n, p in model.named_parameters()},
                        buffers={n: b.clone() for n, b in model.named_buffers()})
    try:  # one value per channel over the whole group (1 row on rank 0, none on rank 1): every rank raises
        SyncBatchNorm(2)(torch.randn(1 - rank, 2))
    except RuntimeError as e:  # an asynchronous device assert (raised at once on the CPU)
        out["too_small"] = str(e)
    return out


def _body_w4(rank, world, cases_world, cases_groups):
    """W=4: GROUP_SIZE=0 (whole world) and GROUP_SIZE=2 (two groups), plus process-group creation rules."""
    out = {"world": _body_cases(rank, world, cases_world, 0, None),
           "groups": _body_cases(rank, world, cases_groups, 2, None)}
    checks = {}
    try:
        create_sync_bn_process_group(3)
    except ValueError as e:
        checks["gs3_error"] = str(e)
    pg = create_sync_bn_process_group(-1, num_proc_per_node=2)
    checks["gs_minus1_ranks"] = dist.get_process_group_ranks(pg)
    checks["gs8_is_world"] = create_sync_bn_process_group(8) is None  # min(world, GROUP_SIZE) = world
    checks["gs4_is_world"] = create_sync_bn_process_group(4) is None
    checks["gs0_is_world"] = create_sync_bn_process_group(0) is None
    pg1 = create_sync_bn_process_group(1)
    checks["gs1_ranks"] = dist.get_process_group_ranks(pg1)
    bn = SyncBatchNorm(2, process_group=pg)
    checks["describe"] = describe_sync_bn(nn.Sequential(bn, nn.BatchNorm1d(2)))
    out["checks"] = checks
    return out


# ---------------------------------------------------------------------------------------------------------------
# Comparison helpers
# ---------------------------------------------------------------------------------------------------------------

def _close(a, b, tol, what):
    a, b = a.double(), b.double()
    assert a.shape == b.shape, (what, a.shape, b.shape)
    if a.numel():
        err = (a - b).abs().max().item()
        assert err <= tol * max(1.0, b.abs().max().item()), f"{what}: max abs error {err:.3g} > {tol:.1g}"


def _check_group(case, per_rank, group_ranks):
    """per_rank[r] = SyncBN records of rank r; compare with torch BN on the group's concatenated batch."""
    ref = _reference(case, group_ranks)
    tol = TOL[case["dtype"]]
    stat_tol = 1e-5 if case["dtype"] == torch.bfloat16 else tol  # bf16 inputs, fp32 statistics
    name = case["name"]
    for step in range(STEPS):
        for k, r in enumerate(group_ranks):
            rec = per_rank[r][step]
            start = sum(case["sizes"][q] for q in group_ranks[:k])
            rows = slice(start, start + case["sizes"][r])
            _close(rec["y"], ref[step]["y"][rows], tol, f"{name} step {step} rank {r} output")
            _close(rec["dx"], ref[step]["dx"][rows], tol, f"{name} step {step} rank {r} input grad")
            _close(rec["rm"], ref[step]["rm"], stat_tol, f"{name} step {step} rank {r} running_mean")
            _close(rec["rv"], ref[step]["rv"], stat_tol, f"{name} step {step} rank {r} running_var")
            assert rec["nbt"] == ref[step]["nbt"] == step + 1
            # Running stats are bitwise identical on every rank of the group.
            assert torch.equal(rec["rm"], per_rank[group_ranks[0]][step]["rm"]), name
            assert torch.equal(rec["rv"], per_rank[group_ranks[0]][step]["rv"]), name
        for key in ("dw", "db"):
            if ref[step][key] is None:
                assert all(per_rank[r][step][key] is None for r in group_ranks)
                continue
            total = sum(per_rank[r][step][key].double() for r in group_ranks)  # DDP adds the per-rank shares
            _close(total, ref[step][key], tol, f"{name} step {step} {key} (sum over ranks)")
    for r in group_ranks:  # eval mode: plain BN with the (synced) running stats
        _close(per_rank[r][STEPS]["y_eval"], ref[STEPS]["y_eval"], tol, f"{name} rank {r} eval output")


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.dist
def test_world2_matches_bn_on_concatenated_batch():
    cases = [
        _make_case("4d_f64_unequal", [2, 3], 3, (4, 3)),
        _make_case("2d_f64_unequal", [3, 5], 4, (), seed=1),
        _make_case("2d_f64_momentum_none", [4, 2], 3, (), momentum=None, seed=2),
        _make_case("4d_f64_non_affine", [3, 1], 2, (2, 2), affine=False, seed=3),
        _make_case("2d_f64_no_bias", [2, 2], 3, (), bias=False, seed=4),
        _make_case("2d_f64_empty_rank", [5, 0], 3, (), seed=5),
        _make_case("4d_f32", [2, 3], 3, (3, 3), dtype=torch.float32, seed=6),
        _make_case("4d_bf16_input", [3, 2], 3, (3, 3), dtype=torch.bfloat16, seed=7),
    ]
    gen = torch.Generator().manual_seed(11)
    x_model = torch.randn(5, 2, 4, 4, generator=gen, dtype=torch.float64) + 1
    g_model = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    res = run_distributed(_body_w2, 2, cases, x_model, g_model)

    for case in cases:
        _check_group(case, [res[r]["cases"][case["name"]] for r in range(2)], [0, 1])

    # Converted model (conv -> BN2d -> ... -> linear -> head BN1d) == plain model on the concatenated batch.
    ref_model = _tiny_model().train()
    x = x_model.clone().requires_grad_(True)
    y = ref_model(x)
    (y * g_model).sum().backward()
    got_y = torch.cat([res[r]["model"]["y"] for r in range(2)])
    got_dx = torch.cat([res[r]["model"]["dx"] for r in range(2)])
    _close(got_y, y.detach(), 1e-10, "model output")  # float64 model: as TOL[float64]
    _close(got_dx, x.grad, 1e-10, "model input grad")
    for n, p in ref_model.named_parameters():
        _close(res[0]["model"]["grads"][n] + res[1]["model"]["grads"][n], p.grad, 1e-10, f"model grad {n}")
    for n, b in ref_model.named_buffers():
        _close(res[0]["model"]["buffers"][n], b, 1e-10, f"model buffer {n}")
        assert torch.equal(res[0]["model"]["buffers"][n], res[1]["model"]["buffers"][n])

    # 'pytorch' on CPU/gloo fell back to scaleclr's SyncBN, said so, and the log line describes it.
    assert any("falling back to scaleclr.SyncBatchNorm" in m and "gloo" in m for m in res[0]["fallback_log"])
    assert res[0]["describe"] == "SyncBN: scaleclr.SyncBatchNorm x2 modules, group size 2 (1 group, world 2)"
    assert all("more than 1 value per channel" in res[r]["too_small"] for r in range(2))


@pytest.mark.dist
def test_world4_whole_world_and_groups_of_two():
    cases_world = [
        _make_case("w4_4d", [1, 2, 3, 2], 3, (2, 3), seed=20),
        _make_case("w4_2d", [2, 1, 1, 3], 4, (), seed=21),
    ]
    cases_groups = [
        _make_case("g2_4d", [2, 3, 1, 4], 3, (3, 2), seed=22),
        _make_case("g2_2d", [3, 2, 4, 1], 5, (), momentum=None, seed=23),
    ]
    res = run_distributed(_body_w4, 4, cases_world, cases_groups)

    for case in cases_world:
        _check_group(case, [res[r]["world"][case["name"]] for r in range(4)], [0, 1, 2, 3])
    for case in cases_groups:
        per_rank = [res[r]["groups"][case["name"]] for r in range(4)]
        _check_group(case, per_rank, [0, 1])
        _check_group(case, per_rank, [2, 3])
        for step in range(STEPS):  # the two groups normalise with different statistics (different data:
            # their means differ by O(0.1), 1e-3 is 1e7 x float64 rounding)
            assert (per_rank[0][step]["rm"] - per_rank[2][step]["rm"]).abs().max() > 1e-3

    checks = [res[r]["checks"] for r in range(4)]
    msg = checks[0]["gs3_error"]
    assert "GROUP_SIZE=3" in msg and "world size 4" in msg and "1, 2, 4" in msg and "-1" in msg
    assert [c["gs_minus1_ranks"] for c in checks] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert all(c["gs8_is_world"] and c["gs4_is_world"] and c["gs0_is_world"] for c in checks)
    assert [c["gs1_ranks"] for c in checks] == [[0], [1], [2], [3]]
    assert checks[0]["describe"] == ("SyncBN: scaleclr.SyncBatchNorm x1 modules, group size 2 (2 groups, world 4); "
                                     "plus 1 plain BatchNorm module (per-rank statistics)")


def test_not_distributed_is_plain_batch_norm():
    for case in (_make_case("nd_4d", [6], 3, (2, 2)), _make_case("nd_2d", [5], 4, (), momentum=None)):
        bn = _init_bn(SyncBatchNorm(case["channels"], momentum=case["momentum"]), case)
        got = _run_steps(bn, case, slice(None))
        _check_group(case, [got], [0])
    with pytest.raises(ValueError, match="at least 2D"):
        SyncBatchNorm(3)(torch.randn(3))
    with pytest.raises(ValueError, match="channels"):
        SyncBatchNorm(3)(torch.randn(4, 5))


def _model_with_head():
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    head = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, eps=1e-3, momentum=0.3), nn.ReLU(), nn.Linear(6, 2),
                         nn.BatchNorm1d(2, affine=False))
    model = nn.ModuleDict({"trunk": trunk, "heads": head})
    with torch.no_grad():  # non-default buffers and parameters
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(7)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-1, 1)
    model["trunk"][1].weight.requires_grad_(False)
    return model


def test_convert_preserves_state_and_parameters():
    model = _model_with_head()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    model["heads"].eval()
    converted = convert_sync_batchnorm(model, "native")
    assert converted is model
    after = converted.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert torch.equal(after[k], before[k]), k
    for n, p in converted.named_parameters():
        assert p is params[n]  # shared, so optimizer references and requires_grad survive
    assert not converted["trunk"][1].weight.requires_grad
    bns = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 3 and all(type(m) is SyncBatchNorm for m in bns)
    head_bn = converted["heads"][1]
    assert (head_bn.eps, head_bn.momentum, head_bn.training) == (1e-3, 0.3, False)
    assert converted["heads"][4].weight is None and not converted["heads"][4].affine
    assert describe_sync_bn(converted) == ("SyncBN: scaleclr.SyncBatchNorm x3 modules, not distributed "
                                           "(local batch statistics)")
    # A BN at the root is replaced and returned.
    root = convert_sync_batchnorm(nn.BatchNorm2d(3), "native")
    assert type(root) is SyncBatchNorm


def test_pytorch_type_falls_back_on_cpu_and_uses_torch_on_cuda(caplog):
    with caplog.at_level(logging.WARNING, logger="scaleclr.distributed.sync_bn"):
        model = convert_sync_batchnorm(_model_with_head(), "pytorch")
    assert all(type(m) is SyncBatchNorm for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    assert any("falling back to scaleclr.SyncBatchNorm" in r.getMessage() for r in caplog.records)
    # A model headed for CUDA gets torch.nn.SyncBatchNorm (constructing it needs no GPU).
    model = convert_sync_batchnorm(_model_with_head(), "pytorch", device="cuda")
    assert describe_sync_bn(model).startswith("SyncBN: torch.nn.SyncBatchNorm x3 modules")


def test_apex_missing_raises_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "apex", None)  # import apex -> ImportError, even where apex is installed
    monkeypatch.setitem(sys.modules, "apex.parallel", None)
    assert not is_apex_available()
    with pytest.raises(ApexNotAvailableError) as info:
        convert_sync_batchnorm(_model_with_head(), "apex")
    assert isinstance(info.value, ImportError) and isinstance(info.value, ValueError)
    msg = str(info.value)
    assert "apex is not installed" in msg and "not on PyPI" in msg
    assert "SYNC_BN_TYPE=pytorch" in msg and "SYNC_BN_TYPE=native" in msg


def test_apex_type_uses_apex_class_when_importable(monkeypatch):
    class FakeApexSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
        def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                     process_group=None, channel_last=False, fuse_relu=False):
            super().__init__(num_features, eps, momentum, affine, track_running_stats)
            self.process_group = process_group

    FakeApexSyncBatchNorm.__module__ = "apex.parallel.optimized_sync_batchnorm"
    apex = types.ModuleType("apex")
    apex.parallel = types.ModuleType("apex.parallel")
    apex.parallel.SyncBatchNorm = FakeApexSyncBatchNorm
    monkeypatch.setitem(sys.modules, "apex", apex)
    monkeypatch.setitem(sys.modules, "apex.parallel", apex.parallel)
    assert is_apex_available()
    model = _model_with_head()
    keys = list(model.state_dict())
    model = convert_sync_batchnorm(model, "apex")
    assert list(model.state_dict()) == keys
    assert describe_sync_bn(model).startswith("SyncBN: apex.parallel.FakeApexSyncBatchNorm x3 modules")


def test_bad_arguments():
    with pytest.raises(ValueError, match="SYNC_BN_TYPE='cudnn'.*native, pytorch, apex"):
        convert_sync_batchnorm(_model_with_head(), "cudnn")
    with pytest.raises(ValueError, match="GROUP_SIZE=-2"):
        create_sync_bn_process_group(-2)
    assert create_sync_bn_process_group(2) is None  # not distributed: the world (of one) is the group
    assert describe_sync_bn(nn.Linear(2, 2)) == "SyncBN: off (no BatchNorm modules)"
    assert describe_sync_bn(nn.BatchNorm1d(2)) == "SyncBN: off, 1 plain BatchNorm module (per-rank statistics)"
