"""The chunked cross-entropy: the same loss and gradients as the plain one, without keeping the
(N, V) logits for backward; `CausalLMLoss(model, chunk_size)` against the plain loss; training with it."""
import csv

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_model
from llm_maker.pack.shards import load_split
from llm_maker.recipe import TrainConfig
from llm_maker.tokenizer.tokenizer import Tokenizer
from llm_maker.train.batches import PretrainBatches
from llm_maker.train.loss import CausalLMLoss, linear_cross_entropy
from llm_maker.train.trainer import run_training

N, C, V = 100, 16, 300


def inputs(seed=0, ignore_every=7):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, generator=g, requires_grad=True)
    weight = (0.3 * torch.randn(V, C, generator=g)).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::ignore_every] = -100  # prompt tokens in SFT
    return hidden, weight, targets


def plain(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.t()).float(), targets, ignore_index=-100)


@pytest.mark.parametrize("chunk", [7, 32, 100, 4096])  # not dividing N (twice), exactly N, more than N
def test_same_loss_and_gradients_as_plain_cross_entropy(chunk):
    h, w, t = inputs()
    ref = plain(h, w, t)
    gh, gw = torch.autograd.grad(2.5 * ref, (h, w))  # a non-unit upstream gradient
    out = linear_cross_entropy(h, w, t, chunk)
    gh2, gw2 = torch.autograd.grad(2.5 * out, (h, w))
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)  # fp32 sums in another order
    assert torch.allclose(gh, gh2, atol=1e-7) and torch.allclose(gw, gw2, atol=1e-7)
    assert gh2[::7].abs().max() == 0  # ignored rows get no gradient


def test_bf16_autocast_matches_the_plain_loss_under_autocast():
    h, w, t = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, out = plain(h, w, t), linear_cross_entropy(h, w, t, 32)
    assert out.dtype == torch.float32  # the loss itself is fp32
    assert out.item() == pytest.approx(ref.item(), abs=1e-5)  # same bf16 logits, both reduced in fp32
    gh, gw = torch.autograd.grad(ref, (h, w))
    gh2, gw2 = torch.autograd.grad(out, (h, w))
    assert gh2.dtype == h.dtype and gw2.dtype == w.dtype
    assert torch.allclose(gh, gh2, atol=2e-3, rtol=2e-2) and torch.allclose(gw, gw2, atol=2e-3, rtol=2e-2)


def saved_numels(fn) -> list[int]:
    """Sizes of the tensors autograd keeps from forward for backward."""
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        fn()
    return sizes


def test_no_vocabulary_sized_tensor_is_kept_for_backward():
    h, w, t = inputs()
    assert max(saved_numels(lambda: plain(h, w, t))) >= N * V  # the plain loss keeps the logits
    kept = saved_numels(lambda: linear_cross_entropy(h, w, t, 32))
    assert sum(kept) == N * C + V * C  # only the gradients of hidden and weight


def test_without_autograd_no_gradient_work_is_done():
    h, w, t = inputs()
    with torch.no_grad():
        out = linear_cross_entropy(h, w, t, 32)
    assert out.grad_fn is None and out.item() == pytest.approx(plain(h, w, t).item(), abs=1e-6)


def test_all_ignored_is_nan_like_the_plain_loss_and_bad_chunk_is_an_error():
    h, w, t = inputs()
    t[:] = -100
    assert torch.isnan(linear_cross_entropy(h, w, t, 32)) and torch.isnan(plain(h, w, t))
    with pytest.raises(ValueError, match="chunk_size must be at least 1, got 0"):
        linear_cross_entropy(h, w, t, 0)


@pytest.mark.parametrize("tie", [True, False])
def test_chunked_loss_module_gives_the_same_loss_and_parameter_gradients(tie):
    model = tiny_model(V, seq_len=16, tie_embeddings=tie)
    x, y = torch.randint(0, V, (3, 16)), torch.randint(0, V, (3, 16))
    y[:, :5] = -100
    grads = []
    for chunk in (0, 20):
        model.zero_grad()
        loss = CausalLMLoss(model, chunk)(x, y)
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = grads
    assert l1 == pytest.approx(l0, abs=1e-6)
    assert all(torch.allclose(g0[n], g1[n], atol=1e-6) for n in g0)
    assert CausalLMLoss(model, 20)(x).shape == (3, 16, V)  # without targets: logits, as the model's


def test_training_with_the_chunked_loss_follows_the_same_curve(tmp_path, pack_dir, tokenizer_dir):
    tokenizer = Tokenizer.load(tokenizer_dir)
    curves = []
    for chunk in (0, 50):
        model = tiny_model(tokenizer.vocab_size, seq_len=32)
        batches = PretrainBatches(load_split(pack_dir, "train"), 32, 4, seed=0, val_tokens=load_split(pack_dir, "val"))
        tc = TrainConfig(max_steps=6, micro_batch_size=4, lr=1e-2, warmup_steps=2, eval_every=3, eval_batches=2,
                         precision="fp32",  # two implementations compared to 1e-5: in exact arithmetic
                         checkpoint_every=6, log_every=2, progress=False, device="cpu", loss_chunk_size=chunk)
        run_training(model, batches, tc, tmp_path / str(chunk), tokenizer, {})
        with open(tmp_path / str(chunk) / "metrics.csv", newline="") as f:
            curves.append([(float(r["loss"]), r["val_loss"]) for r in csv.DictReader(f)])
    plain_curve, chunked_curve = curves
    assert len(plain_curve) == len(chunked_curve) == 4  # steps 2, 3 (validation), 4, 6
    for (a, va), (b, vb) in zip(plain_curve, chunked_curve, strict=False):
        assert a == pytest.approx(b, abs=1e-5) and (va == vb == "" or float(va) == pytest.approx(float(vb), abs=1e-5))
