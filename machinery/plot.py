"""<run>/spin.png: one picture of a run, redrawn after every iteration.

    python spin.py --plot runs/toy      # redraw it from a run directory

Top row, per optimizer step across all iterations (dotted lines: where an iteration starts):
the SPIN loss, the rewards λ·log p_θ/p_θt of real and generated responses, and their margin.
Bottom row, per model θ_0 (the start), θ_1, ...: the held-out SPIN numbers (evaluation.py), the
held-out log-likelihood of the human responses, and the task metrics (the toy's, lm-eval's).
"""
import json
from pathlib import Path

from machinery import checkpoint


def panels(run: Path) -> dict[str, dict]:
    """The data of every panel: {title: {"x": axis label, "series": {name: (xs, ys)}, "starts":
    [...]}}. Panels without data (no held-out set, not the toy, no lm-eval) are left out."""
    steps, starts = [], []
    t = 0
    while (run / f"iter{t}" / "metrics.jsonl").exists():
        starts.append(len(steps))
        steps += checkpoint.read_jsonl(run / f"iter{t}" / "metrics.jsonl")
        t += 1
    rows = checkpoint.read_jsonl(run / "evaluation.jsonl")
    if not rows and (run / "start.json").exists():  # a run stopped before its first iteration ended
        rows = [{"model": 0, **json.loads((run / "start.json").read_text())}]

    def per_step(*keys):
        return {k: ([i for i in range(len(steps))], [m[k] for m in steps]) for k in keys}

    def per_model(*keys):
        series = {}
        for k in keys:
            points = [(r["model"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
            if points:
                series[k] = tuple(map(list, zip(*points)))
        return series

    step_axis, model_axis = "optimizer step (whole run)", "model θ_s (0 = start)"
    out = {
        "SPIN loss (training)": {"x": step_axis, "series": per_step("loss"), "starts": starts},
        "rewards λ·log p_θ/p_θt (training)": {"x": step_axis,
                                              "series": per_step("real_reward", "generated_reward"),
                                              "starts": starts},
        "margin (training)": {"x": step_axis, "series": per_step("margin"), "starts": starts},
        "held-out SPIN (θ_s against θ_s−1)": {"x": model_axis,
                                              "series": per_model("eval_loss", "eval_margin",
                                                                  "eval_reward_accuracy")},
        "held-out log p(y|x) per token": {"x": model_axis,
                                          "series": per_model("eval_real_logp_per_token")},
        "task metrics": {"x": model_axis, "series": per_model(
            "accuracy", "tv_distance", *sorted({k for r in rows for k in r if "/" in k}))},
    }
    return {title: panel for title, panel in out.items()
            if panel["series"] and all(xs for xs, _ in panel["series"].values())}


def draw(run: Path) -> Path:
    """Write <run>/spin.png from the run directory; returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    data = panels(run)
    ncols = 3
    nrows = max(1, -(-len(data) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(data):]:
        ax.axis("off")
    for ax, (title, panel) in zip(axes.flat, data.items()):
        for name, (xs, ys) in panel["series"].items():
            ax.plot(xs, ys, marker="o" if "θ" in panel["x"] else None, markersize=3, label=name)
        for x in panel.get("starts", [])[1:]:
            ax.axvline(x, color="grey", linestyle=":", linewidth=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(panel["x"], fontsize=8)
        if "θ" in panel["x"]:
            ax.set_xticks(sorted({x for xs, _ in panel["series"].values() for x in xs}))
        if len(panel["series"]) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(f"SPIN run {run}", fontsize=11)
    fig.tight_layout()
    path = run / "spin.png"
    tmp = run / "spin.png.tmp"
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path
