"""The planned mixture as a picture: target weight curves and the sampler's realised fractions."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from chatflow.plan import Survey
from chatflow.schedule import Schedule
from chatflow.spec import ChatFlowRun


def plot_schedule(
    run: ChatFlowRun, schedule: Schedule, total: int, survey: Survey, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display in pods or CI
    import matplotlib.pyplot as plt

    samples = np.linspace(0, total, 400)
    target = schedule.weights_at(schedule.progress(samples))
    figure, axes = plt.subplots(figsize=(9, 4.5), dpi=110)
    for k, name in enumerate(schedule.sources):
        (line,) = axes.plot(samples, target[:, k], label=f"{name} target")
        axes.plot(
            survey.window_starts + survey.window / 2,
            survey.realised[:, k],
            "o",
            color=line.get_color(),
            markersize=3,
            alpha=0.7,
            label=f"{name} realised",
        )
    horizon_samples = schedule.horizon / schedule.tokens_per_sample
    if 0 < horizon_samples < total:
        axes.axvline(horizon_samples, color="grey", linestyle="--", linewidth=1)
    axes.set(
        title=f"ChatFlowRun {run.metadata.name}: data mixture ({schedule.curve} schedule)",
        xlabel="global sample",
        ylabel="fraction of samples",
        ylim=(0, 1),
        xlim=(0, total),
    )
    axes.legend(ncol=2, fontsize="small", loc="upper right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
