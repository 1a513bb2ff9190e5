"""`llm-maker push RUN_DIR --repo OWNER/NAME`: export a model and upload it to the Hugging Face Hub
in one commit.

    OWNER/NAME (a model repository)
      config.json, generation_config.json, model.safetensors,   export_hf's directory (export/hf.py)
      tokenizer.json, tokenizer_config.json
      README.md          the export's card (export/card.py) under a YAML header the Hub reads:
                         license, language, datasets, base_model, pipeline_tag, library_name, tags,
                         and a model-index of the run's evaluation results
      plots/*.png        the training curves `llm-maker card` draws (registry/plots.py)
      NAME-f16.gguf      with --gguf: the llama.cpp file (export/gguf_export.py)

The header is built with huggingface_hub's own ModelCardData and EvalResult, so it is what the
Hub validates. Credentials are huggingface_hub's business (HF_TOKEN or `hf auth login`): this
module never reads or prints a token. `send` is the one function that talks to the Hub.

An existing repository gets a new commit that adds or replaces our files; files in it that we no
longer produce are kept (a push never deletes silently) and named after the commit. `--private`
applies when the repository is created; an existing repository keeps its visibility.
"""
from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from llm_maker.errors import LLMMakerError
from llm_maker.layout import TRAIN_STAGES, WEIGHTS, RunPaths, run_dir_of

DEFAULT_LICENSE = "apache-2.0"  # our code's licence; the weights' licence is the publisher's call (--license)
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
HF_CACHE_DIR = re.compile(r"models--([^/]+?)--([^/]+)")  # huggingface_hub's cache folder of OWNER/NAME
# lm-eval task -> (Hub dataset, config) for the model-index, so each result links to its dataset
LM_EVAL_DATASETS = {
    "hellaswag": ("Rowan/hellaswag", None), "arc_easy": ("allenai/ai2_arc", "ARC-Easy"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge"), "piqa": ("ybisk/piqa", None),
    "winogrande": ("allenai/winogrande", "winogrande_xl"), "lambada_openai": ("EleutherAI/lambada_openai", None),
    "sciq": ("allenai/sciq", None), "wikitext": ("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1"),
}


def require_hub():
    try:
        import huggingface_hub
    except ImportError:
        raise LLMMakerError("pushing to the Hub needs huggingface_hub: pip install 'llm-maker[hf]'") from None
    return huggingface_hub


def check_repo_id(repo: str) -> str:
    """OWNER/NAME, or a clear error (a model repository always has an owner: a user or an org)."""
    if not REPO_ID.match(repo or "") or ".." in repo or repo.endswith((".git", ".")) or len(repo) > 96:
        raise LLMMakerError(f"--repo must be OWNER/NAME (e.g. alice/tiny-llama), got {repo!r}")
    return repo


# --------------------------------------------------------------------------------------
# The card's header: pure functions of what the run recorded
# --------------------------------------------------------------------------------------

def hub_datasets(recipe: Optional[dict[str, Any]], stage: Optional[str]) -> list[str]:
    """Hub dataset ids the model was trained on: fineweb-edu sources, for an SFT (or DPO) model its
    `hf:owner/name` instruction sets, and for a DPO model its preference set. Local files and the
    builtin corpus have no Hub id."""
    recipe = recipe or {}
    out = [s.get("repo_id") or "HuggingFaceFW/fineweb-edu"
           for s in (recipe.get("data") or {}).get("sources") or [] if s.get("type") == "fineweb-edu"]
    sources = []
    if stage in ("sft", "dpo"):
        sft_data = (recipe.get("sft") or {}).get("data") or {}
        sources += [m.get("source", "") for m in sft_data.get("mixture") or []] or [sft_data.get("source", "")]
    if stage == "dpo":
        sources.append(((recipe.get("dpo") or {}).get("data") or {}).get("source", ""))
    out += [s[3:].split(":")[0] for s in sources if str(s).startswith("hf:")]
    return list(dict.fromkeys(out))


def hub_id_of_path(path: Optional[str]) -> Optional[str]:
    """OWNER/NAME for a folder in huggingface_hub's cache (.../models--OWNER--NAME/snapshots/...)."""
    m = HF_CACHE_DIR.search(path or "")
    return f"{m.group(1)}/{m.group(2)}" if m else None


def eval_results(report: Optional[dict[str, Any]], lm_eval: Optional[dict[str, Any]], which: str, label: str,
                 dataset: str) -> list:
    """EvalResults for the model-index: validation loss and perplexity of `which` (base, sft or dpo) from
    eval/report.json, and lm-eval's headline numbers for the model labelled `label`."""
    from huggingface_hub import EvalResult

    out = []
    v = ((report or {}).get("validation") or {}).get(which)
    if v:
        held_out = f"held-out pretraining text ({(report['validation'].get('tokens_scored') or 0):,} tokens)"
        for metric, value in (("loss", v.get("loss")), ("perplexity", v.get("perplexity"))):
            if value is not None:
                out.append(EvalResult(task_type="text-generation", task_name="Language modelling",
                                      dataset_type=dataset, dataset_name=held_out, dataset_split="validation",
                                      metric_type=metric, metric_name=f"validation {metric}",
                                      metric_value=round(float(value), 4)))
    headline = ((lm_eval or {}).get("headline") or {}).get(label) or {}
    for task, h in headline.items():
        hub, config = LM_EVAL_DATASETS.get(task, (task, None))
        out.append(EvalResult(task_type="text-generation", task_name=task, dataset_type=hub, dataset_name=task,
                              dataset_config=config, metric_type=h["metric"], metric_value=round(float(h["value"]), 4),
                              metric_name=f"{h['metric']} (lm-evaluation-harness, zero-shot)"))
    return out


def card_data(facts: dict[str, Any], repo_id: str, license: str, base_model: Optional[str], gguf: bool,
              label: str):
    """huggingface_hub.ModelCardData of the card's YAML header."""
    from huggingface_hub import ModelCardData

    stage = facts.get("stage")
    datasets = hub_datasets(facts.get("recipe"), stage)
    imported = bool(facts.get("imported_from"))
    tags = ["llm-maker", "llama", "text-generation"] + ([] if imported else ["from-scratch"]) \
        + (["distillation"] if stage == "distill" else []) \
        + (["sft", "chat"] if facts.get("chat_template") else []) + (["dpo"] if stage == "dpo" else []) \
        + (["gguf"] if gguf else [])
    which = stage if stage in ("sft", "dpo") else "base"  # eval/report.json's names
    results = eval_results(facts.get("report"), facts.get("lm_eval"), which, label,
                           datasets[0] if datasets else "held-out")
    return ModelCardData(
        license=license, language=["en"], library_name="transformers", pipeline_tag="text-generation",
        tags=tags, datasets=datasets or None, base_model=base_model,
        model_name=repo_id.split("/")[1], eval_results=results or None,
    )


def hub_card(body: str, data, plots: list[str], gguf_file: Optional[str]) -> str:
    """README.md: the header from `data`, the export card's body (its own front matter replaced),
    then the training curves and, with a GGUF, how to run it."""
    if body.startswith("---\n"):
        body = body.split("\n---\n", 1)[1].lstrip("\n")
    extra = []
    if plots:
        extra += ["## Training curves", "", *[f"![{Path(p).stem}]({p})" for p in plots], ""]
    if gguf_file:
        extra += ["## GGUF", "", f"`{gguf_file}` (f16) runs in llama.cpp, Ollama and LM Studio:", "",
                  "```sh", f"llama-cli -m {gguf_file} -p \"The meaning of the word\"", "```", ""]
    return f"---\n{data.to_yaml()}\n---\n\n{body.rstrip()}\n\n" + "\n".join(extra)


# --------------------------------------------------------------------------------------
# Staging the files
# --------------------------------------------------------------------------------------

@dataclass
class Staged:
    repo_id: str
    files: dict[str, Path] = field(default_factory=dict)  # path in the repository -> local file
    card: str = ""
    header: str = ""  # the card's YAML header (without the --- lines)
    kind: str = ""  # what the model is: "a chat model (chatml template), ..." or "a base model, pretrained"

    def operations(self) -> list:
        """One CommitOperationAdd per file, in a stable order."""
        from huggingface_hub import CommitOperationAdd

        return [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
                for name, path in sorted(self.files.items())]


def base_model_of(model_dir: Path, meta, explicit: Optional[str]) -> Optional[str]:
    """The Hub's base_model: --base-model, else the Hub id an imported model came from (its own
    record, or for an SFT or DPO model, the one it was tuned from's, back to its run's base model)."""
    if explicit:
        return check_repo_id(explicit)
    found = hub_id_of_path(meta.imported_from)
    run = run_dir_of(Path(model_dir).resolve())
    if found is None and meta.stage in ("sft", "dpo"):
        from llm_maker.train.checkpoint import read_model_config

        paths = RunPaths.of(run) if run else None
        start = meta.base_model or (paths.model("sft" if meta.stage == "dpo" else paths.base_stage()) if paths
                                    else None)
        base, seen = Path(start) if start else None, 0
        while found is None and base is not None and (base / "config.json").is_file() and seen < len(TRAIN_STAGES):
            config = read_model_config(base)  # a DPO model's base_model is the SFT model: follow it down
            found, seen = hub_id_of_path(config.get("imported_from")), seen + 1
            base = Path(config["base_model"]) if config.get("base_model") else None
    return found


def plot_files(run: Optional[Path], out_dir: Path) -> list[Path]:
    """The run's training curves, drawn as `llm-maker card` draws them, into out_dir."""
    if run is None:
        return []
    from llm_maker.artifacts import as_float
    from llm_maker.registry.plots import eval_steps, write_plots
    from llm_maker.registry.registry import read_recipe

    recipe = read_recipe(RunPaths.of(run))
    clip = as_float((recipe.get("train") or {}).get("grad_clip"))
    made = write_plots(run, out_dir, grad_clip=clip if clip is not None else 1.0, eval_every=eval_steps(recipe))
    return list(made.values())  # loss, lr, grad_norm, token_accuracy, then the later stages': the card's order


def stage_push(model_dir: str | Path, repo_id: str, work: str | Path, license: str = DEFAULT_LICENSE,
               gguf: bool = False, base_model: Optional[str] = None) -> Staged:
    """Export `model_dir` under `work` and gather what the commit uploads."""
    from llm_maker.eval.lm_eval_suite import model_label
    from llm_maker.export.card import card_facts, model_kind, render_card
    from llm_maker.export.hf import export_hf
    from llm_maker.train.checkpoint import load_model_dir

    model_dir, work = Path(model_dir), Path(work)
    model, _, meta = load_model_dir(model_dir)
    facts = card_facts(model_dir, model, meta)
    del model
    data = card_data(facts, repo_id, license, base_model_of(model_dir, meta, base_model), gguf, model_label(model_dir))
    chat = f"a chat model ({facts['chat_template']} template)" if facts.get("chat_template") else "a base model"
    staged = Staged(repo_id, header=data.to_yaml(), kind=f"{chat}, {model_kind(facts)}")
    plots = plot_files(run_dir_of(model_dir.resolve()), work / "plots")
    gguf_name = f"{repo_id.split('/')[1]}-f16.gguf" if gguf else None
    staged.card = hub_card(render_card(facts), data, [f"plots/{p.name}" for p in plots], gguf_name)
    hf_dir = export_hf(model_dir, work / "hf", force=True, card=staged.card)
    staged.files = {p.name: p for p in sorted(hf_dir.iterdir()) if p.is_file()}
    staged.files.update({f"plots/{p.name}": p for p in plots})
    if gguf_name:
        from llm_maker.export.gguf_export import export_gguf

        staged.files[gguf_name] = export_gguf(model_dir, work / gguf_name, force=True, dtype="f16")
    return staged


# --------------------------------------------------------------------------------------
# Sending
# --------------------------------------------------------------------------------------

def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def dry_run_text(staged: Staged, message: str, private: bool) -> str:
    """What a push would send: every file with its size, and the card's YAML header."""
    rows = [(name, staged.files[name].stat().st_size) for name in sorted(staged.files)]
    width = max(len(name) for name, _ in rows)
    lines = [f"dry run: would commit {len(rows)} files to {staged.repo_id} "
             f"({'private' if private else 'public'} if created), message {message!r}:", ""]
    if staged.kind:
        lines[1:1] = [f"the model: {staged.kind}"]
    lines += [f"  {name:<{width}}  {human_size(size):>10}" for name, size in rows]
    lines += [f"  {'total':<{width}}  {human_size(sum(s for _, s in rows)):>10}", "", "README.md header:", "---",
              staged.header.rstrip(), "---"]
    return "\n".join(lines)


def send(api, repo_id: str, operations: list, message: str, private: bool) -> tuple[Any, list[str]]:
    """The one call that talks to the Hub: create the repository if missing, then one commit.
    Returns (the commit's info, files already in the repository that this commit does not touch)."""
    api.create_repo(repo_id, private=private, exist_ok=True)
    ours = {op.path_in_repo for op in operations}
    kept = sorted(f for f in api.list_repo_files(repo_id) if f not in ours and f != ".gitattributes")
    info = api.create_commit(repo_id, operations=operations, commit_message=message)
    return info, kept


def push(model_dir: str | Path, repo_id: str, license: str = DEFAULT_LICENSE, gguf: bool = False,
         private: bool = False, dry_run: bool = False, message: Optional[str] = None,
         base_model: Optional[str] = None, say: Callable[[str], None] = print) -> Optional[str]:
    """Export and upload `model_dir` to `repo_id` in one commit; returns the commit URL (None for
    a dry run, which makes no Hub call at all)."""
    repo_id, model_dir = check_repo_id(repo_id), Path(model_dir)
    if not (model_dir / WEIGHTS).is_file():
        raise LLMMakerError(f"{model_dir}: no model ({WEIGHTS} missing); train or choose another with --model")
    hub = require_hub()
    with tempfile.TemporaryDirectory(prefix="llm-maker-push-") as work:
        staged = stage_push(model_dir, repo_id, work, license=license, gguf=gguf, base_model=base_model)
        message = message or f"Upload {'/'.join(model_dir.resolve().parts[-3:])} with llm-maker"
        if dry_run:
            say(dry_run_text(staged, message, private))
            return None
        try:
            info, kept = send(hub.HfApi(), repo_id, staged.operations(), message, private)
        except (hub.errors.HfHubHTTPError, hub.errors.LocalTokenNotFoundError, OSError) as e:
            raise LLMMakerError(f"the push to {repo_id} failed: {str(e).splitlines()[0]} (a write token comes "
                                "from HF_TOKEN or `hf auth login`; nothing was committed)") from None
    url = getattr(info, "commit_url", None) or str(info)
    say(f"pushed {len(staged.files)} files to {repo_id}: {url}")
    if kept:
        say(f"kept in the repository, not part of this push (delete them on the Hub if stale): {', '.join(kept)}")
    return url
