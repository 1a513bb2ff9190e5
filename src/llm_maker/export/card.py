"""The model card (README.md) that goes with an export, as in the seeds: architecture, training,
evaluation, samples, intended use and limits.

`card_facts(model_dir, model, meta)` gathers what the run recorded (the stage manifests, the
resolved recipe, eval/report.json, eval/lm_eval/results.json); `render_card(facts)` is a pure
function of those facts, so tests can render a card without a run.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import yaml

from llm_maker.artifacts import read_manifest
from llm_maker.eval.report import cell, number
from llm_maker.model.llama import LlamaModel

LIMITS = (
    "This is a small research model trained from scratch. It is not instruction-safe, not "
    "fact-checked and not fit for decisions about people: it produces fluent-looking text that is "
    "often wrong, repeats itself, and reflects whatever its training corpus contains. Intended uses: "
    "learning how language models are built, experiments, baselines, and as a starting point for "
    "further training. Its context window is the trained one (`max_position_embeddings`); longer "
    "inputs are out of distribution."
)


def run_dir_of(model_dir: Path) -> Optional[Path]:
    """RUN_DIR for RUN_DIR/{pretrain,sft}/final (or a checkpoint under them), else None."""
    for parent in [model_dir, *model_dir.parents][:4]:
        if parent.name in ("pretrain", "sft"):
            return parent.parent
    return None


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def card_facts(model_dir: Path, model: LlamaModel, meta: dict[str, Any]) -> dict[str, Any]:
    """Everything the card shows, read from the model dir and (when there is one) its run."""
    run = run_dir_of(Path(model_dir).resolve())
    facts: dict[str, Any] = {"name": meta.get("recipe") or Path(model_dir).name, "stage": meta.get("stage"),
                             "config": model.config.to_dict(), "parameters": model.num_parameters(),
                             "chat_template": meta.get("chat_template"), "meta": meta, "training": [],
                             "recipe": None, "report": None, "lm_eval": None, "imported_from": meta.get("imported_from")}
    if run is None:
        return facts
    recipe_file = run / "recipe.yaml"
    facts["recipe"] = yaml.safe_load(recipe_file.read_text(encoding="utf-8")) if recipe_file.is_file() else None
    stages = ["pretrain", "sft"] if meta.get("stage") == "sft" else ["pretrain"]
    for stage in stages:
        m = read_manifest(run / stage)
        if m and m.get("summary"):
            facts["training"].append({"stage": stage, **m["summary"]})
    facts["report"] = _read_json(run / "eval" / "report.json")
    facts["lm_eval"] = _read_json(run / "eval" / "lm_eval" / "results.json")
    return facts


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------

def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows] + [""]


def _architecture(f: dict[str, Any]) -> list[str]:
    c = f["config"]
    rows = [["architecture", "LlamaForCausalLM (pre-norm RMSNorm, RoPE, SwiGLU, grouped-query attention)"],
            ["parameters", number(f["parameters"])], ["layers", c["n_layers"]], ["d_model", c["d_model"]],
            ["attention heads (query / key-value)", f"{c['n_heads']} / {c['n_kv_heads']}"],
            ["head dim", c["d_model"] // c["n_heads"]], ["MLP hidden (SwiGLU)", c["d_mlp"]],
            ["vocabulary", number(c["vocab_size"])], ["context length", c["seq_len"]],
            ["tied embeddings", "yes" if c["tie_embeddings"] else "no"], ["RoPE theta", c["rope_theta"]],
            ["RMSNorm eps", c["norm_eps"]]]
    return ["## Architecture", ""] + _table(["", ""], rows)


def _training(f: dict[str, Any]) -> list[str]:
    lines = ["## Training", ""]
    if f.get("imported_from"):
        lines += [f"Imported from the Hugging Face checkpoint `{f['imported_from']}`.", ""]
    if not f["training"]:
        return lines + ["No training record found beside this model.", ""]
    rows = [[t["stage"], number(t.get("steps")), number(t.get("tokens_seen")), number(t.get("final_loss")),
             number(t.get("val_loss")), t.get("precision", "—"), t.get("device", "—")] for t in f["training"]]
    lines += _table(["stage", "steps", "tokens seen", "final train loss", "val loss", "precision", "device"], rows)
    recipe = f.get("recipe") or {}
    hp = []
    for key, tc in (("pretrain", recipe.get("train")), ("sft", (recipe.get("sft") or {}).get("train"))):
        if tc and any(t["stage"] == key for t in f["training"]):
            hp.append([key, tc.get("lr"), tc.get("warmup_steps"), tc.get("micro_batch_size"),
                       tc.get("grad_accum_steps"), tc.get("weight_decay"), tc.get("grad_clip")])
    if hp:
        lines += ["AdamW (β 0.9/0.95), linear warmup then cosine decay to 10% of the peak.", ""]
        lines += _table(["stage", "peak lr", "warmup steps", "micro batch", "accumulation", "weight decay",
                         "grad clip"], hp)
    return lines


def _evaluation(f: dict[str, Any]) -> list[str]:
    lines = ["## Evaluation", ""]
    report, lm = f.get("report"), f.get("lm_eval")
    if not report and not lm:
        return lines + ["Not evaluated yet: run `llm-maker eval RECIPE` and `llm-maker eval RUN_DIR --suite ...`.", ""]
    if report:
        v = report["validation"]
        rows = [[name, number(v[name]["loss"]), number(v[name]["perplexity"], 2)]
                for name in ("base", "sft") if v.get(name)]
        rows.append(["unigram baseline", number(v["unigram_loss"]), number(v["unigram_perplexity"], 2)])
        lines += [f"Next-token loss on {v['tokens_scored']:,} held-out tokens (nats/token).", ""]
        lines += _table(["model", "val loss", "perplexity"], rows)
        stop, em = report["stop_table"]["stop_fraction"], report["exact_match"]
        rows = [[name, "—" if stop.get(name) is None else f"{100 * stop[name]:.0f}%",
                 "—" if em["accuracy"].get(name) is None else f"{100 * em['accuracy'][name]:.0f}%"]
                for name in ("base", "sft") if name in stop]
        lines += _table(["model", "answers that stop", f"exact match ({em['n_items']} held-out items)"], rows)
    if lm:
        lines += [f"lm-evaluation-harness ({lm.get('lm_eval_version', '?')}), zero-shot:", "",
                  lm.get("table", "").strip(), ""]
    return lines


def _samples(f: dict[str, Any]) -> list[str]:
    report = f.get("report")
    if not report:
        return []
    lines = ["## Samples", "", "Greedy, from the run's evaluation report.", ""]
    rows = [[cell(c["prompt"], 40), cell(c["greedy"], 160)] for c in report.get("base_completions", [])]
    if rows:
        lines += _table(["prompt (base model)", "continuation"], rows)
    if f.get("stage") == "sft":
        rows = [[cell(r["prompt"], 60), cell((r.get("sft") or {}).get("text"), 160)]
                for r in report["stop_table"]["rows"]]
        lines += _table(["user (SFT model)", "assistant"], rows)
    return lines


def _usage(f: dict[str, Any]) -> list[str]:
    code = ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            'tok = AutoTokenizer.from_pretrained("PATH")', 'model = AutoModelForCausalLM.from_pretrained("PATH")']
    if f.get("chat_template"):
        code += ['ids = tok.apply_chat_template([{"role": "user", "content": "What is a list?"}],',
                 '                              add_generation_prompt=True, return_tensors="pt")']
    else:
        code += ['ids = tok("The meaning of the word", return_tensors="pt").input_ids']
    code += ["out = model.generate(ids, max_new_tokens=64, do_sample=False)",
             "print(tok.decode(out[0][ids.shape[1]:], skip_special_tokens=True))", "```", ""]
    template = (f"Chat template `{f['chat_template']}` (in tokenizer_config.json); generation stops on "
                "its end token (generation_config.json)." if f.get("chat_template")
                else "A base model: it continues text; it has no chat template.")
    return ["## Use", "", template, ""] + code


def render_card(f: dict[str, Any]) -> str:
    """README.md for the export: Hugging Face front matter, then the sections."""
    front = {"library_name": "transformers", "pipeline_tag": "text-generation", "language": ["en"],
             "tags": ["llm-maker", "llama", "from-scratch"] + (["chat"] if f.get("chat_template") else [])}
    kind = "instruction-tuned (SFT)" if f.get("stage") == "sft" else "base (pretrained)"
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {f['name']}", "",
             f"A {number(f['parameters'])}-parameter Llama-style decoder, {kind}, built with llm-maker. "
             "It loads as `LlamaForCausalLM` without `trust_remote_code`.", ""]
    for section in (_usage, _architecture, _training, _evaluation, _samples):
        lines += section(f)
    lines += ["## Intended use and limits", "", LIMITS, ""]
    return "\n".join(lines)


def model_card(model_dir: Path, model: LlamaModel, meta: dict[str, Any]) -> str:
    return render_card(card_facts(Path(model_dir), model, meta))
