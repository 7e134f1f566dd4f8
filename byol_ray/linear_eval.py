"""The paper's linear evaluation protocol on frozen features (section 4, table 1).

Features are extracted once (``evaluate.extract_features``, no augmentation); a linear classifier is
trained on them with SGD + Nesterov momentum 0.9 and a cosine schedule. The learning rate is picked from
a small grid on a held-out, class-balanced slice of the train split, then the classifier is retrained on
the whole train split with that lr and scored on the test split (top-1, top-5).

Features are standardised with the train split's mean/std first: an affine change of the inputs a linear
classifier can absorb, so it changes nothing in what can be learned, but it lets one lr grid serve
encoders whose feature scales differ by orders of magnitude (BYOL vs untrained vs pixels). The paper
trains 80 epochs with augmentation on ImageNet; the epochs here are a parameter, and there is no
augmentation because the features are computed once. No weight decay, as the convex problem on
54k x 128 features does not overfit in a few tens of epochs.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .evaluate import topk_accuracy
from .finetune import balanced_subset

DEFAULT_LRS = (0.01, 0.1, 1.0)


def standardise(train_x: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mu = train_x.mean(0, keepdim=True)
    sd = train_x.std(0, keepdim=True).clamp_min(1e-6)
    return [(x - mu) / sd for x in (train_x, *others)]


def train_linear(x: torch.Tensor, y: torch.Tensor, n_classes: int, lr: float, epochs: int,
                 batch_size: int = 1024, seed: int = 0) -> nn.Linear:
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
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
                idx = perm[i * batch : (i + 1) * batch]
                loss = F.cross_entropy(head(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
    return head


def linear_eval(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    lrs: Sequence[float] = DEFAULT_LRS,
    epochs: int = 30,
    batch_size: int = 1024,  # the paper's linear-evaluation batch
    holdout_fraction: float = 0.1,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict:
    """The protocol above. Returns test top1/top5 (%), the chosen lr and every lr's held-out top-1."""
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    val_scores: dict[float, float] = {}
    if len(lrs) > 1:
        val_idx = balanced_subset(train_y, holdout_fraction, seed)
        keep = torch.ones(len(train_y), dtype=torch.bool)
        keep[val_idx] = False
        fit_x, val_x = standardise(train_x[keep], train_x[val_idx])
        for lr in lrs:
            head = train_linear(fit_x, train_y[keep], n_classes, lr, epochs, batch_size, seed)
            with torch.no_grad():
                val_scores[lr] = topk_accuracy(head(val_x), train_y[val_idx], 1)
            log(f"[linear] lr {lr:g}: held-out top-1 {val_scores[lr]:.2f}")
        # Ties keep the smaller lr (max returns the first maximum of the grid, sorted ascending).
        best_lr = max(sorted(val_scores), key=lambda lr: val_scores[lr])
    else:
        best_lr = lrs[0]
    xtr, xte = standardise(train_x, test_x)
    head = train_linear(xtr, train_y, n_classes, best_lr, epochs, batch_size, seed)
    with torch.no_grad():
        logits = head(xte)
    return {"top1": topk_accuracy(logits, test_y, 1), "top5": topk_accuracy(logits, test_y, 5),
            "lr": best_lr, "val_top1": val_scores}
