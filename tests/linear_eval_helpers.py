"""Shared by the linear-evaluation test files: the configs, train.py runs and in-process trainers."""
import json
import os
from pathlib import Path

from train_helpers import run_train_py

QUICK = "config=test/integration_test/quick_linear_eval"
BENCH = "config=benchmark/linear_image_classification/imagenet1k/"
VISSL_CFG = BENCH + "eval_resnet_8gpu_transfer_in1k_linear"
SIMCLR_CFG = BENCH + "simclr_linear_in1k"
DEMO_CFG = "config=benchmark/linear_image_classification/demo_digits_linear"
EVAL_TF = ("config.DATA.TRAIN.TRANSFORMS=[{name:Resize,size:37},{name:CenterCrop,size:32},{name:ToTensor},"
           "{name:Normalize,mean:[0.5,0.5,0.5],std:[0.5,0.5,0.5]}]")
PRECOMPUTED = ["config.MODEL.FEATURE_EVAL_SETTINGS.PRECOMPUTE_FEATURES=True", EVAL_TF]
ENV = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", CUDA_VISIBLE_DEVICES="")


def run(out_dir, *overrides, config=QUICK, launcher=(), check=True, timeout=600):
    return run_train_py(out_dir, *overrides, config=config, launcher=launcher, timeout=timeout, check=check)


def records(out_dir, key):
    return [json.loads(line) for line in open(Path(out_dir) / "metrics.jsonl") if key in json.loads(line)]


def phases_of(out_dir):
    return [(r["step"], r["linear_top1"], r["linear_top5"], r["test_images"]) for r in records(out_dir, "linear_top1")]


def make_trainer(overrides, rank=0, world=1):
    from scaleclr.config import load_config
    from scaleclr.trainer import Trainer

    root, _ = load_config(overrides, world_size=world)
    return Trainer(root, rank=rank, world_size=world, local_rank=rank, local_world_size=world)


def quick(out_dir, *extra):
    return [QUICK, f"config.CHECKPOINT.DIR={out_dir}", "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=False", *extra]
