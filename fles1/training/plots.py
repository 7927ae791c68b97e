"""PNG plots of a training_log.json history: loss, doc/query non-zeros, lambda_d -- each against steps."""

from __future__ import annotations

import os

from fles1.atomic import atomic_open

PLOT_FILES = ("loss.png", "nnz.png", "lambda_d.png")


def plot_series(log: dict) -> dict[str, tuple[str, list[tuple[str, list, list, str]], bool]]:
    """{file name: (y label, [(label, steps, values, marker style)], log scale)} -- what `write_plots` draws. The
    lambda_d panel shows each CLFR adjustment's new value at its step too: the history rows carry the lambda_d each
    step used, so the adjustment at a run's last step was in training_log.json's "clfr" list only."""
    history = log["history"]
    steps = [row["step"] for row in history]

    def line(key, label):
        return label, steps, [row.get(key) for row in history], ".-"

    lambda_series = [line("lambda_d", "lambda_d")]
    if log.get("clfr"):
        lambda_series.append(("CLFR adjustment (new lambda_d)", [row["step"] for row in log["clfr"]],
                              [row["lambda_d_after"] for row in log["clfr"]], "x"))
    # log scale shows CLFR's multiplicative steps; a run without regularization (lambda_d 0 throughout) has
    # nothing to show on one (matplotlib warned and drew an empty panel)
    positive = any(isinstance(y, (int, float)) and y > 0 for _, _, ys, _ in lambda_series for y in ys)
    return dict(zip(PLOT_FILES, [
        ("loss", [line("loss", "total"), line("loss_contrastive", "InfoNCE")], False),
        ("mean non-zeros per vector", [line("nnz_doc", "documents"), line("nnz_query", "queries")], False),
        ("lambda_d", lambda_series, positive),
    ]))


def write_plots(log: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, (ylabel, series, log_scale) in plot_series(log).items():
        figure, axis = plt.subplots(figsize=(6, 3.5))
        for label, xs, ys, style in series:
            axis.plot(xs, ys, style, label=label)
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
