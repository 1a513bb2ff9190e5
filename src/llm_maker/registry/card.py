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
    limitations,
    samples_section,
    training_section,
)
from llm_maker.layout import FINAL, TRAIN_STAGES
from llm_maker.markdown import GENERATED_MARK, MISSING, count, number, percent, table
from llm_maker.registry.records import STATUS_ICON, RunRecord

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
    base, sft = record.model("pretrain"), record.model("sft")
    pre = stages.get("pretrain", {})
    dims = (pre.get("manifest") or {}).get("model") or pre.get("dims")
    lines = [GENERATED_MARK, "", f"# {record.name}", "", f"Status: {STATUS_ICON[record.status]} ({record.reason}).", ""]
    if base:
        what = f"A {number(base.parameters)}-parameter Llama-style decoder trained from scratch by llm-maker on " \
               f"{count(base.tokens)} tokens"
        if sft:
            template = (recipe.get("sft") or {}).get("template", "chatml")
            what += f", then instruction-tuned ({template} template" + (f", {sft.note})" if sft.note else ")")
        lines += [what + ".", ""]
    if dims:
        lines += architecture_section(dims, base.parameters if base else None)
    seq = dims.get("seq_len") if dims else None
    # SFT batches are padded to the longest conversation, not to the context.
    seq_lens = {s: (v.get("manifest") or {}).get("batch_seq_len", seq) if s == "sft" else seq
                for s, v in stages.items()}
    results = [{"stage": s, **((v.get("manifest") or {}).get("summary") or {}),
                "kept": record.model(s).kept if record.model(s) else FINAL}
               for s, v in stages.items() if (v.get("manifest") or {}).get("summary")]
    lines += training_section(recipe, results, [s for s in TRAIN_STAGES if s in stages], seq_lens)
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
        lines += ["## Limitations", "", *limitations(base.parameters if base else None, base.tokens if base else None,
                                                     report, dims["seq_len"])]
    lines += ["## Use it", "", "```bash", f"llm-maker chat {record.path}", f"llm-maker serve {record.path}   "
              "# web chat and an OpenAI-compatible API on http://127.0.0.1:8000", "```", ""]
    return "\n".join(lines)
