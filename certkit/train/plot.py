"""``certkit plot RUN_DIR``: PNGs of the curves the paper shows, from RUN_DIR/metrics.h5."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from certkit.errors import InvalidInput
from certkit.train.metrics import MetricsFile


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write loss/regulariser, ReLU-ratio, ε and error curves into RUN_DIR/plots/."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    path = run_dir / "metrics.h5"
    if not path.is_file():
        raise InvalidInput(f"{path}: no metrics file (is {run_dir} a certkit training run?)")
    m = MetricsFile(path).read()
    if len(m.get("epoch", [])) == 0:
        raise InvalidInput(f"{path}: no finished epoch yet")
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    ep = m["epoch"]
    written = []

    def save(fig, name):
        fig.tight_layout()
        p = out_dir / name
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(ep, m["tightness"], marker="o")
    ax[0].set(title="L_tightness", xlabel="epoch")
    ax[1].plot(ep, m["relu"], marker="o", color="tab:orange")
    ax[1].set(title="L_relu", xlabel="epoch")
    save(fig, "regularizers.png")

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, a in (("active", ax[0]), ("unstable", ax[1])):
        data = np.atleast_2d(m[name])
        for layer in range(data.shape[1]):
            a.plot(ep, 100 * data[:, layer], label=f"ReLU {layer + 1}")
        a.set(title=f"{name} neurons (%)", xlabel="epoch")
        a.legend(fontsize=7)
    save(fig, "relu_ratios.png")

    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot(ep, m["eps"], marker="o")
    ax.set(title="ε at the end of each epoch", xlabel="epoch")
    save(fig, "eps_schedule.png")

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(ep, m["test_clean_err"], label="clean error")
    ax.plot(ep, m["test_verified_err"], label="IBP verified error")
    ax.plot(ep, m["train_ibp_err"], label="train IBP error (current ε)", linestyle="--")
    ax.set(title="errors (%)", xlabel="epoch")
    ax.legend(fontsize=8)
    save(fig, "errors.png")
    return written
