"""Tests for scaleclr.models: ResNet trunk (SimCLR widths), VISSL mlp heads, SimCLRModel multicrop forward.

References are independent: parameter counts from spec 3.1 (= SimCLR paper's 24M/94M/375M), torchvision's
resnet for names/numerics, hand-written functional forwards for the heads. Big trunks are built on the meta
device (shape arithmetic only).
"""
import ast
import pathlib

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from scaleclr.models import MLP, RESNET_LAYERS, ResNet, SimCLRModel, build_heads, feature_dim

SIMCLR_HEAD = [["mlp", {"dims": [2048, 2048], "use_relu": True, "skip_last_layer_relu_bn": False}],
               ["mlp", {"dims": [2048, 128]}]]


def _numel(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ----------------------------------------------------------------------------------------------- trunk
@pytest.mark.parametrize("depth,width,expected", [
    (50, 1, 23_508_032), (50, 2, 93_907_072), (50, 4, 375_378_176), (101, 1, 42_500_160),
    (152, 1, 58_143_808),
])
def test_trunk_parameter_counts(depth, width, expected):
    with torch.device("meta"):
        trunk = ResNet(depth=depth, width_multiplier=width)
    assert _numel(trunk) == expected
    assert trunk.num_features == 2048 * width
    with torch.device("meta"):
        out = trunk(torch.empty(2, 3, 224, 224))
    assert tuple(out.shape) == (2, 2048 * width)


def test_trunk_count_matches_torchvision_minus_fc():
    for depth, ctor in [(18, torchvision.models.resnet18), (34, torchvision.models.resnet34),
                        (50, torchvision.models.resnet50)]:
        with torch.device("meta"):
            tv = ctor()
            ours = ResNet(depth=depth)
        assert _numel(ours) == _numel(tv) - _numel(tv.fc)
        assert ours.num_features == tv.fc.in_features


def test_width_scales_stem_and_every_stage():
    with torch.device("meta"):
        trunk = ResNet(depth=50, width_multiplier=2)
    assert trunk.conv1.out_channels == 128
    assert [s[0].conv1.out_channels for s in trunk.stages()] == [128, 256, 512, 1024]  # bottleneck inner width
    assert [s[-1].conv3.out_channels for s in trunk.stages()] == [512, 1024, 2048, 4096]


def test_state_dict_loads_into_torchvision_and_same_function():
    torch.manual_seed(1)
    ours = ResNet(depth=18)
    tv = torchvision.models.resnet18()
    tv.fc = nn.Identity()
    tv.load_state_dict(ours.state_dict(), strict=True)
    ours.eval()
    tv.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # the same modules, weights and ops in one process: identical
        torch.testing.assert_close(ours(x), tv(x), rtol=0, atol=0)


def test_resnet50_keys_match_torchvision():
    with torch.device("meta"):
        ours = ResNet(depth=50)
        tv = torchvision.models.resnet50()
    tv_shapes = {k: v.shape for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in ours.state_dict().items()} == tv_shapes
    assert "layer1.0.downsample.1.running_mean" in tv_shapes


def test_unknown_depth_lists_allowed():
    with pytest.raises(ValueError, match=r"allowed depths: 18, 34, 50, 101, 152, 200"):
        ResNet(depth=42)


@pytest.mark.parametrize("kwargs", [dict(depth=18, groups=32, width_per_group=4), dict(width_multiplier=0),
                                    dict(layer4_stride=3), dict(norm_layer="InstanceNorm")])
def test_bad_trunk_options(kwargs):
    with pytest.raises(ValueError):
        ResNet(**kwargs)


def test_init_matches_torchvision_recipe():
    torch.manual_seed(0)
    trunk = ResNet(depth=50, zero_init_residual=True)
    w = trunk.layer3[1].conv2.weight  # 256 out, 3x3 -> fan_out = 256*9
    expected_std = (2.0 / (w.shape[0] * 9)) ** 0.5
    assert abs(w.std().item() / expected_std - 1) < 0.03  # 589,824 samples
    for name, m in trunk.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.bias == 0), name
            if name.endswith("bn3"):
                assert torch.all(m.weight == 0), name
            else:
                assert torch.all(m.weight == 1), name
    assert torch.all(ResNet(depth=18).layer1[0].bn2.weight == 1)


def test_layer4_stride_and_shard_units():
    with torch.device("meta"):
        trunk = ResNet(depth=50, layer4_stride=1)
        feats = trunk.layer4(trunk.layer3(trunk.layer2(trunk.layer1(torch.empty(1, 64, 56, 56)))))
    assert trunk.layer4[0].conv2.stride == (1, 1)
    assert trunk.layer4[0].downsample[0].stride == (1, 1)
    assert tuple(feats.shape[-2:]) == (14, 14)
    assert len(trunk.stages()) == 4
    assert len(trunk.shard_units()) == 3 + 4 + 6 + 3
    assert trunk.shard_units()[0] is trunk.layer1[0]


def test_norm_layer_names():
    with torch.device("meta"):
        gn = ResNet(depth=18, norm_layer="GroupNorm")
        ln = ResNet(depth=18, norm_layer="LayerNorm")
    assert isinstance(gn.bn1, nn.GroupNorm) and gn.bn1.num_groups == 32
    assert isinstance(ln.layer1[0].bn1, nn.GroupNorm) and ln.layer1[0].bn1.num_groups == 1


@pytest.mark.parametrize("depth", sorted(RESNET_LAYERS))
@pytest.mark.parametrize("width", [1, 3])
def test_feature_dim_is_the_pooled_output(depth, width):
    """feature_dim (which the config inference and checkpoint readers use) = the channels a forward returns."""
    with torch.device("meta"):
        trunk = ResNet(depth=depth, width_multiplier=width)
        out = trunk(torch.empty(2, 3, 32, 32))
    assert feature_dim(depth, width) == trunk.num_features == out.shape[1]
    assert feature_dim(depth, width) == (512 if depth in (18, 34) else 2048) * width  # spec 3.1's table


# ----------------------------------------------------------------------------------------------- heads
def test_simclr_head_structure_and_names():
    heads = build_heads(SIMCLR_HEAD)
    assert len(heads) == 2
    assert [type(m) for m in heads[0].clf] == [nn.Linear, nn.ReLU]
    assert [type(m) for m in heads[1].clf] == [nn.Linear]
    names = [n for n, _ in heads.named_parameters()]
    assert names == ["0.clf.0.weight", "0.clf.0.bias", "1.clf.0.weight", "1.clf.0.bias"]
    assert _numel(heads) == 4_458_624  # spec 3.1


def test_bn_head_structure():
    heads = build_heads([["mlp", {"dims": [16, 16], "use_relu": True, "use_bn": True, "use_bias": False,
                                  "skip_last_layer_relu_bn": False}],
                         ["mlp", {"dims": [16, 8], "use_bias": False}]], batchnorm_eps=1e-3,
                        batchnorm_momentum=0.01)
    assert [type(m) for m in heads[0].clf] == [nn.Linear, nn.BatchNorm1d, nn.ReLU]
    assert heads[0].clf[0].bias is None
    assert heads[0].clf[1].eps == 1e-3 and heads[0].clf[1].momentum == 0.01
    mlp = MLP([4, 5, 6, 3], use_bn=True, use_relu=True, use_dropout=True)
    assert [type(m) for m in mlp.clf] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout,
                                          nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout, nn.Linear]
    assert mlp.clf[3].p == 0.5


def test_mlp_forward_matches_functional_reference():
    mlp = MLP([6, 5, 3], use_relu=True)
    x = torch.randn(4, 6)
    w0, b0, w1, b1 = mlp.clf[0].weight, mlp.clf[0].bias, mlp.clf[2].weight, mlp.clf[2].bias
    ref = F.relu(x @ w0.T + b0) @ w1.T + b1
    # fp32, 6- and 5-term dot products: addmm vs matmul + add round <~ 6 u |terms| apart (~1e-6 at |x| ~ 3)
    torch.testing.assert_close(mlp(x), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mlp(x[:, :, None, None]), ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[N, C, 1, 1\]"):
        mlp(torch.randn(4, 6, 2, 2))


def test_composite_head_and_errors():
    heads = build_heads([[["mlp", {"dims": [8, 8], "use_relu": True}], ["mlp", {"dims": [8, 4]}]]])
    assert len(heads) == 1 and isinstance(heads[0], nn.Sequential)
    assert "0.1.clf.0.weight" in dict(heads.named_parameters())
    with pytest.raises(ValueError, match="'swav_head'.*mlp"):
        build_heads([["swav_head", {"dims": [8, 4]}]])
    with pytest.raises(ValueError, match="use_gelu"):
        build_heads([["mlp", {"dims": [8, 4], "use_gelu": True}]])
    with pytest.raises(ValueError):
        build_heads(["mlp"])


def test_params_multiplier_and_seed():
    a = build_heads([["mlp", {"dims": [8, 4]}]], init_seed=3)
    b = build_heads([["mlp", {"dims": [8, 4]}]], init_seed=3, params_multiplier=2.0)
    torch.testing.assert_close(b[0].clf[0].weight, 2 * a[0].clf[0].weight, rtol=0, atol=0)  # x2 is exact
    torch.testing.assert_close(b[0].clf[0].bias, 2 * a[0].clf[0].bias, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------- SimCLRModel
def _small_model():
    torch.manual_seed(0)
    return SimCLRModel(ResNet(depth=18), build_heads([["mlp", {"dims": [512, 32], "use_relu": True,
                                                                "skip_last_layer_relu_bn": False}],
                                                       ["mlp", {"dims": [32, 16]}]]))


def test_simclr_model_names_and_forward():
    model = _small_model().eval()
    names = dict(model.named_parameters())
    assert "trunk.conv1.weight" in names and "heads.0.clf.0.weight" in names and "heads.1.clf.0.bias" in names
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model.heads[1].clf[0](F.relu(model.heads[0].clf[0](model.trunk(x))))
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)  # the same ops on the same tensors: identical
        torch.testing.assert_close(model.trunk_features(x), model.trunk(x), rtol=0, atol=0)
    assert model(x).shape == (3, 16)


def test_multicrop_forward_order_and_grouping():
    model = _small_model().eval()
    B = 2
    crops = [torch.randn(B, 3, 48, 48) for _ in range(2)] + [torch.randn(B, 3, 32, 32) for _ in range(4)]
    calls = []
    handle = model.trunk.register_forward_hook(lambda m, inp, out: calls.append(tuple(inp[0].shape)))
    with torch.no_grad():
        out = model(crops)
        handle.remove()
        # reference: every crop on its own (eval-mode BN, so batch composition does not matter)
        ref = torch.cat([model(c) for c in crops], dim=0)
    assert calls == [(2 * B, 3, 48, 48), (4 * B, 3, 32, 32)]  # one trunk pass per resolution group
    assert out.shape == (6 * B, 16)
    # eval mode, the same weights: a batch of 4 or 8 vs 2 may select other conv kernels (other summation
    # orders): ~20 layers x sqrt(K <= 4608) u ~ 8e-5 relative as a worst-case random walk; measured 5e-7 of the
    # output's max (0.46) on the native, AVX2 and default ATen kernels. 1e-5: 20x the measured, inside the bound.
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_multicrop_train_mode_batch_stats_per_group():
    """In train mode BN statistics are shared within a resolution group (VISSL multi_res_input_forward)."""
    model = _small_model().train()
    crops = [torch.randn(2, 3, 32, 32) for _ in range(3)]
    out = model(crops)
    ref = model(torch.cat(crops))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # one group = the concatenated batch: the same ops


@pytest.mark.parametrize("unit", ["block", "stage", "layer"])
def test_shard_units(unit):
    """The units the FSDP engine wraps (distributed.parallelize reads the model's names for them)."""
    from scaleclr.distributed.parallelize import shard_units

    model = _small_model()
    if unit == "layer":
        with pytest.raises(ValueError, match="SHARD_UNIT='layer'; allowed: block, stage"):
            shard_units(model, unit)
        return
    units = shard_units(model, unit)
    trunk = model.trunk
    expected = [trunk.layer1[0], trunk.layer1[1]] if unit == "block" else [trunk.layer1]
    assert len(units) == (8 if unit == "block" else 4) + 2
    assert units[:len(expected)] == expected and units[-2:] == list(model.heads)


def test_model_code_never_imports_torch_distributed():
    root = pathlib.Path(__file__).resolve().parents[1] / "scaleclr" / "models"
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            assert not any(m.startswith("torch.distributed") for m in mods), path


def test_build_heads_accepts_omegaconf():
    omegaconf = pytest.importorskip("omegaconf")
    heads = build_heads(omegaconf.OmegaConf.create(SIMCLR_HEAD))
    assert [type(m) for m in heads[0].clf] == [nn.Linear, nn.ReLU] and heads[1].clf[0].out_features == 128
