"""report.json -> report.md: the eval's numbers as readable markdown tables, one column or row per
model scored (base, sft, and dpo when the run has a DPO model).

`render_markdown` is a pure function of the report dict (the one `run_eval` builds), so the
markdown can be regenerated from report.json alone.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from llm_maker.artifacts import atomic_write_json, atomic_write_text
from llm_maker.markdown import MISSING, cell, number, percent, table

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
MODEL_TITLES = {"base": "base", "sft": "SFT", "dpo": "DPO"}  # the report's models, as headings name them


def stop_cell(answer: Optional[dict[str, Any]]) -> str:
    """`eos@13 text`: stopped after 13 tokens; `doc-end@N`: halted on <|endoftext|>; `cut@48`: never stopped."""
    if answer is None:
        return MISSING
    if answer["stopped"]:
        mark = f"eos@{answer['n_tokens']}"
    elif answer.get("ended_document"):  # halted on <|endoftext|>: a document ended, not the turn
        mark = f"doc-end@{answer['n_tokens']}"
    else:
        mark = f"cut@{answer['n_tokens']}"
    text = answer["text"]
    return f"{mark} {cell(text) if text.strip() else cell(repr(text), 24)}"  # show a blank answer's whitespace


def _models_section(report: dict[str, Any]) -> list[str]:
    rows = [[name, number(info["parameters"]), number(info.get("tokens_seen")), number(info.get("steps")),
             cell(info["dir"])] for name, info in report["models"].items() if info]
    return ["## Models", ""] + table(["model", "parameters", "tokens seen", "steps", "directory"], rows)


def _validation_section(report: dict[str, Any]) -> list[str]:
    v = report["validation"]
    rows = [[name, number(v[name]["loss"]), number(v[name]["perplexity"], 2)]
            for name in report["models"] if v.get(name)]
    rows.append(["unigram baseline", number(v["unigram_loss"]), number(v["unigram_perplexity"], 2)])
    return (["## Validation loss", "", f"Next-token loss on {v['tokens_scored']:,} tokens of the packed val split "
             "(nats/token); the unigram baseline knows only token frequencies.", ""]
            + table(["model", "val loss", "perplexity"], rows))


def _stop_section(report: dict[str, Any]) -> list[str]:
    st = report["stop_table"]
    names = [n for n in report["models"] if report["models"][n]]
    rows = [[cell(r["prompt"], 60), r["source"]] + [stop_cell(r[n]) for n in names] for r in st["rows"]]
    n = len(st["rows"])
    rows.append(["**stopped**", ""] + [
        f"**{sum(r[m]['stopped'] for r in st['rows'])}/{n} ({percent(st['stop_fraction'][m])})**" if n else MISSING
        for m in names])
    intro = (f"The same prompts in the `{st['template']}` template, answered greedily (at most "
             f"{st['max_new_tokens']} new tokens). `eos@N`: ended the turn with `{st.get('stop_token', 'EOS')}` "
             "after N tokens; `doc-end@N`: halted on `<|endoftext|>` as if a document ended (a base "
             "model's habit, not a learned stop); `cut@N`: never stopped.")
    compared = " vs ".join(MODEL_TITLES.get(n, n) for n in report["models"])  # base vs SFT (vs DPO)
    return [f"## Does it answer and stop? ({compared})", "", intro, ""] + table(["prompt", "from"] + names, rows)


def _exact_match_section(report: dict[str, Any]) -> list[str]:
    em = report["exact_match"]
    lines = ["## Exact match on held-out SFT items", ""]
    if not em["n_items"]:
        return lines + ["No held-out SFT items (the SFT stage did not run or held none out).", ""]
    names = [n for n in report["models"] if report["models"][n]]
    rows = [[n, percent(em["accuracy"][n]), f"{em['correct'][n]}/{em['n_items']}"] for n in names]
    lines += ["Greedy answer, stripped, equal to the reference, stripped.", ""]
    lines += table(["model", "accuracy", "correct"], rows)
    examples = [[cell(e["prompt"], 60), cell(e["reference"], 60)] + [cell(e[n], 60) for n in names]
                for e in em["examples"]]
    return lines + table(["prompt", "reference"] + names, examples)


def _completions_section(report: dict[str, Any]) -> list[str]:
    rows = [[cell(c["prompt"], 40), cell(c["greedy"]), cell(c["sampled"])] for c in report["base_completions"]]
    return (["## Base model completions", "", "Plain-text continuations; the sample is seeded (temperature 0.8, "
             "top-k 40).", ""] + table(["prompt", "greedy", "sampled"], rows))


def render_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Evaluation of run `{report['run']}`", "",
             f"Device {report['device']}, {report.get('precision', 'fp32')} weights; "
             f"took {report.get('eval_seconds', 0):.1f} s.", ""]
    for section in (_models_section, _validation_section, _stop_section, _exact_match_section,
                    _completions_section):
        lines += section(report)
    return "\n".join(lines)


def write_report(out_dir: str | Path, report: dict[str, Any]) -> tuple[Path, Path]:
    """Write report.json and report.md atomically; returns their paths."""
    out_dir = Path(out_dir)
    json_path, md_path = out_dir / REPORT_JSON, out_dir / REPORT_MD
    atomic_write_json(json_path, report)
    atomic_write_text(md_path, render_markdown(report))
    return json_path, md_path
