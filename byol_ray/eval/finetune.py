"""Semi-supervised evaluation: fine-tune the whole encoder plus a linear head on a few labels.

The paper's protocol (section 4, table 2) scaled down to a 2-core CPU:

- Labelled subsets are class-balanced (the same number of images per class) and fixed by a seed, so the
  BYOL encoder and the untrained baseline see exactly the same images; the indices are returned so the
  caller can record them.
- SGD with Nesterov momentum 0.9, cosine decay to 0, light augmentation (random resized crop + horizontal
  flip, the batched ops of ``data/augment/``), evaluation with the deterministic ``eval_transform``.
- DEPARTURES from the paper's ImageNet setting (``docs/paper_recipe.md``), and why: a fixed number of
  optimiser steps at batch 128 instead of tens of epochs at batch 1024 (minutes of CPU, not GPU-days);
  crops keep 50-100% of a 28 px image rather than 8-100% of 224 px (a garment must stay recognisable on
  so few pixels); no weight decay (few steps). When several learning rates are given they are compared
  on a held-out, class-balanced slice of the train split disjoint from the labelled subset (the paper
  also picks its hyper-parameters on a held-out part of the train set), and the best one's model is the
  one scored on the test split; every encoder gets the same grid.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ViewConfig
from ..core.model import ResNetEncoder, memory_format
from ..core.schedules import cosine_decay
from ..data.augment import ViewTransform
from ..errors import UserError
from .scoring import extract_features, topk_accuracy


@dataclasses.dataclass(frozen=True)
class FinetuneOptions:
    """How a fine-tuning runs, apart from its lr and length: the same for every encoder compared."""

    batch_size: int = 128
    seed: int = 0  # head init, batch order and augmentation
    flip: bool = True  # mirrored digits are not digits: off for them
    device: torch.device | str = "cpu"
    channels_last: bool = False  # model.channels_last: asked for; core.model.memory_format decides


# Random resized crop + flip only: the "light" augmentation of supervised fine-tuning.
FINETUNE_VIEW = ViewConfig(crop_scale=(0.5, 1.0), flip_prob=0.5)
FINETUNE_OPS = ("crop", "flip")


def balanced_subset(
    labels: torch.Tensor, fraction: float, seed: int, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """Sorted indices of a class-balanced subset: round(fraction * N / n_classes) images of every class.

    Deterministic per (labels, fraction, seed); images in `exclude` are never picked (a held-out slice
    disjoint from a labelled subset). Raises UserError when a class has too few images.
    """
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"a label fraction must be in (0, 1], got {fraction}")
    labels = labels.cpu()
    classes = torch.unique(labels[labels >= 0])
    per_class = max(1, round(fraction * len(labels) / len(classes)))
    allowed = torch.ones(len(labels), dtype=torch.bool)
    if exclude is not None and len(exclude):
        allowed[exclude.cpu()] = False
    g = torch.Generator().manual_seed(int(seed))
    picked = []
    for c in classes.tolist():
        pool = torch.nonzero((labels == c) & allowed).flatten()
        if len(pool) < per_class:
            raise UserError(
                f"a class-balanced {fraction:.2%} subset needs {per_class} images of class {c}, but only "
                f"{len(pool)} are available. Use a smaller fraction or more training data."
            )
        picked.append(pool[torch.randperm(len(pool), generator=g)[:per_class]])
    return torch.cat(picked).sort().values


def finetune(
    encoder: ResNetEncoder,
    n_classes: int,
    images: torch.Tensor,
    labels: torch.Tensor,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    lr: float,
    steps: int,
    options: FinetuneOptions = FinetuneOptions(),
    log: Callable[[str], None] = print,
) -> nn.Sequential:
    """Train `encoder` (in place) and a new linear head on uint8 `images`; returns encoder -> head."""
    o = options
    device, seed = torch.device(o.device), o.seed
    torch.manual_seed(seed)
    head = nn.Linear(encoder.out_dim, n_classes)
    model = nn.Sequential(encoder, head).to(device)
    fmt = memory_format(o.channels_last, model, device)
    model = model.to(memory_format=fmt)
    view = ViewTransform(
        FINETUNE_VIEW if o.flip else dataclasses.replace(FINETUNE_VIEW, flip_prob=0.0), FINETUNE_OPS, size, mean, std
    )
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_decay(s, steps))
    gen = torch.Generator(device=device).manual_seed(seed)
    order = _batches(len(images), min(o.batch_size, len(images)), steps, seed)
    model.train()
    for s, idx in enumerate(order):
        x = view(images[idx].to(device), gen).contiguous(memory_format=fmt)
        loss = F.cross_entropy(model(x), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (s + 1) % max(1, steps // 4) == 0 or s + 1 == steps:
            log(f"[finetune] step {s + 1}/{steps} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.4f}")
    return model.eval()


def _batches(n: int, batch: int, steps: int, seed: int) -> list[torch.Tensor]:
    """`steps` full batches walking through seeded permutations of range(n) (no partial batch: a batch
    of one image would break BatchNorm)."""
    if batch < 2:
        raise UserError(f"fine-tuning needs at least 2 labelled images, got {n}")
    g = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    perm, pos = torch.randperm(n, generator=g), 0
    while len(out) < steps:
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=g), 0
        out.append(perm[pos : pos + batch])
        pos += batch
    return out


def classify(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    size: int,
    mean,
    std,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Top-1/top-5 (%) of a classifier under the evaluation transform."""
    logits = extract_features(model, images, size, mean, std, batch_size, device)
    return {"top1": topk_accuracy(logits, labels, 1), "top5": topk_accuracy(logits, labels, 5)}


def finetune_and_score(
    make_encoder: Callable[[], ResNetEncoder],
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    n_classes: int,
    size: int,
    mean,
    std,
    *,
    lrs: Sequence[float],
    steps: int,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    options: FinetuneOptions = FinetuneOptions(),
    log: Callable[[str], None] = print,
) -> dict:
    """Fine-tune a fresh encoder per learning rate; with several, keep the best on `val` (held out).

    Returns test top-1/top-5 of the kept model, its lr and every lr's held-out top-1.
    """
    if not lrs:
        raise ValueError("no learning rate to fine-tune with")
    if len(lrs) > 1 and val is None:
        raise ValueError("several learning rates need a held-out set to choose between them")
    best, val_scores = None, {}
    for lr in lrs:
        model = finetune(
            make_encoder(),
            n_classes,
            train_images,
            train_labels,
            size,
            mean,
            std,
            lr=lr,
            steps=steps,
            options=options,
            log=log,
        )
        if len(lrs) == 1:
            best = (lr, model)
            break
        assert val is not None  # several learning rates: checked on entry
        score = classify(model, val[0], val[1], size, mean, std, device=options.device)["top1"]
        val_scores[lr] = score
        log(f"[finetune] lr {lr:g}: held-out top-1 {score:.2f}")
        if best is None or score > val_scores[best[0]]:  # ties keep the earlier (smaller) lr
            best = (lr, model)
    assert best is not None  # lrs is not empty, and the first lr is always kept
    lr, model = best
    test = classify(model, test_images, test_labels, size, mean, std, device=options.device)
    return {**test, "lr": lr, "val_top1": val_scores, "model": model}
