"""Evaluation of a frozen encoder: linear probe, weighted kNN, and the baselines scored the same way.

The same functions serve the end-of-run table, the kNN monitor during pretraining and the ``eval``
command, so BYOL and its baselines (raw pixels, an untrained encoder) are always scored by one evaluator
on the same splits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import EvalConfig
from ..data.augment import eval_transform


@torch.no_grad()
def extract_features(
    encoder: nn.Module | None,
    images: torch.Tensor,
    size: int,
    mean,
    std,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Features of uint8 images under the evaluation transform; encoder None = the normalised pixels."""
    was_training = encoder.training if encoder is not None else False
    if encoder is not None:
        encoder.eval()
    out = []
    try:
        for i in range(0, len(images), batch_size):
            x = eval_transform(images[i : i + batch_size].to(device, non_blocking=True), size, mean, std)
            out.append((encoder(x) if encoder is not None else x.flatten(1)).float().cpu())
    finally:
        if encoder is not None:
            encoder.train(was_training)
    return torch.cat(out)


def standardise(train_x: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor standardised with `train_x`'s per-feature mean and std.

    An affine change of the inputs that a linear classifier can absorb, so it changes nothing in what can
    be learned; it lets one optimiser setting (lr, L-BFGS tolerances, regularisation grid) serve encoders
    whose feature scales differ by orders of magnitude (BYOL vs untrained vs pixels).
    """
    mu = train_x.mean(0, keepdim=True)
    sd = train_x.std(0, keepdim=True).clamp_min(1e-6)
    return [(x - mu) / sd for x in (train_x, *others)]


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, n_classes: int, weight_decay: float, max_iter: int = 100
) -> nn.Linear:
    """L2-regularised multinomial logistic regression, full-batch L-BFGS in float64, zero init.

    Deterministic (no sampling, no init noise), so two fits on the same features give the same head. The
    penalty is `weight_decay * ||W||^2` on the weights (not the bias) added to the mean cross-entropy.
    """
    x = x.double()
    head = nn.Linear(x.shape[1], n_classes).double()
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(
        head.parameters(),
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head(x), y) + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return head


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    epochs: int = 100,
    weight_decay: float = 1e-5,
) -> dict[str, float]:
    """Multinomial logistic regression on standardised frozen features, one fixed weight decay.

    Deterministic and fast (seconds for 60k x 512 on a CPU), which suits a per-run monitor; the paper's
    SGD-Nesterov protocol with a held-out lr sweep is the ``eval linear`` command's job.
    """
    xtr, xte = standardise(train_x, test_x)
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    head = fit_logistic(xtr, train_y, n_classes, weight_decay, epochs)
    with torch.no_grad():
        logits = head(xte.double())
    return {"top1": topk_accuracy(logits, test_y, 1), "top5": topk_accuracy(logits, test_y, 5)}


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    hit = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return 100.0 * hit.float().mean().item()


@torch.no_grad()
def knn_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    k: int = 200,
    temperature: float = 0.1,
    chunk: int = 1024,
) -> float:
    """Weighted kNN (Wu et al. 2018): cosine similarity, votes weighted by exp(sim / T)."""
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    tr = F.normalize(train_x.float(), dim=1)
    te = F.normalize(test_x.float(), dim=1)
    k = min(k, len(tr))
    correct = 0
    for i in range(0, len(te), chunk):
        sim, idx = (te[i : i + chunk] @ tr.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), n_classes)
        votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())
        correct += int((votes.argmax(1) == test_y[i : i + chunk]).sum().item())
    return 100.0 * correct / len(te)


@dataclass
class EvalRow:
    name: str
    linear_top1: float
    linear_top5: float
    knn_top1: float
    feature_dim: int


def score_features(name: str, train_x, train_y, test_x, test_y, cfg: EvalConfig) -> EvalRow:
    lin = linear_probe(train_x, train_y, test_x, test_y, cfg.linear_epochs, cfg.linear_weight_decay)
    knn = knn_accuracy(train_x, train_y, test_x, test_y, cfg.knn_k, cfg.knn_temperature)
    return EvalRow(name, lin["top1"], lin["top5"], knn, train_x.shape[1])


def evaluate_encoders(
    encoders: dict[str, nn.Module | None],
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    size: int,
    mean,
    std,
    cfg: EvalConfig,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = print,
) -> list[EvalRow]:
    """Score each named encoder (None = raw pixels) with the linear probe and kNN on the same splits."""
    rows = []
    for name, enc in encoders.items():
        ftr = extract_features(enc, train_images, size, mean, std, cfg.batch_size, device)
        fte = extract_features(enc, test_images, size, mean, std, cfg.batch_size, device)
        row = score_features(name, ftr, train_labels, fte, test_labels, cfg)
        log(
            f"[eval] {name:<18} linear top-1 {row.linear_top1:6.2f}  top-5 {row.linear_top5:6.2f}  "
            f"kNN {row.knn_top1:6.2f}  (dim {row.feature_dim})"
        )
        rows.append(row)
    return rows


def rows_to_markdown(rows: list[EvalRow]) -> str:
    lines = [
        "| encoder | linear top-1 (%) | linear top-5 (%) | kNN top-1 (%) | feature dim |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r.name} | {r.linear_top1:.2f} | {r.linear_top5:.2f} | {r.knn_top1:.2f} | {r.feature_dim} |")
    return "\n".join(lines) + "\n"


def write_table(rows: list[EvalRow], out_dir: Path) -> dict[str, Path]:
    """eval_table.md and eval_table.csv in `out_dir`."""
    import pandas as pd

    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "eval_table.md"
    csv = out_dir / "eval_table.csv"
    md.write_text(rows_to_markdown(rows))
    pd.DataFrame([r.__dict__ for r in rows]).to_csv(csv, index=False)
    return {"markdown": md, "csv": csv}


# ---- paper-shaped tables for the `eval` command -------------------------------------------------
BASELINE_ROW = "untrained encoder"


@dataclass
class ResultTable:
    """Method rows x metric columns, shaped like the paper's tables 1-3, with the untrained encoder's
    number and the difference (main row minus baseline) beside every number of the main row.

    `rows` maps a row name to {column: value in %}; a missing cell prints as "-". `reference` rows (the
    paper's ImageNet numbers) are printed below, for the shape of the comparison only.
    """

    title: str
    columns: list[str]
    rows: dict[str, dict[str, float]]
    main: str = "BYOL"
    baseline: str = BASELINE_ROW
    reference: dict[str, dict[str, float]] | None = None
    notes: list[str] | None = None

    def deltas(self) -> dict[str, float]:
        m, b = self.rows.get(self.main, {}), self.rows.get(self.baseline, {})
        return {c: m[c] - b[c] for c in self.columns if c in m and c in b}

    def to_markdown(self) -> str:
        cell = lambda row, c: f"{row[c]:.2f}" if c in row else "-"  # noqa: E731
        lines = [
            f"**{self.title}**",
            "",
            "| method | " + " | ".join(self.columns) + " |",
            "|---|" + "---:|" * len(self.columns),
        ]
        for name, row in self.rows.items():
            lines.append(f"| {name} | " + " | ".join(cell(row, c) for c in self.columns) + " |")
        d = self.deltas()
        if d:
            lines.append(
                f"| {self.main} - {self.baseline} | "
                + " | ".join(f"{d[c]:+.2f}" if c in d else "-" for c in self.columns)
                + " |"
            )
        for name, row in (self.reference or {}).items():
            lines.append(f"| *{name}* | " + " | ".join(cell(row, c) for c in self.columns) + " |")
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def write(self, out_dir: Path, stem: str) -> dict[str, Path]:
        """<stem>.md (the table as printed) and <stem>.csv (one row per method, the delta row included)."""
        import pandas as pd

        out_dir.mkdir(parents=True, exist_ok=True)
        md, csv = out_dir / f"{stem}.md", out_dir / f"{stem}.csv"
        md.write_text(self.to_markdown())
        records = [{"method": n, **r} for n, r in self.rows.items()]
        if self.deltas():
            records.append({"method": f"{self.main} - {self.baseline}", **self.deltas()})
        pd.DataFrame(records, columns=["method", *self.columns]).to_csv(csv, index=False)
        return {"markdown": md, "csv": csv}
