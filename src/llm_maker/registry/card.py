"""A run's model card, RUN_DIR/card.md: what the model is and its status, then the sections it
shares with an export's README.md (export/card.py: architecture, training recipe, evaluation,
samples, limitations), plus what only a run has: what training cost and the training curves
(RUN_DIR/plots/*.png). Everything comes from the run's artifacts; no weights are loaded.

`card_markdown(record, report, lm_eval, plots, stages)` is a pure function of those facts;
registry.py's `write_card` reads them and writes card.md and the plots.
"""
from __future__ import annotations

import statistics
from typing import Any, Optional

from llm_maker.artifacts import as_float
from llm_maker.export.card import (
    architecture_section,
    evaluation_section,
    later_stages_section,
    limitations,
    samples_section,
    stage_figures,
    teacher_label,
    training_section,
)
from llm_maker.layout import FINAL, TRAIN_STAGES
from llm_maker.markdown import GENERATED_MARK, MISSING, count, number, percent, table
from llm_maker.registry.records import STATUS_ICON, RunRecord, base_stage_of

CARD_FILE = "card.md"
PLOTS_DIR = "plots"


def cost_row(stage: str, rows: list[dict[str, str]], summary: dict[str, Any]) -> list[Any]:
    """stage, device, wall time, median tokens/s, mean MFU, peak memory, tokens: from metrics.csv."""
    tps = [v for v in (as_float(r.get("tokens_per_s")) for r in rows) if v]
    mfu = [v for v in (as_float(r.get("mfu")) for r in rows) if v is not None]
    mem = [v for v in (as_float(r.get("peak_mem_mb")) for r in rows) if v]
    elapsed = as_float(rows[-1].get("elapsed_s")) if rows else None
    return [stage, f"{summary.get('device', MISSING)} ({summary.get('precision', MISSING)})",
            f"{elapsed / 60:.1f} min" if elapsed else MISSING, f"{statistics.median(tps):,.0f}" if tps else MISSING,
            percent(statistics.mean(mfu), 1) if mfu else MISSING, f"{max(mem):,.0f} MB" if mem else MISSING,
            count(summary.get("tokens_seen") or (int(rows[-1]["tokens"]) if rows else None))]


def card_markdown(record: RunRecord, report: Optional[dict[str, Any]], lm_eval: Optional[dict[str, Any]],
                  plots: dict[str, str], stages: dict[str, dict[str, Any]]) -> str:
    """The card's text. `plots`: {name: path relative to the card}; `stages`: {stage: {"manifest",
    "metrics", "dims"}} for the training stages that ran."""
    recipe = record.recipe
    base_stage = base_stage_of(record)
    base, sft, dpo = record.model(base_stage), record.model("sft"), record.model("dpo")
    kept = {s: record.model(s).kept if record.model(s) else FINAL for s in stages}
    figures = {s: stage_figures(s, v.get("manifest"), v["metrics"], kept[s])
               for s, v in stages.items() if s in ("distill", "dpo")}
    dims = next((d for s in sorted(stages, key=lambda s: s != base_stage)  # the base stage's shape first
                 if (d := (stages[s].get("manifest") or {}).get("model") or stages[s].get("dims"))), None)
    base_tokens = sum(m.tokens or 0 for s in ("pretrain", "distill") if (m := record.model(s))) or None
    lines = [GENERATED_MARK, "", f"# {record.name}", "", f"Status: {STATUS_ICON[record.status]} ({record.reason}).", ""]
    if base:
        what = f"A {number(base.parameters)}-parameter Llama-style decoder trained from scratch by llm-maker on " \
               f"{count(base_tokens)} tokens"
        if "distill" in figures and base.stage == "distill":
            teacher = figures["distill"]["teacher"].get("dir") or (recipe.get("distill") or {}).get("teacher")
            what += f", distilled from `{teacher_label(teacher)}`"
        if sft:
            template = (recipe.get("sft") or {}).get("template", "chatml")
            what += f", then instruction-tuned ({template} template" + (f", {sft.note})" if sft.note else ")")
        if dpo:
            beta = figures.get("dpo", {}).get("beta") or (recipe.get("dpo") or {}).get("beta", 0.1)
            what += f", then preference-tuned with DPO (β {beta}" + (f", {dpo.note})" if dpo.note else ")")
        lines += [what + ".", ""]
    if dims:
        lines += architecture_section(dims, base.parameters if base else None)
    seq = dims.get("seq_len") if dims else None
    # SFT (and DPO) batches are padded to the longest conversation, not to the context.
    seq_lens = {s: (v.get("manifest") or {}).get("batch_seq_len", seq) if s in ("sft", "dpo") else seq
                for s, v in stages.items()}
    results = [{"stage": s, **((v.get("manifest") or {}).get("summary") or {}), "kept": kept[s]}
               for s, v in stages.items() if (v.get("manifest") or {}).get("summary")]
    lines += training_section(recipe, results, [s for s in TRAIN_STAGES if s in stages], seq_lens)
    lines += later_stages_section(figures)
    cost = [cost_row(s, v["metrics"], (v.get("manifest") or {}).get("summary") or {})
            for s, v in stages.items() if v["metrics"]]
    if cost:
        lines += ["## Cost and throughput", "", *table(["stage", "device", "wall time", "tokens/s (median)",
                                                        "MFU (mean)", "peak memory", "tokens"], cost)]
    lines += evaluation_section(report, lm_eval)
    lines += samples_section(report)
    if plots:
        lines += ["## Training curves", ""] + [f"![{name}]({path})" for name, path in plots.items()] + [""]
    if dims:
        lines += ["## Limitations", "", *limitations(base.parameters if base else None, base_tokens, report,
                                                     dims["seq_len"])]
    lines += ["## Use it", "", "```bash", f"llm-maker chat {record.path}", f"llm-maker serve {record.path}   "
              "# web chat and an OpenAI-compatible API on http://127.0.0.1:8000", "```", ""]
    return "\n".join(lines)
