"""Evaluation of learned representations: weighted kNN on frozen features, sharded and exact (``knn``); linear
evaluation's exact sharded top-k, sharded feature extraction and precomputed-feature dataset (``linear``; the task
that trains the classifier through the Trainer is ``scaleclr.tasks.LinearEvalTask``)."""
from scaleclr.eval.knn import extract_shard, knn_top1
from scaleclr.eval.linear import (FeatureDataset, evaluate_topk, extract_sharded_features, topk_correct, topk_percent,
                                  valid_rows)

__all__ = ["extract_shard", "knn_top1", "FeatureDataset", "evaluate_topk", "extract_sharded_features",
           "topk_correct", "topk_percent", "valid_rows"]
