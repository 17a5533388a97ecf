"""Combinations that pass every single-key check but fail on a GPU, refused (or adjusted) before launch.

- apex SyncBN and bf16: apex's SyncBN kernels (``csrc/welford.cu``: ``welford_mean_var``, ``batchnorm_forward``,
  ``reduce_bn``, ``welford_parallel``) dispatch float, double and half only, so the first bf16 BatchNorm input
  stops the run with "not implemented for 'BFloat16'" after the model is built and the data started.
- apex SyncBN and channels_last: apex's ``SyncBatchnormFunction`` calls ``input.contiguous()`` (and
  ``grad_output.contiguous()``) on every BN input, so a channels_last trunk pays a layout copy in and out of
  every BatchNorm, and apex's own NHWC path (``channel_last=True``) wants ``[N, H, W, C]`` *shapes*, which
  scaleclr's models never produce. ``CHANNELS_LAST=auto`` therefore resolves to ``off`` (with a warning);
  an explicit ``CHANNELS_LAST=on`` is refused.

Documented in ``docs/gpu.md`` ("Configurations checked before launch").
"""
import logging

from omegaconf import DictConfig

from scaleclr.config.errors import ConfigError

logger = logging.getLogger(__name__)

SYNC_BN_TYPE = "config.MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE"


def bf16_source(c: DictConfig) -> str:
    """The key that puts bf16 activations through the model, or '' when none does."""
    amp = c.MODEL.AMP_PARAMS
    if amp.USE_AMP and amp.AMP_DTYPE == "bfloat16":
        return "config.MODEL.AMP_PARAMS.AMP_DTYPE=bfloat16 (with USE_AMP=True)"
    if c.DISTRIBUTED.ENGINE == "fsdp" and c.MODEL.FSDP_CONFIG.MIXED_PRECISION == "bfloat16":
        return "config.MODEL.FSDP_CONFIG.MIXED_PRECISION=bfloat16"
    return ""


def uses_apex_sync_bn(c: DictConfig) -> bool:
    sbn = c.MODEL.SYNC_BN_CONFIG
    return bool(sbn.CONVERT_BN_TO_SYNC_BN) and sbn.SYNC_BN_TYPE == "apex"


def check_gpu_combinations(root: DictConfig) -> None:
    """Raise ConfigError for apex SyncBN with bf16 or with CHANNELS_LAST=on; turn CHANNELS_LAST=auto off with apex.

    Mutates ``root.config.MODEL.CHANNELS_LAST`` (``auto`` -> ``off``) when apex SyncBN is configured.
    """
    c = root.config
    if not uses_apex_sync_bn(c):
        return
    bf16 = bf16_source(c)
    if bf16:
        raise ConfigError(SYNC_BN_TYPE, f"= apex cannot run with {bf16}: apex's SyncBN kernels take float32 and "
                          "float16 only (no BFloat16 dispatch). Use SYNC_BN_TYPE=pytorch (torch's SyncBN on CUDA) "
                          "or native (scaleclr's own), or AMP_DTYPE=float16.")
    key = "config.MODEL.CHANNELS_LAST"
    if c.MODEL.CHANNELS_LAST == "on":
        raise ConfigError(key, f"= on with {SYNC_BN_TYPE}=apex: apex's SyncBN copies every channels_last input "
                          "back to NCHW (and its NHWC mode wants [N, H, W, C] shapes). Use CHANNELS_LAST=off (or "
                          "auto) with apex, or SYNC_BN_TYPE=pytorch / native with channels_last.")
    if c.MODEL.CHANNELS_LAST == "auto":
        c.MODEL.CHANNELS_LAST = "off"
        logger.warning("%s=apex: config.MODEL.CHANNELS_LAST=auto resolves to off (apex's SyncBN copies channels_last "
                       "inputs to NCHW in every BatchNorm); use SYNC_BN_TYPE=pytorch for channels_last", SYNC_BN_TYPE)
