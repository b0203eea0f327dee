"""Per-exit accuracy / exit-rate curves: as table rows for ``distree calibrate --report``, or as a plot."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distree.exits.calibrate import DEFAULT_CONFIDENCE, Behaviour, CurvePoint, exit_curve
from distree.exits.types import Calibration
from distree.serde import write_bytes_atomic


@dataclass(frozen=True)
class ExitReport:
    """One exit: accuracy on all samples, and its curve over the threshold grid (calibration, test)."""

    name: str
    after_block: int
    accuracy: float
    test_accuracy: float | None
    curve: tuple[CurvePoint, ...]
    test_curve: tuple[CurvePoint, ...] | None


def exit_reports(calibration: Calibration, test: Behaviour | None = None,
                 confidence: float = DEFAULT_CONFIDENCE) -> tuple[ExitReport, ...]:
    """Curves of every exit on its own at each threshold level; test numbers use the same thresholds."""
    scores, correct = calibration.scores_array(), calibration.correct_array()
    reports = []
    for j, e in enumerate(calibration.exits):
        grid = calibration.thresholds[j]
        reports.append(ExitReport(
            name=e.name, after_block=e.after_block, accuracy=float(correct[:, j].mean()),
            test_accuracy=None if test is None else float(test.correct[:, j].mean()),
            curve=exit_curve(scores[:, j], correct[:, j], grid, confidence),
            test_curve=None if test is None else exit_curve(test.scores[:, j], test.correct[:, j], grid, confidence),
        ))
    return tuple(reports)


def plot_curves(calibration: Calibration, reports: tuple[ExitReport, ...], path: str | Path) -> Path:
    """Accuracy of the samples leaving vs exit rate, one line per exit (dashed: test), final as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_rate) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r, color in zip(reports, plt.cm.viridis(np.linspace(0, 0.9, max(len(reports), 1)))):
        label = f"{r.name} (after block {r.after_block})"
        ax_acc.plot([p.exit_rate for p in r.curve], [p.accuracy for p in r.curve], "o-", color=color, label=label)
        ax_rate.plot([p.threshold for p in r.curve], [p.exit_rate for p in r.curve], "o-", color=color, label=label)
        if r.test_curve is not None:
            ax_acc.plot([p.exit_rate for p in r.test_curve], [p.accuracy for p in r.test_curve], "x--",
                        color=color, alpha=0.6)
    ax_acc.axhline(calibration.final_accuracy(), color="k", ls=":", label="final classifier (all samples)")
    ax_acc.set(xlabel="exit rate (share of samples with score >= threshold)", ylabel="accuracy of those samples",
               title=f"exit accuracy vs exit rate ({calibration.score_kind}; x--: test)")
    ax_rate.set(xlabel=f"threshold ({calibration.score_kind} score)", ylabel="exit rate",
                title="exit rate vs threshold (calibration grid)")
    ax_acc.legend(fontsize=7)
    ax_acc.grid(alpha=0.3)
    ax_rate.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return write_bytes_atomic(path, buffer.getvalue())
