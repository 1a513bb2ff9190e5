"""The decoder: parameter-count formula for every preset, KV-cache equivalence (the caches of
serve/kv_cache.py), GQA, shapes, rotary tables."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from llm_maker.model.llama import LlamaConfig, LlamaModel, count_parameters
from llm_maker.model.presets import PRESETS, resolve_model_config
from llm_maker.serve.kv_cache import BatchKVCache, KVCache
from llm_maker.train.loss import CausalLMLoss

PUBLISHED_COUNTS = {  # the parameter counts published for models of these shapes
    "12m": 12_194_048,   # the LLM Maker design doc, model B
    "100m": 97_536_768,  # the LLM Maker design doc, model D
    "135m": 134_515_008,  # l20-edu-135m
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_formula_matches_built_model(name):
    cfg = resolve_model_config(SimpleNamespace(preset=name))
    with torch.device("meta"):  # no memory for the large presets
        model = LlamaModel(cfg)
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())
    if name in PUBLISHED_COUNTS:
        assert count_parameters(cfg) == PUBLISHED_COUNTS[name]


def test_untied_head_is_a_separate_matrix():
    cfg = LlamaConfig(vocab_size=300, n_layers=1, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64, seq_len=16,
                      tie_embeddings=False)
    m = LlamaModel(cfg)
    assert m.lm_head.weight.data_ptr() != m.embed_tokens.weight.data_ptr()
    assert count_parameters(cfg) == m.num_parameters()
    tied = LlamaModel(LlamaConfig(**{**cfg.to_dict(), "tie_embeddings": True}))
    assert m.num_parameters() - tied.num_parameters() == 300 * 32


@pytest.mark.parametrize("bad,field", [
    (dict(d_model=130, n_heads=4), "d_model"),
    (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
])
def test_impossible_shapes_name_the_field(bad, field):
    cfg = LlamaConfig(**{**LlamaConfig().to_dict(), **bad})
    with pytest.raises(ValueError, match=field):
        cfg.validate()


def _tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**dict(vocab_size=97, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=48,
                                seq_len=32), **kw})
    return LlamaModel(cfg).eval()


def test_kv_cache_matches_full_forward_in_chunks():
    model = _tiny()
    x = torch.randint(0, 97, (2, 24))
    full = model(x)
    cache = KVCache(model.config, batch_size=2, max_len=32, device="cpu")
    parts = [model(x[:, a:b], cache=cache) for a, b in ((0, 10), (10, 11), (11, 20), (20, 24))]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)
    assert cache.pos == 24


def test_batch_kv_cache_rows_continue_their_own_sequences():
    """Rows of different lengths, prefilled one by one, then decoded together (joining, leaving
    and moving rows between steps) give each sequence's own full-forward logits."""
    model = _tiny(n_kv_heads=2)
    torch.manual_seed(1)
    cache = BatchKVCache(model.config, max_rows=3, max_len=32, device="cpu")
    seqs: list[list[int]] = []

    def join(n: int) -> None:
        seqs.append(torch.randint(0, 97, (n,)).tolist())
        row = cache.add_row()
        cache.select(slice(row, row + 1))
        logits = model(torch.tensor([seqs[-1]]), cache=cache)
        assert torch.allclose(logits, model(torch.tensor([seqs[-1]])), atol=1e-5)

    join(5), join(11)
    for step in range(8):
        if step == 2:
            join(3)  # a newcomer with a short prompt (stale, longer keys may sit past its end)
        if step == 4:
            cache.remove_row(0)  # the first leaves; the last row moves into its place
            seqs[0] = seqs.pop()
        new = torch.randint(0, 97, (len(seqs), 1))
        for s, t in zip(seqs, new[:, 0].tolist(), strict=False):
            s.append(t)
        cache.select(slice(0, cache.n))
        logits = model(new, cache=cache)[:, -1]
        expected = torch.stack([model(torch.tensor([s]))[0, -1] for s in seqs])
        assert torch.allclose(logits, expected, atol=1e-5), step
    assert cache.lengths == [len(s) for s in seqs]
    with pytest.raises(ValueError, match="all 3 rows are in use"):
        cache.add_row(), cache.add_row()


def test_gqa_equals_attention_with_repeated_kv_heads():
    """A GQA model equals an MHA model whose k/v projections repeat each KV head per group."""
    gqa = _tiny(n_kv_heads=2)
    mha = _tiny(n_kv_heads=4)
    sd = gqa.state_dict()
    hd = gqa.config.head_dim
    for i in range(gqa.config.n_layers):
        for proj in ("k_proj", "v_proj"):
            w = sd[f"layers.{i}.self_attn.{proj}.weight"].view(2, hd, -1)
            sd[f"layers.{i}.self_attn.{proj}.weight"] = w.repeat_interleave(2, dim=0).reshape(4 * hd, -1)
    mha.load_state_dict(sd)
    x = torch.randint(0, 97, (1, 16))
    assert torch.allclose(gqa(x), mha(x), atol=1e-5)


def test_causality_future_tokens_do_not_change_past_logits():
    model = _tiny()
    x = torch.randint(0, 97, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 97
    assert torch.allclose(model(x)[0, :10], model(y)[0, :10], atol=1e-6)


def test_loss_ignores_minus_100_and_equals_cross_entropy():
    model = _tiny()
    x = torch.randint(0, 97, (2, 8))
    t = torch.randint(0, 97, (2, 8))
    t[:, :3] = -100
    logits = model(x)
    expected = F.cross_entropy(logits.view(-1, 97), t.view(-1), ignore_index=-100)
    assert torch.allclose(CausalLMLoss(model)(x, t), expected, atol=1e-6)


def test_a_few_steps_reduce_the_loss():
    model = _tiny().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 97, (4, 16))
    losses = []
    for _ in range(20):
        loss = CausalLMLoss(model)(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.5


def test_weight_decay_only_on_matrices():
    model = _tiny()
    decay, no_decay = model.weight_decay_groups(0.1)
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    total = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert total == model.num_parameters()


def test_logits_are_the_head_over_the_hidden_states():
    model = _tiny()
    x = torch.randint(0, 97, (2, 12))
    hidden = model.hidden_states(x)
    assert hidden.shape == (2, 12, 32)
    assert torch.equal(model(x), model.lm_head(hidden))
    assert not hasattr(model, "loss_chunk_size") and not hasattr(model, "activation_checkpointing")


def test_set_rope_replaces_the_tables_and_keeps_the_config():
    model = _tiny()
    x = torch.randint(0, 97, (1, 20))
    before = model(x)
    model.set_rope(50_000.0, 64)
    assert model.context_len == 64 and model.rope_cos.shape == (64, model.config.head_dim)
    assert model.config.seq_len == 32 and model.config.rope_theta == 10000.0  # still the trained values
    hd = model.config.head_dim
    assert model.rope_cos[1, 1].item() == pytest.approx(math.cos(50_000.0 ** (-2 / hd)))  # second frequency
    assert not torch.equal(model(x), before)
    model.set_rope(10000.0, 32)
    assert torch.equal(model(x), before)


def test_positions_past_the_tables_are_computed():
    """A cache longer than the rotary tables: positions beyond them get the same angles the
    tables would have held."""
    model = _tiny()  # tables for 32 positions
    x = torch.randint(0, 97, (1, 40))
    wide = _tiny()
    wide.set_rope(10000.0, 48)
    cache = KVCache(model.config, batch_size=1, max_len=48, device="cpu")
    assert torch.allclose(model(x, cache=cache), wide(x), atol=1e-5)
