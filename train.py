#!/usr/bin/env python
"""scaleclr entry point: SimCLR pretraining (Chen et al. 2020, arXiv 2002.05709) with VISSL's configs.

    python train.py config=quickstart
    python train.py config=pretrain/simclr/simclr_8node_resnet config.OPTIMIZER.num_epochs=200
    python train.py config=quickstart --dry-run
    torchrun --nproc_per_node 2 train.py config=... config.DISTRIBUTED.NUM_PROC_PER_NODE=2
    deepspeed --num_gpus 2 train.py --deepspeed_config ds_configs/zero2.json config=...

Launcher flags (--local_rank, --deepspeed_config, --dry-run) are parsed here; everything else is a Hydra
override passed to the compose API. See README.md for the whole command surface.
"""
import sys

from scaleclr.main import main

if __name__ == "__main__":
    sys.exit(main())
