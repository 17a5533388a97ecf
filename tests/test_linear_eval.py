"""Linear evaluation (frozen trunk + classifier) through the one Trainer: CPU, gloo.

Data: ``quick_linear_eval`` (labelled synthetic images, the full protocol: augmented images through the frozen
trunk every step) for most tests, in this process or a 2-process gloo job; the demo config itself
(``demo_digits_linear``, the digit scans, precomputed features) through ``train.py``'s launchers.

Covered: exact top-k counts (crafted logits; uneven, padded shards for 1-4 ranks); the trunk is really frozen
(parameters and BatchNorm buffers bit-identical, no gradients, not in the optimizer); 2 processes == 1 process step
for step and test phase for test phase (DDP full protocol in a gloo job and through train.py's spawn launcher,
precomputed features with sharded extraction; the demo config through spawn and torchrun, and DeepSpeed ZeRO 0/2/3,
in the slow set); FSDP2 with a frozen trunk ==
DDP; stop + resume == uninterrupted; TEST_ONLY reproduces the final test phase; WEIGHTS_INIT loads the trunk only
(or the classifier too with EVAL_TRUNK_AND_HEAD); a linear-evaluation checkpoint exports to torchvision and loads
with strict=True with the same logits (ResNet-18 BatchNorm + Linear from a real run, ResNet-50 plain Linear,
non-affine BatchNorm). The ImageNet configs' values, catalog paths in --dry-run and config errors:
``tests/test_linear_eval_config.py``. The demo figure (linear top-1 after pretraining beats the same protocol
at initialisation) is the slow ``test_demo_linear_eval_beats_its_init_figure`` and what ``make train`` prints.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import numerics as nm
from dist_helpers import free_port, run_distributed
from linear_eval_helpers import DEMO_CFG, ENV, PRECOMPUTED, VISSL_CFG, make_trainer, phases_of, quick, records, run
from train_helpers import assert_states_close, final_state, step_losses

ROOT = Path(__file__).resolve().parents[1]

def train_recording(overrides, rank=0, world=1, checkpoints=True):
    """Train in this process; returns (results, per-step losses averaged over ranks, trainer)."""
    from scaleclr.distributed.collectives import all_reduce_sum

    tr = make_trainer(overrides, rank, world)
    if not checkpoints:
        tr.save_checkpoint = lambda *a, **k: None
    losses, step = [], tr.train_step

    def recording(batch, data_time):
        loss = step(batch, data_time)
        losses.append(float(all_reduce_sum(loss.detach())) / tr.world_size)
        return loss

    tr.train_step = recording
    return tr.train(), losses, tr


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """Reference, in this process: 1 process x 16 images, 2 epochs x 4 steps, test phases on 45 images."""
    out = tmp_path_factory.mktemp("linear_single")
    results, losses, _ = train_recording(quick(out, "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=True"))
    return out, results, losses


def initial_state():
    """The model every run of the quick linear-evaluation config starts from (seeded by SEED_VALUE)."""
    from scaleclr.builders import build_model
    from scaleclr.config import load_config

    model = build_model(load_config(quick("unused"))[0].config)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_close_runs(label, got_losses, ref_losses, got_state=None, ref_state=None):
    """Two runs that differ only in reduction order (process count, engine): every step's loss within
    ``numerics.loss_floor`` (the quick config's forward; the classifier's cross-entropy has unscaled logits where
    InfoNCE's are scaled by 1/T = 10, so the floor is generous here) and the final state within
    ``numerics.UPDATE_NOISE_FLOOR`` of the update (``update_error``; the frozen trunk must stay within its rounding
    floor). The trained classifier (BatchNorm + Linear) has no ReLU, so no branch flips separate the runs."""
    got_losses, ref_losses = dict(got_losses), dict(ref_losses)
    assert got_losses.keys() == ref_losses.keys(), label
    checks = [nm.Check(label, f"step-{s} loss |diff|", abs(got_losses[s] - ref_losses[s]), nm.loss_floor(r, s),
                       "same steps, another reduction order") for s, r in ref_losses.items()]
    if ref_state is not None:
        err = nm.update_error(got_state, ref_state, initial_state(), len(ref_losses))
        checks.append(nm.Check(label, f"update error ({err.name})", err.value, nm.UPDATE_NOISE_FLOOR,
                               "rounding of the norms, no ReLU in the classifier"))
    nm.assert_ok(checks)


def by_step(losses):
    """A list of per-step losses as ``{step: loss}`` (steps from 1)."""
    return dict(enumerate(losses, 1))


# ------------------------------------------------------------------------------------------- top-k counts
def test_topk_counts_exact_on_crafted_logits():
    from scaleclr.eval.linear import topk_correct

    logits = torch.tensor([[0.1, 0.9, 0.0, 0.3],    # target 1: top-1
                           [0.8, 0.1, 0.7, 0.2],    # target 2: 2nd
                           [0.1, 0.2, 0.3, 0.4],    # target 0: 4th
                           [0.5, 0.6, 0.7, 0.1]])   # target 0: 3rd
    targets = torch.tensor([1, 2, 0, 0])
    assert topk_correct(logits, targets, [1, 2, 3, 4]).tolist() == [1, 2, 3, 4]
    valid = torch.tensor([True, False, True, True])
    assert topk_correct(logits, targets, [1, 2, 3], valid).tolist() == [1, 1, 2]
    with pytest.raises(ValueError, match="top-k values"):
        topk_correct(logits, targets, [5])


@pytest.mark.parametrize("world,batch", [(1, 3), (2, 2), (3, 2), (4, 1)])
def test_sharded_topk_counts_every_image_once(world, batch):
    """11 images over `world` ranks with padded last global batches: summed counts == the direct count."""
    from scaleclr.data.sampler import ShardedSampler
    from scaleclr.eval.linear import evaluate_topk, topk_correct

    gen = torch.Generator().manual_seed(0)
    n, classes = 11, 6
    logits = torch.randn(n, classes, generator=gen)
    labels = torch.randint(0, classes, (n,), generator=gen)
    data = torch.utils.data.TensorDataset(torch.arange(n), labels)
    total = torch.zeros(3, dtype=torch.float64)
    seen = []
    for rank in range(world):
        sampler = ShardedSampler(n, world, rank, shuffle=False, drop_last=False, batch_size=batch)
        loader = torch.utils.data.DataLoader(data, batch_size=batch, sampler=sampler)
        seen += list(sampler)
        total += evaluate_topk(lambda idx: logits[idx], loader, sampler, [1, 3], torch.device("cpu"))
    assert len(seen) == -(-n // (world * batch)) * world * batch > n  # the last global batch was padded
    assert total[0].item() == n
    assert total[1:].tolist() == topk_correct(logits, labels, [1, 3]).tolist()


# ------------------------------------------------------------------------------------------ frozen trunk
def test_trunk_is_frozen_and_only_the_classifier_trains(tmp_path):
    tr = make_trainer(quick(tmp_path, "config.OPTIMIZER.num_epochs=1", "config.TEST_MODEL=False"))
    model = tr.engine.module
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimised = {id(p) for g in tr.engine.optimizer.param_groups for p in g["params"]}
    assert optimised == {id(p) for p in model.heads.parameters()}
    assert not any(p.requires_grad for p in model.trunk.parameters())
    tr.train()
    after = model.state_dict()
    for k in before:
        if k.startswith("trunk."):
            assert torch.equal(before[k], after[k]), k  # weights, running_mean/var and num_batches_tracked
    assert all(p.grad is None for p in model.trunk.parameters())
    assert not model.trunk.training and model.heads.training
    changed = [k for k in before if k.startswith("heads.") and not torch.equal(before[k], after[k])]
    assert set(changed) == {"heads.0.channel_bn.weight", "heads.0.channel_bn.bias", "heads.0.channel_bn.running_mean",
                            "heads.0.channel_bn.running_var", "heads.0.channel_bn.num_batches_tracked",
                            "heads.0.clf.clf.0.weight", "heads.0.clf.clf.0.bias"}


def test_linear_eval_checkpoint_holds_trunk_and_classifier(single_run):
    single_run, _, _ = single_run
    state = final_state(single_run)
    heads = sorted(k for k in state["model"] if k.startswith("heads."))
    assert heads == ["heads.0.channel_bn.bias", "heads.0.channel_bn.num_batches_tracked",
                     "heads.0.channel_bn.running_mean", "heads.0.channel_bn.running_var", "heads.0.channel_bn.weight",
                     "heads.0.clf.clf.0.bias", "heads.0.clf.clf.0.weight"]
    assert state["model"]["heads.0.clf.clf.0.weight"].shape == (10, 512)
    assert state["client_state"]["train_state"] == {"epochs_done": 2, "step": 8, "step_in_epoch": 0}
    # a test phase after each epoch, in metrics.jsonl and TensorBoard
    assert [t[0] for t in phases_of(single_run)] == [4, 8] and all(t[3] == 45 for t in phases_of(single_run))
    assert any(f.startswith("events") for f in os.listdir(single_run / "tb"))


# --------------------------------------------------------------------------------- processes and resume
DEMO_SHORT = ("config.OPTIMIZER.num_epochs=2", "config.TEST_EVERY_NUM_EPOCH=1", "config.LOG_FREQUENCY=1")
DEMO_TWO = ("config.DISTRIBUTED.NUM_PROC_PER_NODE=2", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=32",
            "config.DATA.TEST.BATCHSIZE_PER_REPLICA=64")


@pytest.mark.dist
def test_two_processes_equal_one_process_spawn(single_run, tmp_path):
    """train.py's spawn launcher: 2 processes x 8 images == 1 x 16 (the in-process reference), step for step and
    test phase for test phase (45 test images: a padded last batch)."""
    ref_dir, _, _ = single_run
    run(tmp_path, "config.DISTRIBUTED.NUM_PROC_PER_NODE=2", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
        "config.DATA.TEST.BATCHSIZE_PER_REPLICA=8")
    ref, got = step_losses(ref_dir), step_losses(tmp_path)
    assert got.keys() == ref.keys() == set(range(1, 9))
    assert phases_of(tmp_path) == phases_of(ref_dir)
    got_state = final_state(tmp_path)
    assert got_state["client_state"]["world_size"] == 2
    assert_close_runs("spawn 2x8 vs 1x16", got, ref, got_state["model"], final_state(ref_dir)["model"])


@pytest.fixture(scope="module")
def demo_one(tmp_path_factory):
    """The demo config through train.py, 1 process, 2 epochs (precomputed features of the 1437 + 360 scans)."""
    out = tmp_path_factory.mktemp("demo_one")
    r = run(out, *DEMO_SHORT, config=DEMO_CFG)
    assert "linear evaluation on config.DATA.TEST (360 images): top-1" in r.stdout
    return out


@pytest.mark.slow  # the 2-process code is covered by test_two_processes_equal_one_process_spawn (synthetic data)
@pytest.mark.dist
@pytest.mark.parametrize("launcher", ["spawn", "torchrun"])
def test_demo_two_processes_equal_one_process(demo_one, launcher, tmp_path):
    """The demo config itself, 2 processes x 32 images == 1 x 64, through train.py's spawn launcher and torchrun."""
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()))
    run(tmp_path, *DEMO_SHORT, *DEMO_TWO, config=DEMO_CFG, launcher=torchrun if launcher == "torchrun" else ())
    ref, got = step_losses(demo_one), step_losses(tmp_path)
    assert len(ref) == 44
    assert_close_runs(f"demo {launcher} 2x32 vs 1x64", got, ref)
    assert phases_of(tmp_path) == phases_of(demo_one)
    assert final_state(tmp_path)["client_state"]["world_size"] == 2


def test_resume_mid_epoch_equals_uninterrupted(single_run, tmp_path):
    ref_dir, _, _ = single_run
    cut_dir = tmp_path / "cut"
    make_trainer(quick(cut_dir, "config.TRAINER.MAX_ITERATIONS=3")).train()  # stops mid-epoch 0
    assert (cut_dir / "model_iteration3.torch").exists() and not records(cut_dir, "linear_top1")
    make_trainer(quick(cut_dir)).train()  # AUTO_RESUME from iteration 3
    ref, got = step_losses(ref_dir), step_losses(cut_dir)
    assert got == ref  # same process count, same kernels: the resumed run repeats the uninterrupted one exactly
    assert phases_of(cut_dir) == phases_of(ref_dir)
    assert_states_close(final_state(cut_dir)["model"], final_state(ref_dir)["model"])


def test_test_only_reproduces_the_final_test_phase(single_run, tmp_path):
    single_run, _, _ = single_run
    ckpt = single_run / "model_final_checkpoint_phase1.torch"
    tr = make_trainer(quick(tmp_path, "config.TEST_ONLY=True", f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={ckpt}",
                            "config.MODEL.FEATURE_EVAL_SETTINGS.EVAL_TRUNK_AND_HEAD=True"))
    got = tr.train()
    last = phases_of(single_run)[-1]
    assert (got["linear_top1"], got["linear_top5"], got["test_images"]) == last[1:]
    assert tr.state.step == 0 and not [f for f in os.listdir(tmp_path) if f.startswith("model_")]


def _steady_state_counts(tr, steps=2):
    """Host reads and collectives per training step after a warm-up step (tests/test_hot_path.py's counters)."""
    from hot_path_helpers import counting

    tr.sampler.set_epoch(0)
    tr.dataset.set_epoch(0)
    it = iter(tr.loader)
    batches = [next(it) for _ in range(steps + 1)]
    tr.train_step(batches[0], 0.0)
    with counting() as counts:
        for b in batches[1:]:
            tr.train_step(b, 0.0)
    return {k: v / steps for k, v in counts.items()}


def _engines_and_precompute(rank, world, out):
    """2-process job: DDP and FSDP2 with the frozen trunk (full protocol), precomputed features, and the step's host
    reads and collectives."""
    results = {"hot": {}}
    for name, extra in (("ddp", []), ("precomputed", PRECOMPUTED)):
        tr = make_trainer(quick(f"{out}/hot_{name}", f"config.DISTRIBUTED.NUM_PROC_PER_NODE={world}",
                                "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8", "config.LOG_FREQUENCY=1000", *extra),
                          rank, world)
        if name == "precomputed":
            tr.task.start(tr.engine)  # extracts the features (collective), as train() does
        results["hot"][name] = _steady_state_counts(tr)
    for name, extra in (("ddp", []), ("fsdp", ["config.DISTRIBUTED.ENGINE=fsdp"]), ("precomputed", PRECOMPUTED)):
        res, losses, tr = train_recording(quick(f"{out}/{name}", f"config.DISTRIBUTED.NUM_PROC_PER_NODE={world}",
                                                "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
                                                "config.DATA.TEST.BATCHSIZE_PER_REPLICA=8", *extra), rank, world,
                                          checkpoints=False)
        results[name] = {"losses": losses, "phases": (res["linear_top1"], res["linear_top5"]),
                         "state": tr.engine.full_state_dict(),
                         "trunk_frozen": not any(p.requires_grad for p in tr.engine.module.trunk.parameters())}
    return results


@pytest.mark.dist
def test_two_processes_ddp_fsdp_and_precomputed_equal_one_process(single_run, tmp_path):
    """2 processes x 8 images == 1 x 16 with the full protocol (DDP; 45 test images: a padded last batch); FSDP2 with
    a frozen trunk == DDP (the trunk unchanged); precomputed features on 2 processes (sharded extraction +
    all-gather) == 1 process."""
    single_dir, single_res, single_losses = single_run
    pre_res, pre_losses, _ = train_recording(quick(tmp_path / "ref_pre", *PRECOMPUTED), checkpoints=False)
    r0, _ = run_distributed(_engines_and_precompute, 2, str(tmp_path))
    ddp, fsdp, pre = r0["ddp"], r0["fsdp"], r0["precomputed"]
    assert_close_runs("ddp 2x8 vs 1x16", by_step(ddp["losses"]), by_step(single_losses), ddp["state"],
                      final_state(single_dir)["model"])
    assert ddp["phases"] == (single_res["linear_top1"], single_res["linear_top5"])
    assert_close_runs("fsdp vs ddp", by_step(fsdp["losses"]), by_step(ddp["losses"]), fsdp["state"], ddp["state"])
    assert fsdp["phases"] == ddp["phases"]
    init_state = initial_state()
    for k, v in fsdp["state"].items():
        if k.startswith("trunk."):
            assert torch.equal(v, init_state[k]), k
    assert fsdp["trunk_frozen"] and ddp["trunk_frozen"]
    assert_close_runs("precomputed 2x8 vs 1x16", by_step(pre["losses"]), by_step(pre_losses))
    assert pre["phases"] == (pre_res["linear_top1"], pre_res["linear_top5"])
    # the step reads nothing on the host; its only collective is the classifier's SyncBN forward all-gather (its
    # backward all-reduce is for the input gradient, which the frozen trunk's features do not need; DDP's gradient
    # all-reduce runs in its C++ reducer, not counted)
    for case, counts in r0["hot"].items():
        assert {k: v for k, v in counts.items() if k.startswith("Tensor.")} == {}, (case, counts)
        assert counts == {"dist.all_gather_single": 1.0} or counts == {"dist.all_gather_into_tensor": 1.0}, counts


def _extract(rank, world, folder, n=13, b=3, f=5):
    """Identity 'features' of n rows [i, i+.1, ...] through each rank's padded shard; counts the gathered rows."""
    import scaleclr.eval.linear as lin
    from scaleclr.data.sampler import ShardedSampler

    sampler = ShardedSampler(n, world, rank, shuffle=False, drop_last=False, batch_size=b)
    rows = torch.arange(n, dtype=torch.float32)[:, None] + torch.arange(f) / 10
    order = torch.tensor(list(sampler))
    loader = [(rows[order[k:k + b]], order[k:k + b]) for k in range(0, len(order), b)]  # label = dataset index
    gathered, real = [], lin._all_gather
    lin._all_gather = lambda x: gathered.append(x.numel() * world) or real(x)
    path = os.path.join(folder, f"w{world}.node0.f32")  # one node: both ranks share the file
    feats, labels = lin.extract_sharded_features(lambda x: x, loader, sampler, torch.device("cpu"), path=path)
    return {"feats": feats.clone(), "labels": labels.clone(), "file": feats.untyped_storage().filename,
            "largest_gather": max(gathered), "expected": rows}


@pytest.mark.dist
def test_precomputed_features_are_file_backed_and_gathered_a_step_at_a_time(tmp_path):
    """1 process == 2 processes (13 rows, batches of 3: a padded last global batch), the [N, F] matrix lives in the
    node's file (page cache shared by its ranks, no private N x F copy per rank), and no collective carries more
    than one global batch (G x F values, not N x F)."""
    one = _extract(0, 1, str(tmp_path))
    two = run_distributed(_extract, 2, str(tmp_path))
    for r in [one, *two]:
        assert torch.equal(r["feats"], r["expected"]) and torch.equal(r["labels"], torch.arange(13))
    assert two[0]["file"] == two[1]["file"] == str(tmp_path / "w2.node0.f32")
    assert os.path.getsize(two[0]["file"]) == 13 * 5 * 4
    assert one["largest_gather"] == 3 * 5 and two[0]["largest_gather"] == 2 * 3 * 5  # G x F; N x F would be 65


# ------------------------------------------------------------------------------------- export to torchvision
def _export_and_compare(ckpt, tv_ctor, model, tmp_path, num_classes=10):
    import torchvision

    from scaleclr.export import export

    out = tmp_path / "tv.pth"
    assert "fc from the linear-evaluation classifier" in export(str(ckpt), str(out), "torchvision")
    tv = getattr(torchvision.models, tv_ctor)(num_classes=num_classes)
    tv.load_state_dict(torch.load(out, weights_only=True), strict=True)
    tv.eval()
    model.eval()
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(tv(x), model(x), rtol=1e-4, atol=1e-5)


def test_export_linear_eval_checkpoint_to_torchvision_strict(single_run, tmp_path):
    """The trained run's checkpoint (ResNet-18, BatchNorm + Linear folded into fc) -> torchvision resnet18."""
    from scaleclr.builders import build_model
    from scaleclr.config import load_config

    single_run, _, _ = single_run
    ckpt = single_run / "model_final_checkpoint_phase1.torch"
    root, _ = load_config(quick(tmp_path))
    model = build_model(root.config)
    model.load_state_dict(torch.load(ckpt, weights_only=True)["model"])
    _export_and_compare(ckpt, "resnet18", model, tmp_path)


@pytest.mark.parametrize("depth,head,arch", [
    (50, '[["mlp", {"dims": [2048, 7]}]]', "resnet50"),
    (18, '[["eval_mlp", {"in_channels": 512, "dims": [512, 7], "affine": False}]]', "resnet18")])
def test_export_plain_and_non_affine_classifiers_to_torchvision_strict(depth, head, arch, tmp_path):
    """ResNet-50 with SimCLR's plain Linear; a non-affine BatchNorm + Linear (mmselfsup's head); random BN
    statistics everywhere so that the folding is exercised."""
    from scaleclr.builders import build_model
    from scaleclr.config import load_config
    from scaleclr.io import atomic_torch_save

    root, _ = load_config([VISSL_CFG, f"config.MODEL.TRUNK.RESNETS.DEPTH={depth}", f"config.MODEL.HEAD.PARAMS={head}"])
    model = build_model(root.config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    ckpt = tmp_path / "model_final_checkpoint_phase0.torch"
    atomic_torch_save({"engine": "ddp", "model": model.state_dict(), "optimizer": {}, "client_state": {}}, str(ckpt))
    _export_and_compare(ckpt, arch, model, tmp_path, num_classes=7)


# --------------------------------------------------------------------------------------- initialisation
def test_classifier_init_from_any_checkpoint_loads_the_trunk_only(single_run, tmp_path):
    """PARAMS_FILE = a linear-eval checkpoint: the trunk is loaded, the classifier is new (unless
    EVAL_TRUNK_AND_HEAD)."""
    from scaleclr.builders import build_model
    from scaleclr.config import load_config

    single_run, _, _ = single_run
    ckpt = single_run / "model_final_checkpoint_phase1.torch"
    saved = torch.load(ckpt, weights_only=True)["model"]
    for both, heads_equal in ((False, False), (True, True)):
        root, _ = load_config(quick(tmp_path, f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={ckpt}",
                                    f"config.MODEL.FEATURE_EVAL_SETTINGS.EVAL_TRUNK_AND_HEAD={both}"))
        state = build_model(root.config).state_dict()
        assert torch.equal(state["trunk.layer4.1.bn2.running_var"], saved["trunk.layer4.1.bn2.running_var"])
        assert torch.equal(state["heads.0.clf.clf.0.weight"], saved["heads.0.clf.clf.0.weight"]) == heads_equal


# ------------------------------------------------------------------------------------------- the demo figure
@pytest.mark.slow
def test_demo_linear_eval_beats_its_init_figure(tmp_path):
    """make train's claim: config=quickstart's pretraining (15 epochs, several minutes on 2 cores), then the demo
    protocol (precomputed features) on its trunk and on the trunk at initialisation: pretraining must help. (3
    epochs of pretraining do not: 93.06 % vs 94.17 % at initialisation, measured.)"""
    pre = tmp_path / "pre"
    subprocess.run([sys.executable, str(ROOT / "train.py"), "config=quickstart", f"config.CHECKPOINT.DIR={pre}",
                    "config.KNN_EVAL.ENABLED=False", "config.ONLINE_LINEAR_PROBE.ENABLED=False"], check=True, cwd=ROOT,
                   env=ENV, capture_output=True, timeout=3600)
    run(tmp_path / "lin", f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={pre}/model_final_checkpoint_phase14.torch",
        config=DEMO_CFG)
    run(tmp_path / "init", config=DEMO_CFG)
    after, init = phases_of(tmp_path / "lin")[-1][1], phases_of(tmp_path / "init")[-1][1]
    assert after > init, (after, init)


def _deepspeed_stages(rank, world, out):
    results = {}
    for stage in (0, 2, 3):
        res, losses, tr = train_recording(quick(f"{out}/z{stage}", f"config.DISTRIBUTED.NUM_PROC_PER_NODE={world}",
                                                "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
                                                "config.DATA.TEST.BATCHSIZE_PER_REPLICA=8",
                                                "config.DISTRIBUTED.ENGINE=deepspeed",
                                                f"config.DISTRIBUTED.DEEPSPEED_CONFIG=ds_configs/zero{stage}.json"),
                                          rank, world)
        results[stage] = {"losses": losses, "phases": (res["linear_top1"], res["linear_top5"]),
                          "state": tr.engine.full_state_dict()}
    return results


@pytest.mark.slow  # ~75 s; the engine code is the pretraining one (test_deepspeed_engine), the task's is covered above
@pytest.mark.deepspeed
@pytest.mark.dist
def test_deepspeed_zero_stages_with_a_frozen_trunk_equal_one_process(single_run, tmp_path):
    """ZeRO 0/2/3 hold only the classifier in the optimizer (ZeRO-3 also partitions the frozen trunk): same losses,
    test phases and weights as 1 process (DDP)."""
    pytest.importorskip("deepspeed")
    single_dir, single_res, single_losses = single_run
    r0, _ = run_distributed(_deepspeed_stages, 2, str(tmp_path))
    ref_state = final_state(single_dir)["model"]
    for stage, got in r0.items():
        assert_close_runs(f"zero{stage} vs 1 process", by_step(got["losses"]), by_step(single_losses), got["state"],
                          ref_state)
        assert got["phases"] == (single_res["linear_top1"], single_res["linear_top5"]), stage
