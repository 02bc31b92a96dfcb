"""What a search writes beside its weights: ``<stem>_report.json`` (every proxy's mixture and losses, both fits'
out-of-fold rank correlations and predictions, the chosen mixture against the prior, timings), ``<stem>_report.png``
(predicted vs measured target per proxy; chosen vs prior shares) and ``<stem>_proxies.csv`` (the proxies as a
results table ``--import`` reads back)."""

from __future__ import annotations

import json
import os

import numpy as np


def report_paths(weights_path: str) -> dict[str, str]:
    stem = os.path.splitext(weights_path)[0]
    return {"json": f"{stem}_report.json", "png": f"{stem}_report.png", "csv": f"{stem}_proxies.csv"}


def write_json(path: str, payload: dict) -> None:
    """Write atomically (a temporary file renamed), so a reader never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def plot_report(report: dict, path: str) -> str | None:
    """Two panels: out-of-fold predicted vs measured target loss per proxy (both fits), and the chosen mixture next
    to the prior. Returns the path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    measured = np.array([p["target_loss"] for p in report["proxies"]])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, predicted in report["fit"]["out_of_fold"].items():
        rho = report["fit"]["spearman"][name]
        chosen = " (chosen)" if name == report["fit"]["chosen"] else ""
        left.scatter(measured, predicted, s=14, label=f"{name}{chosen}: Spearman {rho:.2f}")
    if measured.size:
        low, high = float(measured.min()), float(measured.max())
        left.plot([low, high], [low, high], color="grey", lw=0.8)
    left.set_xlabel("measured target loss (proxy)")
    left.set_ylabel("out-of-fold predicted target loss")
    left.legend(fontsize=8)
    domains = list(report["weights"])
    positions = np.arange(len(domains))
    right.bar(positions - 0.2, [report["prior"][d] for d in domains], width=0.4, label="prior (smoothed token shares)")
    right.bar(positions + 0.2, [report["weights"][d] for d in domains], width=0.4, label="chosen")
    right.set_xticks(positions, domains, rotation=30, ha="right")
    right.set_ylabel("share")
    right.legend(fontsize=8)
    fig.suptitle(f"Mixture search: {len(measured)} proxies, target {report['targets']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
