"""The `llm-maker` command: one verb per stage, each a thin wrapper over the stage function.

    llm-maker pipeline RECIPE        every stage in order (skips what is up to date, resumes)
    llm-maker data|tokenizer|pack RECIPE
    llm-maker pretrain|distill|sft|dpo RECIPE [--resume] [--force]   distill: against a teacher; dpo: preference pairs
    llm-maker plan RECIPE [--device h100] [--gpus N] [--tokens-per-s N | --mfu X]   memory, fit, time, cost
    torchrun --nproc_per_node=N -m llm_maker pretrain RECIPE   N processes: DDP, or FSDP2 (train.distributed)
    llm-maker eval RECIPE                                the recipe's eval stage (eval/report.md)
    llm-maker lm-eval RUN_DIR --suite TASKS [--baseline [NAME=]DIR]   lm-evaluation-harness (+ baselines)
    llm-maker export RUN_DIR --format hf|gguf --out PATH
    llm-maker push RUN_DIR --repo OWNER/NAME [--gguf] [--private] [--dry-run]   export + upload in one Hub commit
    llm-maker import-hf HF_DIR --out RUN_DIR
    llm-maker import-gguf FILE.gguf --out RUN_DIR         a llama.cpp `llama` GGUF (any quant) as a run
    llm-maker generate RUN_DIR --prompt TEXT
    llm-maker chat RUN_DIR [--model base|sft|dpo|distill|DIR]   (default: the newest: DPO, SFT, distilled, base)
    llm-maker summary RUN_DIR
    llm-maker serve RUN_DIR [--port 8000] [--rope-scaling 2]   web chat + OpenAI-compatible API on 127.0.0.1
    llm-maker registry RUNS_DIR                          REGISTRY.md of every model, each run's card.md + plots
    llm-maker card RUN_DIR                               one run's card.md and training curves
    llm-maker data-report RUN_DIR                        counts, drops and why, bytes/token, length histogram
    llm-maker audit RUN_DIR --eval-sets FILE ...         n-gram contamination of evaluation sets

The stage verbs, their help and `pipeline --only` come from layout.STAGES. Each verb imports what
it runs inside its function, so `llm-maker --help` does not import torch.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Optional

from llm_maker.artifacts import require_manifest
from llm_maker.errors import LLMMakerError
from llm_maker.layout import STAGE_NAMES, STAGES, RunPaths
from llm_maker.stopping import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_STOPPED, StageStopped, install_early_handlers
from llm_maker.summary import print_summary


def _recipe(args):
    from llm_maker.recipe import load_recipe, parse_override

    overrides = dict(parse_override(o) for o in (args.set or []))
    return load_recipe(args.recipe, overrides=overrides)


def _add_recipe(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="the YAML recipe")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set train.max_steps=50 (repeatable)")
    p.add_argument("--force", action="store_true", help="redo the stage even if it is up to date")


def cmd_pipeline(args) -> int:
    from llm_maker.pipeline import run_pipeline

    recipe = _recipe(args)
    results = run_pipeline(recipe, force=args.force, only=args.only)
    if not args.only:
        print_summary(RunPaths.of(recipe.run_dir), results)
    return 0


def cmd_stage(args) -> int:
    from llm_maker.pipeline import run_stage

    print(run_stage(args.command, _recipe(args), resume=getattr(args, "resume", False), force=args.force))
    return 0


def cmd_plan(args) -> int:
    import json

    from llm_maker.artifacts import atomic_write_json
    from llm_maker.plan import format_plan, make_plan, named_device, recipe_device_spec
    from llm_maker.recipe import load_recipe, parse_override

    overrides = dict(parse_override(o) for o in (args.set or []))
    recipe = load_recipe(args.recipe, overrides=overrides, check_files=False)  # plan runs before any input exists
    device = named_device(args.device) if args.device else recipe_device_spec(recipe)
    plan = make_plan(recipe, device, gpus=args.gpus, tokens_per_s=args.tokens_per_s, mfu_fraction=args.mfu,
                     price_per_hour=args.price_per_hour)
    if args.json == "-":
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(format_plan(plan))
        if args.json:
            atomic_write_json(args.json, plan.to_dict())
    return 1 if plan.fits is False else 0


def cmd_generate(args) -> int:
    from llm_maker.serve.generate import stream_text
    from llm_maker.serve.inference import load_for_inference

    model_dir = _model_dir(args.run_dir, args.model)
    model, tokenizer, meta = load_for_inference(model_dir, args.device, args.precision)
    if args.system is None:  # plain continuation of the text
        ids, stop_ids = tokenizer.encode(args.prompt), [tokenizer.eos_id]
        sys.stdout.write(args.prompt)
    else:  # one chat turn: the system message and the prompt as the user's, in the model's template
        from llm_maker.serve.engine import chat_template
        from llm_maker.sft.templates import prompt_ids, stop_token_ids

        template = chat_template(meta, None, tokenizer)  # an imported model's own Jinja, else its named one
        messages = [{"role": "system", "content": args.system}, {"role": "user", "content": args.prompt}]
        ids, stop_ids = prompt_ids(tokenizer, messages, template), stop_token_ids(tokenizer, template)
    for piece in stream_text(model, tokenizer, ids, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             repetition_penalty=args.repetition_penalty, stop_ids=stop_ids,
                             seed=args.seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args) -> int:
    from llm_maker.serve.chat import chat_repl

    chat_repl(_model_dir(args.run_dir, args.model), max_new_tokens=args.max_new_tokens,
              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              repetition_penalty=args.repetition_penalty, seed=args.seed, device=args.device,
              precision=args.precision, system=args.system)
    return 0


def cmd_lm_eval(args) -> int:
    from llm_maker.eval.lm_eval_suite import model_label, run_suite, suite_out_dir

    ours = _model_dir(args.run_dir, args.model)
    models = {model_label(ours): ours}
    for b in args.baseline or []:
        name, _, path = b.rpartition("=")
        models[name or model_label(Path(path))] = _model_dir(path, None)  # a run, llm-maker or HF model dir
    batch = args.batch_size if args.batch_size in (None, "auto") else int(args.batch_size)
    out = run_suite(models, args.suite, Path(args.out) if args.out else suite_out_dir(ours), device=args.device,
                    batch_size=batch, limit=args.limit, force=args.force, precision=args.precision)
    print((out / "table.md").read_text(encoding="utf-8"))
    print(out)
    return 0


def cmd_export(args) -> int:
    model_dir = _model_dir(args.run_dir, args.model)
    if args.format == "hf":
        from llm_maker.export.hf import export_hf
        out = export_hf(model_dir, args.out, force=args.force, dtype=args.dtype or "float32")
    else:
        from llm_maker.export.gguf_export import export_gguf
        out = export_gguf(model_dir, args.out, force=args.force, dtype=args.dtype or "f16", pre=args.gguf_pre)
    print(out)
    return 0


def cmd_import_hf(args) -> int:
    from llm_maker.export.import_hf import import_hf

    print(import_hf(args.hf_dir, args.out, force=args.force))
    return 0


def cmd_import_gguf(args) -> int:
    from llm_maker.export.import_gguf import import_gguf

    print(import_gguf(args.gguf_file, args.out, force=args.force))
    return 0


def cmd_push(args) -> int:
    from llm_maker.export.push import check_repo_id, push

    check_repo_id(args.repo)  # before anything is exported
    push(_model_dir(args.run_dir, args.model), args.repo, license=args.license, gguf=args.gguf,
         private=args.private, dry_run=args.dry_run, message=args.message, base_model=args.base_model)
    return 0


def cmd_summary(args) -> int:
    print_summary(RunPaths.of(args.run_dir), None)
    return 0


def cmd_data_report(args) -> int:
    from llm_maker.data.report import write_data_report

    paths = RunPaths.of(args.run_dir)
    out = Path(args.out) if args.out else paths.pack
    write_data_report(require_manifest(paths.data, "data"), require_manifest(paths.pack, "pack"), out)
    print((out / "data_report.md").read_text(encoding="utf-8"))
    print(out)
    return 0


def cmd_audit(args) -> int:
    from llm_maker.audit.contamination import audit_markdown, audit_run, write_audit

    report = audit_run(args.run_dir, args.eval_sets or [], n=args.ngram, sft_heldout=not args.no_sft_heldout,
                       include_sft_train=not args.no_sft_train, max_examples=args.examples)
    out = write_audit(report, Path(args.out) if args.out else Path(args.run_dir) / "audit")
    print(audit_markdown(report))
    print(out)
    worst = max((s["fraction_with_overlap"] for s in report["sets"]), default=0.0)
    return 1 if args.fail_above is not None and worst > args.fail_above else 0


def cmd_serve(args) -> int:
    from llm_maker.serve.server import ServeSettings, serve

    settings = ServeSettings(host=args.host, port=args.port, max_batch=args.max_batch, max_waiting=args.max_waiting,
                             max_tokens_limit=args.max_tokens_limit, max_context=args.max_context)
    serve(_model_dir(args.run_dir, args.model), settings, rope_scaling=args.rope_scaling, name=args.name,
          device=args.device, precision=args.precision)
    return 0


def cmd_registry(args) -> int:
    from llm_maker.registry.registry import write_registry

    print(write_registry(args.runs_dir, out=args.out, cards=not args.no_cards, force=args.force))
    return 0


def cmd_card(args) -> int:
    from llm_maker.registry.registry import write_card

    print(write_card(args.run_dir, force=args.force))
    return 0


TRAINING_COMMANDS = {"pipeline", *(stage.name for stage in STAGES if stage.trains)}


def resume_command(args) -> str:
    """The command line that goes on after a stop: the same verb, recipe and overrides, with --resume."""
    words = [args.command, args.recipe, *(w for o in (args.set or []) for w in ("--set", o))]
    if args.command != "pipeline":  # the pipeline resumes by itself
        words.append("--resume")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "torchrun <the same options> -m llm_maker " + shlex.join(words)
    return "llm-maker " + shlex.join(words)


MODEL_CHOICES = ("base", "sft", "dpo", "distill")  # --model's names; anything else is a model directory


def _model_dir(run_dir: str, which: Optional[str]) -> Path:
    """The model `--model` names: base (the distilled model when the run has a finished distill
    stage, else the pretrained one), sft, dpo, distill, a model directory, or (None) the run's newest
    model; of a training stage, the one later stages take (RunPaths.model: best/ or final/ as the
    recipe chose)."""
    paths = RunPaths.of(run_dir)
    if which == "base":
        return paths.model(paths.base_stage())
    if which in MODEL_CHOICES:
        return paths.model(which)
    if which:
        return Path(which)
    if (Path(run_dir) / "config.json").is_file():  # a model directory itself
        return Path(run_dir)
    return paths.final_model()


def _add_model(p: argparse.ArgumentParser) -> None:
    """RUN_DIR and --model, read by `_model_dir`."""
    p.add_argument("run_dir", help="a run directory (or a model directory)")
    p.add_argument("--model", help="base, sft, dpo, distill, or a model directory (default: the newest of DPO, SFT, "
                                   "distilled, base)")


def _add_runtime(p: argparse.ArgumentParser) -> None:
    """--device and --precision, read by `devices.resolve_device` and `devices.inference_dtype`."""
    p.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu) | cpu | cuda | cuda:N | mps")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="the weights' dtype; auto: bf16 on GPUs and AMX-BF16 CPUs that have it, fp16 on older "
                        "GPUs, fp32 elsewhere (the training rule)")


def _add_sampling(p: argparse.ArgumentParser, temperature: float) -> None:
    _add_model(p)
    _add_runtime(p)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=temperature)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system", help="a system message (generate: answer --prompt as a chat turn in the model's "
                                    "template after it)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-maker", description="Build small language models from scratch.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pipeline", help="run every stage of a recipe (skips up-to-date stages, resumes)")
    _add_recipe(p)
    p.add_argument("--only", nargs="+", choices=STAGE_NAMES)
    p.set_defaults(func=cmd_pipeline)

    for stage in STAGES:
        p = sub.add_parser(stage.name, help=stage.help)
        _add_recipe(p)
        if stage.trains:
            p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
        p.set_defaults(func=cmd_stage)

    p = sub.add_parser("plan", help="before any compute: parameters, tokens, memory per GPU and whether it fits, "
                                    "time and cost of pretraining (exit 1 if it does not fit)")
    p.add_argument("recipe", help="the YAML recipe")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe value (repeatable)")
    p.add_argument("--device", help="t4, l4, a10g, rtx3090, rtx4090, l20, l40s, a100-40gb, a100-80gb, h100, "
                                    "h100-pcie, h100-nvl, h200 or cpu (default: train.device on this machine)")
    speed = p.add_mutually_exclusive_group()
    speed.add_argument("--tokens-per-s", type=float, help="the whole run's tokens/s, all GPUs (metrics.csv's "
                                                          "tokens_per_s)")
    speed.add_argument("--mfu", type=float, help="the MFU to assume (default: this project's bench record for the "
                                                 "device, else 0.35)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs (torchrun ranks) of the run (default 1)")
    p.add_argument("--price-per-hour", type=float, help="USD per GPU-hour (default: the device table's)")
    p.add_argument("--json", metavar="PATH", help="also write the plan as JSON ('-': print JSON instead of the table)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("lm-eval", help="benchmark a model with lm-evaluation-harness (named tasks, local .jsonl "
                                       "files), against baselines")
    _add_model(p)
    p.add_argument("--suite", required=True,
                   help="comma-separated: small-lm, lm-eval task names, local .jsonl files, task YAML dirs")
    p.add_argument("--baseline", action="append", metavar="[NAME=]DIR",
                   help="a local model (Hugging Face or llm-maker directory) to compare against (repeatable)")
    p.add_argument("--out", help="where results.json and table.md go (default: RUN_DIR/eval/lm_eval)")
    _add_runtime(p)
    p.add_argument("--batch-size", help="auto or a number (default: auto on GPU, 8 on CPU)")
    p.add_argument("--limit", type=float, help="at most this many items per task (or a fraction < 1)")
    p.add_argument("--force", action="store_true", help="replace existing results")
    p.set_defaults(func=cmd_lm_eval)

    p = sub.add_parser("export", help="export a model for transformers (hf) or llama.cpp (gguf)")
    _add_model(p)
    p.add_argument("--format", choices=["hf", "gguf"], required=True)
    p.add_argument("--out", required=True, help="hf: a directory; gguf: a .gguf file")
    p.add_argument("--dtype", help="hf: float32 (default) | bfloat16 | float16; gguf: f16 (default) | f32")
    p.add_argument("--gguf-pre", help="llama.cpp pre-tokenizer name, for tokenizers other than llm-maker's BPE")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import-hf", help="turn a local Hugging Face Llama directory into a run to fine-tune")
    p.add_argument("hf_dir", help="a transformers Llama-family directory (config.json, safetensors, tokenizer)")
    p.add_argument("--out", required=True, help="the run directory to create (tokenizer/, pretrain/final/)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_import_hf)

    p = sub.add_parser("import-gguf", help="turn a llama.cpp GGUF (llama architecture, any quant) into a run")
    p.add_argument("gguf_file", help="a .gguf file (F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1, K-quants)")
    p.add_argument("--out", required=True, help="the run directory to create (tokenizer/, pretrain/final/)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_import_gguf)

    p = sub.add_parser("push", help="export a model and upload it to the Hugging Face Hub in one commit "
                                    "(token: HF_TOKEN or `hf auth login`)")
    _add_model(p)
    p.add_argument("--repo", required=True, metavar="OWNER/NAME", help="the Hub model repository (created if missing)")
    p.add_argument("--gguf", action="store_true", help="also upload the f16 GGUF for llama.cpp")
    p.add_argument("--private", action="store_true", help="create the repository private (an existing one keeps "
                                                          "its visibility)")
    p.add_argument("--dry-run", action="store_true", help="print the files, their sizes and the card's header; "
                                                          "send nothing")
    p.add_argument("--message", help="the commit message (default: Upload RUN/STAGE/MODEL with llm-maker)")
    p.add_argument("--license", default="apache-2.0",
                   help="the card's license (default apache-2.0: choose what your data and weights allow)")
    p.add_argument("--base-model", metavar="OWNER/NAME", help="the card's base_model (default: an imported "
                                                              "model's Hub id, when it came from the Hub cache)")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("generate", help="continue a prompt with a model (streams to the terminal)")
    _add_sampling(p, temperature=0.8)
    p.add_argument("--prompt", required=True)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat with a model in the terminal (rolling context window)")
    _add_sampling(p, temperature=0.7)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("summary", help="print a run's summary (artifacts, losses, samples)")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("serve", help="serve a model: web chat and an OpenAI-compatible API (FastAPI + uvicorn)")
    _add_model(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback: there is no authentication)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", help="the model id clients send (default: <recipe>-<stage>)")
    p.add_argument("--rope-scaling", type=float, metavar="FACTOR",
                   help="dynamic NTK RoPE scaling: serve FACTOR times the trained context (e.g. 2)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="requests generating together (continuous batching); 1 runs them one by one")
    p.add_argument("--max-waiting", type=int, default=16, help="requests queued behind the running ones; more get 503")
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="the largest max_tokens a request may ask")
    p.add_argument("--max-context", type=int, metavar="N",
                   help="tokens a request may hold, prompt and reply (default: the model's context, shortened when "
                        "its KV cache for --max-batch rows would take over 25%% of the free RAM/VRAM)")
    _add_runtime(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("registry", help="scan a runs folder: REGISTRY.md, and each run's card.md + plots")
    p.add_argument("runs_dir")
    p.add_argument("--out", help="where to write the table (default: RUNS_DIR/REGISTRY.md)")
    p.add_argument("--no-cards", action="store_true", help="only the table, no card.md / plots per run")
    p.add_argument("--force", action="store_true", help="replace files that llm-maker did not write")
    p.set_defaults(func=cmd_registry)

    p = sub.add_parser("card", help="write a run's model card (card.md) and training curves (plots/*.png)")
    p.add_argument("run_dir")
    p.add_argument("--force", action="store_true", help="replace a card.md that llm-maker did not write")
    p.set_defaults(func=cmd_card)

    p = sub.add_parser("data-report", help="the data report: counts, drops and why, bytes/token, length histogram")
    p.add_argument("run_dir")
    p.add_argument("--out", help="folder for data_report.{json,md} and doc_lengths.png (default: RUN_DIR/pack)")
    p.set_defaults(func=cmd_data_report)

    p = sub.add_parser("audit", help="n-gram overlap of evaluation sets with the run's training tokens")
    p.add_argument("run_dir")
    p.add_argument("--eval-sets", nargs="+", metavar="JSONL",
                   help="multiple-choice (context/choices/label), chat (messages) or text jsonl files")
    p.add_argument("--ngram", type=int, default=13, help="n-gram length in tokens (default 13)")
    p.add_argument("--no-sft-heldout", action="store_true", help="do not audit sft/data/heldout.jsonl")
    p.add_argument("--no-sft-train", action="store_true", help="training text is the packed pretraining split only")
    p.add_argument("--examples", type=int, default=5, help="worst items shown per set")
    p.add_argument("--out", help="folder for contamination.{json,md} (default: RUN_DIR/audit)")
    p.add_argument("--fail-above", type=float, metavar="FRACTION",
                   help="exit 1 if a set's fraction of overlapping items exceeds this")
    p.set_defaults(func=cmd_audit)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    args = build_parser().parse_args(argv)
    # A SIGTERM from now on is obeyed at the next training step, not a kill with nothing written.
    restore_sigterm = install_early_handlers() if args.command in TRAINING_COMMANDS else lambda: None
    try:
        return args.func(args)
    except StageStopped as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"llm-maker: {e}; continue with: {resume_command(args)}", file=sys.stderr)
        return EXIT_STOPPED
    except LLMMakerError as e:
        print(f"llm-maker: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("llm-maker: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        restore_sigterm()
        if "llm_maker.train.distributed" in sys.modules:  # leave torchrun's process group cleanly
            sys.modules["llm_maker.train.distributed"].shutdown_distributed()


if __name__ == "__main__":
    raise SystemExit(main())
