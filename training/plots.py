"""Training curves as a PNG (matplotlib's headless Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from towers.artifacts import atomic_open


def plot_curves(epochs: Sequence[dict[str, Any]], path: str | Path, *, k: int = 50, title: str = "") -> None:
    """Two panels: mean training loss per epoch, and validation HR@k (seen items masked) per epoch.

    ``epochs``: the per-epoch records of metrics.json (``epoch``, ``loss``, ``valid_hr``).
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    xs = [int(e["epoch"]) for e in epochs]
    fig, (ax_loss, ax_hr) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(xs, [float(e["loss"]) for e in epochs], marker="o")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_title("loss")
    ax_loss.grid(alpha=0.3)
    hr = [(x, float(e["valid_hr"])) for x, e in zip(xs, epochs, strict=True) if e.get("valid_hr") is not None]
    if hr:
        ax_hr.plot([x for x, _ in hr], [v for _, v in hr], marker="o", color="tab:green")
        best = max(hr, key=lambda t: t[1])
        ax_hr.axvline(best[0], color="grey", linestyle=":", label=f"best epoch {best[0]}: {best[1]:.4f}")
        ax_hr.legend(loc="lower right")
    ax_hr.set_xlabel("epoch")
    ax_hr.set_ylabel(f"valid HR@{k} (seen masked)")
    ax_hr.set_title(f"validation HR@{k}")
    ax_hr.grid(alpha=0.3)
    for ax in (ax_loss, ax_hr):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def plot_trials(trials: Sequence[dict[str, Any]], path: str | Path, *, k: int = 50, title: str = "") -> None:
    """A tuning run: each trial's validation HR@k (dots, trial 0 = the defaults), the best so far, and
    the trials the pruner stopped (crosses, at their last epoch's validation HR@k)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    xs = [int(t["trial"]) for t in trials]
    ys = [float(t["value"]) for t in trials]
    best, run = [], float("-inf")
    for y in ys:
        run = max(run, y) if y == y else run  # NaN (a failed trial) never becomes the best
        best.append(run)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(xs, ys, s=18, label="trial")
    cut = [t for t in trials if t.get("state") == "pruned"]
    if cut:
        ax.scatter([int(t["trial"]) for t in cut], [float(t["last_epoch_hr"]) for t in cut], marker="x",
                   color="tab:red", label="pruned (at its last epoch)")
    ax.step(xs, best, where="post", color="tab:green", label="best so far")
    if ys:
        ax.axhline(ys[0], color="grey", linestyle=":", label=f"defaults (trial 0): {ys[0]:.4f}")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"valid HR@{k} (seen masked)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
