"""The plan of a pretraining run, counted from the recipe before any compute: what it trains, the
memory it needs per GPU, whether that fits the device, how long it takes and what it costs.

    llm-maker plan RECIPE [--device h100] [--tokens-per-s N | --mfu X] [--gpus N] [--price-per-hour P]

`pretrain` prints the same plan first and, on a CUDA device, stops before compute when the run
cannot fit (set LLM_MAKER_IGNORE_PLAN=1 to train anyway); on a CPU it never refuses.

  parameters       embeddings, blocks, final norm, head (a tied head is the embedding: counted once)
  FLOPs per token  the trainer's MFU numerator, LlamaModel.flops_per_token: 6·N + 12·L·d·T
  tokens per step  micro_batch_size × grad_accum_steps × seq_len, whatever the GPU count:
                   grad_accum_steps counts a step's micro-batches over all ranks
  time             tokens/s from --tokens-per-s (the whole run's, as metrics.csv logs it), or the
                   device's peak × MFU × GPUs / FLOPs per token; cost = hours × GPUs × price per GPU-hour

Memory per GPU, in bytes, for N parameters (the trainer keeps fp32 weights and autocasts matmuls):
  weights 4N and gradients 4N (fp32: the weights are also the master copy under bf16/fp16);
  optimizer: AdamW 8N (two fp32 moments), Muon 4 per block-matrix parameter (one momentum) and 8
  per other parameter (AdamW's); autocast copies (bf16/fp16): 2 per matmul weight, cast in forward
  and kept for backward (with activation checkpointing only the head's and one block's live);
  activations: `activation_bytes`. DDP replicates all of it (its buckets are views of the gradients);
  FSDP2 shards weights, gradients and optimizer state over the GPUs but gathers the root (embedding,
  head) and two blocks at a time, and the autocast copies stay whole (no MixedPrecisionPolicy).
  The estimate is for eager PyTorch with SDPA's fused kernel; torch.compile usually needs less.
  A device's usable memory is 90% of it: the rest goes to the CUDA context, kernel workspaces and
  the caching allocator's fragmentation.
"""
from __future__ import annotations

import dataclasses
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import torch

from llm_maker.artifacts import read_json, read_manifest
from llm_maker.devices import DeviceCaps, choose_precision, cpu_has_amx_bf16, device_caps, resolve_device
from llm_maker.errors import RecipeError
from llm_maker.layout import RunPaths
from llm_maker.markdown import count
from llm_maker.model.llama import LlamaConfig, LlamaModel, count_parameters
from llm_maker.model.presets import MODEL_DIMS, resolve_model_config
from llm_maker.recipe import Recipe
from llm_maker.train.mfu import DEVICES, DeviceSpec, device_spec, device_spec_for_name, mfu

USABLE_FRACTION = 0.90  # of a device's memory; the rest: CUDA context, workspaces, fragmentation
DEFAULT_MFU = 0.35  # without a bench record for the device; bench/README.md targets >= 52% (124m, H100)
IGNORE_PLAN_ENV = "LLM_MAKER_IGNORE_PLAN"  # =1: pretrain goes on even if the plan does not fit
BENCH_RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"  # in a source checkout
GIB = 2 ** 30


# --------------------------------------------------------------------------------------
# Counting from the config
# --------------------------------------------------------------------------------------

def parameter_counts(cfg: LlamaConfig) -> dict[str, int]:
    """Parameters by part; `total` is count_parameters (the model's own count)."""
    total = count_parameters(cfg)
    embeddings = cfg.vocab_size * cfg.d_model
    head = 0 if cfg.tie_embeddings else embeddings
    return {"embeddings": embeddings, "blocks": total - embeddings - head - cfg.d_model,
            "final_norm": cfg.d_model, "head": head, "total": total}


def block_matrix_parameters(cfg: LlamaConfig) -> int:
    """One block's projection weights (q, k, v, o, gate, up, down): all of it but the two norm gains."""
    return parameter_counts(cfg)["blocks"] // cfg.n_layers - 2 * cfg.d_model


def flops_per_token(cfg: LlamaConfig) -> float:
    """The trainer's MFU numerator, LlamaModel.flops_per_token, from the config alone (the method
    reads only `self.config`), so no model is built."""
    return LlamaModel.flops_per_token(SimpleNamespace(config=cfg))


def block_activation_bytes(cfg: LlamaConfig, autocast: bool) -> int:
    """Bytes per token one block keeps for backward (eager PyTorch; a = 2 under bf16/fp16 autocast,
    4 in fp32; d_kv = n_kv_heads × head_dim; f = d_mlp):

        two RMSNorms, each its fp32 input and normalised output      16·d
        the normed inputs of the projections: autocast casts them
          once per q, k, v, gate, up (5 × 2·d); fp32 shares them      10·d | 8·d
        SDPA (fused): q, k, v, its output (o_proj's input), fp32
          log-sum-exp per head                                       a·(2·d + 2·d_kv) + 4·n_heads
        SwiGLU: gate, up, silu(gate), their product (down's input)   4·a·f

    so 30·d + 4·d_kv + 8·f + 4·n_heads under autocast, 32·d + 8·d_kv + 16·f + 4·n_heads in fp32.
    RoPE keeps only its cos/sin tables. tests/test_plan.py sums what autograd saves against this;
    the whole peak (backward's gradients included) matched torch.profiler's live bytes on CPU to 0.1%."""
    d, f, d_kv = cfg.d_model, cfg.d_mlp, cfg.n_kv_heads * cfg.head_dim
    a = 2 if autocast else 4
    norms = 2 * (4 * d + 4 * d)
    projection_inputs = 5 * 2 * d if autocast else 2 * 4 * d
    attention = a * (2 * d + 2 * d_kv) + 4 * cfg.n_heads
    mlp = 4 * a * f
    return norms + projection_inputs + attention + mlp


def head_bytes(cfg: LlamaConfig, tokens: int, autocast: bool, loss_chunk_size: int) -> int:
    """The final norm, the head and the loss at their peak, the start of backward:

        final norm: fp32 input and output                           8·d per token
        plain loss: the head's input (2·d cast | 4·d fp32) and the logits B×T×V: the fp32
          log-softmax kept for backward, its incoming and outgoing gradients      12·V per token
        chunked loss (train.loss_chunk_size = c): the hidden's fp32 gradient, made in forward
          (4·d per token); the head weight's fp32 gradient and its copies (8·V·d, 10·V·d under
          autocast); one chunk's logits and the log-sum-exp's work (8·c·V)"""
    d, V = cfg.d_model, cfg.vocab_size
    final_norm = 8 * d * tokens
    if loss_chunk_size:
        return final_norm + 4 * d * tokens + (10 if autocast else 8) * V * d + 8 * min(loss_chunk_size, tokens) * V
    return final_norm + (2 if autocast else 4) * d * tokens + 12 * V * tokens


def activation_bytes(cfg: LlamaConfig, micro_batch_size: int, autocast: bool, checkpointing: bool,
                     loss_chunk_size: int = 0) -> int:
    """Peak activation bytes of one micro-batch (T = cfg.seq_len tokens per row):

        inputs and targets (int64)                                  16 per token
        kept for backward: L × block_activation_bytes, or with activation checkpointing only each
          block's fp32 input, L × 4·d per token
        + the largest of: the head at the start of backward (head_bytes); one block's backward
          (its gradients: one block's bytes again; with checkpointing also the recomputed block);
          the embedding's dense fp32 gradient at the end of backward (4·V·d)"""
    tokens = micro_batch_size * cfg.seq_len
    block = block_activation_bytes(cfg, autocast) * tokens
    if checkpointing:
        kept, at_block = cfg.n_layers * 4 * cfg.d_model * tokens, 2 * block
    else:
        kept, at_block = cfg.n_layers * block, block
    at_head = head_bytes(cfg, tokens, autocast, loss_chunk_size)
    return 16 * tokens + kept + max(at_head, at_block, 4 * cfg.vocab_size * cfg.d_model)


@dataclass(frozen=True)
class Memory:
    """Peak bytes on one GPU (one rank), by part."""

    weights: int
    gradients: int
    optimizer: int
    autocast_copies: int
    fsdp_gathered: int  # FSDP2: the unsharded root and blocks being computed, and their gradients
    activations: int

    @property
    def total(self) -> int:
        return sum(dataclasses.astuple(self))


def memory_per_gpu(cfg: LlamaConfig, micro_batch_size: int, precision: str, optimizer: str = "adamw",
                   checkpointing: bool = False, loss_chunk_size: int = 0, shards: int = 1) -> Memory:
    """The module docstring's estimate; `shards` > 1: FSDP2 over that many GPUs."""
    counts = parameter_counts(cfg)
    n, block = counts["total"], counts["blocks"] // cfg.n_layers
    root = n - cfg.n_layers * block  # embedding, final norm, head: FSDP2's root module
    muon = cfg.n_layers * block_matrix_parameters(cfg) if optimizer == "muon" else 0
    autocast = precision in ("bf16", "fp16")
    head_weight = cfg.vocab_size * cfg.d_model
    casts = head_weight + (1 if checkpointing else cfg.n_layers) * block_matrix_parameters(cfg)
    return Memory(weights=math.ceil(4 * n / shards), gradients=math.ceil(4 * n / shards),
                  optimizer=math.ceil((4 * muon + 8 * (n - muon)) / shards),
                  autocast_copies=2 * casts if autocast else 0,
                  fsdp_gathered=4 * (root + 2 * block) + 4 * (root + block) if shards > 1 else 0,
                  activations=activation_bytes(cfg, micro_batch_size, autocast, checkpointing, loss_chunk_size))


# --------------------------------------------------------------------------------------
# Devices and speed
# --------------------------------------------------------------------------------------

def cpu_spec() -> DeviceSpec:
    """The table's cpu row for this machine: its RAM, and bf16 where it has AMX-BF16."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB if hasattr(os, "sysconf") else None
    row = next(s for s in DEVICES if s.key == "cpu")
    return dataclasses.replace(row, name="cpu (this machine)", memory_gib=ram, bf16=cpu_has_amx_bf16())


def named_device(key: str) -> DeviceSpec:
    """`--device NAME`: a row of train/mfu.py's table (cpu: this machine); a RecipeError listing them."""
    spec = device_spec(key)
    return cpu_spec() if spec.key == "cpu" else spec


def local_device_spec(device: torch.device) -> DeviceSpec:
    """The device this process trains on: a CUDA card's table row (if any) with its real memory."""
    if device.type == "cpu":
        return cpu_spec()
    if device.type != "cuda":
        return DeviceSpec(device.type, device.type, None, False, None, None)
    name, caps = torch.cuda.get_device_name(device), device_caps(device)
    memory = torch.cuda.get_device_properties(device).total_memory / GIB
    row = device_spec_for_name(name) or DeviceSpec("cuda", name, None, caps.bf16, None, None)
    return dataclasses.replace(row, name=name, memory_gib=memory, bf16=caps.bf16)


def recipe_device_spec(recipe: Recipe) -> DeviceSpec:
    """The device `train.device` names on this machine, for `plan` without --device."""
    device = resolve_device(recipe.train.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"`train.device` is {recipe.train.device} but this machine has no CUDA device; "
                          f"name the one to plan for with --device ({', '.join(s.key for s in DEVICES)})")
    return local_device_spec(device)


def bench_mfu(spec: DeviceSpec, cfg: LlamaConfig, results: Path = BENCH_RESULTS) -> Optional[tuple[float, str]]:
    """(MFU, where from) of llm-maker's side in this project's bench records on this device
    (bench/train_throughput.py): the record of this model shape, else the median over the device's."""
    found = []
    for path in sorted(results.glob("train_throughput_cuda_*.json")):
        record = read_json(path) or {}
        row = device_spec_for_name(str(record.get("device", "")))
        value = record.get("results", {}).get("llm-maker", {}).get("mfu")
        if row is not None and row.key == spec.key and value:
            found.append((record.get("model") == cfg.to_dict(), float(value), path.name))
    same = [f for f in found if f[0]]
    if same:
        return same[0][1], f"bench/results/{same[0][2]}"
    if found:
        return statistics.median(v for _, v, _ in found), f"median of {len(found)} bench records on {spec.key}"
    return None


def run_speed(device: DeviceSpec, cfg: LlamaConfig, flops: float, gpus: int, tokens_per_s: Optional[float],
              mfu_fraction: Optional[float], bench_results: Path = BENCH_RESULTS,
              ) -> tuple[Optional[float], Optional[float], str]:
    """(the run's tokens/s, its MFU, where they come from): --tokens-per-s as given; else the
    device's peak × MFU (--mfu, else this project's bench record, else DEFAULT_MFU) × GPUs."""
    if tokens_per_s is not None:
        return tokens_per_s, mfu(flops, tokens_per_s, device.peak_tflops, gpus), "--tokens-per-s"
    if device.peak_tflops is None:
        return None, None, "unknown: no peak for this device; pass --tokens-per-s (metrics.csv of a short run)"
    source = "--mfu"
    if mfu_fraction is None:
        mfu_fraction, source = bench_mfu(device, cfg, bench_results) or (DEFAULT_MFU, "default MFU: no bench record")
    return mfu_fraction * device.peak_tflops * 1e12 * gpus / flops, mfu_fraction, source


# --------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------

@dataclass
class TrainingPlan:
    recipe: str
    device: DeviceSpec
    gpus: int
    precision: str
    optimizer: str
    distributed: str  # the mode the fit check uses: ddp (also one process) or fsdp2
    checkpointing: bool
    model: dict[str, Any]
    parameters: dict[str, int]
    flops_per_token: float
    micro_batch_size: int
    grad_accum_steps: int
    tokens_per_step: int
    steps: int
    train_tokens: Optional[int]  # the packed train split (pack/manifest.json), if packed
    memory: dict[str, Memory]  # "ddp" (replicated; one GPU) and, with gpus > 1, "fsdp2"
    activations_checkpointing_flipped: int  # the activations with activation_checkpointing the other way
    tokens_per_s: Optional[float]
    mfu: Optional[float]
    speed_source: str
    price_per_hour: Optional[float]

    @property
    def total_tokens(self) -> int:
        return self.tokens_per_step * self.steps

    @property
    def tokens_per_parameter(self) -> float:
        return self.total_tokens / self.parameters["total"]

    @property
    def epochs(self) -> Optional[float]:
        return self.total_tokens / self.train_tokens if self.train_tokens else None

    @property
    def needed_bytes(self) -> int:
        return self.memory[self.distributed].total

    @property
    def usable_bytes(self) -> Optional[int]:
        gib = self.device.memory_gib
        return None if gib is None else int(gib * GIB * USABLE_FRACTION)

    @property
    def fits(self) -> Optional[bool]:
        return None if self.usable_bytes is None else self.needed_bytes <= self.usable_bytes

    @property
    def hours(self) -> Optional[float]:
        return self.total_tokens / self.tokens_per_s / 3600 if self.tokens_per_s else None

    @property
    def cost(self) -> Optional[float]:
        if self.hours is None or self.price_per_hour is None:
            return None
        return self.hours * self.gpus * self.price_per_hour

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["memory"] = {mode: {**dataclasses.asdict(m), "total": m.total} for mode, m in self.memory.items()}
        for name in ("total_tokens", "tokens_per_parameter", "epochs", "needed_bytes", "usable_bytes", "fits",
                     "hours", "cost"):
            d[name] = getattr(self, name)
        d["usable_fraction"] = USABLE_FRACTION
        return d


def model_config_of(recipe: Recipe, paths: RunPaths, vocab_size: Optional[int] = None) -> LlamaConfig:
    """The shape pretraining will build: init_from's config.json, else the recipe's dims with the
    vocabulary `vocab_size` (the loaded tokenizer's), else the tokenizer stage's, else the recipe's."""
    spec = recipe.model
    if spec.init_from:
        stored = (read_json(Path(spec.init_from) / "config.json") or {}).get("model")
        if stored is None:
            raise RecipeError(f"{recipe.source_file}: `model.init_from` has no config.json: {spec.init_from}")
        return LlamaConfig(**{k: v for k, v in stored.items() if k in MODEL_DIMS})
    if vocab_size is None:
        vocab_size = (read_manifest(paths.tokenizer) or {}).get("vocab_size")
    if vocab_size is None and recipe.tokenizer.type == "bpe":
        vocab_size = recipe.tokenizer.vocab_size
    if vocab_size is None and spec.vocab_size is None:  # a pretrained tokenizer's file, read offline
        from llm_maker.tokenizer.pretrained import load_pretrained_tokenizer

        t = recipe.tokenizer
        vocab_size = load_pretrained_tokenizer(t.path, t.tiktoken_encoding, t.pad_token).vocab_size
    try:
        return resolve_model_config(spec, vocab_size=spec.vocab_size or vocab_size)
    except ValueError as e:  # "field: why"
        name, _, why = str(e).partition(": ")
        raise RecipeError(f"{recipe.source_file}: `model.{name}` {why}") from None


def make_plan(recipe: Recipe, device: DeviceSpec, gpus: int = 1, tokens_per_s: Optional[float] = None,
              mfu_fraction: Optional[float] = None, price_per_hour: Optional[float] = None,
              vocab_size: Optional[int] = None, paths: Optional[RunPaths] = None,
              bench_results: Path = BENCH_RESULTS) -> TrainingPlan:
    """The plan of `recipe`'s pretraining on `gpus` × `device`, counted from the config; `paths`
    (default: the recipe's run_dir) is where the tokenizer and pack manifests are looked for."""
    tc, paths = recipe.train, paths or RunPaths.of(recipe.run_dir)
    if gpus < 1:
        raise RecipeError(f"--gpus must be at least 1, got {gpus}")
    if tc.grad_accum_steps % gpus:
        raise RecipeError(f"`train.grad_accum_steps` is {tc.grad_accum_steps}, not a multiple of {gpus} GPUs: it "
                          f"counts the micro-batches of a step over all ranks")
    cfg = model_config_of(recipe, paths, vocab_size)
    kind = device.key if device.key in ("cpu", "mps") else "cuda"
    precision = choose_precision(tc.precision, DeviceCaps(kind, device.bf16, device.name))
    sizes = dict(micro_batch_size=tc.micro_batch_size, precision=precision, optimizer=tc.optimizer,
                 loss_chunk_size=tc.loss_chunk_size)
    memory = {"ddp": memory_per_gpu(cfg, checkpointing=tc.activation_checkpointing, **sizes)}
    if gpus > 1:
        memory["fsdp2"] = memory_per_gpu(cfg, checkpointing=tc.activation_checkpointing, shards=gpus, **sizes)
    flipped = memory_per_gpu(cfg, checkpointing=not tc.activation_checkpointing, **sizes).activations
    flops = flops_per_token(cfg)
    tokens_per_s, mfu_fraction, speed_source = run_speed(device, cfg, flops, gpus, tokens_per_s, mfu_fraction,
                                                         bench_results)
    train_tokens = (read_manifest(paths.pack) or {}).get("train_tokens")
    return TrainingPlan(
        recipe=recipe.name, device=device, gpus=gpus, precision=precision, optimizer=tc.optimizer,
        distributed=tc.distributed if gpus > 1 else "ddp", checkpointing=tc.activation_checkpointing,
        model=cfg.to_dict(), parameters=parameter_counts(cfg), flops_per_token=flops,
        micro_batch_size=tc.micro_batch_size, grad_accum_steps=tc.grad_accum_steps,
        tokens_per_step=tc.micro_batch_size * tc.grad_accum_steps * cfg.seq_len, steps=tc.max_steps,
        train_tokens=train_tokens, memory=memory, activations_checkpointing_flipped=flipped,
        tokens_per_s=tokens_per_s, mfu=mfu_fraction, speed_source=speed_source,
        price_per_hour=device.price_per_hour if price_per_hour is None else price_per_hour)


# --------------------------------------------------------------------------------------
# Reading it, and acting on it
# --------------------------------------------------------------------------------------

def _size(n: Optional[float]) -> str:
    if n is None:
        return "unknown"
    return f"{n / GIB:,.2f} GiB" if n >= GIB else f"{n / 2 ** 20:,.1f} MiB"


def _duration(hours: float) -> str:
    if hours < 1:
        return f"{hours * 60:,.1f} minutes"
    return f"{hours:,.1f} hours" + (f" ({hours / 24:,.1f} days)" if hours >= 48 else "")


def fit_message(plan: TrainingPlan) -> str:
    """Whether it fits, with the numbers: needed per GPU against the device's usable memory."""
    mode = f" per GPU ({plan.distributed} over {plan.gpus})" if plan.gpus > 1 else ""
    if plan.fits is None:
        return f"needs {_size(plan.needed_bytes)}{mode}; {plan.device.name}'s memory is unknown"
    verdict = "fits" if plan.fits else "does not fit"
    return (f"{verdict}: needs {_size(plan.needed_bytes)}{mode}, {plan.device.name} has "
            f"{_size(plan.usable_bytes)} usable ({USABLE_FRACTION:.0%} of {plan.device.memory_gib:,.1f} GiB)")


def format_plan(plan: TrainingPlan) -> str:
    """The plan as a readable table."""
    m, p = plan.model, plan.parameters
    heads = f"{m['n_heads']}/{m['n_kv_heads']}" if m["n_kv_heads"] != m["n_heads"] else str(m["n_heads"])
    tied = " (tied with the head)" if m["tie_embeddings"] else f", head {p['head']:,}"
    epochs = (f"; {plan.epochs:,.{0 if plan.epochs >= 10 else 2}f} epochs of the {plan.train_tokens:,} packed "
              f"train tokens" if plan.epochs else "; epochs unknown (no pack/manifest.json yet)")
    lines = [
        f"plan: {plan.recipe} on {plan.gpus} × {plan.device.name} ({plan.precision}, {plan.optimizer})",
        f"  model            {m['n_layers']} layers, d_model {m['d_model']}, {heads} heads, SwiGLU {m['d_mlp']}, "
        f"vocab {m['vocab_size']:,}, seq {m['seq_len']:,}, {'tied' if m['tie_embeddings'] else 'untied'}",
        f"  parameters       {p['total']:,}: embeddings {p['embeddings']:,}{tied}, blocks {p['blocks']:,}, "
        f"final norm {p['final_norm']:,}",
        f"  FLOPs per token  {plan.flops_per_token:,.0f} (6·N + 12·L·d·T, the trainer's MFU formula)",
        f"  tokens per step  {plan.tokens_per_step:,} = {plan.micro_batch_size} × {plan.grad_accum_steps} "
        f"accumulation × {m['seq_len']:,} (any GPU count)",
        f"  steps            {plan.steps:,}",
        f"  tokens           {count(plan.total_tokens)} ({plan.total_tokens:,}): "
        f"{plan.tokens_per_parameter:,.1f} tokens per parameter{epochs}",
    ]
    modes = list(plan.memory)
    header = [f"1 {'GPU' if plan.device.key != 'cpu' else 'CPU'}"] if plan.gpus == 1 else \
        [f"DDP ×{plan.gpus}", f"FSDP2 /{plan.gpus}"]
    lines.append(f"  {'memory per GPU':45s}" + "".join(f"{h:>14s}" for h in header))
    for part in ("weights", "gradients", "optimizer", "autocast_copies", "fsdp_gathered", "activations"):
        label = {"autocast_copies": f"autocast copies ({plan.precision})", "fsdp_gathered": "FSDP2 gathered",
                 "activations": f"activations ({plan.micro_batch_size} × {m['seq_len']:,})"}.get(part, part)
        if part == "fsdp_gathered" and plan.gpus == 1:
            continue
        lines.append(f"    {label:43s}" + "".join(f"{_size(getattr(plan.memory[k], part)):>14s}" for k in modes))
    lines.append(f"    {'total':43s}" + "".join(f"{_size(plan.memory[k].total):>14s}" for k in modes))
    other = "with" if not plan.checkpointing else "without"
    lines.append(f"    activations {other} activation checkpointing: {_size(plan.activations_checkpointing_flipped)}")
    lines.append(f"  fit              {fit_message(plan)}")
    if plan.tokens_per_s is None:
        lines.append(f"  time             {plan.speed_source}")
    else:
        how = (f"MFU {plan.mfu:.1%} of {plan.device.peak_tflops:g} TFLOP/s × {plan.gpus}" if plan.mfu is not None
               else "MFU unknown: no peak for this device")
        lines.append(f"  speed            {plan.tokens_per_s:,.0f} tokens/s: {how} ({plan.speed_source})")
        lines.append(f"  time             {_duration(plan.hours)}")
    if plan.cost is not None:
        lines.append(f"  cost             ${plan.cost:,.{0 if plan.cost >= 100 else 2}f} = {plan.hours:,.2f} h × "
                     f"{plan.gpus} GPU × ${plan.price_per_hour:.2f} per GPU-hour")
    return "\n".join(lines)


def check_before_training(recipe: Recipe, paths: RunPaths, device: torch.device, gpus: int, vocab_size: int,
                          show: bool = True) -> TrainingPlan:
    """pretrain's prologue: print the plan (`show`: rank 0) and, on a CUDA device, refuse before any
    compute a run that does not fit its memory, unless LLM_MAKER_IGNORE_PLAN=1. A CPU never refuses."""
    plan = make_plan(recipe, local_device_spec(device), gpus=gpus, vocab_size=vocab_size, paths=paths)
    if show:
        print(format_plan(plan), flush=True)
    if device.type == "cuda" and plan.fits is False and os.environ.get(IGNORE_PLAN_ENV) != "1":
        raise RecipeError(f"{recipe.source_file}: the run {fit_message(plan)}; lower train.micro_batch_size (and "
                          f"raise grad_accum_steps), turn on train.activation_checkpointing or loss_chunk_size, or "
                          f"set {IGNORE_PLAN_ENV}=1 to train anyway")
    return plan
