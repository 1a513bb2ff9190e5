"""The end-of-pipeline summary: where each artifact is, how big the model is, how well it trained
(distillation: KL to the teacher; DPO: held-out preference accuracy and margin), what it says
before and after SFT, and how to chat with it. Built from the stage manifests, metrics.csv and
eval/report.json, so `llm-maker summary RUN_DIR` prints it again later."""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

from llm_maker.artifacts import read_json, read_manifest, read_metrics
from llm_maker.export.card import stage_figures, teacher_label
from llm_maker.layout import STAGES, RunPaths
from llm_maker.markdown import number, one_line, percent
from llm_maker.recipe import Recipe


def _fmt(x: Optional[float], digits: int = 3) -> str:
    return number(x, digits, missing="-")


def _pct(x: Optional[float], digits: int = 0) -> str:
    return percent(x, digits, missing="-")


def _ppl(loss: Optional[float]) -> Optional[float]:
    return None if loss is None else math.exp(min(loss, 50.0))


def summary_lines(paths: RunPaths, results: Optional[dict[str, Any]] = None) -> list[str]:
    lines = [f"== llm-maker run: {paths.root} =="]
    lines.append("Artifacts:")
    defaults = Recipe()
    for spec in STAGES:
        stage, d = spec.name, paths.stage_dir(spec.name)
        status = (results or {}).get(stage, {}).get("status")
        if spec.optional and not getattr(defaults, stage).enabled and not status and not d.is_dir():
            continue  # a stage off by default (distill, dpo) is listed once it ran
        state = status or ("done" if read_manifest(d) else "missing")
        if stage == "pretrain" and state == "missing" and not d.is_dir() and read_manifest(paths.distill):
            state = "skipped: distilled from scratch"
        lines.append(f"  {stage:10s} {d}  ({state})")

    tok = read_manifest(paths.tokenizer) or {}
    pack = read_manifest(paths.pack) or {}
    pre = read_manifest(paths.pretrain) or {}
    distill = read_manifest(paths.distill) or {}
    sft = read_manifest(paths.sft) or {}
    dpo = read_manifest(paths.dpo) or {}
    report = read_json(paths.eval / "report.json") or {}

    lines.append("Data:")
    lines.append(f"  train tokens {pack.get('train_tokens', '-'):,}   val tokens {pack.get('val_tokens', '-'):,}   "
                 f"vocabulary {tok.get('vocab_size', '-')}   bytes/token {_fmt(tok.get('bytes_per_token'), 2)}"
                 if pack else "  (not packed)")
    ps = pre.get("summary", {})
    if ps or not distill:
        lines.append("Pretraining:")
    if ps:
        lines.append(f"  parameters {pre.get('parameters', 0):,}   tokens seen {ps.get('tokens_seen', 0):,}   "
                     f"steps {ps.get('steps')}   device {ps.get('device')} ({ps.get('precision')})")
        lines.append(f"  final train loss {_fmt(ps.get('final_loss'))} (ppl {_fmt(_ppl(ps.get('final_loss')), 1)})   "
                     f"val loss {_fmt(ps.get('val_loss'))} (ppl {_fmt(_ppl(ps.get('val_loss')), 1)})")
    lines += _distill_lines(paths, distill)
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
    lines += _dpo_lines(paths, dpo)
    em = report.get("exact_match") or {}
    st = report.get("stop_table") or {}
    has_dpo = bool((report.get("models") or {}).get("dpo"))
    if st:
        frac, doc = st.get("stop_fraction", {}), st.get("ended_document_fraction", {})
        lines.append(f"Ends its answer with {st.get('stop_token', 'EOS')} within {st.get('max_new_tokens')} tokens: "
                     f"base {_pct(frac.get('base'))}, SFT {_pct(frac.get('sft'))}"
                     + (f", DPO {_pct(frac.get('dpo'))}" if has_dpo else "")
                     + f"   (halted on <|endoftext|> as if a document ended: base {_pct(doc.get('base'))})")
    if em:
        acc = em.get("accuracy", {})
        lines.append(f"Exact match on {em.get('n_items')} held-out items: base {_pct(acc.get('base'), 1)}, "
                     f"SFT {_pct(acc.get('sft'), 1)}" + (f", DPO {_pct(acc.get('dpo'), 1)}" if has_dpo else ""))
    if report.get("base_completions"):
        lines.append("Base model completions (greedy):")
        for c in report["base_completions"][:3]:
            lines.append(f"  {c['prompt']!r} -> {one_line(c.get('greedy', ''))!r}")
    rows = st.get("rows") or []
    if rows and rows[0].get("sft"):
        lines.append("SFT chat answers (" + ("DPO's and " if has_dpo else "") + "base answer beside it):")
        for r in rows[:6]:
            lines.append(f"  Q: {one_line(r['prompt'], 70)}")
            for label, answer in (("SFT ", r["sft"]), ("DPO ", r.get("dpo")), ("base", r["base"])):
                if answer is None:  # no DPO model
                    continue
                stop = f"eos@{answer['n_tokens']}" if answer["stopped"] else "no stop"
                lines.append(f"     {label}: {one_line(answer['text'], 70)!r}  [{stop}]")
    if (paths.eval / "report.md").is_file():
        lines.append(f"Full report: {paths.eval / 'report.md'}")
    lines.append(f"Chat with it: .venv/bin/llm-maker chat {paths.root}")
    return lines


def _distill_lines(paths: RunPaths, manifest: dict[str, Any]) -> list[str]:
    """Distillation's key figures: the teacher, then the model's val loss and its last KL and CE."""
    summary = manifest.get("summary") or {}
    if not summary:
        return []
    fig = stage_figures("distill", manifest, read_metrics(paths.distill), paths.model("distill").name)
    t = fig["teacher"]
    return ["Distillation:",
            f"  teacher {teacher_label(t.get('dir'))} ({t.get('mode', '-')}, alpha {t.get('alpha', '-')}, "
            f"T {t.get('temperature', '-')})   steps {summary.get('steps')}   "
            f"tokens seen {summary.get('tokens_seen') or 0:,}",
            f"  val loss {_fmt(fig['val_loss'])} (ppl {_fmt(_ppl(fig['val_loss']), 1)})   KL to the teacher "
            f"{_fmt(fig['kl'])}   cross-entropy {_fmt(fig['ce'])}"]


def _dpo_lines(paths: RunPaths, manifest: dict[str, Any]) -> list[str]:
    """DPO's key figures: pairs and beta, then held-out preference accuracy and reward margin."""
    summary = manifest.get("summary") or {}
    if not summary:
        return []
    fig = stage_figures("dpo", manifest, read_metrics(paths.dpo), paths.model("dpo").name)
    pairs = f"{fig['pairs']:,} preference pairs, " if fig["pairs"] else ""
    return ["DPO:",
            f"  {pairs}beta {fig['beta'] if fig['beta'] is not None else '-'}   steps {summary.get('steps')}   "
            f"kept: {paths.model('dpo').name}/",
            f"  held-out preference accuracy {_pct(fig['val_pref_acc'], 1)}   reward margin "
            f"{_fmt(fig['val_reward_margin'])}   (train: {_pct(fig['pref_acc'], 1)}, {_fmt(fig['reward_margin'])})"]


def print_summary(paths: RunPaths, results: Optional[dict[str, Any]] = None,
                  log: Callable[[str], None] = print) -> None:
    for line in summary_lines(paths, results):
        log(line)
