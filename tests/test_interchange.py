"""Export (``python -m scaleclr.export``) and import (``config.MODEL.WEIGHTS_INIT``) of scaleclr, torchvision and
VISSL weights. Nothing is downloaded: torchvision files come from ``torchvision.models.resnet18/50()`` built here,
VISSL files from ``to_vissl`` or the fabricator of ``/work/shared/spec/vissl_checkpoints.md`` section 4, and the
engine checkpoints (DDP file, FSDP2 DCP directory, DeepSpeed ZeRO-2 directory) from one 2-process gloo job of real
Trainers (quick synthetic config, ResNet-18, 1 step each).

Features are compared on a fixed batch in eval mode (BN running statistics): exported -> torchvision within 1e-6
(fp32 features |f| <~ 4 of bit-identical weights through the same ops; 1e-6 = ~4 roundings of 2.4e-7, for
kernels that torch picks per memory layout of the converted tensors), exported -> imported into scaleclr
bit-identical (the same module, the same tensors).
"""
import argparse
import functools
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from dist_helpers import run_distributed

from scaleclr.export import main as export_main
from scaleclr.interchange import formats, init_model_from_weights, read_checkpoint
from scaleclr.models import MLP, ResNet, SimCLRModel, build_heads

ROOT = Path(__file__).resolve().parents[1]
QUICK = "config=test/integration_test/quick_simclr_synthetic"
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
ENGINES = ["ddp", "fsdp"] + (["deepspeed"] if HAS_DEEPSPEED else [])
ENGINE_OVERRIDES = {"ddp": [], "fsdp": [],
                    "deepspeed": ["config.DISTRIBUTED.DEEPSPEED_CONFIG=ds_configs/zero2.json"]}
SIMCLR_HEADS = [["mlp", {"dims": [2048, 2048], "use_relu": True, "skip_last_layer_relu_bn": False}],
                ["mlp", {"dims": [2048, 128]}]]
LOG = "scaleclr.interchange.weights_init"


def batch(size=32):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(123))


@functools.lru_cache(maxsize=None)
def _quick_config(seed):
    from scaleclr.config import load_config

    return load_config([QUICK, f"config.SEED_VALUE={seed}"])[0]


def quick_model(seed=0):
    """The quick config's SimCLRModel (ResNet-18, heads 512-512-128), eval mode, initialised from ``seed``."""
    from scaleclr import builders

    return builders.build_model(_quick_config(seed).config).eval()


def randomize_bn(model, seed=0):
    """Non-trivial running statistics and affine parameters, so eval-mode features depend on them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.num_batches_tracked.fill_(7)
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def tv_features(tv_model, x):
    """Pooled trunk features of a torchvision ResNet (its fc bypassed, the model left unchanged)."""
    fc, tv_model.fc = tv_model.fc, nn.Identity()
    try:
        with torch.no_grad():
            return tv_model.eval()(x)
    finally:
        tv_model.fc = fc


def vissl_converter(ckpt):
    """VISSL's extra_scripts/convert_vissl_to_torchvision.py (spec section 2), re-implemented."""
    if "classy_state_dict" in ckpt:
        trunk = ckpt["classy_state_dict"]["base_model"]["model"]["trunk"]
    elif "model_state_dict" in ckpt:
        trunk = ckpt["model_state_dict"]
    else:
        trunk = ckpt
    prefix = "_feature_blocks."
    return {(k.replace(prefix, "", 1) if k.startswith(prefix) else k): v for k, v in trunk.items()}


def make_fake_vissl_checkpoint(trunk_state_dict_in_torchvision_names, heads_state_dict=None, phase_idx=99,
                               legacy=False):
    """The spec's fabricator (vissl_checkpoints.md section 4), verbatim."""
    trunk = {"_feature_blocks." + k: v
             for k, v in trunk_state_dict_in_torchvision_names.items() if not k.startswith("fc.")}
    if heads_state_dict is None:
        heads_state_dict = {}
        for i, (d_in, d_out) in enumerate([(2048, 2048), (2048, 128)]):
            lin = torch.nn.Linear(d_in, d_out)
            heads_state_dict[f"{i}.clf.0.weight"] = lin.weight.detach()
            heads_state_dict[f"{i}.clf.0.bias"] = lin.bias.detach()
    base_model = {"model": {"trunk": trunk, "heads": dict(heads_state_dict)}}
    if not legacy:
        base_model["meta"] = {"trunk": {}, "heads": []}
    ckpt = {
        "phase_idx": phase_idx, "iteration": 0, "loss": {}, "iteration_num": 0,
        "train_phase_idx": phase_idx,
        "classy_state_dict": {
            "train": True, "base_model": base_model, "meters": [], "optimizer": {},
            "phase_idx": phase_idx, "train_phase_idx": phase_idx, "num_updates": 0,
            "losses": [], "hooks": {}, "loss": {},
        },
    }
    if not legacy:
        ckpt["type"] = "consolidated"
    return ckpt


def export(*args):
    return export_main([str(a) for a in args])


# ------------------------------------------------------------------------------------- engine checkpoints
def _engine_checkpoints(rank, world, base, engines):
    """One Trainer per engine (1 step, then the MAX_ITERATIONS checkpoint); rank 0 returns state + path."""
    import gc

    from scaleclr.config import load_config
    from scaleclr.trainer import Trainer

    out = {}
    for engine in engines:
        overrides = [QUICK, f"config.DISTRIBUTED.NUM_PROC_PER_NODE={world}",
                     "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=4", "config.DATA.TRAIN.DATA_LIMIT=16",
                     "config.TRAINER.MAX_ITERATIONS=1",
                     f"config.CHECKPOINT.DIR={base}/{engine}", "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=False",
                     f"config.DISTRIBUTED.ENGINE={engine}", *ENGINE_OVERRIDES[engine]]
        root, _ = load_config(overrides, world_size=world)
        tr = Trainer(root, rank=rank, world_size=world, local_rank=rank, local_world_size=world)
        tr.train()
        state = tr.engine.full_state_dict()
        if rank == 0:
            out[engine] = {"state": state, "path": tr.checkpoints.latest()["abspath"], "run_dir": f"{base}/{engine}"}
        del tr
        gc.collect()
    return out


@pytest.fixture(scope="module")
def engine_ckpts(tmp_path_factory):
    base = tmp_path_factory.mktemp("engines")
    return run_distributed(_engine_checkpoints, 2, str(base), ENGINES)[0]


@pytest.mark.dist
@pytest.mark.parametrize("engine", ENGINES)
def test_export_round_trips_for_every_engine(engine_ckpts, engine, tmp_path, caplog):
    """scaleclr -> torchvision -> scaleclr and scaleclr -> VISSL -> scaleclr: identical features; the torchvision and
    VISSL-converted files load into torchvision.models.resnet18() with only fc missing (within 1e-6)."""
    import torch.distributed as dist

    run = engine_ckpts[engine]
    path, x = run["path"], batch()
    assert os.path.isdir(path) == (engine != "ddp")
    ref = quick_model()
    ref.load_state_dict(run["state"])
    with torch.no_grad():
        ref_feats, ref_emb = ref.trunk(x), ref(x)

    ck = read_checkpoint(path)  # no process group in this process
    assert not dist.is_initialized()
    assert ck.state.keys() == run["state"].keys()
    assert all(torch.equal(ck.state[k], run["state"][k].to(ck.state[k].dtype)) for k in ck.state)
    assert all(v.dtype == torch.float32 for v in ck.state.values() if v.is_floating_point())

    # torchvision
    assert export(path, tmp_path / "r18.pth", "--format", "torchvision") == 0
    tv_sd = torch.load(tmp_path / "r18.pth", weights_only=True)
    tv = torchvision.models.resnet18()
    r = tv.load_state_dict(tv_sd, strict=False)
    assert sorted(r.missing_keys) == ["fc.bias", "fc.weight"] and not r.unexpected_keys
    torch.testing.assert_close(tv_features(tv, x), ref_feats, rtol=0, atol=1e-6)
    back = quick_model(seed=5)
    with caplog.at_level(logging.INFO, logger=LOG):
        rep = init_model_from_weights(back, str(tmp_path / "r18.pth"), state_dict_key_name="", append_prefix="trunk.")
    assert rep.format == "torchvision" and rep.loaded == {"trunk": 100, "heads": 0}
    assert rep.skipped == {"SKIP_LAYERS": 20} and rep.left_at_init == {"heads": 4, "trunk SKIP_LAYERS": 20}
    assert "loaded 100 tensors" in caplog.text and "left at initialisation 24 (heads: 4, trunk SKIP_LAYERS: 20)" \
        in caplog.text
    with torch.no_grad():
        assert torch.equal(back.trunk(x), ref_feats)

    # VISSL
    assert export(path, tmp_path / "vissl.torch", "--format", "vissl") == 0
    ckpt = torch.load(tmp_path / "vissl.torch", weights_only=True)
    assert ckpt["type"] == "consolidated" and ckpt["iteration"] == 1
    assert sorted(ckpt["classy_state_dict"]["base_model"]["model"]["heads"]) == \
        ["0.clf.0.bias", "0.clf.0.weight", "1.clf.0.bias", "1.clf.0.weight"]
    tv = torchvision.models.resnet18()
    r = tv.load_state_dict(vissl_converter(ckpt), strict=False)
    assert sorted(r.missing_keys) == ["fc.bias", "fc.weight"] and not r.unexpected_keys
    torch.testing.assert_close(tv_features(tv, x), ref_feats, rtol=0, atol=1e-6)
    back = quick_model(seed=5)
    rep = init_model_from_weights(back, str(tmp_path / "vissl.torch"))  # VISSL's default STATE_DICT_KEY_NAME
    assert rep.format == "vissl" and rep.loaded == {"trunk": 100, "heads": 4} and rep.left_at_init == \
        {"trunk SKIP_LAYERS": 20}
    with torch.no_grad():
        assert torch.equal(back.trunk(x), ref_feats) and torch.equal(back(x), ref_emb)

    # scaleclr export: weights_only, trunk_config, loads back as is (default STATE_DICT_KEY_NAME)
    assert export(path, tmp_path / "s.torch", "--format", "scaleclr") == 0
    payload = torch.load(tmp_path / "s.torch", weights_only=True)
    assert payload["format"] == "scaleclr" and payload["trunk_config"] == \
        {"depth": 18, "width_multiplier": 1, "groups": 1, "width_per_group": 64}
    ResNet(**payload["trunk_config"]).load_state_dict(payload["trunk"])
    back = quick_model(seed=5)
    init_model_from_weights(back, str(tmp_path / "s.torch"))
    with torch.no_grad():
        assert torch.equal(back(x), ref_emb)
    # the checkpoint itself (file or directory) is a valid PARAMS_FILE
    back = quick_model(seed=5)
    rep = init_model_from_weights(back, path)
    assert rep.format.startswith("scaleclr") and rep.loaded == {"trunk": 100, "heads": 4}
    with torch.no_grad():
        assert torch.equal(back(x), ref_emb)


@pytest.mark.dist
def test_cli_process_and_run_directory(engine_ckpts, tmp_path):
    """`python -m scaleclr.export` in a fresh process (an FSDP directory; the DeepSpeed one goes through the same
    main() in-process above); a run directory is refused with the latest checkpoint's name; --format scaleclr of the
    sharded engines' checkpoints holds their full state."""
    run = engine_ckpts["fsdp"]
    r = subprocess.run([sys.executable, "-m", "scaleclr.export", run["path"], str(tmp_path / "r18.pth"), "--format",
                        "torchvision"], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "torchvision.models.resnet18() state dict" in r.stdout and "4 projection-head tensors dropped" in r.stdout
    assert export(run["run_dir"], tmp_path / "x.pth", "--format", "torchvision") == 2
    with pytest.raises(ValueError, match="run directory.*model_iteration1"):
        read_checkpoint(run["run_dir"])
    # --format scaleclr of a sharded checkpoint: the unsharded fp32 model, equal to the engine's full state
    for name in ("fsdp", "deepspeed") if HAS_DEEPSPEED else ("fsdp",):
        out = tmp_path / f"{name}.torch"
        assert export(engine_ckpts[name]["path"], out, "--format", "scaleclr") == 0
        p = torch.load(out, weights_only=True)
        assert p["format"] == "scaleclr" and p["trunk_config"]["depth"] == 18
        assert all(torch.equal(p["model"][k], engine_ckpts[name]["state"][k]) for k in engine_ckpts[name]["state"])


# ------------------------------------------------------------------------------------ torchvision export
class EvalMLP(nn.Module):
    """VISSL's ``eval_mlp`` names: ``channel_bn`` then ``clf`` (an MLP whose layers are ``clf.clf``)."""

    def __init__(self, dim, num_classes, affine):
        super().__init__()
        self.channel_bn = nn.BatchNorm1d(dim, affine=affine)
        self.clf = MLP([dim, num_classes])

    def forward(self, x):
        return self.clf(self.channel_bn(x))


@pytest.mark.parametrize("classifier", ["linear", "bn_affine", "bn_non_affine"])
def test_linear_eval_checkpoint_loads_strictly_into_torchvision_resnet50(classifier, tmp_path):
    torch.manual_seed(1)
    head = MLP([2048, 1000]) if classifier == "linear" else EvalMLP(2048, 1000, affine=classifier == "bn_affine")
    model = randomize_bn(SimCLRModel(ResNet(depth=50), [head]).eval(), seed=2)
    clf = formats.classifier_of(model.state_dict())
    assert clf is not None and clf.layout == ("linear" if classifier == "linear" else "bn_linear")
    torch.save({"engine": "ddp", "model": model.state_dict()}, tmp_path / "lin.torch")
    assert export(tmp_path / "lin.torch", tmp_path / "r50.pth", "--format", "torchvision") == 0
    tv = torchvision.models.resnet50()
    tv.load_state_dict(torch.load(tmp_path / "r50.pth", weights_only=True), strict=True)
    x = batch()
    with torch.no_grad():
        got, want = tv.eval()(x), model(x)
    if classifier == "linear":
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    else:  # folded BN: the same affine map; in fp32 as accurate as BN then Linear (float64 reference)
        with torch.no_grad():
            ref64 = head.double()(model.trunk(x).double())
        head.float()
        err_fold, err_plain = (got.double() - ref64).abs().max(), (want.double() - ref64).abs().max()
        # folding changes the fp32 rounding of the affine map by at most as much as BN + Linear already round
        # (2x), or by one rounding of the output (1e-7 ~ 2u of its max)
        assert err_fold <= max(2 * err_plain, 1e-7 * ref64.abs().max()), (err_fold, err_plain)
        # the fold is exact: in float64 it equals BN_eval followed by Linear to float64 rounding
        sd = {k: v.double() if v.is_floating_point() else v for k, v in model.state_dict().items()}
        f = torch.randn(4, 2048, dtype=torch.float64)
        w, b = formats.fold_bn_into_linear(
            sd[clf.weight], sd[clf.bias], sd[clf.bn + "running_mean"], sd[clf.bn + "running_var"],
            sd.get(clf.bn + "weight"), sd.get(clf.bn + "bias"))
        head64 = head.double().eval()
        with torch.no_grad():
            torch.testing.assert_close(f @ w.T + b, head64(f), rtol=1e-12, atol=1e-12)  # float64: ~2048 u
    if classifier == "linear":  # --no-fc: trunk only, fc missing
        assert export(tmp_path / "lin.torch", tmp_path / "trunk.pth", "--format", "torchvision", "--no-fc") == 0
        assert "fc.weight" not in torch.load(tmp_path / "trunk.pth", weights_only=True)


def test_vissl_export_of_resnet50_reads_with_vissls_converter(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(SimCLRModel(ResNet(depth=50), build_heads(SIMCLR_HEADS)).eval())
    torch.save({"engine": "ddp", "model": model.state_dict()}, tmp_path / "ck.torch")
    assert export(tmp_path / "ck.torch", tmp_path / "v.torch", "--format", "vissl") == 0
    ckpt = torch.load(tmp_path / "v.torch", weights_only=True)
    assert len(ckpt["classy_state_dict"]["base_model"]["model"]["trunk"]) == 318
    tv = torchvision.models.resnet50()
    r = tv.load_state_dict(vissl_converter(ckpt), strict=False)
    assert sorted(r.missing_keys) == ["fc.bias", "fc.weight"] and not r.unexpected_keys
    x = batch()
    with torch.no_grad():
        torch.testing.assert_close(tv_features(tv, x), model.trunk(x), rtol=0, atol=1e-6)


def test_architecture_inference_and_wide_trunks_refused(tmp_path, capsys):
    cases = [(dict(depth=50), "resnet50"), (dict(depth=101), "resnet101"), (dict(depth=152), "resnet152"),
             (dict(depth=34), "resnet34"), (dict(depth=50, groups=32, width_per_group=4), "resnext50_32x4d"),
             (dict(depth=101, groups=32, width_per_group=8), "resnext101_32x8d"),
             (dict(depth=50, width_per_group=128), "wide_resnet50_2")]
    for kw, name in cases:
        with torch.device("meta"):
            sd = {"trunk." + k: v for k, v in ResNet(**kw).state_dict().items()}
            tv = getattr(torchvision.models, name)().state_dict()
        cfg = formats.infer_trunk_config(sd)
        assert cfg == {"depth": kw["depth"], "width_multiplier": 1, "groups": kw.get("groups", 1),
                       "width_per_group": kw.get("width_per_group", 64)}
        assert formats.torchvision_arch(cfg) == name
        assert {k: v.shape for k, v in formats.from_torchvision(tv).items() if k.startswith("trunk.")} == \
            {k: v.shape for k, v in sd.items()}
    # an R50-w2 file (expanded scalars: tiny on disk, real shapes)
    with torch.device("meta"):
        w2 = SimCLRModel(ResNet(depth=50, width_multiplier=2), []).state_dict()
    w2 = {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in w2.items()}
    torch.save({"engine": "ddp", "model": w2}, tmp_path / "w2.torch")
    capsys.readouterr()
    assert export(tmp_path / "w2.torch", tmp_path / "w2.pth", "--format", "torchvision") == 2
    err = capsys.readouterr().err
    assert "ResNet-50 w2" in err and "--format scaleclr" in err and not (tmp_path / "w2.pth").exists()
    assert export(tmp_path / "w2.torch", tmp_path / "w2s.torch", "--format", "scaleclr") == 0
    assert torch.load(tmp_path / "w2s.torch", weights_only=True)["trunk_config"]["width_multiplier"] == 2
    assert export(tmp_path / "missing.torch", tmp_path / "o.pth", "--format", "vissl") == 2
    assert "no such file" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------- import
@pytest.fixture(scope="module")
def r50_tv():
    torch.manual_seed(3)
    return randomize_bn(torchvision.models.resnet50(), seed=4).eval()


@pytest.mark.parametrize("variant", ["consolidated", "legacy", "feature_extractor"])
def test_vissl_model_zoo_file_imports_into_resnet50(variant, r50_tv, tmp_path, caplog):
    ckpt = make_fake_vissl_checkpoint(r50_tv.state_dict(), legacy=variant == "legacy")
    if variant == "feature_extractor":  # VISSL linear-evaluation runs: base_model._feature_blocks.*
        model_ = ckpt["classy_state_dict"]["base_model"]["model"]
        model_["trunk"] = {"base_model." + k: v for k, v in model_["trunk"].items()}
    torch.save(ckpt, tmp_path / "model_final_checkpoint_phase99.torch")
    model = SimCLRModel(ResNet(depth=50), build_heads(SIMCLR_HEADS)).eval()
    with caplog.at_level(logging.INFO, logger=LOG):
        rep = init_model_from_weights(model, str(tmp_path / "model_final_checkpoint_phase99.torch"),
                                      state_dict_key_name="classy_state_dict")
    assert rep.format == "vissl" and rep.loaded == {"trunk": 265, "heads": 4} and rep.skipped == {"SKIP_LAYERS": 53}
    assert "format vissl; loaded 269 tensors (trunk: 265, heads: 4); skipped 53 (SKIP_LAYERS: 53)" in caplog.text
    x = batch()
    with torch.no_grad():
        torch.testing.assert_close(model.trunk(x), tv_features(r50_tv, x), rtol=0, atol=1e-6)
    heads = ckpt["classy_state_dict"]["base_model"]["model"]["heads"]
    assert all(torch.equal(model.heads.state_dict()[k], v) for k, v in heads.items())


def test_torchvision_file_imports_with_vissl_and_scaleclr_prefixes(r50_tv, tmp_path, caplog):
    torch.save(r50_tv.state_dict(), tmp_path / "r50.pth")
    x = batch()
    want = tv_features(r50_tv, x)
    for prefix in ("trunk.", "trunk._feature_blocks.", "trunk.base_model._feature_blocks."):  # scaleclr, VISSL recipes
        model = SimCLRModel(ResNet(depth=50), build_heads(SIMCLR_HEADS)).eval()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=LOG):
            rep = init_model_from_weights(model, str(tmp_path / "r50.pth"), state_dict_key_name="",
                                          append_prefix=prefix)
        assert rep.format == "torchvision" and rep.loaded == {"trunk": 265, "heads": 0}
        assert rep.skipped == {"SKIP_LAYERS": 53, "torchvision fc": 2}
        assert rep.left_at_init == {"heads": 4, "trunk SKIP_LAYERS": 53}
        assert "skipped 55 (SKIP_LAYERS: 53, torchvision fc: 2); left at initialisation 57 (heads: 4, trunk " \
               "SKIP_LAYERS: 53)" in caplog.text
        with torch.no_grad():
            torch.testing.assert_close(model.trunk(x), want, rtol=0, atol=1e-6)


@pytest.fixture
def r18_files(tmp_path):
    torch.manual_seed(0)
    tv = randomize_bn(torchvision.models.resnet18())
    torch.save(tv.state_dict(), tmp_path / "r18.pth")
    return tmp_path, tv.state_dict()


def test_import_errors_name_the_keys(r18_files, caplog):
    d, sd = r18_files
    f = str(d / "r18.pth")
    # a mistyped prefix fails loudly (VISSL would leave a random trunk)
    with pytest.raises(ValueError, match=r"trunk tensor\(s\) match no model key.*trnk\.conv1\.weight.*"
                                         r"trnk\.conv1\.weight -> trunk\.conv1\.weight"):
        init_model_from_weights(quick_model(), f, state_dict_key_name="", append_prefix="trnk.")
    # forgotten prefix: the hint names APPEND_PREFIX=trunk.
    with pytest.raises(ValueError, match=r"APPEND_PREFIX=trunk\."):
        init_model_from_weights(quick_model(), f, state_dict_key_name="")
    # the default key (VISSL's classy_state_dict) on a torchvision file: says which keys to set
    with pytest.raises(ValueError, match=r"has no 'classy_state_dict': it is a torchvision file; load it with "
                                         r"config\.MODEL\.WEIGHTS_INIT\.STATE_DICT_KEY_NAME='' "
                                         r"config\.MODEL\.WEIGHTS_INIT\.APPEND_PREFIX=trunk\."):
        init_model_from_weights(quick_model(), f)
    # shape mismatch: key, file shape, model shape
    bad = dict(sd, **{"layer1.0.conv1.weight": torch.zeros(32, 64, 3, 3)})
    torch.save(bad, d / "bad.pth")
    with pytest.raises(ValueError, match=r"trunk\.layer1\.0\.conv1\.weight: file \[32, 64, 3, 3\] vs model "
                                         r"\[64, 64, 3, 3\]"):
        init_model_from_weights(quick_model(), str(d / "bad.pth"), state_dict_key_name="", append_prefix="trunk.")
    # another depth: the trunk names say so
    with torch.device("meta"):
        r50 = torchvision.models.resnet50().state_dict()
    with pytest.raises(ValueError, match=r"ResNet-50, the model's ResNet-18"):
        init_model_from_weights(quick_model(), _save(d / "r50meta.pth", {k: torch.zeros((), dtype=v.dtype).expand(
            v.shape) for k, v in r50.items()}), state_dict_key_name="", append_prefix="trunk.")
    # DDP-wrapped (module.) file
    _save(d / "ddp.pth", {"module." + k: v for k, v in sd.items()})
    with pytest.raises(ValueError, match=r"REMOVE_PREFIX=module\."):
        init_model_from_weights(quick_model(), str(d / "ddp.pth"), state_dict_key_name="", append_prefix="trunk.")
    with pytest.raises(ValueError, match=r"REMOVE_PREFIX='modul\.' matched no key.*REMOVE_PREFIX=module\."):
        init_model_from_weights(quick_model(), str(d / "ddp.pth"), state_dict_key_name="", remove_prefix="modul.",
                                append_prefix="trunk.")
    init_model_from_weights(quick_model(), str(d / "ddp.pth"), state_dict_key_name="", remove_prefix="module.",
                            append_prefix="trunk.")
    # a file with heads only: no trunk tensor loaded
    heads = {k: v for k, v in quick_model().state_dict().items() if k.startswith("heads.")}
    with pytest.raises(ValueError, match="no trunk tensor loaded"):
        init_model_from_weights(quick_model(), _save(d / "heads.torch", {"model": heads}))
    # a missing key name, a missing file
    with pytest.raises(ValueError, match=r"STATE_DICT_KEY_NAME='state_dict'.*no key 'state_dict'"):
        init_model_from_weights(quick_model(), f, state_dict_key_name="state_dict")
    with pytest.raises(ValueError, match=r"PARAMS_FILE=.*nope\.torch: no such file"):
        init_model_from_weights(quick_model(), str(d / "nope.torch"))


def _save(path, obj):
    torch.save(obj, path)
    return str(path)


def test_heads_shape_mismatch_and_trunk_only_loading(tmp_path, caplog):
    src = quick_model(seed=1)
    torch.manual_seed(0)
    other = SimCLRModel(ResNet(depth=18), build_heads([["mlp", {"dims": [512, 10]}]])).eval()  # a linear-eval model
    f = _save(tmp_path / "s.torch", {"model": src.state_dict()})
    with pytest.raises(ValueError, match=r"heads\.0\.clf\.0\.weight: file \[512, 512\] vs model \[10, 512\].*add "
                                         r"'heads' to config\.MODEL\.WEIGHTS_INIT\.SKIP_LAYERS"):
        init_model_from_weights(other, f)
    rep = init_model_from_weights(other, f, skip_layers=["num_batches_tracked", "heads"])
    assert rep.skipped == {"SKIP_LAYERS": 24} and rep.left_at_init == {"heads SKIP_LAYERS": 2,
                                                                        "trunk SKIP_LAYERS": 20}
    rep = init_model_from_weights(other, f, load_heads=False)
    assert rep.skipped == {"SKIP_LAYERS": 20, "heads (trunk only)": 2, "heads not in the model": 2}
    x = batch()
    with torch.no_grad():
        assert torch.equal(other.trunk(x), src.trunk(x))
    # prefixes are ignored (with a warning) on VISSL's classy_state_dict path, as in VISSL
    export(f, tmp_path / "v.torch", "--format", "vissl")
    with caplog.at_level(logging.WARNING, logger=LOG):
        init_model_from_weights(quick_model(seed=2), str(tmp_path / "v.torch"), append_prefix="trunk.")
    assert "are ignored with STATE_DICT_KEY_NAME=classy_state_dict" in caplog.text


def test_pickle_needing_file_is_refused_with_the_conversion_command(tmp_path, capsys):
    src = quick_model(seed=1)
    legacy = _save(tmp_path / "legacy.torch", {"model": src.state_dict(), "args": argparse.Namespace(lr=0.3)})
    with pytest.raises(ValueError, match=r"needs pickle to load.*argparse\.Namespace.*python -m scaleclr\.export "
                                         r".*legacy\.torch .*legacy_weights\.torch --format scaleclr --allow-pickle"):
        init_model_from_weights(quick_model(), legacy)
    assert export(legacy, tmp_path / "legacy_weights.torch", "--format", "scaleclr") == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert export(legacy, tmp_path / "legacy_weights.torch", "--format", "scaleclr", "--allow-pickle") == 0
    model = quick_model()
    init_model_from_weights(model, str(tmp_path / "legacy_weights.torch"))
    x = batch()
    with torch.no_grad():
        assert torch.equal(model(x), src(x))


def test_config_keys_preflight_and_builder(tmp_path):
    from scaleclr import builders
    from scaleclr.config import ConfigError, load_config

    src = quick_model(seed=1)
    export(_save(tmp_path / "s.torch", {"model": src.state_dict()}), tmp_path / "r18.pth", "--format", "torchvision")
    w = "config.MODEL.WEIGHTS_INIT"
    root, _ = load_config([QUICK, f"{w}.PARAMS_FILE={tmp_path / 'r18.pth'}", f"{w}.STATE_DICT_KEY_NAME=''",
                           f"{w}.APPEND_PREFIX=trunk."])
    assert root.config.MODEL.WEIGHTS_INIT.SKIP_LAYERS == ["num_batches_tracked"]
    model = builders.build_model(root.config).eval()
    x = batch()
    with torch.no_grad():
        assert torch.equal(model.trunk(x), src.trunk(x))
    with pytest.raises(ConfigError, match=r"config\.MODEL\.WEIGHTS_INIT\.PARAMS_FILE: .*nope\.torch.*no such file"):
        load_config([QUICK, f"{w}.PARAMS_FILE={tmp_path / 'nope.torch'}"])
