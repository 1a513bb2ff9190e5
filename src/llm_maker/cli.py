"""The `llm-maker` command: one verb per stage, each a thin wrapper over the stage function.

    llm-maker pipeline RECIPE        every stage in order (skips what is up to date, resumes)
    llm-maker data|tokenizer|pack RECIPE
    llm-maker pretrain|sft RECIPE [--resume] [--force]
    llm-maker eval RECIPE
    llm-maker generate RUN_DIR --prompt TEXT
    llm-maker chat RUN_DIR
    llm-maker summary RUN_DIR
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

from llm_maker.errors import LLMMakerError


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
    from llm_maker.layout import RunPaths
    from llm_maker.pipeline import run_pipeline
    from llm_maker.summary import print_summary

    recipe = _recipe(args)
    results = run_pipeline(recipe, force=args.force, only=args.only)
    if all(r["status"] != "paused" for r in results.values()) and not args.only:
        print_summary(RunPaths.of(recipe.run_dir), results)
    return 0


def cmd_stage(args) -> int:
    from llm_maker.layout import RunPaths

    recipe = _recipe(args)
    paths = RunPaths.of(recipe.run_dir)
    if args.command == "data":
        from llm_maker.data import prepare_data
        out = prepare_data(recipe.data, paths.data, force=args.force)
    elif args.command == "tokenizer":
        from llm_maker.tokenizer import build_tokenizer
        out = build_tokenizer(recipe.tokenizer, paths.data, paths.tokenizer, force=args.force)
    elif args.command == "pack":
        from llm_maker.pack import pack_tokens
        out = pack_tokens(recipe.pack, paths.data, paths.tokenizer, paths.pack, force=args.force)
    elif args.command == "pretrain":
        from llm_maker.train.stage import run_pretrain
        out = run_pretrain(recipe, paths, resume=args.resume, force=args.force)
    elif args.command == "sft":
        from llm_maker.sft import run_sft
        out = run_sft(recipe, paths, resume=args.resume, force=args.force)
    elif args.command == "eval":
        from llm_maker.eval import run_eval
        out = run_eval(recipe, paths, force=args.force)
    else:  # pragma: no cover - argparse guards the choices
        raise LLMMakerError(f"unknown command {args.command}")
    print(out)
    return 0


def cmd_generate(args) -> int:
    from llm_maker.layout import RunPaths
    from llm_maker.serve.generate import stream_text
    from llm_maker.train.checkpoint import load_model_dir

    model_dir = _model_dir(args.run_dir, args.model)
    model, tokenizer, meta = load_model_dir(model_dir)
    ids = tokenizer.encode(args.prompt)
    sys.stdout.write(args.prompt)
    for piece in stream_text(model, tokenizer, ids, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             repetition_penalty=args.repetition_penalty, stop_ids=[tokenizer.eos_id],
                             seed=args.seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args) -> int:
    from llm_maker.serve.chat import chat_repl

    chat_repl(_model_dir(args.run_dir, args.model), max_new_tokens=args.max_new_tokens,
              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              repetition_penalty=args.repetition_penalty)
    return 0


def cmd_summary(args) -> int:
    from llm_maker.layout import RunPaths
    from llm_maker.summary import print_summary

    print_summary(RunPaths.of(args.run_dir), None)
    return 0


def _model_dir(run_dir: str, which: Optional[str]) -> Path:
    from llm_maker.layout import RunPaths

    paths = RunPaths.of(run_dir)
    if which == "base":
        return paths.pretrain / "final"
    if which == "sft":
        return paths.sft / "final"
    if which:
        return Path(which)
    if (Path(run_dir) / "config.json").is_file():  # a model directory itself
        return Path(run_dir)
    return paths.final_model()


def _add_sampling(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("run_dir", help="a run directory (or a model directory)")
    p.add_argument("--model", help="base, sft, or a model directory (default: SFT if present, else base)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=temperature)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-maker", description="Build small language models from scratch.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pipeline", help="run every stage of a recipe (skips up-to-date stages, resumes)")
    _add_recipe(p)
    p.add_argument("--only", nargs="+", choices=["data", "tokenizer", "pack", "pretrain", "sft", "eval"])
    p.set_defaults(func=cmd_pipeline)

    for name, help_ in (("data", "select and split the corpus"), ("tokenizer", "train or load the tokenizer"),
                        ("pack", "tokenize into memory-mapped token files"), ("pretrain", "pretrain the model"),
                        ("sft", "instruction-tune the pretrained model"), ("eval", "evaluate and write the report")):
        p = sub.add_parser(name, help=help_)
        _add_recipe(p)
        if name in ("pretrain", "sft"):
            p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
        p.set_defaults(func=cmd_stage)

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
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LLMMakerError as e:
        print(f"llm-maker: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llm-maker: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
