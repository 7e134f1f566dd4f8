"""The frozen-feature evaluators: the linear probe, weighted kNN and top-k accuracy on hand-made data."""

from __future__ import annotations

import pytest
import torch
from conftest import gen
from torch import nn

from byol_ray.eval.scoring import knn_accuracy, linear_probe, topk_accuracy


# ---- evaluation ---------------------------------------------------------------------------------
def test_linear_probe_separable_and_noise():
    g = gen(3)
    n_cls = 10
    ytr = torch.arange(400) % n_cls
    yte = torch.randperm(300, generator=g) % n_cls
    xtr = nn.functional.one_hot(ytr, n_cls).float() + 0.1 * torch.randn(400, n_cls, generator=g)
    xte = nn.functional.one_hot(yte, n_cls).float() + 0.1 * torch.randn(300, n_cls, generator=g)
    res = linear_probe(xtr, ytr, xte, yte, epochs=50)
    assert res["top1"] == pytest.approx(100.0)
    assert res["top5"] == pytest.approx(100.0)
    # Pure noise features: chance (10%) on held-out data, within a wide margin.
    ntr = torch.randn(400, 20, generator=g)
    nte = torch.randn(2000, 20, generator=g)
    ynte = torch.randint(0, n_cls, (2000,), generator=g)
    res = linear_probe(ntr, ytr, nte, ynte, epochs=50)
    assert res["top1"] < 16.0
    assert 35.0 < res["top5"] < 65.0  # top-5 of 10 classes: 50% by chance
    assert res["top5"] >= res["top1"]


def test_knn_accuracy_clusters_and_shuffled_labels():
    g = gen(4)
    n_cls, dim = 5, 16
    centers = torch.randn(n_cls, dim, generator=g) * 3
    ytr = torch.arange(500) % n_cls
    yte = torch.arange(200) % n_cls
    xtr = centers[ytr] + 0.1 * torch.randn(500, dim, generator=g)
    xte = centers[yte] + 0.1 * torch.randn(200, dim, generator=g)
    assert knn_accuracy(xtr, ytr, xte, yte, k=20, temperature=0.1) == pytest.approx(100.0)
    # Labels unrelated to the clusters: around chance (20%).
    ytr_rand = torch.randint(0, n_cls, (500,), generator=g)
    acc = knn_accuracy(xtr, ytr_rand, xte, yte, k=20, temperature=0.1, chunk=64)
    assert acc < 40.0
    # k larger than the train set is clamped, chunking does not change the result.
    assert knn_accuracy(xtr[:30], ytr[:30], xte, yte, k=500) == knn_accuracy(
        xtr[:30], ytr[:30], xte, yte, k=30, chunk=7
    )


def test_topk_accuracy_hand_made():
    logits = torch.tensor(
        [
            [0.9, 0.05, 0.05],  # label 0: top-1 hit
            [0.1, 0.3, 0.6],  # label 1: second -> top-2 hit
            [0.2, 0.7, 0.1],  # label 2: last -> miss even in top-2
            [0.0, 0.4, 0.5],  # label 2: top-1 hit
        ]
    )
    labels = torch.tensor([0, 1, 2, 2])
    assert topk_accuracy(logits, labels, 1) == pytest.approx(50.0)
    assert topk_accuracy(logits, labels, 2) == pytest.approx(75.0)
    assert topk_accuracy(logits, labels, 3) == pytest.approx(100.0)
    assert topk_accuracy(logits, labels, 5) == pytest.approx(100.0)  # k clamped to the class count
