"""Interchange formats: export any engine's checkpoint as scaleclr / torchvision / VISSL weights, and initialise
a model from such files (``config.MODEL.WEIGHTS_INIT``).

* :mod:`~scaleclr.interchange.formats`: the layouts and the conversions between them (pure dict code).
* :mod:`~scaleclr.interchange.checkpoints`: read a DDP file, FSDP2 DCP directory, DeepSpeed directory, scaleclr
  export, VISSL or torchvision file into an fp32 scaleclr state dict, without a process group.
* :mod:`~scaleclr.interchange.weights_init`: ``config.MODEL.WEIGHTS_INIT`` with VISSL's keys, strict on the trunk.
* ``python -m scaleclr.export``: the command line (:mod:`scaleclr.export`).
"""
from scaleclr.interchange.checkpoints import Checkpoint, load_weights_file, read_checkpoint
from scaleclr.interchange.formats import (CLASSIFIER_LAYOUTS, Classifier, classifier_of, detect_format,
                                          from_torchvision, from_vissl, infer_trunk_config, scaleclr_payload,
                                          to_torchvision, to_vissl)
from scaleclr.interchange.weights_init import InitReport, init_model_from_weights

__all__ = ["Checkpoint", "read_checkpoint", "load_weights_file", "CLASSIFIER_LAYOUTS", "Classifier", "classifier_of",
           "detect_format", "from_torchvision", "from_vissl", "infer_trunk_config", "scaleclr_payload",
           "to_torchvision", "to_vissl", "InitReport", "init_model_from_weights"]
