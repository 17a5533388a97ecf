"""Evaluation of learned representations: weighted kNN on frozen features (``knn``)."""
from scaleclr.eval.knn import extract_features, knn_top1

__all__ = ["extract_features", "knn_top1"]
