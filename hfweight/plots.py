"""A PNG of the weighting trajectory: loss, per-domain losses, mixture probabilities, weight statistics and, for
GRPO/RLOO, rewards, reward weights, Lagrange multipliers and held-out reward means."""

from __future__ import annotations

import logging
from collections import defaultdict

logger = logging.getLogger(__name__)

PANELS = (
    ("loss", "training loss", lambda key: key == "loss"),
    ("domain_loss/", "per-domain loss", lambda key: key.startswith("domain_loss/")),
    ("mixture/", "mixture probabilities", lambda key: key.startswith("mixture/")),
    (
        "heldout",
        "held-out loss by domain (mixture evaluations)",
        lambda key: key.startswith("mixture_eval_") and key.endswith("_loss"),
    ),
    ("dga_alignment/", "DGA gradient alignment with the target", lambda key: key.startswith("dga_alignment/")),
    ("weights/", "sample-weight ESS fraction", lambda key: key == "weights/ess_fraction"),
    ("reward", "mean training reward", lambda key: key == "reward"),
    ("reward_weight/", "reward weights", lambda key: key.startswith("reward_weight/")),
    ("lagrange/", "Lagrange multipliers", lambda key: key.startswith("lagrange/")),
    ("validation/", "held-out reward means", lambda key: key.startswith("validation/")),
)


def collect_series(log_history: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """``{key: (steps, values)}`` for every numeric key a panel plots."""
    series: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    for entry in log_history:
        step = entry.get("step")
        if step is None:
            continue
        for key, value in entry.items():
            if isinstance(value, (int, float)) and any(match(key) for _, _, match in PANELS):
                series[key][0].append(step)
                series[key][1].append(float(value))
    return dict(series)


def plot_weighting_history(log_history: list[dict], path: str) -> str | None:
    """Write the plot to ``path`` and return it, or None when matplotlib is missing or nothing was logged."""
    series = collect_series(log_history)
    panels = [(title, [k for k in sorted(series) if match(k)]) for _, title, match in PANELS]
    panels = [(title, keys) for title, keys in panels if keys]
    if not panels:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("hfweight: matplotlib is not installed (pip install 'hfweight[plots]'); no plot written.")
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.4 * len(panels)), sharex=True, squeeze=False)
    for ax, (title, keys) in zip(axes[:, 0], panels):
        for key in keys:
            steps, values = series[key]
            label = key.split("/", 1)[-1] if "/" in key else key.removeprefix("mixture_eval_").removesuffix("_loss")
            ax.plot(steps, values, label=label)
        ax.set_title(title, fontsize=10)
        if len(keys) > 1:
            ax.legend(fontsize=7, ncol=min(len(keys), 4))
    axes[-1, 0].set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
