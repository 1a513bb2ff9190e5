"""Optional experiment tracking: every metrics.csv row also goes to TensorBoard and/or Weights &
Biases when the recipe switches them on (`train.tensorboard`, `train.wandb`; both off by
default, and metrics.csv stays the record either way). The trainer feeds each sink the rows it
logs; a sink is anything with `log(row)` and `close()`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Protocol


class MetricSink(Protocol):
    def log(self, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a metrics row, without the step (the x axis)."""
    out = {}
    for key, value in row.items():
        try:
            v = float(value)
        except (TypeError, ValueError):  # "" (not measured at this step), None
            continue
        if key != "step":
            out[key] = v
    return out


class TensorBoardSink:
    """Scalars under `<stage>/<metric>` in out_dir/tensorboard (`tensorboard --logdir RUN_DIR`)."""

    def __init__(self, log_dir: Path, stage: str):
        from torch.utils.tensorboard import SummaryWriter

        self.stage = stage
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, row: dict[str, Any]) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(f"{self.stage}/{key}", value, int(row["step"]))

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """One W&B run per stage, named `<recipe>-<stage>`, its files under out_dir/wandb."""

    def __init__(self, out_dir: Path, project: str, name: str, config: dict[str, Any]):
        import wandb

        self.run = wandb.init(project=project, name=name, dir=str(out_dir), config=config, reinit=True)

    def log(self, row: dict[str, Any]) -> None:
        self.run.log(scalars(row), step=int(row["step"]))

    def close(self) -> None:
        self.run.finish()


def open_trackers(tc: Any, out_dir: Path, stage: Optional[str] = None, run_name: Optional[str] = None
                  ) -> list[MetricSink]:
    """The sinks `tc` (a TrainConfig) switches on, for `stage` (default: out_dir's name) of `run_name`."""
    stage = stage or Path(out_dir).name
    sinks: list[MetricSink] = []
    if getattr(tc, "tensorboard", False):
        sinks.append(TensorBoardSink(Path(out_dir) / "tensorboard", stage))
    if getattr(tc, "wandb", False):
        config = dataclasses.asdict(tc) if dataclasses.is_dataclass(tc) else {}
        sinks.append(WandbSink(Path(out_dir), tc.wandb_project, f"{run_name or 'run'}-{stage}", config))
    return sinks
