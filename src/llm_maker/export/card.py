"""Model cards: the sections both cards share, and the README.md that goes with an export.

Two cards describe a model: the README.md of a Hugging Face export (here) and a run's card.md
(registry/card.py, which adds the run's status, cost and training curves). Both are built from
the same sections, each a pure function of what the run recorded:

    architecture_section(dims, parameters)   the shape, and why, where the dims decide it
    training_section(...)                    data, per-stage results, the model each stage kept, settings
    later_stages_section(figures)            distillation's teacher, KL and CE; DPO's pairs, beta and
                                             held-out preference accuracy (`stage_figures`)
    evaluation_section(report, lm_eval)      eval/report.json and eval/lm_eval/results.json
    samples_section(report)                  greedy answers from the eval report
    limitations(...)                         limits that follow from the run's numbers, then the general ones

`card_facts(model_dir, model, meta)` gathers what the export's card shows; `render_card(facts)`
is a pure function of those facts, so tests can render a card without a run.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from llm_maker.artifacts import as_float, read_json, read_manifest, read_metrics
from llm_maker.layout import BEST, FINAL, KEPT_MODELS, TRAIN_STAGES, RunPaths, run_dir_of
from llm_maker.markdown import MISSING, cell, number, percent, table
from llm_maker.model.llama import LlamaModel
from llm_maker.recipe import DistillConfig, DPOConfig, SFTConfig, TrainConfig
from llm_maker.train.checkpoint import ModelMeta
from llm_maker.train.divergence import rollback_text

DEFAULT_TRAIN = {"pretrain": dataclasses.asdict(TrainConfig()), "distill": dataclasses.asdict(DistillConfig().train),
                 "sft": dataclasses.asdict(SFTConfig().train), "dpo": dataclasses.asdict(DPOConfig().train)}
# Each training stage's settings table, and where the recipe keeps them
SETTINGS_TITLE = {"pretrain": "Pretraining", "distill": "Distillation (KL to the teacher + cross-entropy)",
                  "sft": "SFT (completion-only loss)", "dpo": "DPO (preference pairs against a frozen reference)"}
CHAT_STAGES = ("sft", "dpo")  # their models answer in a chat template (ModelMeta.is_chat_model)
MODEL_TITLES = {"base": "base", "sft": "SFT", "dpo": "DPO"}  # eval/report.json's models
CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022: compute-optimal pretraining
INTENDED_USE = (
    "A small research model trained from scratch. Intended uses: learning how language models are "
    "built, experiments, baselines, and as a starting point for further training; not decisions "
    "about people. Its context window is the trained one (`max_position_embeddings`); longer inputs "
    "are out of distribution."
)


# --------------------------------------------------------------------------------------
# The shared sections
# --------------------------------------------------------------------------------------

def architecture_section(dims: dict[str, Any], parameters: Optional[int]) -> list[str]:
    d, h, kv = dims["d_model"], dims["n_heads"], dims["n_kv_heads"]
    tied = dims.get("tie_embeddings")
    rows = [["architecture", "Llama-style decoder: pre-norm RMSNorm, RoPE, SwiGLU MLP, causal SDPA attention",
             "loads as transformers' LlamaForCausalLM; model/llama.py says why each part"],
            ["parameters", number(parameters), "computed from the dims and asserted against the built model"],
            ["layers", dims["n_layers"], ""], ["d_model", d, ""],
            ["attention heads (query / key-value)", f"{h} / {kv} (head dim {d // h})",
             "grouped-query attention: a smaller KV cache" if kv < h else "multi-head attention"],
            ["MLP hidden", f"{dims['d_mlp']} ({dims['d_mlp'] / d:.2g}× d_model)", "SwiGLU"],
            ["vocabulary", number(dims["vocab_size"]), ""],
            ["context", f"{dims['seq_len']} tokens", f"RoPE θ = {dims.get('rope_theta', 10000.0):g}"],
            ["embeddings", "tied" if tied else "untied",
             "the head reuses the input embedding: saves V·d parameters" if tied else ""],
            ["RMSNorm eps", f"{dims.get('norm_eps', 1e-5):g}", ""]]
    return ["## Architecture", "", *table(["component", "value", "why"], rows)]


def recipe_rows(train: dict[str, Any], seq_len: Optional[int]) -> list[list[Any]]:
    """A training stage's settings (recipe.train or recipe.sft.train, defaults filled in)."""
    mb, accum = train.get("micro_batch_size", MISSING), train.get("grad_accum_steps", 1)
    per_step = mb * accum * seq_len if isinstance(mb, int) and seq_len else None
    lr = as_float(train.get("lr"))
    return [["steps", train.get("max_steps", MISSING)],
            ["batch", f"{mb} × {accum} accumulation"
                      + (f" × {seq_len} tokens = {per_step:,} tokens/step" if per_step else "")],
            ["optimizer", f"{train.get('optimizer', 'adamw')} (β {train.get('beta1', 0.9)}/{train.get('beta2', 0.95)}, "
                          f"weight decay {train.get('weight_decay', 0.1)})"],
            ["learning rate", f"{lr:g} peak, {train.get('warmup_steps', MISSING)} warmup steps, cosine to "
                              f"{train.get('min_lr_ratio', 0.1):g}× peak" if lr else MISSING],
            ["gradient clipping", train.get("grad_clip", 1.0)], ["precision", train.get("precision", "auto")],
            ["seed", train.get("seed", MISSING)]]


def kept_text(summary: dict[str, Any], kept: str = FINAL) -> Optional[str]:
    """Which model of a training stage later stages take, and why, from its manifest summary:
    "best: step 100, val loss 3.227 (final: step 300, 3.586)", or for final/ "final: step 300, val
    loss 3.586 (best: step 100, 3.227)". None when no best evaluation was recorded, or final/ was
    also the best."""
    best = summary.get("best") or {}
    step, value = best.get("step"), as_float(best.get("value"))
    if step is None or value is None or (kept != BEST and step == summary.get("steps")):
        return None
    metric = str(best.get("metric") or "val_loss").replace("_", " ")
    early = ", early-stopped" if summary.get("early_stopped") else ""
    last = number(as_float(best.get("last_value")))
    if kept == BEST and step == summary.get("steps"):
        return f"best: step {step}, {metric} {number(value)} (the last step)"
    if kept == BEST:
        return f"best: step {step}, {metric} {number(value)} (final: step {summary.get('steps')}, {last}{early})"
    return f"final: step {summary.get('steps')}, {metric} {last}{early} (best: step {step}, {number(value)})"


def stage_train_config(recipe: dict[str, Any], stage: str) -> dict[str, Any]:
    """A training stage's train config in a plain recipe dict: `train` for pretraining, else `<stage>.train`."""
    return (recipe.get("train") if stage == "pretrain" else (recipe.get(stage) or {}).get("train")) or {}


def last_value(rows: Sequence[dict[str, str]], column: str, step: Optional[int] = None) -> Optional[float]:
    """A metrics.csv column's last number, or with `step` its last at or before that step."""
    for r in reversed(rows):
        value = as_float(r.get(column))
        if value is not None and (step is None or int(r["step"]) <= step):
            return value
    return None


def teacher_label(teacher_dir: Optional[str]) -> str:
    """A teacher as a card names it: RUN/STAGE/MODEL for a run's model, else its folder's name."""
    if not teacher_dir:
        return MISSING
    path = Path(teacher_dir)
    run = run_dir_of(path)
    return path.relative_to(run.parent).as_posix() if run is not None else path.name


def preference_pairs(data: Any, split: str) -> Optional[int]:
    """How many preference pairs the DPO manifest's `data` counts for `split` (train or heldout)."""
    data = data or {}
    entry = data.get(split) if isinstance(data, dict) else None
    if isinstance(entry, dict):
        entry = next((entry[k] for k in ("kept", "pairs", "n_pairs", "count") if k in entry), None)
    if entry is None and isinstance(data, dict):
        entry = data.get(f"{split}_pairs")
    return entry if isinstance(entry, int) else None


def stage_figures(stage: str, manifest: Optional[dict[str, Any]], metrics: Sequence[dict[str, str]],
                  kept: str = FINAL) -> dict[str, Any]:
    """The headline numbers of a distill or dpo stage, at the model it kept (best/: the step of its
    best evaluation; final/: the last logged values), for the cards, the registry and the summary.

        distill  teacher (the manifest's record: dir, hash, mode, k, temperature (or T), alpha), kl, ce, val_loss
        dpo      beta, pairs, heldout_pairs, val_pref_acc, val_reward_margin, pref_acc, reward_margin, val_loss
    """
    manifest = manifest or {}
    summary = manifest.get("summary") or {}
    best = summary.get("best") or {}
    step = best.get("step") if kept == BEST else None
    at = lambda column: last_value(metrics, column, step)  # noqa: E731
    kept_best = lambda metric: as_float(best.get("value")) if step is not None and best.get("metric") == metric \
        else None  # noqa: E731
    val_loss = kept_best("val_loss") or (at("val_loss") if step is not None else None) or \
        as_float(summary.get("val_loss")) or at("val_loss")
    if stage == "distill":
        teacher = dict(manifest.get("teacher") or {})
        teacher.setdefault("temperature", teacher.get("T"))  # the distill stage records it as T
        return {"stage": stage, "teacher": teacher, "kl": at("kl"), "ce": at("ce"),
                "val_loss": val_loss, "steps": step or summary.get("steps")}
    if stage == "dpo":
        return {"stage": stage, "beta": manifest.get("beta"), "pairs": preference_pairs(manifest.get("data"), "train"),
                "heldout_pairs": preference_pairs(manifest.get("data"), "heldout"),
                "val_pref_acc": kept_best("val_pref_acc") or at("val_pref_acc"),
                "val_reward_margin": at("val_reward_margin"), "pref_acc": at("pref_acc"),
                "reward_margin": at("reward_margin"), "val_loss": val_loss, "steps": step or summary.get("steps")}
    raise ValueError(f"stage {stage!r} has no figures of its own (distill and dpo have)")


def later_stages_section(figures: dict[str, dict[str, Any]]) -> list[str]:
    """## Distillation and ## Preference tuning (DPO), from `stage_figures` of the stages that ran."""
    lines = []
    d = figures.get("distill")
    if d:
        t = d.get("teacher") or {}
        rows = [["teacher", f"`{teacher_label(t.get('dir'))}`" + (f" (weights {str(t['hash'])[:12]})"
                                                                  if t.get("hash") else "")],
                ["teacher's distribution", f"{t.get('mode', MISSING)}" + (f", top {t['k']} log-probs per token"
                                                                          if t.get("mode") == "cached" and t.get("k")
                                                                          else "")],
                ["loss", f"α·T²·KL(teacher ‖ student) + (1 − α)·CE, α {t.get('alpha', MISSING)}, "
                         f"T {t.get('temperature', MISSING)}"],
                ["final KL to the teacher", number(d.get("kl"))], ["final cross-entropy", number(d.get("ce"))],
                ["validation loss", number(d.get("val_loss"))]]
        lines += ["## Distillation", "", "The model learned from the packed text and from the teacher's next-token "
                  "distribution (KL and CE in nats/token, at the model kept).", "", *table(["", "value"], rows)]
    p = figures.get("dpo")
    if p:
        pairs = number(p.get("pairs")) + (f" (+ {number(p['heldout_pairs'])} held out)"
                                          if p.get("heldout_pairs") is not None else "")
        rows = [["preference pairs", pairs], ["β", p.get("beta", MISSING)],
                ["held-out preference accuracy", percent(p.get("val_pref_acc"), 1)],
                ["held-out reward margin", number(p.get("val_reward_margin"))],
                ["train preference accuracy", percent(p.get("pref_acc"), 1)],
                ["train reward margin", number(p.get("reward_margin"))]]
        lines += ["## Preference tuning (DPO)", "", "Direct Preference Optimization of the SFT model: the chosen "
                  "answer's log-probability ratio to the frozen reference must beat the rejected one's. Preference "
                  "accuracy: the share of pairs where it does; reward margin: β times the gap, in nats.", "",
                  *table(["", "value"], rows)]
    return lines


def training_section(recipe: Optional[dict[str, Any]], results: Sequence[dict[str, Any]], stages: Sequence[str],
                     seq_lens: dict[str, Optional[int]], imported_from: Optional[str] = None) -> list[str]:
    """`results`: each finished stage's manifest summary plus its "stage" and the model it "kept"
    (best or final); `stages`: the stages whose settings to show; `seq_lens`: tokens per sequence
    of each stage's batches."""
    lines = ["## Training recipe", ""]
    if imported_from:
        lines += [f"Imported from the Hugging Face checkpoint `{imported_from}`.", ""]
    recipe = recipe or {}
    if recipe:
        data, tok = recipe.get("data") or {}, recipe.get("tokenizer") or {}
        sources = ", ".join(s.get("type", "?") + (f" `{s['path']}`" if s.get("path") else "")
                            for s in data.get("sources") or [])
        lines += [f"Data: {sources or MISSING} (selection key `{data.get('selection_key', MISSING)}`, "
                  f"{data.get('val_fraction', MISSING)} held out). Tokenizer: {tok.get('type', 'bpe')}, "
                  f"vocabulary {tok.get('vocab_size', MISSING)}.", ""]
    if results:
        lines += table(["stage", "steps", "tokens seen", "final train loss", "val loss", "precision", "device"],
                       [[t["stage"], number(t.get("steps")), number(t.get("tokens_seen")), number(t.get("final_loss")),
                         number(t.get("val_loss")), t.get("precision", MISSING), t.get("device", MISSING)]
                        for t in results])
    kept = [f"- {t['stage']}: {text}." for t in results if (text := kept_text(t, t.get("kept", FINAL)))]
    if kept:  # train.keep_best / sft.use: the model at the best evaluation, or the last one
        lines += ["Model kept (the evaluation with the best validation metric, or the last step):", "", *kept, ""]
    rollbacks = [f"- {t['stage']} {rollback_text(e)}." for t in results for e in t.get("rollbacks") or []]
    if rollbacks:  # train/divergence.py: a divergence reloaded the last checkpoint and skipped its batches
        lines += ["Divergence:", "", *rollbacks, ""]
    for stage in stages:
        if recipe:
            train = {**DEFAULT_TRAIN[stage], **stage_train_config(recipe, stage)}  # a recipe.yaml may omit defaults
            lines += [f"**{SETTINGS_TITLE[stage]}**", "",
                      *table(["setting", "value"], recipe_rows(train, seq_lens.get(stage)))]
    if not results and not (recipe and stages):
        lines += ["No training record found beside this model.", ""]
    return lines


def evaluation_section(report: Optional[dict[str, Any]], lm_eval: Optional[dict[str, Any]]) -> list[str]:
    lines = ["## Evaluation", ""]
    if not report and not lm_eval:
        return lines + ["Not evaluated yet: run `llm-maker eval RECIPE` (and `llm-maker lm-eval RUN_DIR "
                        "--suite ...` for benchmarks).", ""]
    report = report or {}
    v = report.get("validation") or {}
    rows = [[name, number(v[name]["loss"]), number(v[name]["perplexity"], 1)]
            for name in ("base", "sft", "dpo") if v.get(name)]
    if v.get("unigram_loss") is not None:
        rows.append(["unigram baseline", number(v["unigram_loss"]), number(v["unigram_perplexity"], 1)])
    if rows:
        lines += [f"Validation loss on {v.get('tokens_scored', 0):,} held-out pretraining tokens (nats/token):", "",
                  *table(["model", "val loss", "perplexity"], rows)]
    stops = (report.get("stop_table") or {}).get("stop_fraction") or {}
    em = report.get("exact_match") or {}
    accuracy = em.get("accuracy") or {}
    score_rows = [[name, percent(stops.get(name)),
                   f"{percent(accuracy[name], 1)} of {em.get('n_items')}"
                   if accuracy.get(name) is not None else MISSING]
                  for name in ("base", "sft", "dpo") if name in stops or name in accuracy]
    if score_rows:
        lines += ["Chat behaviour (greedy): does it stop on the template's end token, and is the answer exactly "
                  "the held-out reference?", "", *table(["model", "stops", "exact match"], score_rows)]
    if lm_eval and lm_eval.get("table"):
        lines += [f"lm-evaluation-harness ({lm_eval.get('lm_eval_version', '?')}), zero-shot:", "",
                  lm_eval["table"].strip(), ""]
    return lines


def samples_section(report: Optional[dict[str, Any]]) -> list[str]:
    lines = ["## Samples", ""]
    completions = (report or {}).get("base_completions") or []
    if completions:
        lines += ["Base model, greedy continuation:", "",
                  *table(["prompt", "continuation"], [[cell(c["prompt"], 50), cell(c.get("greedy", ""), 110)]
                                                      for c in completions])]
    rows = ((report or {}).get("stop_table") or {}).get("rows") or []
    if rows and rows[0].get("sft"):
        tag = lambda a: f"eos@{a['n_tokens']}" if a["stopped"] else "no stop"  # noqa: E731
        names = ["base", "sft"] + (["dpo"] if rows[0].get("dpo") else [])
        lines += [f"Base vs {' vs '.join(MODEL_TITLES[n] for n in names[1:])}, the same chat prompts (greedy):", "",
                  *table(["prompt", *(MODEL_TITLES[n] for n in names)],
                         [[cell(r["prompt"], 50), *(f"{tag(r[n])} {cell(r[n]['text'], 60)}" for n in names)]
                          for r in rows])]
    if len(lines) == 2:
        lines += ["No samples yet (they come with `llm-maker eval RECIPE`).", ""]
    return lines


def limitations(parameters: Optional[int], tokens: Optional[int], report: Optional[dict[str, Any]],
                seq_len: int) -> list[str]:
    """Bullets: limits that follow from this model's own numbers, then the general ones."""
    out = []
    if parameters and tokens and tokens / parameters < CHINCHILLA_TOKENS_PER_PARAM:
        out.append(f"Undertrained: {tokens / parameters:.1f} tokens per parameter, against the "
                   f"~{CHINCHILLA_TOKENS_PER_PARAM} a compute-optimal run would use.")
    out.append(f"Context of {seq_len} tokens: longer conversations lose their oldest turns "
               "(`llm-maker serve --rope-scaling 2` stretches it, with some loss of quality).")
    v = (report or {}).get("validation") or {}
    if v.get("sft") and v.get("base") and v["sft"]["loss"] > v["base"]["loss"]:
        out.append(f"SFT raised the loss on plain text ({v['base']['loss']:.2f} → {v['sft']['loss']:.2f}): the chat "
                   "model is worse at continuing documents than the base model.")
    em = ((report or {}).get("exact_match") or {}).get("accuracy") or {}
    if em.get("sft") is not None and em["sft"] < 0.5:
        out.append(f"Answers are mostly wrong ({em['sft']:.0%} exact match on held-out items): it learned the "
                   "format of an answer and when to stop more than the facts.")
    out.append("Not instruction-safe and not fact-checked: it produces fluent-looking text that is often wrong, "
               "repeats itself and reflects its training corpus. For learning and experiments, not for decisions.")
    return [f"- {line}" for line in out] + [""]


# --------------------------------------------------------------------------------------
# The export's README.md
# --------------------------------------------------------------------------------------

def stages_behind(meta: ModelMeta) -> tuple[str, ...]:
    """The training stages that may have made this model, in order, its own last (a stage that
    did not run has no manifest and is passed over): a DPO model's are pretrain, distill, sft, dpo."""
    own = meta.stage if meta.stage in TRAIN_STAGES else ("sft" if meta.is_chat_model else "pretrain")
    return TRAIN_STAGES[: TRAIN_STAGES.index(own) + 1]


def card_facts(model_dir: Path, model: LlamaModel, meta: ModelMeta) -> dict[str, Any]:
    """Everything the card shows, read from the model dir and (when there is one) its run."""
    run = run_dir_of(Path(model_dir).resolve())
    facts: dict[str, Any] = {"name": meta.recipe or Path(model_dir).name, "stage": meta.stage,
                             "config": model.config.to_dict(), "parameters": model.num_parameters(),
                             "chat_template": meta.chat_template, "training": [],
                             "recipe": None, "report": None, "lm_eval": None, "imported_from": meta.imported_from}
    if run is None:
        return facts
    recipe_file = run / "recipe.yaml"
    facts["recipe"] = yaml.safe_load(recipe_file.read_text(encoding="utf-8")) if recipe_file.is_file() else None
    own = Path(model_dir).resolve()
    facts["figures"] = {}
    for stage in stages_behind(meta):
        m = read_manifest(run / stage)
        if m and m.get("summary"):
            # this model's own directory (an export may name final/ or best/), else what the run's stages take
            kept = own.name if own.parent.name == stage and own.name in KEPT_MODELS else \
                RunPaths.of(run).model(stage).name
            facts["training"].append({"stage": stage, **m["summary"], "batch_seq_len": m.get("batch_seq_len"),
                                      "kept": kept})
            if stage in ("distill", "dpo"):
                facts["figures"][stage] = stage_figures(stage, m, read_metrics(run / stage), kept)
    facts["report"] = read_json(run / "eval" / "report.json")
    facts["lm_eval"] = read_json(run / "eval" / "lm_eval" / "results.json")
    return facts


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


def teacher_of(f: dict[str, Any]) -> str:
    """The teacher a distilled model learned from: the distill manifest's record, else the recipe's."""
    recorded = ((f.get("figures") or {}).get("distill") or {}).get("teacher") or {}
    return teacher_label(recorded.get("dir") or ((f.get("recipe") or {}).get("distill") or {}).get("teacher"))


def model_kind(f: dict[str, Any]) -> str:
    """What the model is, by the stage that made it: "instruction-tuned (SFT)", "preference-tuned
    (DPO)", "distilled from `RUN/pretrain/final`", "pretrained"."""
    stage = f.get("stage")
    if stage == "dpo":
        return "instruction-tuned (SFT), then preference-tuned (DPO)"
    if stage == "sft" or (stage is None and f.get("chat_template")):
        return "instruction-tuned (SFT)"
    if stage == "distill":
        return f"distilled from `{teacher_of(f)}`"
    return "pretrained"


def render_card(f: dict[str, Any]) -> str:
    """README.md for the export: Hugging Face front matter, then the sections."""
    stage = f.get("stage")
    front = {"library_name": "transformers", "pipeline_tag": "text-generation", "language": ["en"],
             "tags": ["llm-maker", "llama", "from-scratch"] + (["distillation"] if stage == "distill" else [])
             + (["dpo"] if stage == "dpo" else []) + (["chat"] if f.get("chat_template") else [])}
    kind = model_kind(f)
    kind = kind if f.get("chat_template") or stage in CHAT_STAGES else f"base ({kind})"
    config, training = f["config"], f.get("training") or []
    seq_lens = {t["stage"]: t.get("batch_seq_len") or config["seq_len"] for t in training}
    # what the base model read: pretraining's tokens, and distillation's
    base_tokens = sum(t.get("tokens_seen") or 0 for t in training if t["stage"] in ("pretrain", "distill")) or None
    figures = f.get("figures") or {}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {f['name']}", "",
             f"A {number(f['parameters'])}-parameter Llama-style decoder, {kind}, built with llm-maker. "
             "It loads as `LlamaForCausalLM` without `trust_remote_code`."
             + (f" Its base model was distilled from `{teacher_of(f)}`." if "distill" in figures and stage != "distill"
                else ""), ""]
    lines += _usage(f)
    lines += architecture_section(config, f["parameters"])
    lines += training_section(f.get("recipe"), training, [t["stage"] for t in training], seq_lens,
                              f.get("imported_from"))
    lines += later_stages_section(figures)
    lines += evaluation_section(f.get("report"), f.get("lm_eval"))
    lines += samples_section(f.get("report"))
    lines += ["## Intended use and limits", "", INTENDED_USE, "",
              *limitations(f["parameters"], base_tokens, f.get("report"), config["seq_len"])]
    return "\n".join(lines)


def model_card(model_dir: Path, model: LlamaModel, meta: ModelMeta) -> str:
    return render_card(card_facts(Path(model_dir), model, meta))

