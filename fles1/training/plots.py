"""PNG plots of a training_log.json history: loss, doc/query non-zeros, lambda_d -- each against steps."""

from __future__ import annotations

import os

from fles1.atomic import atomic_open

PLOT_FILES = ("loss.png", "nnz.png", "lambda_d.png")


def write_plots(log: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = log["history"]
    steps = [row["step"] for row in history]
    panels = dict(zip(PLOT_FILES, [
        ("loss", [("loss", "total"), ("loss_contrastive", "InfoNCE")], False),
        ("mean non-zeros per vector", [("nnz_doc", "documents"), ("nnz_query", "queries")], False),
        ("lambda_d", [("lambda_d", "lambda_d")], True),
    ]))
    paths = []
    for name, (ylabel, series, log_scale) in panels.items():
        figure, axis = plt.subplots(figsize=(6, 3.5))
        for key, label in series:
            axis.plot(steps, [row.get(key) for row in history], marker=".", label=label)
        if name == "nnz.png" and log["clfr"]:
            axis.axhline(log["clfr"][0]["target_nnz"], color="grey", linestyle="--", label="CLFR target")
        if log_scale:
            axis.set_yscale("log")
        axis.set_xlabel("optimizer step")
        axis.set_ylabel(ylabel)
        axis.legend()
        figure.tight_layout()
        path = os.path.join(out_dir, name)
        with atomic_open(path, "wb") as handle:  # a kill mid-write leaves the previous plot, not half a PNG
            figure.savefig(handle, format="png", dpi=100)
        plt.close(figure)
        paths.append(path)
    return paths
