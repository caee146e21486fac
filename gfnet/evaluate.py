"""Anytime evaluation: accuracy after each step, the accuracy vs average GFLOPs curve (CSV + PNG), references."""

import csv
from pathlib import Path

import torch
import torch.nn.functional as F

from inference.early_exit import budget_curve, exit_summary
from model.glance_focus import GlanceFocus
from perf.glance_focus import cumulative_gflops, encoder_gflops

__all__ = ["collect_probs", "anytime_accuracy", "evaluate_curve", "plain_reference", "write_curve"]


@torch.no_grad()
def collect_probs(model: GlanceFocus, loader, device: torch.device, policy: str = "learned"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities (T+1, N, K) of every step on a loader, and the labels (N,)."""
    model.eval()
    probs, labels = [], []
    for (glance, focus), target in loader:
        out = model(glance.to(device), focus.to(device), policy=policy)
        probs.append(out.logits.float().softmax(-1).cpu())
        labels.append(target)
    return torch.cat(probs, dim=1), torch.cat(labels)


def anytime_accuracy(probs: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Top-1 accuracy after each step."""
    return (probs.argmax(-1) == labels).float().mean(1).tolist()


def evaluate_curve(probs: torch.Tensor, labels: torch.Tensor, per_step: list[float],
                   table: list[dict] | None = None) -> list[dict]:
    """The budgeted curve: the stored calibration's thresholds applied to these probabilities, or (without one) a
    sweep calibrated on these probabilities themselves (marked ``calibrated_here``)."""
    cumulative = cumulative_gflops(per_step)
    if not table:
        return [{**row, "calibrated_here": True} for row in budget_curve(probs, labels, cumulative)]
    rows = [{"q": row["q"], "thresholds": row["thresholds"], "calibrated_here": False,
             **exit_summary(probs, labels, row["thresholds"], cumulative)} for row in table]
    return sorted(rows, key=lambda row: row["avg_gflops"])


@torch.no_grad()
def plain_reference(net: torch.nn.Module, loader, device: torch.device, size: int) -> dict[str, float]:
    """Accuracy and GFLOPs of a plain classifier on the loader's focus images resized to ``size`` (0: as they are)."""
    net.eval()
    correct = total = 0
    for (_, focus), target in loader:
        images = focus.to(device)
        if size:
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        correct += (net(images).argmax(-1).cpu() == target).sum().item()
        total += len(target)
        size = size or images.shape[-1]
    return {"accuracy": correct / max(total, 1), "gflops": encoder_gflops(net, size), "size": size}


def write_curve(out_dir: Path, anytime: list[float], per_step: list[float], curve: list[dict],
                references: dict[str, dict]) -> tuple[Path, Path]:
    """``anytime.csv``, ``budget_curve.csv`` and ``budget_curve.png`` (with the references as points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    cumulative = cumulative_gflops(per_step)
    with open(out_dir / "anytime.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["step", "gflops", "accuracy"])
        writer.writerows([t, f"{g:.5f}", f"{a:.4f}"] for t, (g, a) in enumerate(zip(cumulative, anytime, strict=True)))
    curve_csv = out_dir / "budget_curve.csv"
    with open(curve_csv, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["avg_gflops", "accuracy", "avg_steps", "q", "thresholds"])
        writer.writerows([f"{r['avg_gflops']:.5f}", f"{r['accuracy']:.4f}", f"{r['avg_steps']:.3f}", f"{r['q']:.4g}",
                          " ".join(f"{t:.4f}" for t in r["thresholds"])] for r in curve)
        for name, ref in references.items():
            writer.writerow([f"{ref['gflops']:.5f}", f"{ref['accuracy']:.4f}", "", name, ""])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["avg_gflops"] for r in curve], [r["accuracy"] for r in curve], "-", label="glance and focus (budget)")
    ax.plot(cumulative, anytime, "o", label="glance and focus (step t)")
    for name, ref in references.items():
        ax.plot([ref["gflops"]], [ref["accuracy"]], "s", label=name)
    ax.set_xscale("log")
    ax.set(xlabel="average GFLOPs per image", ylabel="top-1 accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = out_dir / "budget_curve.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return curve_csv, png
