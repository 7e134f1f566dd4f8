"""The paper's two linear protocols on frozen features, each with its hyper-parameter picked on held-out data.

Features are extracted once (``evaluate.extract_features``, no augmentation) and standardised with the
train split's statistics (``evaluate.standardise``). A class-balanced slice of the train split is held
out, every value of a small grid is fitted on the rest and scored on the slice, and the classifier is
refitted on the whole train split with the best value and scored on the test split (top-1, top-5).

- ``linear_eval`` (section 4, table 1, the ImageNet linear evaluation): SGD + Nesterov momentum 0.9 with a
  cosine schedule, the learning rate picked from the grid. The paper trains 80 epochs with augmentation;
  the epochs are a parameter here, and there is no augmentation because the features are computed once.
  No weight decay, as the convex problem on 54k x 128 features does not overfit in a few tens of epochs.
- ``regularised_linear_eval`` (the paper's transfer protocol, appendix: linear evaluation on other
  classification datasets, which follows Kornblith et al. 2019 and SimCLR): L2-regularised multinomial
  logistic regression on frozen features, no augmentation, fitted to convergence with L-BFGS, the
  regularisation strength picked on validation data from SimCLR's grid of 45 log-spaced values between
  1e-6 and 1e5. This is
  the protocol for small transfer sets: with ~1k training images the regularisation, not the lr,
  decides what a linear classifier generalises to, and a fixed-epoch SGD run regularises by accident.
  The paper refits on train + validation; here the held-out slice comes from the train split, so the
  refit on the whole train split is the same thing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.schedules import cosine_decay
from .finetune import balanced_subset
from .scoring import fit_logistic, standardise, topk_accuracy

DEFAULT_LRS = (0.01, 0.1, 1.0)
PAPER_WEIGHT_DECAYS = tuple(float(v) for v in np.logspace(-6, 5, 45))
LBFGS_MAX_ITER = 300  # enough to converge on ~1k x 128 standardised features at the smallest penalty


@dataclass(frozen=True)
class FeatureSplit:
    """Frozen features and labels of a train and a test split."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def n_classes(self) -> int:
        return int(max(self.train_y.max(), self.test_y.max())) + 1


def train_linear(
    x: torch.Tensor, y: torch.Tensor, n_classes: int, lr: float, epochs: int, batch_size: int = 1024, seed: int = 0
) -> nn.Linear:
    """SGD-Nesterov logistic regression on (already standardised) features; zero init, seeded order."""
    head = nn.Linear(x.shape[1], n_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, nesterov=True)
    # Small transfer sets (digits: 1.1k train images) would get one step per epoch at batch 1024; give
    # them about ten.
    batch = min(batch_size, max(2, len(x) // 10))
    steps_per_epoch = max(1, len(x) // batch)
    total = steps_per_epoch * epochs
    g = torch.Generator().manual_seed(seed)
    step = 0
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=g)
            for i in range(steps_per_epoch):
                for group in opt.param_groups:
                    group["lr"] = lr * cosine_decay(step, total)
                idx = perm[i * batch : (i + 1) * batch]
                loss = F.cross_entropy(head(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
    return head


def _select_and_refit(
    split: FeatureSplit,
    grid: Sequence[float],
    fit: Callable[[torch.Tensor, torch.Tensor, int, float], nn.Linear],
    prefer_larger: bool,
    holdout_fraction: float,
    seed: int,
    log: Callable[[str], None],
    label: str,
) -> tuple[dict, float, dict[float, float]]:
    """Pick the grid value with the best held-out top-1, refit on all of train, score test."""
    train_x, train_y, n_classes = split.train_x, split.train_y, split.n_classes
    val_scores: dict[float, float] = {}
    if len(grid) > 1:
        val_idx = balanced_subset(train_y, holdout_fraction, seed)
        keep = torch.ones(len(train_y), dtype=torch.bool)
        keep[val_idx] = False
        fit_x, val_x = standardise(train_x[keep], train_x[val_idx])
        for v in grid:
            head = fit(fit_x, train_y[keep], n_classes, v)
            with torch.no_grad():
                val_scores[v] = topk_accuracy(head(val_x.to(head.weight.dtype)), train_y[val_idx], 1)
            log(f"[linear] {label} {v:g}: held-out top-1 {val_scores[v]:.2f}")
        # Ties go to the safer end of the grid: the smaller lr, the stronger regularisation.
        order = sorted(val_scores, reverse=prefer_larger)
        best = max(order, key=lambda v: val_scores[v])
    else:
        best = grid[0]
    xtr, xte = standardise(train_x, split.test_x)
    head = fit(xtr, train_y, n_classes, best)
    with torch.no_grad():
        logits = head(xte.to(head.weight.dtype))
    scores = {"top1": topk_accuracy(logits, split.test_y, 1), "top5": topk_accuracy(logits, split.test_y, 5)}
    return scores, best, val_scores


def linear_eval(
    split: FeatureSplit,
    lrs: Sequence[float] = DEFAULT_LRS,
    epochs: int = 30,
    batch_size: int = 1024,  # the paper's linear-evaluation batch
    holdout_fraction: float = 0.1,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict:
    """SGD protocol. Returns test top1/top5 (%), the chosen lr and every lr's held-out top-1."""

    def fit(x, y, n_classes, lr):
        return train_linear(x, y, n_classes, lr, epochs, batch_size, seed)

    scores, lr, val = _select_and_refit(split, lrs, fit, False, holdout_fraction, seed, log, "lr")
    return {**scores, "lr": lr, "val_top1": val}


def regularised_linear_eval(
    split: FeatureSplit,
    weight_decays: Sequence[float] = PAPER_WEIGHT_DECAYS,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = LBFGS_MAX_ITER,
    log: Callable[[str], None] = print,
) -> dict:
    """L-BFGS transfer protocol. Returns test top1/top5 (%), the chosen weight decay, held-out top-1s."""

    def fit(x, y, n_classes, wd):
        return fit_logistic(x, y, n_classes, wd, max_iter)

    scores, wd, val = _select_and_refit(split, weight_decays, fit, True, holdout_fraction, seed, log, "weight decay")
    return {**scores, "weight_decay": wd, "val_top1": val}
