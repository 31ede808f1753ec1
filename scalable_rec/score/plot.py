"""Training curves as a PNG beside the run (optional: needs matplotlib)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from scalable_rec.atomic import atomic_open

log = logging.getLogger(__name__)


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Train and validation RMSE per epoch; does nothing without matplotlib or history."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed (pip install 'scalable-rec[plot]'): no %s", path.name)
        return
    if not history:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_rmse"] for h in history], marker="o", label="train RMSE")
    ax.plot(epochs, [h["val_rmse"] for h in history], marker="o", label="validation RMSE")
    ax.set_xlabel("epoch")
    ax.set_ylabel("RMSE")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
