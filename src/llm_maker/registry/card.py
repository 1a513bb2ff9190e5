"""A run's model card, RUN_DIR/card.md, in the seeds' layout: what the model is, its
architecture (and why), the training recipe, what it cost, how it scores, what it says, the
training curves (RUN_DIR/plots/*.png) and its limitations. Everything comes from the run's
artifacts (recipe.yaml, manifests, metrics.csv, eval/report.json); no weights are loaded.

`card_markdown(record, report, plots)` is a pure function of those facts; `write_card` reads
them and writes card.md and the plots.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
from pathlib import Path
from typing import Any, Optional

from llm_maker.artifacts import atomic_write_text, read_manifest
from llm_maker.recipe import SFTConfig, TrainConfig
from llm_maker.registry.registry import (GENERATED_MARK, STATUS_ICON, RunRecord, as_float, check_overwrite, fmt_int,
                                         fmt_tokens, read_json, read_metrics, scan_run)

CARD_FILE = "card.md"
DEFAULT_TRAIN = {"pretrain": dataclasses.asdict(TrainConfig()), "sft": dataclasses.asdict(SFTConfig().train)}
PLOTS_DIR = "plots"
CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022: compute-optimal pretraining
DESIGN = [  # (component, why): the seeds' design table
    ("RoPE", "relative positions; the Hugging Face rotate-half layout, so export needs no permutation"),
    ("RMSNorm, pre-norm", "cheaper than LayerNorm (no mean-centring), stable"),
    ("SwiGLU MLP", "gated activation, stronger than a GELU MLP at equal parameters"),
    ("SDPA attention", "PyTorch's fused causal kernel"),
]


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in r) + " |" for r in rows], ""]


def _short(text: str, limit: int = 110) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def architecture(dims: dict[str, Any], parameters: Optional[int]) -> list[str]:
    d, h, kv = dims["d_model"], dims["n_heads"], dims["n_kv_heads"]
    rows = [["parameters", fmt_int(parameters), "computed from the dims and asserted against the built model"],
            ["layers", dims["n_layers"], ""], ["d_model", d, ""],
            ["attention heads (query / key-value)", f"{h} / {kv} (head dim {d // h})",
             "grouped-query attention: a smaller KV cache" if kv < h else "multi-head attention"],
            ["MLP hidden", f"{dims['d_mlp']} ({dims['d_mlp'] / d:.2g}× d_model)", "SwiGLU"],
            ["vocabulary", fmt_int(dims["vocab_size"]), "byte-level BPE: no unknown tokens"],
            ["context", f"{dims['seq_len']} tokens", "RoPE θ = " + f"{dims.get('rope_theta', 10000.0):g}"],
            ["embeddings", "tied" if dims.get("tie_embeddings") else "untied",
             "the head reuses the input embedding: saves V·d parameters" if dims.get("tie_embeddings") else ""]]
    rows += [[c, "yes", why] for c, why in DESIGN]
    return _table(["component", "value", "why"], rows)


def recipe_rows(train: dict[str, Any], seq_len: Optional[int]) -> list[list[Any]]:
    mb, accum = train.get("micro_batch_size", "-"), train.get("grad_accum_steps", 1)
    per_step = mb * accum * seq_len if isinstance(mb, int) and seq_len else None
    lr = as_float(train.get("lr"))
    return [["steps", train.get("max_steps", "-")],
            ["batch", f"{mb} × {accum} accumulation" + (f" × {seq_len} tokens = {per_step:,} tokens/step" if per_step else "")],
            ["optimizer", f"{train.get('optimizer', 'adamw')} (β {train.get('beta1', 0.9)}/{train.get('beta2', 0.95)}, "
                          f"weight decay {train.get('weight_decay', 0.1)})"],
            ["learning rate", f"{lr:g} peak, {train.get('warmup_steps', '-')} warmup steps, cosine to "
                              f"{train.get('min_lr_ratio', 0.1):g}× peak" if lr else "-"],
            ["gradient clipping", train.get("grad_clip", 1.0)], ["precision", train.get("precision", "auto")],
            ["seed", train.get("seed", "-")]]


def cost_rows(stage: str, rows: list[dict[str, str]], summary: dict[str, Any]) -> list[Any]:
    tps = [v for v in (as_float(r.get("tokens_per_s")) for r in rows) if v]
    mfu = [v for v in (as_float(r.get("mfu")) for r in rows) if v is not None]
    mem = [v for v in (as_float(r.get("peak_mem_mb")) for r in rows) if v]
    elapsed = as_float(rows[-1].get("elapsed_s")) if rows else None
    return [stage, f"{summary.get('device', '-')} ({summary.get('precision', '-')})",
            f"{elapsed / 60:.1f} min" if elapsed else "-", f"{statistics.median(tps):,.0f}" if tps else "-",
            f"{statistics.mean(mfu):.1%}" if mfu else "-", f"{max(mem):,.0f} MB" if mem else "-",
            fmt_tokens(summary.get("tokens_seen") or (int(rows[-1]["tokens"]) if rows else None))]


def evaluation(report: Optional[dict[str, Any]], lm_eval: Optional[dict[str, Any]]) -> list[str]:
    if not report:
        return ["Not evaluated yet: run `llm-maker eval RECIPE`.", ""]
    v, out = report.get("validation") or {}, []
    rows = [[name, f"{v[name]['loss']:.3f}", f"{v[name]['perplexity']:.1f}"] for name in ("base", "sft") if v.get(name)]
    if v.get("unigram_loss") is not None:
        rows.append(["unigram baseline", f"{v['unigram_loss']:.3f}", f"{v['unigram_perplexity']:.1f}"])
    if rows:
        out += [f"Validation loss on {v.get('tokens_scored', 0):,} held-out pretraining tokens (nats/token):", "",
                *_table(["model", "val loss", "perplexity"], rows)]
    stops = (report.get("stop_table") or {}).get("stop_fraction") or {}
    em = report.get("exact_match") or {}
    score_rows = [[name, f"{stops[name]:.0%}" if name in stops else "-",
                   f"{em['accuracy'][name]:.1%} of {em.get('n_items')}" if name in (em.get("accuracy") or {}) else "-"]
                  for name in ("base", "sft") if name in stops or name in (em.get("accuracy") or {})]
    if score_rows:
        out += ["Chat behaviour (greedy): does it stop on the template's end token, and is the answer exactly "
                "the held-out reference?", "", *_table(["model", "stops", "exact match"], score_rows)]
    for name, tasks in ((lm_eval or {}).get("headline") or {}).items():
        out += [f"lm-eval, `{name}`:", "",
                *_table(["task", "metric", "value"], [[t, h["metric"], f"{h['value']:.4g}"] for t, h in tasks.items()])]
    return out


def samples(report: Optional[dict[str, Any]]) -> list[str]:
    out = []
    completions = (report or {}).get("base_completions") or []
    if completions:
        out += ["Base model, greedy continuation:", "",
                *_table(["prompt", "continuation"], [[_short(c["prompt"], 50), _short(c.get("greedy", ""))]
                                                    for c in completions])]
    rows = ((report or {}).get("stop_table") or {}).get("rows") or []
    if rows and rows[0].get("sft"):
        tag = lambda a: f"eos@{a['n_tokens']}" if a["stopped"] else "no stop"  # noqa: E731
        out += ["Base vs SFT, same chat prompts (seed 004's table):", "",
                *_table(["prompt", "base", "SFT"], [[_short(r["prompt"], 50), f"{tag(r['base'])} {_short(r['base']['text'], 60)}",
                                                     f"{tag(r['sft'])} {_short(r['sft']['text'], 60)}"] for r in rows])]
    return out or ["No samples yet (they come with `llm-maker eval`).", ""]


def limitations(record: RunRecord, report: Optional[dict[str, Any]], dims: dict[str, Any]) -> list[str]:
    """Limits that follow from this run's own numbers, then the general ones."""
    base = next((m for m in record.models if m.stage == "pretrain"), None)
    out = []
    if base and base.parameters and base.tokens:
        ratio = base.tokens / base.parameters
        if ratio < CHINCHILLA_TOKENS_PER_PARAM:
            out.append(f"Undertrained: {ratio:.1f} tokens per parameter, against the ~{CHINCHILLA_TOKENS_PER_PARAM} "
                       "a compute-optimal run would use.")
    out.append(f"Context of {dims['seq_len']} tokens: longer conversations lose their oldest turns "
               "(`llm-maker serve --rope-scaling 2` stretches it, with some loss of quality).")
    v = (report or {}).get("validation") or {}
    if v.get("sft") and v.get("base") and v["sft"]["loss"] > v["base"]["loss"]:
        out.append(f"SFT raised the loss on plain text ({v['base']['loss']:.2f} → {v['sft']['loss']:.2f}): the chat "
                   "model is worse at continuing documents than the base model.")
    em = ((report or {}).get("exact_match") or {}).get("accuracy") or {}
    if "sft" in em and em["sft"] < 0.5:
        out.append(f"Answers are mostly wrong ({em['sft']:.0%} exact match on held-out items): it learned the "
                   "format of an answer and when to stop more than the facts.")
    out += ["Not instruction-safe and not fact-checked: it produces fluent-looking text that is often wrong, "
            "repeats itself and reflects its training corpus. For learning and experiments, not for decisions."]
    return [f"- {line}" for line in out] + [""]


def card_markdown(record: RunRecord, report: Optional[dict[str, Any]], lm_eval: Optional[dict[str, Any]],
                  plots: dict[str, str], stages: dict[str, dict[str, Any]]) -> str:
    """The card's text. `plots`: {name: path relative to the card}; `stages`: {stage: {"manifest",
    "metrics"}} for pretrain and sft."""
    recipe = record.recipe
    base = next((m for m in record.models if m.stage == "pretrain"), None)
    sft = next((m for m in record.models if m.stage == "sft"), None)
    dims = (stages.get("pretrain", {}).get("manifest") or {}).get("model") or stages.get("pretrain", {}).get("dims")
    lines = [GENERATED_MARK, "", f"# {record.name}", "", f"Status: {STATUS_ICON[record.status]} ({record.reason}).", ""]
    if base:
        what = f"A {fmt_int(base.parameters)}-parameter Llama-style decoder trained from scratch by llm-maker on " \
               f"{fmt_tokens(base.tokens)} tokens"
        if sft:
            template = (recipe.get("sft") or {}).get("template", "chatml")
            what += f", then instruction-tuned ({template} template" + (f", {sft.note})" if sft.note else ")")
        lines += [what + ".", ""]
    if dims:
        lines += ["## Architecture", "", *architecture(dims, base.parameters if base else None)]
    lines += ["## Training recipe", ""]
    data = recipe.get("data") or {}
    sources = ", ".join(s.get("type", "?") + (f" `{s['path']}`" if s.get("path") else "") for s in data.get("sources") or [])
    tok = recipe.get("tokenizer") or {}
    lines += [f"Data: {sources or '-'} (selection key `{data.get('selection_key', '-')}`, "
              f"{data.get('val_fraction', '-')} held out). Tokenizer: {tok.get('type', 'bpe')}, "
              f"vocabulary {tok.get('vocab_size', '-')}.", ""]
    seq = dims.get("seq_len") if dims else None
    for stage, train in (("pretrain", recipe.get("train")), ("sft", (recipe.get("sft") or {}).get("train"))):
        if stage in stages:
            train = {**DEFAULT_TRAIN[stage], **(train or {})}  # a recipe.yaml may omit defaults
            # SFT batches are padded to the longest conversation, not to the context.
            length = (stages[stage].get("manifest") or {}).get("batch_seq_len", seq) if stage == "sft" else seq
            lines += [f"**{'Pretraining' if stage == 'pretrain' else 'SFT (completion-only loss)'}**", "",
                      *_table(["setting", "value"], recipe_rows(train, length))]
    cost = [cost_rows(s, v["metrics"], (v.get("manifest") or {}).get("summary") or {})
            for s, v in stages.items() if v["metrics"]]
    if cost:
        lines += ["## Cost and throughput", "", *_table(["stage", "device", "wall time", "tokens/s (median)",
                                                         "MFU (mean)", "peak memory", "tokens"], cost)]
    lines += ["## Evaluation", "", *evaluation(report, lm_eval), "## Samples", "", *samples(report)]
    if plots:
        lines += ["## Training curves", ""] + [f"![{name}]({path})" for name, path in plots.items()] + [""]
    if dims:
        lines += ["## Limitations", "", *limitations(record, report, dims)]
    lines += ["## Use it", "", "```bash", f"llm-maker chat {record.path}", f"llm-maker serve {record.path}   "
              "# web chat and an OpenAI-compatible API on http://127.0.0.1:8000", "```", ""]
    return "\n".join(lines)


def write_card(run_dir: str | Path, force: bool = False, record: Optional[RunRecord] = None) -> Path:
    """Write RUN_DIR/card.md and RUN_DIR/plots/*.png; returns the card's path."""
    from llm_maker.registry.plots import write_plots
    from llm_maker.registry.registry import model_config

    run_dir = Path(run_dir)
    record = record or scan_run(run_dir)
    out = run_dir / CARD_FILE
    check_overwrite(out, force)
    stages = {}
    for stage in ("pretrain", "sft"):
        manifest, metrics = read_manifest(run_dir / stage), read_metrics(run_dir / stage)
        if manifest or metrics:
            stages[stage] = {"manifest": manifest, "metrics": metrics, "dims": model_config(run_dir / stage)}
    train, sft_train = record.recipe.get("train") or {}, (record.recipe.get("sft") or {}).get("train") or {}
    clip = as_float(train.get("grad_clip"))
    eval_every = {"pretrain": train.get("eval_every", 50), "sft": sft_train.get("eval_every", 50)}
    made = write_plots(run_dir, run_dir / PLOTS_DIR, grad_clip=clip if clip is not None else 1.0,
                       eval_every={k: int(v) for k, v in eval_every.items()})
    plots = {name: os.path.relpath(path, run_dir) for name, path in made.items()}
    text = card_markdown(record, read_json(run_dir / "eval" / "report.json"),
                         read_json(run_dir / "eval" / "lm_eval" / "results.json"), plots, stages)
    atomic_write_text(out, text)
    return out

