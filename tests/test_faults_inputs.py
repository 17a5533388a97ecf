"""Bad inputs (issue 17, docs/faults.md "Bad inputs"): each case is refused or converted with a word, and each has
a negative control (the valid neighbour passes; the unfixed behaviour is shown to be wrong)."""
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from scaleclr.config import ConfigError, load_config
from scaleclr.data.decode import ALPHA_BACKGROUND, CONVERSIONS
from scaleclr.data.host_stage import decode_rgb
from scaleclr.data.sources import DiskFolderSource, load_rgb, open_image

ROOT = Path(__file__).resolve().parents[1]
BASE = "config=test/integration_test/quick_simclr_synthetic"
LR = "config.OPTIMIZER.param_schedulers.lr"


def load(*overrides):
    return load_config([BASE, *overrides])[0]


# ------------------------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("override, good, match", [
    (f"{LR}.start_value=-0.1", f"{LR}.start_value=0.1", r"lr.start_value: must be >= 0"),
    (f"{LR}.start_value=inf", f"{LR}.start_value=1e3", r"lr.start_value: must be a finite number >= 0"),
    (f"{LR}.start_value=nan", f"{LR}.start_value=0.2", r"lr.start_value: must be a finite number"),
    (f"{LR}.start_value='nan'", f"{LR}.start_value='0.2'", r"got 'nan'"),  # a quoted string, as the CLI passes it
    (f"{LR}.end_value=-1e-4", f"{LR}.end_value=0", r"lr.end_value: must be >= 0"),
    ("config.OPTIMIZER.momentum=nan", "config.OPTIMIZER.momentum=0.0", r"momentum: must be a finite number in \[0, 1\)"),
    ("config.OPTIMIZER.momentum=1.0", "config.OPTIMIZER.momentum=0.99", r"momentum: must be in \[0, 1\)"),
    ("config.OPTIMIZER.weight_decay=-1e-6", "config.OPTIMIZER.weight_decay=0", r"weight_decay: must be >= 0"),
    ("config.LOSS.simclr_info_nce_loss.temperature=nan", "config.LOSS.simclr_info_nce_loss.temperature=0.5",
     r"temperature: must be a finite number > 0"),
    ("config.LOSS.simclr_info_nce_loss.temperature=-0.1", "config.LOSS.simclr_info_nce_loss.temperature=1e-3",
     r"temperature: must be > 0"),
    ("config.OPTIMIZER.larc_config.trust_coefficient=0", "config.OPTIMIZER.larc_config.trust_coefficient=0.02",
     r"trust_coefficient: must be > 0"),
    ("config.OPTIMIZER.larc_config.eps=inf", "config.OPTIMIZER.larc_config.eps=0", r"eps: must be a finite number"),
    ("config.MODEL.HEAD.BATCHNORM_EPS=0", "config.MODEL.HEAD.BATCHNORM_EPS=1e-3", r"BATCHNORM_EPS: must be > 0"),
    ("config.MODEL.HEAD.BATCHNORM_MOMENTUM=1.5", "config.MODEL.HEAD.BATCHNORM_MOMENTUM=1.0",
     r"BATCHNORM_MOMENTUM: must be in \[0, 1\]"),
    ("config.KNN_EVAL.TEMPERATURE=nan", "config.KNN_EVAL.TEMPERATURE=0.1", r"TEMPERATURE: must be a finite"),
    ("+config.DATA.TRAIN.TRANSFORMS.1.scale=[0.2,1.5]", "+config.DATA.TRAIN.TRANSFORMS.1.scale=[0.2,1.0]",
     r"TRANSFORMS\[1\]: RandomResizedCrop: scale=\[0.2, 1.5\].*<= 1"),
    ("+config.DATA.TRAIN.TRANSFORMS.1.ratio=[nan,1.0]", "+config.DATA.TRAIN.TRANSFORMS.1.ratio=[0.5,2.0]",
     r"TRANSFORMS\[1\]: RandomResizedCrop: ratio=\[nan, 1.0\] must be finite"),
    ("config.DATA.TRAIN.TRANSFORMS.2.p=1.5", "config.DATA.TRAIN.TRANSFORMS.2.p=1.0", r"TRANSFORMS\[2\].*p=1.5"),
    ("config.DATA.TRAIN.TRANSFORMS.4.radius_max=inf", "config.DATA.TRAIN.TRANSFORMS.4.radius_max=3.0",
     r"TRANSFORMS\[4\]: ImgPilGaussianBlur.*finite"),
    ("config.DATA.TRAIN.TRANSFORMS.3.strength=nan", "config.DATA.TRAIN.TRANSFORMS.3.strength=0.5",
     r"TRANSFORMS\[3\]: ImgPilColorDistortion: strength=nan"),
    ('config.MODEL.HEAD.PARAMS=[["mlp",{"dims":[512,0]}]]', 'config.MODEL.HEAD.PARAMS=[["mlp",{"dims":[512,128]}]]',
     r"HEAD.PARAMS\[0\]: dims\[1\] = 0"),
    ("config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=1", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=2",
     r"BATCHSIZE_PER_REPLICA: = 1 gives 1 image.*InfoNCE needs >= 2"),
    (f"{LR}.auto_lr_scaling.base_lr_batch_size=0", f"{LR}.auto_lr_scaling.base_lr_batch_size=128",
     r"base_lr_batch_size: must be > 0"),
])
def test_bad_numbers_are_config_errors_naming_key_and_value(override, good, match):
    with pytest.raises(ConfigError, match=match):
        load(override)
    load(good)  # negative control: the valid neighbour passes


def _config_tree(tmp_path, monkeypatch, **files):
    """A copy of configs/ with extra files under config/faults/, selected by SCALECLR_CONFIG_DIR."""
    conf = tmp_path / "configs"
    shutil.copytree(ROOT / "configs", conf)
    (conf / "config" / "faults").mkdir()
    for name, text in files.items():
        (conf / "config" / "faults" / f"{name}.yaml").write_text(text)
    monkeypatch.setenv("SCALECLR_CONFIG_DIR", str(conf))


def _lr_file(body):
    return "# @package _global_\nconfig:\n  OPTIMIZER:\n    param_schedulers:\n      lr:\n" + body


def test_yaml_nan_inf_and_nested_schedules_in_config_files(tmp_path, monkeypatch):
    """YAML's .nan / .inf reach the config as floats (not through the override grammar): still refused, and so
    are bad entries deep inside composite / multistep schedules."""
    _config_tree(tmp_path, monkeypatch,
                 nan_momentum="# @package _global_\nconfig:\n  OPTIMIZER:\n    momentum: .nan\n",
                 inf_lr=_lr_file("        value: .inf\n"),
                 composite=_lr_file("        name: composite\n        lengths: [0.5, 0.5]\n        schedulers:\n"
                                    "          - {name: linear, start_value: 0.1, end_value: 0.2}\n"
                                    "          - {name: cosine, start_value: -0.2, end_value: 0.0}\n"),
                 multistep=_lr_file("        name: multistep\n        values: [0.1, .inf]\n        milestones: [1]\n"),
                 multistep_ok=_lr_file("        name: multistep\n        values: [0.1, 0.01]\n        milestones: [1]\n"),
                 broken="config:\n  OPTIMIZER:\n    num_epochs: [1, 2\n  DATA: : x\n")
    with pytest.raises(ConfigError, match=r"momentum: must be a finite number.*got nan"):
        load("+config/faults=nan_momentum")
    with pytest.raises(ConfigError, match=r"lr.value: must be a finite number.*got inf"):
        load("+config/faults=inf_lr")
    with pytest.raises(ConfigError, match=r"lr.schedulers\[1\].start_value: must be >= 0"):
        load("+config/faults=composite")
    with pytest.raises(ConfigError, match=r"lr.values\[1\]: must be a finite number"):
        load("+config/faults=multistep")
    load("+config/faults=multistep_ok")  # control: the copied tree and a sound schedule compose
    # a file that does not parse: its path, line and column (was a yaml.ParserError traceback, exit status 1)
    with pytest.raises(ConfigError, match=r"broken.yaml:4:\d+: the YAML does not parse"):
        load("+config/faults=broken")


# ---------------------------------------------------------------------------------------- symlinks
def _png(path, size=8, value=0):
    Image.new("RGB", (size, size), (value, value, value)).save(path)


@pytest.fixture
def looped_folder(tmp_path):
    root = tmp_path / "data"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            _png(root / c / f"{i}.png", value=40 * i)
    os.symlink("..", root / "a" / "loop")  # a loop back to the data root
    os.symlink("../b", root / "a" / "alias_b")  # another class, again
    os.symlink("../b/0.png", root / "a" / "dup.png")  # a file, again
    return root


def test_symlink_loop_lists_every_image_once(looped_folder, caplog):
    # negative control: torchvision's listing repeats the images dozens of times, with no word
    _, class_to_idx = find_classes(str(looped_folder))
    assert len(make_dataset(str(looped_folder), class_to_idx, extensions=IMG_EXTENSIONS)) > 6 * 10
    with caplog.at_level(logging.WARNING):
        src = DiskFolderSource(str(looped_folder))
    paths = [src.path(i) for i in range(len(src))]
    assert len(src) == 6 and len({os.path.realpath(p) for p in paths}) == 6
    assert list(src.labels) == [0, 0, 0, 1, 1, 1]  # b's images keep label b, where they live
    assert src.duplicates == 1 and {os.path.basename(link) for link, _ in src.skipped_links} == {"loop", "alias_b"}
    text = caplog.text
    assert "a/loop" in text and "a/alias_b" in text and "1 file(s) reached a second time" in text


def test_plain_folder_matches_torchvision(tmp_path):
    root = tmp_path / "data"
    for c in ("x", "y"):
        (root / c / "sub").mkdir(parents=True)
        _png(root / c / "1.png")
        _png(root / c / "sub" / "0.jpg")
        (root / c / "notes.txt").write_text("not an image")
    _, class_to_idx = find_classes(str(root))
    expected = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS)
    src = DiskFolderSource(str(root))
    assert [(src.path(i), int(src.labels[i])) for i in range(len(src))] == expected
    assert src.duplicates == 0 and not src.skipped_links


# ----------------------------------------------------------------------------------------- decoding
@pytest.fixture
def odd_images(tmp_path):
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 0 .. 63000 of 65535
    Image.fromarray(ramp).save(tmp_path / "gray16.png")
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255  # red under fully transparent pixels on the left half
    rgba[:, 4:, :] = (10, 200, 30, 255)  # opaque green on the right
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    pal.save(tmp_path / "p_trns.png", transparency=0)
    return tmp_path, ramp


def test_16bit_png_scaled_not_clipped_to_white(odd_images):
    d, ramp = odd_images
    with Image.open(d / "gray16.png") as raw:
        assert raw.mode.startswith("I")
        clipped = np.asarray(raw.convert("RGB"))  # negative control: Pillow's conversion clips at 255
    assert (clipped[..., 0] == 255).mean() > 0.95
    expected = np.floor(ramp / 257 + 0.5).astype(np.uint8)
    before = CONVERSIONS["16-bit"]
    for img in (load_rgb(str(d / "gray16.png")), decode_rgb(open_image(str(d / "gray16.png")))[0]):
        a = np.asarray(img)
        assert img.mode == "RGB" and a.dtype == np.uint8
        assert (a == expected[..., None]).all()  # exact: integer rounding of v / 257
    assert CONVERSIONS["16-bit"] == before + 2


def test_alpha_composited_over_documented_grey(odd_images, caplog):
    d, _ = odd_images
    with Image.open(d / "rgba.png") as raw:
        dropped = np.asarray(raw.convert("RGB"))  # negative control: the hidden red shows
    assert tuple(dropped[0, 0]) == (255, 0, 0)
    before = CONVERSIONS["alpha"]
    with caplog.at_level(logging.WARNING):
        for img in (load_rgb(str(d / "rgba.png")), decode_rgb(open_image(str(d / "rgba.png")))[0]):
            a = np.asarray(img)
            assert tuple(a[0, 0]) == ALPHA_BACKGROUND and tuple(a[0, 7]) == (10, 200, 30)
        pal = np.asarray(load_rgb(str(d / "p_trns.png")))
    assert tuple(pal[0, 0]) == ALPHA_BACKGROUND  # palette entry 0 is transparent
    assert CONVERSIONS["alpha"] == before + 3
    if before == 0:
        assert "rgba.png (alpha): composited over grey" in caplog.text


def test_plain_rgb_is_not_touched_or_counted(tmp_path):
    _png(tmp_path / "rgb.png", value=77)
    before = dict(CONVERSIONS)
    assert tuple(np.asarray(load_rgb(str(tmp_path / "rgb.png")))[0, 0]) == (77, 77, 77)
    assert dict(CONVERSIONS) == before


# ---------------------------------------------------------------------------------------- preflight
def _preflight(*overrides):
    from scaleclr.main import preflight

    root = load(*overrides)
    preflight(root, None)


def test_preflight_empty_class_folder(tmp_path):
    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    (data / "b").mkdir()
    for i in range(8):
        _png(data / "a" / f"{i}.png")
    src = ["config.DATA.TRAIN.DATA_SOURCES=[disk_folder]", f"config.DATA.TRAIN.DATA_PATHS=[{data}]"]
    with pytest.raises(ConfigError, match=r"DATA_PATHS\[0\]: .*class folder\(s\) with no image: b"):
        _preflight(*src)
    _png(data / "b" / "0.png")
    _preflight(*src, f"config.CHECKPOINT.DIR={tmp_path / 'run'}")  # control


def test_preflight_fewer_images_than_a_global_batch(tmp_path):
    with pytest.raises(ConfigError, match=r"BATCHSIZE_PER_REPLICA: = 8 .* holds 4 \(config.DATA.TRAIN.DATA_LIMIT=4\)"
                       r".*0 steps"):
        _preflight("config.DATA.TRAIN.DATA_LIMIT=4", f"config.CHECKPOINT.DIR={tmp_path}")
    _preflight("config.DATA.TRAIN.DATA_LIMIT=4", "config.DATA.TRAIN.DROP_LAST=False",
               f"config.CHECKPOINT.DIR={tmp_path}")  # control: a partial batch is a step


def test_preflight_checkpoint_dir_under_a_file(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"CHECKPOINT.DIR: .*file.txt', which is not a folder"):
        _preflight(f"config.CHECKPOINT.DIR={tmp_path / 'file.txt' / 'sub'}")
    _preflight(f"config.CHECKPOINT.DIR={tmp_path / 'new' / 'sub'}")  # control: a creatable folder


@pytest.mark.skipif(os.geteuid() == 0, reason="root passes the permission bits")
def test_preflight_checkpoint_dir_read_only(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match="not writable"):
        _preflight(f"config.CHECKPOINT.DIR={ro / 'run'}")


def test_train_py_exits_2_before_any_worker(tmp_path):
    """One subprocess: the exit status is 2, the message names the key, and no run folder was made."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), BASE, f"config.CHECKPOINT.DIR={run}",
                        "config.OPTIMIZER.param_schedulers.lr.start_value=-0.15"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "config.OPTIMIZER.param_schedulers.lr.start_value: must be >= 0" in p.stderr
    assert not run.exists() and "Traceback" not in p.stderr
    assert time.monotonic() - t0 < 60


def test_train_py_checkpoint_dir_under_a_file_exits_2(tmp_path):
    """Through train.py (the lock is read after preflight): a CHECKPOINT.DIR under a regular file is exit status 2
    naming the key, not a traceback from reading the run lock (before the fix: NotADirectoryError, exit 1)."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), BASE, f"config.CHECKPOINT.DIR={blocker}/run",
                        "--dry-run"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]  # --dry-run stops before preflight: the config itself is fine
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), BASE, f"config.CHECKPOINT.DIR={blocker}/run"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and "config.CHECKPOINT.DIR" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


def test_train_py_multinode_auto_run_id_exits_2(tmp_path):
    """RUN_ID=auto on 2 nodes: exit status 2 naming the key, before any worker starts (spawn checks the rendezvous
    first; no run folder is made)."""
    run = tmp_path / "run"
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), BASE, f"config.CHECKPOINT.DIR={run}",
                        "config.DISTRIBUTED.NUM_NODES=2"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert p.returncode == 2 and "config.DISTRIBUTED.RUN_ID" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not run.exists()
