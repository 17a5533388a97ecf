"""WebDataset shards (issue 19): the ``webdataset`` source reads the same images as the ImageFolder they were
written from, by global index, opening each shard once; the writer is deterministic and resumable; the
node-local copy has one copier; bad input gives a clear error naming shard and key (or, for an undecodable
image, the folder path's skip-and-count); the shard-block shuffle is a world-size-independent global order;
training on shards equals training on the folder step for step, 2 processes equal 1, and SIGKILL + resume is
bitwise, with both shuffle modes."""
import io
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import numerics as nm  # noqa: E402
from train_helpers import finish, load, start, wait_for_step  # noqa: E402

from scaleclr.data.sampler import ShardedSampler  # noqa: E402
from scaleclr.data.shards import ShardError, ShardSource, copy_to_local, expand_shards, is_shard_spec  # noqa: E402
from scaleclr.data.shards.writer import write_shards  # noqa: E402
from scaleclr.data.sources import DiskFolderSource, SyntheticSource  # noqa: E402


def make_folder(root, count=40, classes=4, size=40):
    """An ImageFolder of synthetic drawings, PNG and (every third) JPEG."""
    src = SyntheticSource(size=size, count=count, num_classes=classes, seed=3)
    for i in range(count):
        d = Path(root) / f"class{int(src.labels[i])}"
        d.mkdir(parents=True, exist_ok=True)
        fmt = "jpg" if i % 3 == 0 else "png"
        src.load(i).save(d / f"img{i:03d}.{fmt}", quality=90)
    return str(root)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("shards")
    folder = make_folder(base / "folder")
    out = base / "shards"
    shards = write_shards(folder, str(out), shard_size=16000, progress=False)
    return {"folder": folder, "dir": str(out), "shards": shards, "base": base}


def write_with_webdataset(folder_root, out_dir, maxcount=7):
    """The ImageFolder written by the ``webdataset`` library's ShardWriter (keys ``class0/img000``, ``.cls`` labels),
    in the folder's order; None when the library is not installed (``pip install -e .[webdataset]``)."""
    try:
        import webdataset as wds
    except ImportError:
        return None
    folder = DiskFolderSource(folder_root)
    os.makedirs(out_dir, exist_ok=True)
    with wds.ShardWriter(os.path.join(out_dir, "lib-%04d.tar"), maxcount=maxcount, verbose=0) as sink:
        for i in range(len(folder)):
            p = folder.path(i)
            key = os.path.relpath(os.path.splitext(p)[0], folder_root)
            sink.write({"__key__": key, os.path.splitext(p)[1][1:]: open(p, "rb").read(), "cls": int(folder.labels[i])})
    return out_dir


def pixels(img):
    return np.asarray(img.convert("RGB"))


# ------------------------------------------------------------------------------------------------- reading
def test_shards_read_like_the_folder_and_open_each_shard_once(data):
    folder, src = DiskFolderSource(data["folder"]), ShardSource(data["dir"], require_labels=True)
    assert len(data["shards"]) >= 4 and len(src.shards) == len(data["shards"])
    assert len(src) == len(folder) and np.array_equal(src.labels, folder.labels)
    order = np.random.default_rng(0).permutation(len(src))
    for i in order:
        assert np.array_equal(pixels(src.load(int(i))), pixels(folder.load(int(i)))), i
        assert np.array_equal(pixels(src.open(int(i))), pixels(folder.open(int(i)))), i
    assert src.files_opened == len(src.shards)  # no open per sample
    # negative control: the counter counts; with room for one open shard, random reads reopen
    one = ShardSource(data["dir"], max_open=1)
    for i in order:
        one.read(int(i))
    assert one.files_opened > len(src.shards)
    brace = os.path.join(data["dir"], "shard-{000000..%06d}.tar" % (len(src.shards) - 1))
    assert expand_shards(brace) == src.shards and is_shard_spec(brace) and is_shard_spec(data["dir"])
    assert not is_shard_spec(data["folder"])


def test_shards_of_the_webdataset_library_read_unchanged(data, tmp_path):
    """Shards written by webdataset's ShardWriter (keys in folders, .cls labels) read as the same images; and the
    library reads ours (same pixels, same labels)."""
    wds = pytest.importorskip("webdataset")
    folder = DiskFolderSource(data["folder"])
    src = ShardSource(write_with_webdataset(data["folder"], str(tmp_path)), require_labels=True)
    assert len(src) == len(folder) and np.array_equal(src.labels, folder.labels) and len(src.shards) == 6
    for i in range(len(src)):
        assert np.array_equal(pixels(src.load(i)), pixels(folder.load(i)))
    ours = wds.WebDataset(data["shards"], shardshuffle=False).decode("pil")
    n = 0
    for i, sample in enumerate(ours):
        img = sample.get("png", sample.get("jpg"))
        assert np.array_equal(pixels(img), pixels(folder.load(i))) and sample["cls"] == folder.labels[i]
        n += 1
    assert n == len(folder)


# ------------------------------------------------------------------------------------------------- writer
def _bytes(paths):
    return [Path(p).read_bytes() for p in paths]


def test_writer_is_deterministic_and_resumes(data, tmp_path):
    again = write_shards(data["folder"], str(tmp_path / "a"), shard_size=16000, progress=False)
    assert _bytes(again) == _bytes(data["shards"])
    # interrupted: the last two shards missing, a half-written .part left behind
    out = tmp_path / "b"
    shutil.copytree(data["dir"], out)
    names = sorted(p for p in os.listdir(out) if p.endswith(".tar"))
    for n in names[-2:]:
        os.remove(out / n)
    (out / names[-2]).with_suffix(".tar.part").write_bytes(b"partial")
    resumed = write_shards(data["folder"], str(out), shard_size=16000, progress=False)
    assert _bytes(resumed) == _bytes(data["shards"])
    # negative control: other settings into the same folder are refused, not mixed
    with pytest.raises(ValueError, match="holds shards written with"):
        write_shards(data["folder"], str(out), shard_size=32000, progress=False)


def test_writer_max_side_and_cli(data, tmp_path, capsys):
    from scaleclr.data.shards.__main__ import main

    assert main(["write", data["folder"], str(tmp_path / "s"), "--max-side", "24", "--shard-size", "1MiB",
                 "--workers", "2", "--no-progress"]) == 0
    small, folder = ShardSource(str(tmp_path / "s")), DiskFolderSource(data["folder"])
    assert len(small) == len(folder) and np.array_equal(small.labels, folder.labels)
    for i in range(len(small)):
        assert max(small.open(i).size) == 24 and small.path(i).endswith((".jpg", ".png"))
    # negative control: without --max-side the sizes are the originals'
    assert max(ShardSource(data["dir"]).open(0).size) == 40
    assert main(["write", data["folder"], str(tmp_path / "x"), "--shard-size", "1XB"]) == 2
    assert "--shard-size '1XB'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- bad input
def _tar(path, members):
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as t:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            t.addfile(info, io.BytesIO(payload))


def _png():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, "PNG")
    return buf.getvalue()


def test_bad_shards_name_shard_and_key(data, tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    _tar(good / "a.tar", [("k1.png", _png()), ("k1.cls", b"1"), ("k2.png", _png()), ("k2.cls", b"2")])
    assert len(ShardSource(str(good), require_labels=True)) == 2  # the negative control of each case below
    # truncated shard
    cut = tmp_path / "cut"
    cut.mkdir()
    raw = (good / "a.tar").read_bytes()
    (cut / "a.tar").write_bytes(raw[:1700])
    with pytest.raises(ValueError, match=r"a\.tar is truncated or damaged after sample 'k1'"):
        ShardSource(str(cut))
    (cut / "a.tar").write_bytes(raw[:2048 + 512 + 512])  # cut at a member boundary: no end-of-archive blocks
    with pytest.raises(ValueError, match=r"a\.tar is truncated or damaged after sample 'k2'"):
        ShardSource(str(cut))
    # a sample without an image member
    noimg = tmp_path / "noimg"
    noimg.mkdir()
    _tar(noimg / "a.tar", [("k1.png", _png()), ("k2.txt", b"hello")])
    with pytest.raises(ValueError, match=r"a\.tar: sample 'k2' has no image member \(has \['txt'\]"):
        ShardSource(str(noimg))
    # a key without a label when labels are needed
    nolabel = tmp_path / "nolabel"
    nolabel.mkdir()
    _tar(nolabel / "a.tar", [("k1.png", _png()), ("k1.cls", b"0"), ("k2.png", _png())])
    assert ShardSource(str(nolabel)).labels.tolist() == [0, -1]
    with pytest.raises(ValueError, match=r"sample 'k2' of shard .*a\.tar has no label"):
        ShardSource(str(nolabel), require_labels=True)
    # brace pattern matching nothing; a folder without shards
    with pytest.raises(ValueError, match=r"matches no shard file"):
        ShardSource(str(good / "b-{000..003}.tar"))
    with pytest.raises(ValueError, match=r"is a folder without \.tar shards"):
        ShardSource(data["folder"])


def test_undecodable_member_is_skipped_and_counted(tmp_path):
    from scaleclr.data import SSLDataset, build_transforms

    _tar(tmp_path / "a.tar", [("k1.png", _png()), ("k2.jpg", b"not a jpeg"), ("k3.png", _png())])
    src = ShardSource(str(tmp_path))
    ds = SSLDataset(src, build_transforms([{"name": "ToTensor"}]), label_type="sample_index")
    out = [ds[i] for i in range(3)]
    assert [o["skipped"] for o in out] == [0, 1, 0] and out[1]["label"] == 2  # k3 stood in for k2
    assert src.path(1).endswith("a.tar:k2.jpg")


def test_stale_index_is_rebuilt_and_a_changed_shard_stops_the_run(tmp_path, caplog):
    _tar(tmp_path / "a.tar", [("k1.png", _png()), ("k2.png", _png())])
    src = ShardSource(str(tmp_path))
    assert src.read(1)  # negative control: the index matches
    _tar(tmp_path / "a.tar", [("long-key-1.png", _png() + b"\0" * 100), ("long-key-2.png", _png())])
    os.utime(tmp_path / "a.tar", ns=(1, 1))
    with pytest.raises(ShardError, match=r"a\.tar does not hold member 'k2\.png'"):
        src.read(1)  # the shard changed under a running source: stop, never read other bytes
    with caplog.at_level("WARNING"):
        fresh = ShardSource(str(tmp_path))  # a new run: the stale index (size/mtime) is rebuilt
    assert "is stale" in caplog.text and fresh.index.key(1) == "long-key-2"
    # the header check accepts what tar writers do with long names (ustar prefix, pax and GNU long-name records)
    for fmt in (tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        d = tmp_path / f"fmt{fmt}"
        d.mkdir()
        with tarfile.open(d / "a.tar", "w", format=fmt) as t:
            for name in ("d" * 60 + "/" + "k" * 50 + ".png", "e" * 120 + ".png", "short.png"):
                if fmt == tarfile.USTAR_FORMAT and "/" not in name and len(name) > 100:
                    continue
                info = tarfile.TarInfo(name)
                info.size = len(_png())
                t.addfile(info, io.BytesIO(_png()))
        src = ShardSource(str(d))
        assert all(pixels(src.load(i)).shape == (8, 8, 3) for i in range(len(src))), fmt


# ------------------------------------------------------------------------------------------------- local copy
def _copy_worker(shards, spec, dest, q):
    local, copied = copy_to_local(shards, spec, dest)
    q.put((copied, all(os.path.getsize(p) == os.path.getsize(s) for p, s in zip(local, shards)), local))


def test_local_copy_one_copier_the_other_waits(data, tmp_path):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_copy_worker, args=(data["shards"], data["dir"], str(tmp_path), q)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    copied = sorted(r[0] for r in results)
    assert copied == [0, len(data["shards"])]  # one copied everything; the other waited and found it done
    assert all(r[1] for r in results)  # both returned only once every shard was complete
    local = results[0][2]
    assert _bytes(local) == _bytes(data["shards"]) and not [f for f in os.listdir(os.path.dirname(local[0]))
                                                           if ".part" in f]
    # resume: a missing local shard is copied again, nothing else
    os.remove(local[2])
    assert copy_to_local(data["shards"], data["dir"], str(tmp_path))[1] == 1
    src = ShardSource(os.path.dirname(local[0]))
    assert src.shards == local and len(src) == 40


def test_config_checks():
    from scaleclr.config import ConfigError, load_config

    quick = "config=test/integration_test/quick_simclr_synthetic"
    with pytest.raises(ConfigError, match=r"SHUFFLE_MODE.*shard_block needs DATA_SOURCES=\[webdataset\]"):
        load_config([quick, "config.DATA.TRAIN.SHUFFLE_MODE=shard_block"])
    with pytest.raises(ConfigError, match=r"COPY_TO_LOCAL_DISK.*implemented for shards only"):
        load_config([quick, "config.DATA.TRAIN.COPY_TO_LOCAL_DISK=True"])
    with pytest.raises(ConfigError, match=r"SHUFFLE_MODE.*'random' is not allowed"):
        load_config([quick, "config.DATA.TRAIN.SHUFFLE_MODE=random"])
    root, _ = load_config([quick, "config.DATA.TRAIN.DATA_SOURCES=[webdataset]", "config.DATA.TRAIN.DATA_PATHS=[/x]",
                           "config.DATA.TRAIN.SHUFFLE_MODE=shard_block", "config.DATA.TRAIN.COPY_TO_LOCAL_DISK=True"])
    from scaleclr import builders
    with pytest.raises(ValueError, match=r"config\.DATA\.TRAIN\.DATA_PATHS\[0\]='/x' matches no shard file"):
        builders.resolve_train_data_path(root.config)  # checked before any worker starts (exit status 2)


def test_knn_and_test_split_read_shards(data, tmp_path):
    """kNN paths that name shards, and DATA.TEST=[webdataset] (linear evaluation), read the shard source with labels
    required; the folder next to them stays an ImageFolder (negative control)."""
    from scaleclr import builders
    from scaleclr.config import load_config

    root, _ = load_config(["config=test/integration_test/quick_simclr_synthetic",
                           f"config.KNN_EVAL.TRAIN_PATH={data['dir']}", f"config.KNN_EVAL.VAL_PATH={data['folder']}",
                           "config.DATA.TEST.DATA_SOURCES=[webdataset]", f"config.DATA.TEST.DATA_PATHS=[{data['dir']}]"])
    knn = builders.build_knn_data(root.config, 0, 1)
    train, val = knn["train"][1], knn["val"][1]
    assert isinstance(train.dataset.source, ShardSource) and isinstance(val.dataset.source, DiskFolderSource)
    test = builders.build_split_source(root.config, "TEST")
    assert isinstance(test, ShardSource) and len(test) == 40
    # COPY_TO_LOCAL_DISK through the builder: the local copies, in the order the spec gives (here descending)
    last = len(data["shards"]) - 1
    spec = os.path.join(data["dir"], "shard-{%06d..000000}.tar" % last)
    root.config.DATA.TRAIN.DATA_SOURCES, root.config.DATA.TRAIN.DATA_PATHS = ["webdataset"], [spec]
    root.config.DATA.TRAIN.COPY_TO_LOCAL_DISK, root.config.DATA.TRAIN.COPY_DESTINATION_DIR = True, str(tmp_path / "loc")
    root.config.DATA.TRAIN.DATA_LIMIT = -1
    local = builders.build_split_source(root.config, "TRAIN")
    assert all(p.startswith(str(tmp_path / "loc")) for p in local.shards)
    assert [os.path.basename(p) for p in local.shards] == [os.path.basename(p) for p in data["shards"][::-1]]
    original = ShardSource(data["dir"])
    assert local.index.key(0) == original.index.key(int(original.index.starts[last]))
    nolabel = tmp_path / "nolabel"
    nolabel.mkdir()
    _tar(nolabel / "a.tar", [("k1.png", _png())])
    root.config.DATA.TEST.DATA_PATHS = [str(nolabel)]
    with pytest.raises(ValueError, match=r"config\.DATA\.TEST\.DATA_PATHS\[0\].*sample 'k1' of shard .* has no label"):
        builders.build_split_source(root.config, "TEST")


# ------------------------------------------------------------------------------------------------- sampler
def windowed(order, shard_of, lengths, k):
    """Whether ``order`` is consecutive windows, each exactly the samples of ``k`` whole shards."""
    pos = 0
    while pos < len(order):
        for end in range(pos + 1, len(order) + 1):
            shards = {int(shard_of[i]) for i in order[pos:end]}
            if len(shards) > k:
                return False
            if end - pos == sum(lengths[s] for s in shards) and (len(shards) == k or end == len(order)):
                break
        else:
            return False
        pos = end
    return True


def test_shard_block_order_is_global_windowed_and_resumable():
    lengths = [5, 3, 7, 4, 6, 5]  # 30 samples
    starts = np.concatenate([[0], np.cumsum(lengths)])
    shard_of = np.repeat(np.arange(6), lengths)
    one = ShardedSampler(30, 1, 0, seed=1, batch_size=6, shuffle_mode="shard_block", shard_lengths=lengths,
                         block_shards=2)
    order = one.global_indices()
    assert sorted(order) == list(range(30))
    assert windowed(order, shard_of, lengths, 2)
    # independent of the world size: ranks' slices concatenate to the 1-process order
    three = [list(ShardedSampler(30, 3, r, seed=1, batch_size=2, shuffle_mode="shard_block", shard_lengths=lengths,
                                 block_shards=2)) for r in range(3)]
    merged = [i for step in range(5) for r in range(3) for i in three[r][2 * step:2 * step + 2]]
    assert merged == list(one)
    one.set_epoch(1)
    assert one.global_indices() != order
    # resume mid-epoch
    state = one.state_dict(iteration=2)
    again = ShardedSampler(30, 1, 0, seed=1, batch_size=6, shuffle_mode="shard_block", shard_lengths=lengths,
                           block_shards=2)
    again.load_state_dict(state)
    assert list(again) == one.global_indices()[12:]
    glob = ShardedSampler(30, 1, 0, seed=1, batch_size=6)
    with pytest.raises(ValueError, match="shuffle_mode='shard_block'"):
        glob.load_state_dict(state)  # a checkpoint of the other mode would replay another order
    assert not windowed(glob.global_indices(), shard_of, lengths, 2)  # negative control: global is not windowed


# ------------------------------------------------------------------------------------------------- training
def _steps(out):
    recs = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def _final(out):
    return load(out, "model_final_checkpoint_phase1.torch")["model"]


def _train(out, *overrides):
    rc, _, err = finish(start(out, *overrides))
    assert rc == 0, err[-6000:]


def _shards(data, mode="global"):
    return ["config.DATA.TRAIN.DATA_SOURCES=[webdataset]", f"config.DATA.TRAIN.DATA_PATHS=[{data['dir']}]",
            f"config.DATA.TRAIN.SHUFFLE_MODE={mode}", "config.DATA.TRAIN.SHUFFLE_BLOCK_SHARDS=2"]


@pytest.fixture(scope="module")
def block_run(data):
    """1 process x 8 images, shard-block shuffle, 2 epochs x 4 steps (the reference of the two tests below)."""
    out = data["base"] / "block"
    _train(out, *_shards(data, "shard_block"))
    return out


@pytest.mark.dist
def test_training_on_shards_equals_the_folder(data):
    """Shards written by the webdataset library (ours when it is not installed) train exactly like the folder."""
    folder, shards = data["base"] / "folder_run", data["base"] / "shard_run"
    lib = write_with_webdataset(data["folder"], str(data["base"] / "lib_shards")) or data["dir"]
    _train(folder, "config.DATA.TRAIN.DATA_SOURCES=[disk_folder]", f"config.DATA.TRAIN.DATA_PATHS=[{data['folder']}]")
    _train(shards, *_shards({"dir": lib}))
    assert _steps(shards) == _steps(folder) and len(_steps(folder)) == 8  # the same images, the same order
    ref = _final(folder)
    assert all(torch.equal(v, ref[k]) for k, v in _final(shards).items())


@pytest.mark.dist
def test_shard_block_two_processes_and_sigkill_resume(data, block_run):
    """2 processes x 4 images == 1 process x 8 (step 1: same forward, another reduction order, numerics.loss_floor);
    SIGKILL of a 1-process run after step 3, then resume: bitwise equal to the uninterrupted run."""
    two = data["base"] / "block_two"
    _train(two, *_shards(data, "shard_block"), "config.DISTRIBUTED.NUM_PROC_PER_NODE=2",
           "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=4", "config.TRAINER.MAX_ITERATIONS=2")
    ref = _steps(block_run)[1]
    nm.assert_ok([nm.Check("shard_block 2x4 vs 1x8", "step-1 loss |diff|", abs(_steps(two)[1] - ref),
                           nm.loss_floor(ref), "same forward, another reduction order")])
    killed = data["base"] / "block_killed"
    proc = start(killed, *_shards(data, "shard_block"), "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=1",
                 new_session=True)
    wait_for_step(killed, 3, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    finish(proc)
    assert not (killed / "model_final_checkpoint_phase1.torch").exists()  # it was killed before the end
    _train(killed, *_shards(data, "shard_block"), "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=1")
    assert _steps(killed) == _steps(block_run)
    ref_state = _final(block_run)
    assert all(torch.equal(v, ref_state[k]) for k, v in _final(killed).items())


@pytest.mark.slow
@pytest.mark.dist
def test_global_shuffle_on_shards_two_processes_and_sigkill_resume(data):
    """Slow duplicate (covered by the shard-block test above plus the folder-equality test: the global order is
    the one every other source uses): the same checks with SHUFFLE_MODE=global."""
    ref_out = data["base"] / "global_ref"
    _train(ref_out, *_shards(data))
    two = data["base"] / "global_two"
    _train(two, *_shards(data), "config.DISTRIBUTED.NUM_PROC_PER_NODE=2", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=4",
           "config.TRAINER.MAX_ITERATIONS=2")
    ref = _steps(ref_out)[1]
    nm.assert_ok([nm.Check("global 2x4 vs 1x8", "step-1 loss |diff|", abs(_steps(two)[1] - ref), nm.loss_floor(ref),
                           "same forward, another reduction order")])
    killed = data["base"] / "global_killed"
    proc = start(killed, *_shards(data), "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=1", new_session=True)
    wait_for_step(killed, 3, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    finish(proc)
    _train(killed, *_shards(data), "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=1")
    assert _steps(killed) == _steps(ref_out)
