"""Weighted kNN (Wu et al. 2018 / DINO) against a brute-force reference and a hand-computed case."""
import math

import pytest
import torch

from scaleclr.data.sampler import ShardedSampler
from scaleclr.eval import extract_shard, knn_top1


def _reference_top1(train, train_labels, test, test_labels, k, temperature):
    """Plain-python weighted kNN: cosine similarity, k most similar, exp(sim / T) votes."""
    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    train = [unit(v) for v in train.tolist()]
    correct = 0
    for query, label in zip(test.tolist(), test_labels.tolist()):
        q = unit(query)
        sims = sorted(((sum(a * b for a, b in zip(q, t)), j) for j, t in enumerate(train)), reverse=True)
        votes = {}
        for sim, j in sims[:k]:
            c = int(train_labels[j])
            votes[c] = votes.get(c, 0.0) + math.exp(sim / temperature)
        best = max(votes.values())
        pred = min(c for c, v in votes.items() if v == best)
        correct += int(pred == label)
    return 100.0 * correct / len(test_labels)


@pytest.mark.parametrize("k,temperature,chunk_size", [(1, 0.07, None), (5, 0.07, 3), (20, 0.5, 7), (200, 0.1, 4)])
def test_knn_matches_brute_force(k, temperature, chunk_size):
    g = torch.Generator().manual_seed(k)
    centers = torch.randn(4, 8, generator=g)
    train_labels = torch.randint(0, 4, (60,), generator=g)
    test_labels = torch.randint(0, 4, (25,), generator=g)
    train = centers[train_labels] + 1.5 * torch.randn(60, 8, generator=g)
    test = centers[test_labels] + 1.5 * torch.randn(25, 8, generator=g)
    got = knn_top1(train, train_labels, test, test_labels, k=k, temperature=temperature, chunk_size=chunk_size)
    # a percentage of 25 votes: the counts must agree exactly (random features: no similarity ties within fp32
    # rounding); approx only absorbs the division
    assert got == pytest.approx(_reference_top1(train, train_labels, test, test_labels, min(k, 60), temperature))
    assert 0.0 < got <= 100.0
    # cosine similarity: scaling the features changes nothing
    assert knn_top1(3 * train, train_labels, 0.5 * test, test_labels, k=k, temperature=temperature) == got


def test_knn_hand_computed_temperature_weighting():
    # query [1, 0]; one class-1 neighbour at similarity 1, two class-0 neighbours at similarity 0.5.
    s = math.sqrt(3) / 2
    train = torch.tensor([[1.0, 0.0], [0.5, s], [0.5, -s], [-1.0, 0.0]])
    train_labels = torch.tensor([1, 0, 0, 2])
    test, test_labels = torch.tensor([[2.0, 0.0]]), torch.tensor([1])
    # T = 0.07: e^(1/0.07) = 1.6e6 > 2 e^(0.5/0.07) = 2.5e3 -> class 1 wins
    assert knn_top1(train, train_labels, test, test_labels, k=3, temperature=0.07) == 100.0
    # T = 10: e^0.1 = 1.105 < 2 e^0.05 = 2.103 -> class 0 wins (the majority)
    assert knn_top1(train, train_labels, test, test_labels, k=3, temperature=10.0) == 0.0
    assert knn_top1(train, train_labels, test, test_labels, k=1, temperature=10.0) == 100.0


def test_knn_rejects_unlabelled_and_bad_shapes():
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, -1])
    with pytest.raises(ValueError, match="labels >= 0"):
        knn_top1(x, y, x, y.abs())
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        knn_top1(x, y.abs(), torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_classes"):
        knn_top1(x, y.abs(), x, y.abs(), num_classes=1)


def test_extract_shard_stacks_without_grad():
    model = torch.nn.Linear(6, 4)
    images = torch.randn(7, 6)
    labels = torch.arange(7)
    sampler = ShardedSampler(7, 1, 0, shuffle=False, seed=0, drop_last=False, batch_size=4)  # 4 + 3 (+ 1 padding)
    loader = [(images[:4], labels[:4]), {"data": images[4:], "label": labels[4:]}]
    with torch.no_grad():
        feats, got_labels, valid = extract_shard(model, loader, sampler, torch.device("cpu"))
    assert feats.shape == (7, 4) and not feats.requires_grad and valid.all()
    # batches of 4 + 3 vs 7 rows: the 6-term products may run in other kernels: fp32 rounding, within allclose's
    # rtol 1e-5 (~200 u)
    assert torch.allclose(feats, model(images).detach()) and torch.equal(got_labels, labels)
    with pytest.raises(ValueError, match="no batch"):
        extract_shard(model, [], sampler, torch.device("cpu"))
