"""Muon for the blocks' matrices, AdamW for the rest: the split, the update, resume, the recipe switch."""
import csv
import math

import pytest
import torch

from helpers import tiny_model
from llm_maker.errors import RecipeError
from llm_maker.pack.shards import load_split
from llm_maker.recipe import TrainConfig, recipe_from_dict
from llm_maker.tokenizer.tokenizer import Tokenizer
from llm_maker.train.batches import PretrainBatches
from llm_maker.train.checkpoint import load_model_dir
from llm_maker.train.loss import CausalLMLoss
from llm_maker.train.muon import MuonWithAdamW, split_parameters
from llm_maker.train.trainer import make_optimizer, run_training


def config(**kw):
    base = dict(precision="fp32",  # equivalences to 1e-5 are checked in fp32
                optimizer="muon", max_steps=20, micro_batch_size=4, lr=3e-2, warmup_steps=3, eval_every=10,
                eval_batches=2, checkpoint_every=10, log_every=5, progress=False, device="cpu")
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("tie", [True, False])
def test_blocks_matrices_go_to_muon_everything_else_to_adamw(tie):
    model = tiny_model(512, seq_len=32, tie_embeddings=tie)
    muon, decay, no_decay = split_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in muon) == sorted(
        f"layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                      "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                                                      "mlp.gate_proj.weight", "mlp.up_proj.weight",
                                                      "mlp.down_proj.weight"))
    assert sorted(names[id(p)] for p in decay) == (["embed_tokens.weight"] if tie
                                                    else ["embed_tokens.weight", "lm_head.weight"])
    assert all(p.dim() == 1 for p in no_decay) and len(no_decay) == 2 * 2 + 1  # two norms per block + final
    everything = {id(p) for p in model.parameters()}
    assert len(muon) + len(decay) + len(no_decay) == len(everything)  # each parameter exactly once


def test_muon_step_is_an_orthogonalised_update():
    """One step from zero momentum moves a matrix by lr * 0.2 * sqrt(max(A, B)) * (an orthogonal-ish matrix)."""
    model = tiny_model(512, seq_len=32)
    opt = make_optimizer(model, config(weight_decay=0.0, lr=0.01), torch.device("cpu"))
    assert isinstance(opt, MuonWithAdamW) and len(opt.param_groups) == 3
    w = model.layers[0].mlp.up_proj.weight  # (64, 32)
    before = w.detach().clone()
    x = torch.randint(0, 512, (4, 32))
    CausalLMLoss(model)(x, x).backward()
    opt.step()
    update = (before - w.detach()) / (0.01 * 0.2 * math.sqrt(64))
    s = torch.linalg.svdvals(update)
    assert s.min() > 0.5 and s.max() < 1.5  # Newton-Schulz: singular values pushed to ~1 (Keller Jordan's bound)
    g = torch.linalg.svdvals(before)  # the raw init is nowhere near orthogonal
    assert g.max() / g.min() > 3


@pytest.mark.slow
def test_muon_trains_and_resumes_exactly(tmp_path, pack_dir, tokenizer_dir):
    tokenizer = Tokenizer.load(tokenizer_dir)

    def batches(stop_at=None, out=None):
        class Stopping(PretrainBatches):
            def micro_batch(self, index):
                if index == stop_at:
                    (out / "STOP").touch()
                return super().micro_batch(index)
        return Stopping(load_split(pack_dir, "train"), 32, 4, seed=0, val_tokens=load_split(pack_dir, "val"))

    a, b = tmp_path / "a", tmp_path / "b"
    summary = run_training(tiny_model(512, seq_len=32), batches(), config(), a, tokenizer, {})
    assert summary["val_loss"] < math.log(tokenizer.vocab_size) - 0.7  # well below uniform guessing (6.24)
    b.mkdir()
    summary_b = run_training(tiny_model(512, seq_len=32), batches(stop_at=7, out=b), config(), b, tokenizer, {})
    assert summary_b["steps"] == 8
    run_training(tiny_model(512, seq_len=32), batches(), config(), b, tokenizer, {}, resume=True)

    def rows(d):
        return list(csv.DictReader(open(d / "metrics.csv", newline="")))
    ra, rb = rows(a), rows(b)
    assert float(rb[-1]["loss"]) == pytest.approx(float(ra[-1]["loss"]), abs=1e-5)
    wa, wb = load_model_dir(a / "final")[0].state_dict(), load_model_dir(b / "final")[0].state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_adamw_checkpoint_does_not_load_into_muon():
    model = tiny_model(512, seq_len=32)
    adamw = make_optimizer(model, config(optimizer="adamw"), torch.device("cpu"))
    muon = make_optimizer(model, config(), torch.device("cpu"))
    with pytest.raises(ValueError, match="train.optimizer: adamw"):
        muon.load_state_dict(adamw.state_dict())


@pytest.mark.parametrize("train,message", [
    ({"optimizer": "sgd"}, "`train.optimizer` must be adamw or muon, got 'sgd'"),
    ({"optimizer": "muon", "distributed": "fsdp2"}, "`train.optimizer` is muon, which needs whole matrices"),
    ({"distributed": "deepspeed"}, "`train.distributed` must be ddp or fsdp2, got 'deepspeed'"),
    ({"loss_chunk_size": -1}, "`train.loss_chunk_size` must be >= 0"),
])
def test_recipe_switches_are_validated(train, message):
    with pytest.raises(RecipeError, match="^r.yaml: " + message.replace("(", r"\(")):
        recipe_from_dict({"train": train}, recipe_file="r.yaml")
    assert recipe_from_dict({"train": {"optimizer": "muon"}}, recipe_file="r.yaml").train.optimizer == "muon"
