"""`llm-maker lm-eval RUN_DIR --suite TASKS`: lm-evaluation-harness on the exported model, with one
headline metric per task and a side-by-side table against local baseline models.

TASKS is a comma-separated list of:
  small-lm         SMALL_LM_SUITE, the benchmarks small-model cards report: HellaSwag,
                   ARC-Easy/Challenge and PIQA (acc_norm), WinoGrande
                   and LAMBADA (acc), SciQ (acc_norm), WikiText-2 (word perplexity); their data
                   comes from the Hugging Face Hub, so it needs network (or a warm datasets cache)
  FILE.jsonl       a local task, written as an lm-eval task YAML over the file: rows with
                   context/choices/label are multiple choice (acc, acc_norm), rows with text are
                   rolling perplexity (word_perplexity), rows with context/continuation are
                   LAMBADA-style cloze (acc, perplexity)
  DIR or FILE.yaml lm-eval task YAMLs of your own (added to lm-eval's include path)
  any other name   an lm-eval task name (lm-eval --tasks list)

The model runs through lm-eval's own HF backend (`--model hf`), on an export made for the
occasion: bf16 on a GPU, fp32 on a CPU. With only local tasks, the Hub is never contacted
(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set before lm-eval is imported).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from llm_maker.artifacts import atomic_write_json, atomic_write_text
from llm_maker.devices import inference_dtype, precision_name, resolve_device
from llm_maker.errors import LLMMakerError
from llm_maker.export.hf import export_to_temp
from llm_maker.layout import KEPT_MODELS, TRAIN_STAGES, run_dir_of
from llm_maker.markdown import MISSING
from llm_maker.tokenizer.tokenizer import Tokenizer

SMALL_LM_SUITE = {  # task -> headline metric: the benchmarks small Llama-style models are usually reported on
    "hellaswag": "acc_norm", "arc_easy": "acc_norm", "arc_challenge": "acc_norm", "piqa": "acc_norm",
    "winogrande": "acc", "lambada_openai": "acc", "sciq": "acc_norm", "wikitext": "word_perplexity"}
LOWER_IS_BETTER = {"word_perplexity", "byte_perplexity", "bits_per_byte", "perplexity"}
HEADLINE_ORDER = ("acc_norm", "acc", "word_perplexity", "perplexity", "byte_perplexity")
LOCAL_PREFIX = "llm_maker_"  # generated task names, clear of lm-eval's registered ones
RESULTS = "results.json"
TABLE = "table.md"


@dataclass
class Suite:
    tasks: list[str] = field(default_factory=list)  # lm-eval task names, in table order
    include_paths: list[str] = field(default_factory=list)
    metrics: dict[str, str] = field(default_factory=dict)  # task -> headline metric (else HEADLINE_ORDER)
    local_only: bool = True  # every task reads local files: no hub access needed


# --------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------

def local_task_config(path: Path) -> tuple[dict[str, Any], str]:
    """(lm-eval task config over a jsonl file, its headline metric), the kind read off the first row."""
    path = Path(path).resolve()
    try:
        first = json.loads(next(line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()))
    except StopIteration:
        raise LLMMakerError(f"--suite {path}: the file holds no rows") from None
    except json.JSONDecodeError as e:
        raise LLMMakerError(f"--suite {path}: the first row is not valid JSON: {e}") from None
    base = {"task": LOCAL_PREFIX + path.stem, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(path)}}, "test_split": "test"}
    mean_up = {"aggregation": "mean", "higher_is_better": True}
    if isinstance(first, dict) and {"context", "choices", "label"} <= set(first):
        return {**base, "output_type": "multiple_choice", "doc_to_text": "context", "doc_to_choice": "choices",
                "doc_to_target": "label",
                "metric_list": [{"metric": "acc", **mean_up}, {"metric": "acc_norm", **mean_up}]}, "acc_norm"
    if isinstance(first, dict) and {"context", "continuation"} <= set(first):
        return {**base, "output_type": "loglikelihood", "doc_to_text": "context", "doc_to_target": "continuation",
                "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                                {"metric": "acc", **mean_up}]}, "acc"
    if isinstance(first, dict) and "text" in first:
        return {**base, "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "text",
                "metric_list": [{"metric": m, "aggregation": agg, "higher_is_better": False} for m, agg in
                                (("word_perplexity", "weighted_perplexity"), ("byte_perplexity", "weighted_perplexity"),
                                 ("bits_per_byte", "bits_per_byte"))]}, "word_perplexity"
    raise LLMMakerError(f"--suite {path}: rows need context/choices/label (multiple choice), context/continuation "
                        f"(cloze) or text (perplexity); the first row has "
                        f"{sorted(first) if isinstance(first, dict) else first!r}")


def yaml_task_names(path: Path) -> list[str]:
    files = sorted(path.glob("*.yaml")) if path.is_dir() else [path]
    names = []
    for f in files:
        doc = yaml.load(f.read_text(encoding="utf-8"), Loader=yaml.BaseLoader)  # tolerate lm-eval's !function tags
        if isinstance(doc, dict) and isinstance(doc.get("task"), str):
            names.append(doc["task"])
    if not names:
        raise LLMMakerError(f"--suite {path}: no lm-eval task YAML (a mapping with `task:`) found")
    return names


def resolve_suite(spec: str, tasks_dir: Path) -> Suite:
    """Parse `--suite`; local jsonl files become task YAMLs written under `tasks_dir`."""
    suite = Suite()
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        path = Path(item)
        if item == "small-lm":
            suite.tasks += list(SMALL_LM_SUITE)
            suite.metrics.update(SMALL_LM_SUITE)
            suite.local_only = False
        elif item.endswith(".jsonl"):
            if not path.is_file():
                raise LLMMakerError(f"--suite {item}: file not found")
            config, metric = local_task_config(path)
            tasks_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(tasks_dir / f"{config['task']}.yaml", yaml.safe_dump(config, sort_keys=False))
            suite.tasks.append(config["task"])
            suite.metrics[config["task"]] = metric
            if str(tasks_dir) not in suite.include_paths:
                suite.include_paths.append(str(tasks_dir))
        elif path.suffix in (".yaml", ".yml") or path.is_dir():
            if not path.exists():
                raise LLMMakerError(f"--suite {item}: not found")
            suite.tasks += yaml_task_names(path)
            suite.include_paths.append(str((path if path.is_dir() else path.parent).resolve()))
        else:
            suite.tasks.append(item)
            suite.local_only = False
    if not suite.tasks:
        raise LLMMakerError(f"--suite {spec!r} names no task")
    return suite


# --------------------------------------------------------------------------------------
# Running lm-eval
# --------------------------------------------------------------------------------------

HF_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def lm_eval_model_args(hf_dir: Path, device: str, prefix_token_id: Optional[int],
                       precision: str = "fp32") -> dict[str, Any]:
    """lm-eval's HF backend, its weights in `precision` (bf16 | fp16 | fp32)."""
    args: dict[str, Any] = {"pretrained": str(hf_dir), "device": device, "dtype": HF_DTYPES[precision]}
    if prefix_token_id is not None:  # an empty context is conditioned on <|endoftext|>, as we train
        args["prefix_token_id"] = prefix_token_id
    return args


def go_offline() -> None:
    """No Hub access: huggingface_hub and datasets read these when first imported, so this runs
    before anything imports them (the export imports transformers)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"


def run_lm_eval(hf_dir: Path, suite: Suite, device: str, batch_size: Any, limit: Optional[float] = None,
                prefix_token_id: Optional[int] = None, log_samples: bool = False,
                precision: str = "fp32") -> dict[str, Any]:
    """lm_eval.simple_evaluate on one HF directory; returns lm-eval's results dict (with
    per-item "samples" when `log_samples`)."""
    if suite.local_only:
        go_offline()
    try:
        from lm_eval import evaluator
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LLMMakerError("`llm-maker lm-eval` needs lm-eval: pip install 'llm-maker[hf]'") from None
    # Indexing lm-eval's ~10k built-in task files takes seconds: skip it when every task is ours.
    manager = TaskManager(include_path=suite.include_paths or None, include_defaults=not suite.local_only)
    missing = [t for t in suite.tasks if t not in manager.all_tasks]
    if missing:
        raise LLMMakerError(f"--suite: lm-eval knows no task {missing[0]!r} (see `lm-eval ls tasks`)")
    results = evaluator.simple_evaluate(
        model="hf", model_args=lm_eval_model_args(hf_dir, device, prefix_token_id, precision), tasks=suite.tasks,
        task_manager=manager, batch_size=batch_size, limit=limit, log_samples=log_samples, bootstrap_iters=1000)
    if results is None:  # only on non-zero ranks of a distributed run
        raise LLMMakerError("lm-eval returned no results")
    return results


def headline(results: dict[str, Any], suite: Suite) -> dict[str, dict[str, Any]]:
    """{task: {"metric", "value", "higher_is_better"}} for each task of the suite."""
    out = {}
    for task in suite.tasks:
        row = results["results"].get(task, {})
        found = {k.split(",")[0]: v for k, v in row.items() if "," in k and "_stderr" not in k}
        metric = suite.metrics.get(task) or next((m for m in HEADLINE_ORDER if m in found), None)
        if metric is None or metric not in found:
            raise LLMMakerError(f"lm-eval gave task {task} no {metric or 'known'} metric (got {sorted(found)})")
        out[task] = {"metric": metric, "value": float(found[metric]), "higher_is_better": metric not in LOWER_IS_BETTER}
    return out


def win_rate(ours: dict[str, dict], theirs: dict[str, dict]) -> tuple[int, int]:
    """(tasks where ours is strictly better, tasks compared)."""
    shared = [t for t in ours if t in theirs]
    wins = sum((ours[t]["value"] > theirs[t]["value"]) if ours[t]["higher_is_better"]
               else (ours[t]["value"] < theirs[t]["value"]) for t in shared)
    return wins, len(shared)


def display_name(task: str) -> str:
    return task[len(LOCAL_PREFIX):] if task.startswith(LOCAL_PREFIX) else task


def comparison_table(columns: dict[str, dict[str, dict]]) -> str:
    """Markdown: one row per task (its metric, one cell per model), then the first model's win
    rate against each of the others."""
    names = list(columns)
    ours = columns[names[0]]
    lines = ["| task | metric | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for task, h in ours.items():
        arrow = "↑" if h["higher_is_better"] else "↓"
        cells = []
        for name in names:
            v = columns[name].get(task, {}).get("value")
            cells.append(MISSING if v is None else (f"{v:.2f}" if h["metric"] in LOWER_IS_BETTER else f"{v:.4f}"))
        lines.append(f"| {display_name(task)} | {h['metric']} {arrow} | " + " | ".join(cells) + " |")
    if len(names) > 1:
        cells = [MISSING] + [f"{w}/{n} ({100 * w / n:.0f}%)" if n else MISSING
                         for w, n in (win_rate(ours, columns[name]) for name in names[1:])]
        lines.append(f"| **{names[0]} wins** | | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# The verb
# --------------------------------------------------------------------------------------

def default_batch_size(device: str) -> Any:
    """`auto` on a GPU (lm-eval backs off on out-of-memory errors); 8 on a CPU, where running out
    of memory kills the process instead of raising, so auto-detection cannot back off."""
    return "auto" if device.startswith("cuda") else 8


def model_label(model_dir: Path) -> str:
    """`demo/sft` for runs/demo/sft/final (or sft/best); the folder name otherwise."""
    model_dir = Path(model_dir).resolve()
    if model_dir.name in KEPT_MODELS and model_dir.parent.name in TRAIN_STAGES:
        return f"{model_dir.parent.parent.name}/{model_dir.parent.name}"
    return model_dir.name


def suite_out_dir(model_dir: Path) -> Path:
    """RUN_DIR/eval/lm_eval for a model of a run (where the model card looks); else MODEL_DIR/lm_eval."""
    run = run_dir_of(Path(model_dir).resolve())
    return run / "eval" / "lm_eval" if run is not None else Path(model_dir) / "lm_eval"


def is_hf_dir(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and "model_type" in json.loads(config.read_text(encoding="utf-8"))


def hf_dir_for(model_dir: Path, work: Path) -> tuple[Path, Optional[int]]:
    """(a transformers directory for `model_dir`, the prefix token for empty contexts): an HF
    directory as it is, an llm-maker model directory exported under `work`."""
    if is_hf_dir(model_dir):
        return model_dir, None
    return export_to_temp(model_dir, work), Tokenizer.load(model_dir).eos_id


def run_suite(models: dict[str, Path], spec: str, out_dir: Path, device: str = "auto", batch_size: Any = None,
              limit: Optional[float] = None, force: bool = False, precision: str = "auto") -> Path:
    """Evaluate each model (the first is "ours", the others baselines) on the suite, every one in
    the same `precision` (auto: `devices.inference_dtype`'s rule for the device); writes
    out_dir/results.json, out_dir/table.md and the generated task YAMLs (out_dir/tasks/)."""
    out_dir = Path(out_dir)
    if (out_dir / RESULTS).exists() and not force:
        raise LLMMakerError(f"{out_dir / RESULTS} exists; pass --force to replace it")
    for name, path in models.items():
        if not (Path(path) / "config.json").is_file():
            raise LLMMakerError(f"{name}: {path} is not a model directory (no config.json)")
    suite = resolve_suite(spec, out_dir / "tasks")
    if suite.local_only:
        go_offline()
    device = str(resolve_device(device))
    precision = precision_name(inference_dtype(precision, device))
    batch_size = batch_size or default_batch_size(device)
    columns, raw, version = {}, {}, None
    with tempfile.TemporaryDirectory(prefix="llm-maker-lm-eval-") as work:
        for i, (name, path) in enumerate(models.items()):
            hf_dir, prefix = hf_dir_for(Path(path), Path(work) / str(i))
            results = run_lm_eval(hf_dir, suite, device, batch_size, limit, prefix, precision=precision)
            columns[name] = headline(results, suite)
            raw[name] = {"dir": str(path), "results": results["results"], "n_samples": results.get("n-samples")}
            version = results.get("lm_eval_version")
    table = comparison_table(columns)
    atomic_write_json(out_dir / RESULTS, {"suite": spec, "tasks": suite.tasks, "device": device, "precision": precision,
                                          "batch_size": batch_size, "limit": limit, "lm_eval_version": version,
                                          "columns": list(columns),  # ours first (JSON keys get sorted)
                                          "headline": columns, "table": table, "models": raw})
    atomic_write_text(out_dir / TABLE, table)
    return out_dir
