"""Training curves as PNGs (matplotlib, Agg: no display needed), one figure per metric with a
panel per training stage:

    loss.png            train loss and validation loss against the step
    lr.png              the learning-rate schedule (warmup, cosine decay)
    grad_norm.png       the global gradient norm before clipping (the clip level dashed)
    token_accuracy.png  SFT: next-token accuracy on the held-out responses (val_token_acc)
    distill_kl_ce.png   distillation: the KL to the teacher and the cross-entropy, the loss's two parts
    reward_margin.png   DPO: the reward margin (chosen minus rejected, in nats), train and held out
    preference_accuracy.png  DPO: the share of pairs whose chosen answer wins, train and held out
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from llm_maker.artifacts import as_float, atomic_path, read_metrics
from llm_maker.layout import TRAIN_STAGES

STAGE_TITLES = {"pretrain": "pretraining", "distill": "distillation", "sft": "SFT", "dpo": "DPO"}
DEFAULT_EVAL_EVERY = 50  # TrainConfig.eval_every


def eval_steps(recipe: dict[str, Any]) -> dict[str, int]:
    """{stage: steps between validations} of each training stage, from a plain recipe dict."""
    configs = {stage: (recipe.get("train") if stage == "pretrain" else (recipe.get(stage) or {}).get("train")) or {}
               for stage in TRAIN_STAGES}
    return {stage: int(c.get("eval_every", DEFAULT_EVAL_EVERY)) for stage, c in configs.items()}


def series(rows: list[dict[str, str]], column: str, every: Optional[int] = None) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows where `column` has a number; with `every`, only steps that
    are multiples of it, and the last (validation is measured there and carried between)."""
    steps, values = [], []
    last = int(rows[-1]["step"]) if rows else None
    for r in rows:
        v = as_float(r.get(column))
        step = int(r["step"])
        if v is not None and (every is None or step % every == 0 or step == last):
            steps.append(step)
            values.append(v)
    return steps, values


def _figure(n_panels: int):
    import matplotlib

    matplotlib.use("Agg")  # before pyplot: a headless backend, whatever the environment says
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n_panels, figsize=(5.2 * n_panels, 3.6), squeeze=False)
    return plt, fig, list(axes[0])


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def plot_metric(stages: dict[str, list[dict[str, str]]], columns: list[tuple[str, str]], ylabel: str,
                path: Path, log_y: bool = False, hline: Optional[float] = None,
                eval_every: Optional[dict[str, int]] = None) -> Optional[Path]:
    """One panel per stage holding `columns` [(column, label)]; None if no stage has any value.
    `val_*` columns are drawn at the stage's eval steps only (`eval_every`)."""
    panels = {s: rows for s, rows in stages.items() if any(series(rows, c)[0] for c, _ in columns)}
    if not panels:
        return None
    plt, fig, axes = _figure(len(panels))
    for ax, (stage, rows) in zip(axes, panels.items(), strict=False):
        for column, label in columns:
            every = (eval_every or {}).get(stage) if column.startswith("val_") else None
            steps, values = series(rows, column, every)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 12 else None, markersize=3, label=label)
        if hline is not None:
            ax.axhline(hline, color="grey", linestyle="--", linewidth=1, label=f"clip {hline:g}")
        ax.set_title(STAGE_TITLES.get(stage, stage))
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if len(columns) > 1 or hline is not None:
            ax.legend()
    return _save(plt, fig, path)


def write_plots(run_dir: str | Path, out_dir: str | Path, grad_clip: Optional[float] = None,
                eval_every: Optional[dict[str, int]] = None) -> dict[str, Path]:
    """Draw the run's curves into out_dir; returns {name: path} of the plots made.
    `eval_every`: {stage: steps between validations} from the recipe."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    stages = {s: rows for s in TRAIN_STAGES if (rows := read_metrics(run_dir / s))}
    made = {
        "loss": plot_metric(stages, [("loss", "train loss"), ("val_loss", "val loss")], "loss (nats/token)",
                            out_dir / "loss.png", eval_every=eval_every),
        "lr": plot_metric(stages, [("lr", "learning rate")], "learning rate", out_dir / "lr.png"),
        "grad_norm": plot_metric(stages, [("grad_norm", "grad norm")], "gradient norm", out_dir / "grad_norm.png",
                                 log_y=True, hline=grad_clip or None),
        "token_accuracy": plot_metric({s: r for s, r in stages.items() if s == "sft"},
                                      [("val_token_acc", "held-out token accuracy")], "token accuracy",
                                      out_dir / "token_accuracy.png", eval_every=eval_every),
        "distill_kl_ce": plot_metric({s: r for s, r in stages.items() if s == "distill"},
                                     [("kl", "KL to the teacher"), ("ce", "cross-entropy")], "nats/token",
                                     out_dir / "distill_kl_ce.png"),
        "reward_margin": plot_metric({s: r for s, r in stages.items() if s == "dpo"},
                                     [("reward_margin", "train"), ("val_reward_margin", "held out")],
                                     "reward margin (nats)", out_dir / "reward_margin.png", eval_every=eval_every),
        "preference_accuracy": plot_metric({s: r for s, r in stages.items() if s == "dpo"},
                                           [("pref_acc", "train"), ("val_pref_acc", "held out")],
                                           "preference accuracy", out_dir / "preference_accuracy.png",
                                           eval_every=eval_every),
    }
    return {k: v for k, v in made.items() if v is not None}
