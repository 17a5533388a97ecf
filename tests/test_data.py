"""Data pipeline: per-sample seeding, VISSL transforms, collator layouts, sampler equivalence and resume,
corrupt-file skipping, file lists, DATA_LIMIT and the bundled demo data."""
import logging
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from scaleclr.data import (EvalDataset, SSLDataset, ShardedSampler, build_dataloader, build_source,
                           build_transforms, eval_transform_specs, get_collator, multicrop_collator,
                           sample_generator, sample_seed, simclr_collator)
from scaleclr.data.transforms import ImgPilColorDistortion, ImgPilGaussianBlur, RandomResizedCrop

SIMCLR_32 = [
    {"name": "ImgReplicatePil", "num_times": 2},
    {"name": "RandomResizedCrop", "size": 32},
    {"name": "RandomHorizontalFlip", "p": 0.5},
    {"name": "ImgPilColorDistortion", "strength": 1.0},
    {"name": "ImgPilGaussianBlur", "p": 0.5, "radius_min": 0.1, "radius_max": 2.0},
    {"name": "ToTensor"},
    {"name": "Normalize", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
]
MULTICROP = [
    {"name": "ImgPilToMultiCrop", "total_num_crops": 5, "size_crops": [24, 12], "num_crops": [2, 3],
     "crop_scales": [[0.3, 1.0], [0.05, 0.3]]},
    {"name": "RandomHorizontalFlip", "p": 0.5},
    {"name": "ToTensor"},
]


def _synthetic_dataset(count=24, seed=0, transforms=SIMCLR_32):
    return SSLDataset(build_source("synthetic", None, size=32, count=count), build_transforms(transforms), seed=seed)


def _image_folder(root, per_class=3, classes=("cat", "dog")):
    for c, name in enumerate(classes):
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (12, 10), (40 * i, 100 * c, 7)).save(root / name / f"{i}.png")
    return root


# ------------------------------------------------------------------------------------------ seeding
def test_sample_seed_mixes_all_three_inputs():
    seeds = {sample_seed(s, e, i) for s in range(3) for e in range(3) for i in range(50)}
    assert len(seeds) == 3 * 3 * 50
    assert sample_seed(0, 1, 2) == sample_seed(0, 1, 2) < 2 ** 63
    with pytest.raises(ValueError, match="SEED_VALUE"):
        sample_seed(-1, 0, 0)


def test_views_depend_only_on_seed_epoch_index():
    ds, other = _synthetic_dataset(), _synthetic_dataset()
    a = ds[5]
    for view_a, view_b in zip(a["data"], other[5]["data"]):  # fresh instance, same triple -> same views
        assert torch.equal(view_a, view_b)
    assert len(a["data"]) == 2 and a["data"][0].shape == (3, 32, 32)
    assert not torch.equal(a["data"][0], a["data"][1])  # the two views are independent draws
    assert (a["label"], a["data_idx"], a["skipped"]) == (5, 5, 0)
    ds.set_epoch(1)
    assert not torch.equal(ds[5]["data"][0], a["data"][0])
    ds.set_epoch(0)
    assert torch.equal(ds[5]["data"][0], a["data"][0])
    assert not torch.equal(_synthetic_dataset(seed=1)[5]["data"][0], a["data"][0])
    # a different index with the same picture must still get different views
    same_picture = SSLDataset(ds.source, ds.transforms, seed=0)
    assert not torch.equal(same_picture[15]["data"][0], ds[5]["data"][0])


def test_transforms_leave_global_rngs_alone():
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    ds = _synthetic_dataset()
    for i in range(6):
        ds[i]
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert random.getstate() == states[2]


def _epochs_of_batches(num_workers, epochs=2):
    ds = _synthetic_dataset(count=20)
    sampler = ShardedSampler(len(ds), 1, 0, seed=3, batch_size=4)
    loader = build_dataloader(ds, 4, num_workers, simclr_collator, sampler)
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        ds.set_epoch(epoch)
        out.append(list(loader))
    return out


def test_views_identical_regardless_of_num_workers():
    serial, parallel = _epochs_of_batches(0), _epochs_of_batches(2)  # persistent workers across 2 epochs
    for epoch_a, epoch_b in zip(serial, parallel):
        assert len(epoch_a) == len(epoch_b) == 5
        for a, b in zip(epoch_a, epoch_b):
            assert torch.equal(a["data"], b["data"]) and torch.equal(a["data_idx"], b["data_idx"])
    # the epoch reached the persistent workers: epoch 1 views differ from epoch 0 views of the same images
    first = {int(i): row for i, row in zip(serial[0][0]["data_idx"][:4], serial[0][0]["data"][:4])}
    for batch in serial[1]:
        for i, row in zip(batch["data_idx"][:4], batch["data"][:4]):
            if int(i) in first:
                assert not torch.equal(first[int(i)], row)


def test_loader_workers_use_one_thread():
    class Threads(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.get_num_threads()

    loader = build_dataloader(Threads(), 2, 1, None, None)
    assert loader.persistent_workers and next(iter(loader)).tolist() == [1, 1]


# --------------------------------------------------------------------------------------- transforms
def test_random_resized_crop_boxes_follow_scale_and_ratio():
    crop = RandomResizedCrop(16, scale=(0.08, 1.0))
    img = Image.new("RGB", (200, 160))
    fractions = []
    for i in range(300):
        top, left, h, w = crop.get_params(img, sample_generator(0, 0, i))
        assert 0 <= top <= 160 - h and 0 <= left <= 200 - w
        fractions.append(h * w / (200 * 160))
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
    assert 0.07 <= min(fractions) and max(fractions) <= 1.0 and 0.35 < np.mean(fractions) < 0.7
    assert crop(img, sample_generator(0, 0, 0)).size == (16, 16)


def test_color_distortion_and_blur_probabilities():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    distort, blur = ImgPilColorDistortion(1.0), ImgPilGaussianBlur(0.5, 0.1, 2.0)
    gray = changed = blurred = 0
    for i in range(400):
        out = np.asarray(distort(img, sample_generator(1, 0, i))).astype(int)
        gray += int((out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all())
        changed += int(not np.array_equal(out, np.asarray(img)))
        blurred += int(blur(img, sample_generator(2, 0, i)) is not img)
    assert 0.13 < gray / 400 < 0.27           # RandomGrayscale p 0.2
    assert 0.76 < changed / 400 <= 0.9         # jitter p 0.8, plus grayscale on un-jittered images
    assert 0.42 < blurred / 400 < 0.58         # blur p 0.5


def test_multicrop_shapes_and_order():
    ds = _synthetic_dataset(count=6, transforms=MULTICROP)
    samples = [ds[i] for i in range(3)]
    assert [tuple(v.shape) for v in samples[0]["data"]] == [(3, 24, 24)] * 2 + [(3, 12, 12)] * 3
    batch = multicrop_collator(samples)
    assert [tuple(t.shape) for t in batch["data"]] == [(3, 3, 24, 24)] * 2 + [(3, 3, 12, 12)] * 3
    for c in range(5):
        for i in range(3):
            assert torch.equal(batch["data"][c][i], samples[i]["data"][c])
    assert batch["data_idx"].tolist() == [0, 1, 2] * 5 and batch["label"].tolist() == [0, 1, 2] * 5
    with pytest.raises(ValueError, match="multicrop_collator"):
        simclr_collator(samples)


def test_multicrop_validation_names_the_keys():
    bad = dict(MULTICROP[0], total_num_crops=6)
    with pytest.raises(ValueError, match=r"TRANSFORMS\[0\].*total_num_crops=6.*sum\(num_crops\)=5"):
        build_transforms([bad])
    with pytest.raises(ValueError, match="one entry per crop group"):
        build_transforms([dict(MULTICROP[0], size_crops=[24])])


def test_build_transforms_errors_suggest_the_right_key():
    with pytest.raises(ValueError, match=r"TRANSFORMS\[1\].name='RandomResizedCrp'.*did you mean 'RandomResizedCrop'"):
        build_transforms([SIMCLR_32[0], {"name": "RandomResizedCrp", "size": 32}])
    with pytest.raises(ValueError, match=r"\(RandomResizedCrop\): unknown parameter 'sise' \(did you mean 'size'\?\)"
                                         r".*allowed keys: \['size', 'scale', 'ratio', 'interpolation'\]"):
        build_transforms([{"name": "RandomResizedCrop", "sise": 32}])
    with pytest.raises(ValueError, match="missing required parameter"):
        build_transforms([{"name": "RandomResizedCrop"}])
    with pytest.raises(ValueError, match="strength"):
        build_transforms([{"name": "ImgPilColorDistortion", "strength": 3.0}])


def test_build_transforms_accepts_omegaconf_lists():
    omegaconf = pytest.importorskip("omegaconf")
    pipeline = build_transforms(omegaconf.OmegaConf.create(SIMCLR_32))
    assert pipeline.num_views == 2
    views = pipeline(Image.new("RGB", (40, 40), (10, 200, 30)), sample_generator(0, 0, 0))
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2


# ---------------------------------------------------------------------------------------- collators
def test_simclr_collator_is_view_major():
    samples = [{"data": [torch.full((3, 2, 2), 10.0 * i + v) for v in range(2)], "label": 100 + i,
                "data_idx": 7 + i, "skipped": i % 2} for i in range(3)]
    batch = simclr_collator(samples)
    assert batch["data"].shape == (6, 3, 2, 2)
    assert batch["data"][:, 0, 0, 0].tolist() == [0, 10, 20, 1, 11, 21]  # [v0 of all; v1 of all]
    assert batch["label"].tolist() == [100, 101, 102] * 2
    assert batch["data_idx"].tolist() == [7, 8, 9] * 2
    assert batch["skipped"] == 1


def test_get_collator():
    assert get_collator("simclr_collator") is simclr_collator
    with pytest.raises(ValueError, match=r"COLLATE_FUNCTION='simclr'.*multicrop_collator"):
        get_collator("simclr")


# ------------------------------------------------------------------------------------------ sampler
def _rank_batches(sampler):
    order = list(sampler)
    b = sampler.batch_size
    return [order[i:i + b] for i in range(0, len(order), b)]


@pytest.mark.parametrize("shuffle", [True, False])
def test_sampler_one_by_eight_equals_two_by_four(shuffle):
    for epoch in range(3):
        single = ShardedSampler(37, 1, 0, shuffle=shuffle, seed=5, batch_size=8)
        ranks = [ShardedSampler(37, 2, r, shuffle=shuffle, seed=5, batch_size=4) for r in range(2)]
        for s in [single] + ranks:
            s.set_epoch(epoch)
        per_rank = [_rank_batches(s) for s in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == len(_rank_batches(single)) == 4
        for step, batch in enumerate(_rank_batches(single)):
            assert per_rank[0][step] + per_rank[1][step] == batch  # rank-major == the 1-process batch


def test_sampler_permutation_matches_distributed_sampler_seeding():
    sampler = ShardedSampler(20, 2, 1, seed=4, batch_size=2)
    sampler.set_epoch(3)
    expected = torch.randperm(20, generator=torch.Generator().manual_seed(7)).tolist()
    assert sampler.global_indices() == expected[:20]
    assert list(sampler) == [i for step in range(5) for i in expected[step * 4 + 2: step * 4 + 4]]


def test_sampler_drop_last_and_padding():
    dropped = [ShardedSampler(37, 2, r, seed=1, drop_last=True, batch_size=4) for r in range(2)]
    seen = list(dropped[0]) + list(dropped[1])
    assert len(dropped[0]) == len(dropped[1]) == 16 and len(set(seen)) == 32  # 4 full global batches
    padded = [ShardedSampler(37, 2, r, seed=1, drop_last=False, batch_size=4) for r in range(2)]
    seen = list(padded[0]) + list(padded[1])
    assert len(padded[0]) == len(padded[1]) == 20 and set(seen) == set(range(37))
    order = padded[0].global_indices()
    assert order[37:] == order[:3]  # padding repeats the start of the permutation
    with pytest.raises(ValueError, match="DROP_LAST"):
        ShardedSampler(7, 2, 0, batch_size=4)
    with pytest.raises(ValueError, match="rank"):
        ShardedSampler(70, 2, 2, batch_size=4)


def test_sampler_resume_equals_uninterrupted():
    full = ShardedSampler(50, 2, 1, seed=9, batch_size=3)
    full.set_epoch(2)
    uninterrupted, next_epoch = list(full), None
    full.set_epoch(3)
    next_epoch = list(full)

    before = ShardedSampler(50, 2, 1, seed=9, batch_size=3)
    before.set_epoch(2)
    state = before.state_dict(iteration=5)
    assert state["epoch"] == 2 and state["consumed_samples"] == 5 * 6
    resumed = ShardedSampler(50, 2, 1, seed=9, batch_size=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the training loop re-enters the interrupted epoch: keeps the offset
    assert list(resumed) == uninterrupted[5 * 3:] and len(resumed) == len(uninterrupted) - 15
    resumed.set_epoch(3)
    assert list(resumed) == next_epoch

    # resume a 2 x 3 checkpoint on 1 x 6: same global batches from the same step on
    single = ShardedSampler(50, 1, 0, seed=9, batch_size=6)
    single.load_state_dict(state)
    assert _rank_batches(single)[0][3:] == uninterrupted[15:18]
    with pytest.raises(ValueError, match="dataset_len"):
        ShardedSampler(51, 2, 1, seed=9, batch_size=3).load_state_dict(state)
    with pytest.raises(ValueError, match="global batch"):
        ShardedSampler(50, 1, 0, seed=9, batch_size=4).load_state_dict(state)


def test_loader_resume_reproduces_views():
    def run(start_iter):
        ds = _synthetic_dataset(count=16)
        sampler = ShardedSampler(len(ds), 1, 0, seed=2, batch_size=4)
        if start_iter:
            sampler.load_state_dict({"epoch": 1, "consumed_samples": start_iter * 4})
        sampler.set_epoch(1)
        ds.set_epoch(1)
        return list(build_dataloader(ds, 4, 0, simclr_collator, sampler))

    full, tail = run(0), run(2)
    assert len(tail) == 2
    for a, b in zip(full[2:], tail):
        assert torch.equal(a["data"], b["data"])


# ---------------------------------------------------------------------------- sources and skipping
def test_corrupt_image_is_skipped_warned_once_and_counted(tmp_path, caplog):
    root = _image_folder(tmp_path / "folder")
    (root / "cat" / "1_broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg" * 4)
    source = build_source("disk_folder", str(root))
    bad = [i for i in range(len(source)) if source.path(i).endswith("1_broken.jpg")][0]
    ds = SSLDataset(source, build_transforms(SIMCLR_32[:2] + SIMCLR_32[5:]), seed=0)
    with caplog.at_level(logging.WARNING, logger="scaleclr.data.dataset"):
        sample = ds[bad]
        ds[bad]
    assert sample["skipped"] == 1 and sample["data_idx"] == bad
    assert sample["label"] == source.labels[bad + 1]
    warnings = [r.getMessage() for r in caplog.records if "1_broken.jpg" in r.getMessage()]
    assert len(warnings) == 1 and str(root / "cat" / "1_broken.jpg") in warnings[0]
    batch = simclr_collator([ds[i] for i in range(len(ds))])
    assert batch["skipped"] == 1 and batch["data"].shape == (2 * 7, 3, 32, 32)


def test_three_bad_files_in_a_row_count_three_per_epoch(tmp_path):
    """skipped_images counts distinct unreadable files: 3 consecutive bad files are 3 per epoch (not the 6
    substitution attempts of indices i, i+1, i+2), in one process and split over 2 ranks x 2 workers."""
    root = _image_folder(tmp_path / "folder", per_class=4)
    for name in ("1.png", "2.png", "3.png"):
        (root / "cat" / name).write_bytes(b"not a png")
    source = build_source("disk_folder", str(root))
    ds = SSLDataset(source, build_transforms(SIMCLR_32[:2] + SIMCLR_32[5:]), seed=0)
    assert sum(ds[i]["skipped"] for i in range(len(ds))) == 3
    assert sum(ds[i]["skipped"] for i in range(len(ds))) == 3  # the next epoch: again once each
    total = 0
    for rank in range(2):
        sampler = ShardedSampler(len(ds), 2, rank, shuffle=True, seed=0, drop_last=False, batch_size=2)
        fresh = SSLDataset(source, build_transforms(SIMCLR_32[:2] + SIMCLR_32[5:]), seed=0)
        total += sum(b["skipped"] for b in build_dataloader(fresh, 2, 2, simclr_collator, sampler))
    assert total == 3


def test_all_unreadable_raises(tmp_path):
    for i in range(3):
        os.makedirs(tmp_path / "a", exist_ok=True)
        (tmp_path / "a" / f"{i}.png").write_bytes(b"garbage")
    ds = SSLDataset(build_source("disk_folder", str(tmp_path)), build_transforms(SIMCLR_32), seed=0)
    with pytest.raises(RuntimeError, match="unreadable"):
        ds[0]


def test_disk_folder_labels_and_data_limit(tmp_path):
    root = _image_folder(tmp_path / "f", per_class=4)
    source = build_source("disk_folder", str(root))
    assert len(source) == 8 and source.labels.tolist() == [0] * 4 + [1] * 4
    assert source.load(5).mode == "RGB" and source.load(5).size == (12, 10)
    limited = build_source("disk_folder", str(root), data_limit=5)
    assert len(limited) == 5 and limited.labels.tolist() == source.labels[:5].tolist()
    assert [limited.path(i) for i in range(5)] == [source.path(i) for i in range(5)]
    assert build_source("synthetic", None, data_limit=7).labels.tolist() == list(range(7))


def test_disk_filelist_npy_and_txt(tmp_path):
    root = _image_folder(tmp_path / "f")
    folder = build_source("disk_folder", str(root))
    paths = [folder.path(i) for i in range(len(folder))]
    np.save(tmp_path / "list.npy", np.array(paths, dtype=str))
    npy = build_source("disk_filelist", str(tmp_path / "list.npy"), mmap_mode=True)
    assert isinstance(npy._paths, np.memmap)
    assert len(npy) == 6 and npy.labels.tolist() == [-1] * 6 and npy.path(4) == paths[4]
    assert np.array_equal(np.asarray(npy.load(4)), np.asarray(folder.load(4)))
    in_memory = build_source("disk_filelist", str(tmp_path / "list.npy"), data_limit=2, mmap_mode=False)
    assert len(in_memory) == 2 and in_memory.path(1) == paths[1]

    (tmp_path / "list.txt").write_text("\n".join(os.path.relpath(p, tmp_path) for p in paths) + "\n\n")
    txt = build_source("disk_filelist", str(tmp_path / "list.txt"))
    assert len(txt) == 6 and txt.path(2) == paths[2] and txt.load(2).mode == "RGB"

    np.save(tmp_path / "obj.npy", np.array(paths, dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="DATA_PATHS"):
        build_source("disk_filelist", str(tmp_path / "obj.npy"))
    (tmp_path / "list.csv").write_text("x")
    with pytest.raises(ValueError, match=r"\.npy or \.txt"):
        build_source("disk_filelist", str(tmp_path / "list.csv"))


def test_build_source_errors_name_the_keys(tmp_path):
    with pytest.raises(ValueError, match=r"DATA_SOURCES\[0\]='foo'.*disk_filelist.*disk_folder.*synthetic"):
        build_source("foo", str(tmp_path))
    with pytest.raises(ValueError, match=r"DATA_PATHS\[1\]='/no/such/dir'"):
        build_source("disk_folder", "/no/such/dir", path_key="config.DATA.TRAIN.DATA_PATHS[1]")
    with pytest.raises(ValueError, match="not an ImageFolder"):
        build_source("disk_folder", str(tmp_path))  # exists, but no class folders
    with pytest.raises(ValueError, match="unknown option"):
        build_source("synthetic", None, sizee=3)


def test_eval_dataset_is_deterministic(tmp_path):
    source = build_source("synthetic", None, size=40, count=4)
    ds = EvalDataset(source, build_transforms(eval_transform_specs(32)))
    x, y = ds[3]
    assert x.shape == (3, 32, 32) and y == 3 and torch.equal(x, ds[3][0])
    with pytest.raises(ValueError, match="one output per image"):
        EvalDataset(source, build_transforms(SIMCLR_32))


# ---------------------------------------------------------------------------------------- demo data
def test_demo_data_prepared_once(tmp_path):
    from scaleclr.data.demo import MARKER, prepare_demo_data

    paths = prepare_demo_data(str(tmp_path))
    assert paths["num_classes"] == 10
    train, val = build_source("disk_folder", paths["train"]), build_source("disk_folder", paths["val"])
    assert sorted(set(train.labels)) == sorted(set(val.labels)) == list(range(10))
    assert len(train) + len(val) == 1797 and 340 <= len(val) <= 380
    assert min(np.bincount(val.labels)) >= 30  # stratified
    names = lambda s: {os.path.basename(s.path(i)) for i in range(len(s))}  # noqa: E731
    assert not names(train) & names(val)
    img = val.load(0)
    assert img.mode == "RGB" and img.size == (32, 32)

    marker = os.path.join(os.path.dirname(paths["train"]), MARKER)
    stamp = os.stat(marker).st_mtime_ns
    assert prepare_demo_data(str(tmp_path)) == paths and os.stat(marker).st_mtime_ns == stamp
    os.remove(marker)  # a half-written cache is redone
    os.remove(train.path(0))
    prepare_demo_data(str(tmp_path))
    assert os.path.exists(marker) and len(build_source("disk_folder", paths["train"])) == len(train)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def _hold_loader_and_exit(finalize):
    """In a Process child: a loader whose 2 persistent workers ignore SIGTERM, one batch read, the iterator still
    alive when the child returns (what a trainer process does when it stops mid-epoch)."""
    import multiprocessing.util
    import signal

    if not finalize:  # negative control: no shutdown before multiprocessing's terminate() + join at exit
        multiprocessing.util.Finalize = lambda *a, **k: None
    ds = torch.utils.data.TensorDataset(torch.arange(64.0))
    loader = build_dataloader(ds, 4, 2, None, None, ignore_signals=(signal.SIGTERM,))
    global _HELD
    _HELD = (loader, iter(loader))
    next(_HELD[1])


@pytest.mark.parametrize("finalize", [True, False])
def test_process_with_signal_ignoring_workers_exits(finalize):
    """A Process child (a spawned trainer) returns with its loader's workers up: they are shut down, the child
    exits. Without the Finalize hook multiprocessing's exit SIGTERMs them (ignored) and waits for ever."""
    import multiprocessing

    p = multiprocessing.get_context("fork").Process(target=_hold_loader_and_exit, args=(finalize,))
    p.start()
    p.join(timeout=30 if finalize else 8)  # the shutdown joins the workers within ~0.1 s; a hang never returns
    hung = p.is_alive()
    if hung:
        with open(f"/proc/{p.pid}/task/{p.pid}/children") as f:
            workers = [int(pid) for pid in f.read().split()]
        for pid in workers:
            os.kill(pid, 9)
        p.kill()
        p.join()
    assert hung == (not finalize), p.exitcode
    if finalize:
        assert p.exitcode == 0
