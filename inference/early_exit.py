"""Early exit: stop at the first step whose top probability reaches that step's threshold.

``--exit-threshold P`` uses P at every step. ``--budget GFLOPS`` uses GFNet's budgeted batch classification: for a
geometric law of exit proportions (q^t, normalised) the per-step thresholds that make those proportions exit on a
calibration set are found; sweeping q gives the accuracy vs average GFLOPs curve, and a budget picks the most
accurate row whose average compute meets it. Probabilities are (T+1, N, K): step 0 is the glance.
"""

import numpy as np
import torch

from utils import UserError

__all__ = ["exit_steps", "threshold_thresholds", "calibrate_thresholds", "budget_curve", "thresholds_for_budget",
           "exit_summary"]

NEVER = 2.0  # a threshold no probability reaches


def exit_steps(probs: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
    """The step (N,) at which each sample exits: the first with top probability >= its threshold, else the last."""
    confident = probs.max(-1).values >= torch.tensor(thresholds, dtype=probs.dtype, device=probs.device)[:, None]
    confident[-1] = True
    return confident.float().argmax(0)


def threshold_thresholds(steps: int, p: float) -> list[float]:
    """Thresholds of ``--exit-threshold p`` for ``steps`` focus steps (the last step always answers)."""
    return [p] * steps + [0.0]


def exit_summary(probs: torch.Tensor, labels: torch.Tensor, thresholds: list[float],
                 cumulative: list[float]) -> dict[str, float]:
    """Accuracy and average GFLOPs when exiting with ``thresholds``; ``cumulative``: GFLOPs after each step."""
    steps = exit_steps(probs, thresholds)
    chosen = probs[steps, torch.arange(probs.shape[1])]
    accuracy = (chosen.argmax(-1) == labels).float().mean().item()
    gflops = torch.tensor(cumulative, dtype=torch.float64)[steps].mean().item()
    return {"accuracy": accuracy, "avg_gflops": gflops, "avg_steps": steps.float().mean().item()}


def calibrate_thresholds(probs: torch.Tensor, proportions: np.ndarray) -> list[float]:
    """Per-step thresholds so that about ``proportions[t]`` of the samples exit at step t (GFNet's procedure)."""
    confidence = probs.max(-1).values
    remaining = torch.ones(probs.shape[1], dtype=torch.bool)
    thresholds, n = [], probs.shape[1]
    for t in range(probs.shape[0] - 1):
        count = int(round(proportions[t] * n))
        candidates = confidence[t][remaining].sort(descending=True).values
        if count <= 0 or len(candidates) == 0:
            thresholds.append(NEVER)
            continue
        threshold = candidates[min(count, len(candidates)) - 1].item()
        thresholds.append(threshold)
        remaining &= confidence[t] < threshold
    return thresholds + [0.0]


def budget_curve(probs: torch.Tensor, labels: torch.Tensor, cumulative: list[float],
                 qs: np.ndarray | None = None) -> list[dict]:
    """Rows ``{q, thresholds, accuracy, avg_gflops, avg_steps}`` of the budgeted-classification sweep, by compute."""
    qs = np.logspace(-2, 2, 41) if qs is None else qs
    steps = probs.shape[0]
    rows = []
    for q in qs:
        proportions = q ** np.arange(steps, dtype=np.float64)
        thresholds = calibrate_thresholds(probs, proportions / proportions.sum())
        rows.append({"q": float(q), "thresholds": thresholds, **exit_summary(probs, labels, thresholds, cumulative)})
    return sorted(rows, key=lambda row: row["avg_gflops"])


def thresholds_for_budget(table: list[dict], budget: float) -> dict:
    """The most accurate calibrated row whose average GFLOPs is within ``budget``."""
    if not table:
        raise UserError("this model folder has no budget calibration; run train_glance_focus.py --calibrate-budget")
    fitting = [row for row in table if row["avg_gflops"] <= budget]
    if not fitting:
        raise UserError(f"--budget {budget} GFLOPs is below the cheapest calibrated point "
                        f"({table[0]['avg_gflops']:.4f} GFLOPs, the glance alone); raise the budget")
    return max(fitting, key=lambda row: (row["accuracy"], row["avg_gflops"]))
