"""Distillation (distill/): the loss against plain training and a teacher equal to the student, the
cached top-k against the online teacher, the tokenizer check, the stage's exact resume, the
top-k cache's resumable build and reuse, and the stage on 2 gloo ranks like one process."""
from __future__ import annotations

import copy
import csv
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from helpers import make_tokenizer, random_model, tiny_model, write_jsonl
from llm_maker.distill.loss import DistillLoss, distill_kl
from llm_maker.distill.stage import run_distill
from llm_maker.distill.teacher import (
    CachedTeacherBatches,
    OnlineTeacherBatches,
    TopKCache,
    build_topk_cache,
    topk_cache_dir,
)
from llm_maker.errors import RecipeError
from llm_maker.layout import RunPaths
from llm_maker.pack.packer import pack_tokens
from llm_maker.pack.shards import load_split
from llm_maker.recipe import DataConfig, PackConfig, SourceConfig, recipe_from_dict
from llm_maker.stopping import StageStopped
from llm_maker.tokenizer.tokenizer import Tokenizer
from llm_maker.train.batches import PretrainBatches
from llm_maker.train.checkpoint import load_model_dir, save_model_dir
from llm_maker.train.loss import IGNORE_INDEX, CausalLMLoss

SEQ = 32
DIMS = dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64, seq_len=SEQ)


@pytest.fixture(scope="module")
def tok(tokenizer_dir) -> Tokenizer:
    return Tokenizer.load(tokenizer_dir)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tok) -> Path:
    """A tiny teacher (another init than any student here) with the run's tokenizer."""
    teacher = random_model(tok.vocab_size, seed=7, std=0.1, **{**DIMS, "d_model": 48, "d_mlp": 96})
    return save_model_dir(tmp_path_factory.mktemp("teacher") / "final", teacher, tok, {"stage": "pretrain"})


def batch(vocab: int, seed: int = 0, b: int = 3, t: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t + 1), generator=g)
    return ids[:, :-1].clone(), ids[:, 1:].clone()


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------

def test_alpha_zero_is_plain_training_same_loss_and_gradients():
    x, y = batch(100)
    y[0, :5] = IGNORE_INDEX
    teacher = random_model(100, seed=3, **DIMS)
    logp = torch.log_softmax(teacher(x) / 2.0, -1).detach()
    a, b = tiny_model(100, seed=1, **DIMS), tiny_model(100, seed=1, **DIMS)
    plain = CausalLMLoss(a)(x, y)
    plain.backward()
    loss, parts = DistillLoss(b, alpha=0.0, temperature=2.0)(x, y, logp)
    loss.backward()
    assert torch.equal(loss, plain) and torch.equal(parts["ce"], plain.detach())
    assert parts["kl"] > 0.01  # the teacher differs: logged, but no part of the loss
    ga, gb = grads(a), grads(b)
    assert all(torch.equal(ga[n], gb[n]) for n in ga)


def test_student_equal_to_teacher_has_zero_kl_and_no_gradient():
    x, y = batch(100, seed=1)
    student = tiny_model(100, seed=2, **DIMS)
    teacher = copy.deepcopy(student).eval()
    source = OnlineTeacherBatches(FixedBatches(x, y), teacher, temperature=3.0, vocab_size=100)
    loss, parts = DistillLoss(student, alpha=1.0, temperature=3.0)(*source.micro_batch(0))
    loss.backward()
    assert abs(loss.item()) < 1e-6 and abs(parts["kl"].item()) < 1e-6
    assert max(p.grad.abs().max().item() for p in student.parameters()) < 1e-6
    other = random_model(100, seed=5, **DIMS)  # and a different student is pulled towards the teacher
    assert DistillLoss(other, 1.0, 3.0)(*source.micro_batch(0))[1]["kl"] > 1e-3
    assert source.log_metrics()["teacher_tokens_per_s"] > 0


def test_kl_counts_only_supervised_positions():
    """SFT: what the teacher says at prompt positions (y = -100) changes nothing."""
    logits = torch.randn(6, 20)
    teacher = torch.log_softmax(torch.randn(6, 20), -1)
    mask = torch.tensor([False, True, True, False, True, False])
    changed = teacher.clone()
    changed[~mask] = torch.log_softmax(torch.randn(3, 20), -1)
    kl = distill_kl(logits, teacher, 2.0, mask)
    assert torch.equal(kl, distill_kl(logits, changed, 2.0, mask))
    assert kl == pytest.approx(distill_kl(logits[mask], teacher[mask], 2.0, torch.ones(3, dtype=torch.bool)).item())


class FixedBatches:
    tokens_per_micro_batch = 48

    def __init__(self, x, y):
        self.x, self.y = x, y

    def micro_batch(self, index):
        return self.x, self.y

    def val_batches(self):
        yield self.x, self.y


def test_cached_topk_equals_online_when_k_covers_the_vocabulary(tmp_path, pack_dir, tok, teacher_dir):
    tokens = np.asarray(load_split(pack_dir, "train")[: 40 * SEQ + 1])
    teacher = load_model_dir(teacher_dir)[0].eval()
    fields = dict(k=tok.vocab_size, temperature=2.0, seq_len=SEQ, teacher_hash="t", tokenizer_hash=tok.hash,
                  pack_fingerprint="p")
    assert build_topk_cache(teacher, tokens, tmp_path / "c", fields, tok.vocab_size, chunk_blocks=16) == 3
    base = PretrainBatches(tokens, SEQ, 4, seed=0)
    cached = CachedTeacherBatches(base, TopKCache(tmp_path / "c"))
    online = OnlineTeacherBatches(base, teacher, 2.0, tok.vocab_size)
    student = tiny_model(tok.vocab_size, seed=1, **DIMS)
    for index in (0, 5, 13):
        c_batch, o_batch = cached.micro_batch(index), online.micro_batch(index)
        assert torch.equal(c_batch[0], o_batch[0]) and c_batch[2].shape[-1] == tok.vocab_size
        for alpha in (0.5, 1.0):
            c_loss, c_parts = DistillLoss(student, alpha, 2.0)(*c_batch)
            o_loss, o_parts = DistillLoss(student, alpha, 2.0)(*o_batch)
            assert c_loss.item() == pytest.approx(o_loss.item(), rel=2e-3)  # float16 log-probs on disk
            assert c_parts["kl"].item() == pytest.approx(o_parts["kl"].item(), rel=5e-3, abs=1e-4)
    # fewer kept ids: the teacher's 8 most likely, in uint16 / float16 on disk
    build_topk_cache(teacher, tokens, tmp_path / "k8", {**fields, "k": 8}, tok.vocab_size)
    k8 = CachedTeacherBatches(base, TopKCache(tmp_path / "k8")).micro_batch(5)
    assert k8[3].dtype == torch.int64 and k8[2].shape[-1] == 8
    assert np.load(tmp_path / "k8" / "train-ids-00000.npy", mmap_mode="r").dtype == np.uint16
    top = online.micro_batch(5)[2].topk(8, dim=-1)
    assert torch.allclose(k8[2], top.values, atol=1e-2) and torch.equal(k8[3], top.indices)
    assert DistillLoss(student, 1.0, 2.0)(*k8)[1]["kl"] >= 0


def test_cache_build_interrupted_and_resumed_equals_one_go(tmp_path, pack_dir, tok, teacher_dir):
    tokens = np.asarray(load_split(pack_dir, "train")[: 50 * SEQ + 1])
    teacher = load_model_dir(teacher_dir)[0].eval()
    fields = dict(k=16, temperature=1.5, seq_len=SEQ, teacher_hash="t", tokenizer_hash=tok.hash,
                  pack_fingerprint="p")
    assert build_topk_cache(teacher, tokens, tmp_path / "once", fields, tok.vocab_size, chunk_blocks=8) == 7

    def interrupt(chunk):
        if chunk == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_topk_cache(teacher, tokens, tmp_path / "twice", fields, tok.vocab_size, chunk_blocks=8,
                         on_chunk=interrupt)
    assert not (tmp_path / "twice" / "manifest.json").exists()
    done = []
    assert build_topk_cache(teacher, tokens, tmp_path / "twice", fields, tok.vocab_size, chunk_blocks=8,
                            on_chunk=done.append) == 4
    assert done == [3, 4, 5, 6]  # continued at the first missing chunk
    once = sorted(p.name for p in (tmp_path / "once").iterdir())
    assert once == sorted(p.name for p in (tmp_path / "twice").iterdir())
    for name in once:
        assert (tmp_path / "once" / name).read_bytes() == (tmp_path / "twice" / name).read_bytes(), name
    assert build_topk_cache(teacher, tokens, tmp_path / "twice", fields, tok.vocab_size, chunk_blocks=8) == 0
    # other fields (here the pack) in the same folder: the old chunks go, all are recomputed
    assert build_topk_cache(teacher, tokens, tmp_path / "twice", {**fields, "pack_fingerprint": "q"},
                            tok.vocab_size, chunk_blocks=8) == 7


# ----------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------

TRAIN = dict(device="cpu", precision="fp32", max_steps=4, micro_batch_size=4, grad_accum_steps=2, lr=1e-2,
             warmup_steps=2, eval_every=2, eval_batches=2, checkpoint_every=2, log_every=1, progress=False)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, prose_texts, tokenizer_dir) -> Path:
    """A small run's data/ (200 paragraphs) with tokenizer/ and pack/ beside it: ~20K train tokens."""
    from llm_maker.data.stage import prepare_data

    root = tmp_path_factory.mktemp("small")
    source = write_jsonl(root / "prose.jsonl", prose_texts[:200])
    data = prepare_data(DataConfig(sources=[SourceConfig(type="jsonl", path=str(source))], val_fraction=0.1),
                        root / "data")
    shutil.copytree(tokenizer_dir, root / "tokenizer")
    pack_tokens(PackConfig(workers=1), data, root / "tokenizer", root / "pack")
    return data


def make_run(root: Path, small_data: Path) -> RunPaths:
    for stage in ("tokenizer", "pack"):
        shutil.copytree(small_data.parent / stage, root / stage)
    return RunPaths.of(root)


def distill_raw(run_dir: Path, teacher: Path, **distill) -> dict:
    train = {**TRAIN, **distill.pop("train", {})}
    return {"name": "distill-test", "run_dir": str(run_dir), "model": {"preset": "tiny", **DIMS},
            "distill": {"enabled": True, "teacher": str(teacher), "alpha": 0.7, "temperature": 2.0,
                        "teacher_precision": "fp32", "train": train, **distill}}


def metrics(stage_dir: Path) -> list[dict[str, str]]:
    with open(stage_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def assert_same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    wa, wb = load_model_dir(a)[0].state_dict(), load_model_dir(b)[0].state_dict()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=atol, rtol=0), k


def assert_same_losses(a: Path, b: Path, abs_: float = 0.0) -> None:
    ra, rb = metrics(a), metrics(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb, strict=True):
        for col in ("loss", "val_loss", "ce", "kl"):
            assert (x[col] == "") == (y[col] == ""), (col, x["step"])
            if x[col]:
                assert float(x[col]) == pytest.approx(float(y[col]), abs=abs_), (col, x["step"])


def test_a_teacher_with_another_tokenizer_is_refused_before_any_compute(tmp_path, small_data):
    other_tok = make_tokenizer(300)
    teacher = save_model_dir(tmp_path / "other" / "final", tiny_model(other_tok.vocab_size, **DIMS), other_tok, {})
    paths = make_run(tmp_path / "run", small_data)
    recipe = recipe_from_dict(distill_raw(paths.root, teacher), check_files=False)
    with pytest.raises(RecipeError) as e:
        run_distill(recipe, paths)
    ours = Tokenizer.load(paths.tokenizer).hash
    for said in ("`distill.teacher`", str(teacher), other_tok.hash, ours):
        assert said in str(e.value)
    assert not paths.distill.exists()
    recipe.distill.teacher = str(tmp_path / "nowhere")
    with pytest.raises(RecipeError, match="`distill.teacher`: .*nowhere: no config.json"):
        run_distill(recipe, paths)


def test_distill_stage_stopped_and_resumed_equals_uninterrupted(tmp_path, small_data, teacher_dir):
    runs = {}
    for name in ("straight", "resumed"):
        paths = make_run(tmp_path / name, small_data)
        recipe = recipe_from_dict(distill_raw(paths.root, teacher_dir), check_files=False)
        if name == "resumed":
            (paths.root / "STOP").touch()  # stops after its first step, at a checkpoint
            with pytest.raises(StageStopped):
                run_distill(recipe, paths)
            (paths.distill / "STOP").touch()  # and once more, later
            with pytest.raises(StageStopped) as stopped:
                run_distill(recipe, paths, resume=True)
            assert stopped.value.step == 2
            recipe = recipe_from_dict(distill_raw(paths.root, teacher_dir), check_files=False)
            run_distill(recipe, paths, resume=True)
        else:
            assert run_distill(recipe, paths) == paths.distill
        runs[name] = paths
    a, b = runs["straight"].distill, runs["resumed"].distill
    assert_same_losses(a, b)
    assert_same_weights(a / "final", b / "final")
    rows = metrics(a)
    assert all(float(r["kl"]) > 0 and float(r["ce"]) > 0 and float(r["teacher_tokens_per_s"]) > 0 for r in rows)
    loss = 0.7 * 4.0 * float(rows[-1]["kl"]) + 0.3 * float(rows[-1]["ce"])  # alpha T^2 KL + (1 - alpha) CE
    assert float(rows[-1]["loss"]) == pytest.approx(loss, rel=1e-4)
    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest["teacher"]["dir"] == str(teacher_dir) and manifest["teacher"]["mode"] == "online"
    assert load_model_dir(a / "final")[2].stage == "distill"
    recipe = recipe_from_dict(distill_raw(runs["straight"].root, teacher_dir), check_files=False)
    stamp = (a / "manifest.json").stat().st_mtime_ns
    run_distill(recipe, runs["straight"])  # up to date: nothing happens
    assert (a / "manifest.json").stat().st_mtime_ns == stamp


def test_student_pretrain_starts_from_pretrain_final(tmp_path, small_data, tok, teacher_dir):
    from llm_maker.artifacts import write_manifest

    paths = make_run(tmp_path / "run", small_data)
    start = tiny_model(tok.vocab_size, seed=11, **DIMS)
    save_model_dir(paths.final("pretrain"), start, tok, {"stage": "pretrain"})
    write_manifest(paths.pretrain, "pretrain", "f")
    raw = distill_raw(paths.root, teacher_dir, student="pretrain", train={"max_steps": 1, "lr": 1e-9})
    run_distill(recipe_from_dict(raw, check_files=False), paths)
    final = load_model_dir(paths.final("distill"))[0].state_dict()
    assert all(torch.allclose(final[k], v, atol=1e-6) for k, v in start.state_dict().items())
    manifest = json.loads((paths.distill / "manifest.json").read_text())
    assert manifest["student"] == "pretrain"
    assert "pretrain" in load_model_dir(paths.final("distill"))[2].trained_with["upstream"]


def test_cached_mode_writes_the_cache_beside_the_pack_once(tmp_path, small_data, teacher_dir):
    paths = make_run(tmp_path / "run", small_data)
    raw = distill_raw(paths.root, teacher_dir, mode="cached", top_k=8, train={"max_steps": 3})
    run_distill(recipe_from_dict(raw, check_files=False), paths)
    (cache,) = (paths.pack / "teacher").iterdir()
    assert cache.name.endswith("-k8-T2-L32") and (cache / "manifest.json").is_file()
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    rows = metrics(paths.distill)
    assert float(rows[-1]["kl"]) > 0 and float(rows[-1]["teacher_tokens_per_s"]) == 0
    # a second student (another seed) reuses the cache: no file of it is rewritten
    raw = distill_raw(paths.root, teacher_dir, mode="cached", top_k=8, train={"max_steps": 3, "seed": 5})
    run_distill(recipe_from_dict(raw, check_files=False), paths, force=True)
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == stamps
    # the pack stage is still up to date with teacher/ inside it, and its splits read as before
    before = (paths.pack / "manifest.json").read_bytes()
    pack_tokens(PackConfig(workers=1), small_data, paths.tokenizer, paths.pack)
    assert (paths.pack / "manifest.json").read_bytes() == before and cache.is_dir()
    assert np.array_equal(load_split(paths.pack, "train"), load_split(small_data.parent / "pack", "train"))
    assert cache == topk_cache_dir(paths.pack, json.loads(
        (paths.distill / "manifest.json").read_text())["teacher"]["hash"], 8, 2.0, SEQ)


# ----------------------------------------------------------------------------------------
# Two gloo ranks
# ----------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, raws: list[dict]) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from llm_maker.train.distributed import shutdown_distributed

    for raw in raws:
        run_distill(recipe_from_dict(raw, check_files=False), RunPaths.of(raw["run_dir"]))
        dist.barrier()
    shutdown_distributed()


@pytest.mark.slow  # 2 gloo ranks in subprocesses
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_distill_stage_on_two_ranks_equals_one_process(tmp_path, small_data, teacher_dir):
    modes = {"online": {}, "cached": {"mode": "cached", "top_k": 16}, "fsdp2": {"train": {"distributed": "fsdp2"}}}
    raws = {}
    for ranks in ("one", "two"):
        for mode, extra in modes.items():
            paths = make_run(tmp_path / f"{ranks}-{mode}", small_data)
            raws[ranks, mode] = distill_raw(paths.root, teacher_dir, **extra)
    for mode in modes:
        run_distill(recipe_from_dict(raws["one", mode], check_files=False), RunPaths.of(raws["one", mode]["run_dir"]))
    torch.multiprocessing.spawn(_worker, args=(2, free_port(), [raws["two", m] for m in modes]), nprocs=2, join=True)
    for mode in modes:
        one, two = (Path(raws[r, mode]["run_dir"]) / "distill" for r in ("one", "two"))
        assert_same_losses(one, two, abs_=1e-5)
        assert_same_weights(one / "final", two / "final", atol=1e-5)
        manifest = json.loads((two / "manifest.json").read_text())
        assert manifest["summary"]["world_size"] == 2
        assert manifest["teacher"]["mode"] == modes[mode].get("mode", "online")


# ----------------------------------------------------------------------------------------
# SFT with a teacher
# ----------------------------------------------------------------------------------------

def test_sft_with_a_teacher_logs_kl_and_fingerprints_the_teacher(tmp_path, small_data, tok):
    from llm_maker.artifacts import write_manifest
    from llm_maker.sft.stage import run_sft, sft_inputs

    paths = make_run(tmp_path / "run", small_data)
    dims = {**DIMS, "seq_len": 256}
    save_model_dir(paths.final("pretrain"), tiny_model(tok.vocab_size, seed=1, **dims), tok, {"stage": "pretrain"})
    write_manifest(paths.pretrain, "pretrain", "f")
    teachers = [save_model_dir(tmp_path / f"teacher{s}", random_model(tok.vocab_size, seed=s, std=0.1, **dims), tok,
                               {}) for s in (1, 2)]
    train = dict(device="cpu", precision="fp32", max_steps=2, micro_batch_size=4, warmup_steps=1, eval_every=2,
                 eval_batches=1, checkpoint_every=2, log_every=1, progress=False)

    def recipe(teacher):
        return recipe_from_dict({"run_dir": str(paths.root), "sft": {
            "data": {"source": "builtin", "max_conversations": 16, "heldout_fraction": 0.25}, "train": train,
            "distill": {"teacher": str(teacher), "alpha": 0.5, "temperature": 2.0, "teacher_precision": "fp32"}}},
            check_files=False)

    run_sft(recipe(teachers[0]), paths)
    rows = metrics(paths.sft)
    assert all(float(r["kl"]) > 0 and float(r["ce"]) > 0 and float(r["teacher_tokens_per_s"]) > 0 for r in rows)
    fps = [sft_inputs(recipe(t), paths)["config"]["distill"]["teacher"]["hash"] for t in teachers]
    assert fps[0] != fps[1]  # another teacher's weights: another SFT run
    shutil.copytree(teachers[0], tmp_path / "moved")  # the same teacher elsewhere: the same run
    assert sft_inputs(recipe(tmp_path / "moved"), paths)["config"] == sft_inputs(recipe(teachers[0]), paths)["config"]
