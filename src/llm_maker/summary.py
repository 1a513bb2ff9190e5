"""The end-of-pipeline summary: where each artifact is, how big the model is, how well it trained,
what it says before and after SFT, and how to chat with it. Built from the stage manifests
and eval/report.json, so `llm-maker summary RUN_DIR` prints it again later."""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

from llm_maker.artifacts import read_json, read_manifest
from llm_maker.layout import STAGE_NAMES, RunPaths
from llm_maker.markdown import number, one_line, percent


def _fmt(x: Optional[float], digits: int = 3) -> str:
    return number(x, digits, missing="-")


def _pct(x: Optional[float], digits: int = 0) -> str:
    return percent(x, digits, missing="-")


def _ppl(loss: Optional[float]) -> Optional[float]:
    return None if loss is None else math.exp(min(loss, 50.0))


def summary_lines(paths: RunPaths, results: Optional[dict[str, Any]] = None) -> list[str]:
    lines = [f"== llm-maker run: {paths.root} =="]
    lines.append("Artifacts:")
    for stage in STAGE_NAMES:
        d = paths.stage_dir(stage)
        status = (results or {}).get(stage, {}).get("status")
        state = status or ("done" if read_manifest(d) else "missing")
        lines.append(f"  {stage:10s} {d}  ({state})")

    tok = read_manifest(paths.tokenizer) or {}
    pack = read_manifest(paths.pack) or {}
    pre = read_manifest(paths.pretrain) or {}
    sft = read_manifest(paths.sft) or {}
    report = read_json(paths.eval / "report.json") or {}

    lines.append("Data:")
    lines.append(f"  train tokens {pack.get('train_tokens', '-'):,}   val tokens {pack.get('val_tokens', '-'):,}   "
                 f"vocabulary {tok.get('vocab_size', '-')}   bytes/token {_fmt(tok.get('bytes_per_token'), 2)}"
                 if pack else "  (not packed)")
    ps = pre.get("summary", {})
    lines.append("Pretraining:")
    if ps:
        lines.append(f"  parameters {pre.get('parameters', 0):,}   tokens seen {ps.get('tokens_seen', 0):,}   "
                     f"steps {ps.get('steps')}   device {ps.get('device')} ({ps.get('precision')})")
        lines.append(f"  final train loss {_fmt(ps.get('final_loss'))} (ppl {_fmt(_ppl(ps.get('final_loss')), 1)})   "
                     f"val loss {_fmt(ps.get('val_loss'))} (ppl {_fmt(_ppl(ps.get('val_loss')), 1)})")
    val = report.get("validation") or {}
    if val:
        base = val.get("base") or {}
        lines.append(f"  eval: base val loss {_fmt(base.get('loss'))} (ppl {_fmt(base.get('perplexity'), 1)}) "
                     f"vs unigram baseline {_fmt(val.get('unigram_loss'))} "
                     f"(ppl {_fmt(val.get('unigram_perplexity'), 1)})")
    ss = sft.get("summary", {})
    if ss:
        lines.append("SFT:")
        lines.append(f"  steps {ss.get('steps')}   final loss {_fmt(ss.get('final_loss'))}   "
                     f"held-out loss {_fmt(ss.get('val_loss'))}")
        best = ss.get("best") or {}
        if sft.get("use") == "best" and best.get("step") is not None:
            lines.append(f"  kept: best/, step {best['step']} ({str(best.get('metric', 'val_loss')).replace('_', ' ')} "
                         f"{_fmt(best.get('value'))}), the model eval, chat and export use")
    em = report.get("exact_match") or {}
    st = report.get("stop_table") or {}
    if st:
        frac, doc = st.get("stop_fraction", {}), st.get("ended_document_fraction", {})
        lines.append(f"Ends its answer with {st.get('stop_token', 'EOS')} within {st.get('max_new_tokens')} tokens: "
                     f"base {_pct(frac.get('base'))}, SFT {_pct(frac.get('sft'))}"
                     f"   (halted on <|endoftext|> as if a document ended: base {_pct(doc.get('base'))})")
    if em:
        acc = em.get("accuracy", {})
        lines.append(f"Exact match on {em.get('n_items')} held-out items: base {_pct(acc.get('base'), 1)}, "
                     f"SFT {_pct(acc.get('sft'), 1)}")
    if report.get("base_completions"):
        lines.append("Base model completions (greedy):")
        for c in report["base_completions"][:3]:
            lines.append(f"  {c['prompt']!r} -> {one_line(c.get('greedy', ''))!r}")
    rows = st.get("rows") or []
    if rows and rows[0].get("sft"):
        lines.append("SFT chat answers (base answer beside it):")
        for r in rows[:6]:
            s, b = r["sft"], r["base"]
            lines.append(f"  Q: {one_line(r['prompt'], 70)}")
            for label, answer in (("SFT ", s), ("base", b)):
                stop = f"eos@{answer['n_tokens']}" if answer["stopped"] else "no stop"
                lines.append(f"     {label}: {one_line(answer['text'], 70)!r}  [{stop}]")
    if (paths.eval / "report.md").is_file():
        lines.append(f"Full report: {paths.eval / 'report.md'}")
    lines.append(f"Chat with it: .venv/bin/llm-maker chat {paths.root}")
    return lines


def print_summary(paths: RunPaths, results: Optional[dict[str, Any]] = None,
                  log: Callable[[str], None] = print) -> None:
    for line in summary_lines(paths, results):
        log(line)
