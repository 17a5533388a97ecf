"""Evaluation during pretraining: the sharded kNN (1 process == N processes), the online linear probe against a
reference classifier, the EVERY_N_EPOCHS schedule through train.py (world size and resume invariant), and the
picture of a run (``python -m scaleclr.summary RUN --plot``)."""
import json
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image

from dist_helpers import run_distributed
from train_helpers import EXIT_RESUMABLE, ROOT, finish, run_train_py, start, wait_for_step

from scaleclr.data.sampler import ShardedSampler
from scaleclr.eval import extract_shard, knn_top1
from scaleclr.eval.online import OnlineProbe


def _features(n_train=37, n_test=23, dim=8, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g)
    ytr, yte = torch.randint(0, classes, (n_train,), generator=g), torch.randint(0, classes, (n_test,), generator=g)
    return (centers[ytr] + 1.5 * torch.randn(n_train, dim, generator=g), ytr,
            centers[yte] + 1.5 * torch.randn(n_test, dim, generator=g), yte)


def _shard(x, y, rank, world, batch):
    """This rank's padded shard, as extract_shard returns it (rows of its batches, padding marked)."""
    sampler = ShardedSampler(len(y), world, rank, shuffle=False, seed=0, drop_last=False, batch_size=batch)
    order = torch.as_tensor(list(sampler))  # this rank's indices, batch after batch
    loader = [(x[idx], y[idx]) for idx in order.split(batch)]
    return extract_shard(lambda t: t, loader, sampler, torch.device("cpu"))


def _sharded_knn(rank, world, k):
    xtr, ytr, xte, yte = _features()
    tr, te = _shard(xtr, ytr, rank, world, 5), _shard(xte, yte, rank, world, 3)
    return torch.tensor(knn_top1(tr[0], tr[1], te[0], te[1], k=k, temperature=0.1, train_valid=tr[2],
                                 test_valid=te[2]), dtype=torch.float64)


@pytest.mark.dist
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_knn_equals_one_process(world):
    """Padded shards of both splits on 2 and 3 ranks give the one-process figure exactly (the same neighbours in
    the same order); the per-rank shortcut (each rank's own neighbours) does not."""
    xtr, ytr, xte, yte = _features()
    for k in (1, 5, 20):
        ref = knn_top1(xtr, ytr, xte, yte, k=k, temperature=0.1)
        got = run_distributed(_sharded_knn, world, k)
        assert [float(g) for g in got] == [ref] * world, (k, got, ref)
    # negative control, computed in one process: the mean over ranks of kNN on each rank's own training shard
    shards = [_shard(xtr, ytr, r, world, 5) for r in range(world)]
    naive = sum(knn_top1(f[v], y[v], xte, yte, k=20, temperature=0.1) for f, y, v in shards) / world
    assert naive != knn_top1(xtr, ytr, xte, yte, k=20, temperature=0.1)


def test_extract_shard_marks_padding():
    x, y = torch.arange(10.0).view(10, 1), torch.arange(10)
    # rank 1 of 2, batches of 3: global batches of 6, so 10 images -> 12 positions; rank 1 holds 3-5 and 9-11
    feats, labels, valid = _shard(x, y, 1, 2, 3)
    assert feats.shape == (6, 1) and valid.tolist() == [True] * 4 + [False, False]
    assert labels[valid].tolist() == [3, 4, 5, 9] and feats[:, 0].tolist() == [3, 4, 5, 9, 0, 1]


def _probe_rank(rank, world, feats, labels):
    probe = OnlineProbe(feats.shape[-1], 3, lr=0.5, momentum=0.9, weight_decay=1e-3, seed=7,
                        device=torch.device("cpu"))
    n = feats.shape[1] // world  # feats: [steps, rows, F]; this rank's rows of each step
    for step in range(4):
        rows = slice(rank * n, (rank + 1) * n)
        probe.train_step(feats[step][rows], labels[step][rows])
    return probe.linear.weight.detach().clone()


def _reference_probe(feats, labels, world=1):
    """A plain Linear + SGD on the same detached features (mean cross-entropy over all rows)."""
    g = torch.Generator().manual_seed(7)
    lin = torch.nn.Linear(feats.shape[-1], 3)
    with torch.no_grad():
        bound = 1.0 / feats.shape[-1] ** 0.5
        lin.weight.copy_(torch.rand(3, feats.shape[-1], generator=g) * 2 * bound - bound)
        lin.bias.zero_()
    opt = torch.optim.SGD(lin.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    for step in range(4):
        torch.nn.functional.cross_entropy(lin(feats[step]), labels[step]).backward()
        opt.step()
        opt.zero_grad()
    return lin.weight.detach()


@pytest.mark.dist
def test_online_probe_matches_reference_classifier():
    """The probe is a linear classifier trained on the detached features: equal to a hand-built Linear + SGD in
    one process (same operations: exact), and 2 ranks on half the rows each equal 1 rank on all of them (the
    gradient average over ranks reorders a sum of 2 terms: within fp32 rounding of a 4-step update)."""
    g = torch.Generator().manual_seed(3)
    feats, labels = torch.randn(4, 8, 6, generator=g), torch.randint(0, 3, (4, 8), generator=g)
    ref = _reference_probe(feats, labels)
    one = _probe_rank(0, 1, feats, labels)
    assert torch.equal(one, ref)
    two = run_distributed(_probe_rank, 2, feats, labels)
    torch.testing.assert_close(two[0], two[1], rtol=0, atol=0)  # replicated exactly
    torch.testing.assert_close(two[0], ref, rtol=1e-5, atol=1e-6)
    # negative control: a probe that does not average the ranks' gradients drifts away from the reference
    assert not torch.allclose(_probe_rank(0, 2, feats, labels), ref, rtol=1e-3, atol=1e-4)


def test_probe_reads_detached_features_only():
    """No gradient reaches the trunk: the probe step leaves the features' graph untouched."""
    trunk = torch.nn.Linear(4, 6)
    h = trunk(torch.randn(5, 4))
    probe = OnlineProbe(6, 2, lr=0.1, momentum=0.0, weight_decay=0.0, seed=0, device=torch.device("cpu"))
    probe.train_step(h, torch.tensor([0, 1, 0, 1, 1]))
    assert trunk.weight.grad is None


# --------------------------------------------------------------------------------------- through train.py
@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """Labelled ImageFolders (3 classes of coloured patterns): 24 training and 12 held-out images."""
    root = tmp_path_factory.mktemp("knn_data")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 8), ("val", 4)):
        for c in range(3):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                base = torch.zeros(3, 40, 40)
                base[c] = 0.6
                img = (base + 0.4 * torch.rand(3, 40, 40, generator=g)).clamp(0, 1)
                Image.fromarray((img.permute(1, 2, 0) * 255).byte().numpy()).save(root / split / f"c{c}" / f"{i}.png")
    return root


def _eval_overrides(root, *extra):
    return ("config.DATA.TRAIN.DATA_SOURCES=[disk_folder]", f"config.DATA.TRAIN.DATA_PATHS=[{root}/train]",
            "config.DATA.TRAIN.LABEL_TYPE=standard", "config.DATA.TRAIN.DATA_LIMIT=-1",
            "config.KNN_EVAL.ENABLED=True", f"config.KNN_EVAL.TRAIN_PATH={root}/train",
            f"config.KNN_EVAL.VAL_PATH={root}/val", "config.KNN_EVAL.IMAGE_SIZE=32", "config.KNN_EVAL.BATCHSIZE=5",
            "config.KNN_EVAL.TOPK=5", "config.KNN_EVAL.EVERY_N_EPOCHS=1", "config.ONLINE_LINEAR_PROBE.ENABLED=True",
            *extra)


def _evals(out):
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return [{k: v for k, v in r.items() if k not in ("time", "eval_s")} for r in recs
            if any(k in r for k in ("knn_top1", "knn_top1_init"))]


@pytest.fixture(scope="module")
def eval_run(tiny_folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_one")
    run_train_py(out, *_eval_overrides(tiny_folders))
    return out


@pytest.mark.dist
def test_every_n_epochs_schedule_and_world_size(eval_run, tiny_folders, tmp_path):
    """kNN at the start, after each epoch and at the end, with the probe's top-1; 2 processes x 4 images give the
    same figures as 1 x 8 (SyncBN over the world: the same training, and the same exact sharded kNN)."""
    evals = _evals(eval_run)
    assert [(r["step"], sorted(k for k in r if k not in ("step", "epoch"))) for r in evals] == [
        (0, ["knn_top1_init"]), (3, ["knn_top1", "probe_top1"]), (6, ["knn_top1", "probe_top1"]),
        (6, ["knn_top1", "knn_top1_init", "probe_top1"])]
    two = tmp_path / "two"
    run_train_py(two, *_eval_overrides(tiny_folders, "config.DISTRIBUTED.NUM_PROC_PER_NODE=2",
                                       "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=4"))
    assert _evals(two) == evals


def test_resume_neither_repeats_nor_skips_an_evaluation(eval_run, tiny_folders, tmp_path):
    """SIGTERM once step 2 is logged (the run stops at the agreed step, 2-4, with a checkpoint, exit 75), then the
    same command: the evaluation records are those of the uninterrupted run, each once (resume is exact, so the
    figures are equal too)."""
    proc = start(tmp_path, *_eval_overrides(tiny_folders))
    wait_for_step(tmp_path, 2, proc)
    proc.send_signal(signal.SIGTERM)
    rc, _, err = finish(proc)
    assert rc == EXIT_RESUMABLE, err[-4000:]
    run_train_py(tmp_path, *_eval_overrides(tiny_folders))
    assert _evals(tmp_path) == _evals(eval_run)


def test_summary_plot_draws_runs(eval_run, tmp_path):
    """One picture of one or several runs, from metrics.jsonl alone; a folder without metrics is refused (2)."""
    out = tmp_path / "curves.png"
    r = subprocess.run([sys.executable, "-m", "scaleclr.summary", str(eval_run), str(eval_run), "--plot", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"learning curves: {out}" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "scaleclr.summary", str(tmp_path), "--plot", str(tmp_path / "x.png")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "metrics.jsonl: no such file" in bad.stderr
    assert not (tmp_path / "x.png").exists()


def test_probe_config_errors():
    from scaleclr.config import ConfigError, load_config

    base = ["config=test/integration_test/quick_simclr_synthetic", "config.ONLINE_LINEAR_PROBE.ENABLED=True"]
    with pytest.raises(ConfigError, match="KNN_EVAL.ENABLED"):
        load_config(base)
    with pytest.raises(ConfigError, match="LABEL_TYPE"):
        load_config(base + ["config.KNN_EVAL.ENABLED=True", "config.KNN_EVAL.DATASET_NAME=scaleclr_demo_digits"])
    with pytest.raises(ConfigError, match="ONLINE_LINEAR_PROBE.LR"):
        load_config(base + ["config.KNN_EVAL.ENABLED=True", "config.KNN_EVAL.DATASET_NAME=scaleclr_demo_digits",
                            "config.DATA.TRAIN.LABEL_TYPE=standard", "config.ONLINE_LINEAR_PROBE.LR=-1"])
    with pytest.raises(ConfigError, match="EVERY_N_EPOCHS"):
        load_config(["config=test/integration_test/quick_simclr_synthetic", "config.KNN_EVAL.EVERY_N_EPOCHS=-1"])
