"""export/gguf_export.py: the file read back with gguf's own reader has llama.cpp's tensor names,
shapes, dtypes and metadata; the q/k permutation keeps every attention score under llama.cpp's
interleaved RoPE; and, where llama-cpp-python is installed, its greedy continuation is ours."""
import json

import numpy as np
import pytest
import torch

from llm_maker.errors import LLMMakerError
from llm_maker.export.gguf_export import export_gguf, permute_for_llama_cpp
from llm_maker.model.llama import apply_rope, rope_cos_sin
from llm_maker.serve.generate import generate
from llm_maker.sft.templates import hf_tokenizer_config, jinja_chat_template, stop_token_ids
from llm_maker.tokenizer.tokenizer import Tokenizer
from llm_maker.train.checkpoint import load_model_dir, save_model_dir

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir, prose_texts):
    from helpers import prose_tokens, train_tiny

    tok = Tokenizer.load(tokenizer_dir)
    model = train_tiny(prose_tokens(tok, prose_texts[:1200]), tok, tie=False, steps=20)
    out = save_model_dir(tmp_path_factory.mktemp("g") / "run" / "sft" / "final", model, tok,
                         {"stage": "sft", "recipe": "tiny", "chat_template": "chatml",
                          "stop_token_ids": stop_token_ids(tok, "chatml")})
    (out / "tokenizer_config.json").write_text(json.dumps(hf_tokenizer_config("chatml", 64)))
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory, model_dir):
    root = tmp_path_factory.mktemp("gguf")
    return {dt: export_gguf(model_dir, root / f"m-{dt}.gguf", dtype=dt) for dt in ("f16", "f32")}


def field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.slow
def test_tensor_names_shapes_and_dtypes(files, model_dir):
    model, _, _ = load_model_dir(model_dir)
    reader = gguf.GGUFReader(files["f16"])
    tensors = {t.name: t for t in reader.tensors}
    per_block = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"}  # untied: output.weight is its own
    expected |= {f"blk.{i}.{n}.weight" for i in range(2) for n in per_block}
    assert set(tensors) == expected
    sd = model.state_dict()
    assert tensors["token_embd.weight"].data.shape == tuple(sd["embed_tokens.weight"].shape) == (512, 64)
    assert tensors["blk.1.attn_k.weight"].data.shape == (32, 64)  # 2 kv heads x 16
    assert tensors["blk.0.ffn_down.weight"].data.shape == (64, 160)
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # norms stay f32
    f32 = {t.name: np.array(t.data) for t in gguf.GGUFReader(files["f32"]).tensors}
    np.testing.assert_array_equal(f32["blk.1.ffn_gate.weight"], sd["layers.1.mlp.gate_proj.weight"].numpy())
    np.testing.assert_array_equal(f32["blk.0.attn_v.weight"], sd["layers.0.self_attn.v_proj.weight"].numpy())
    np.testing.assert_allclose(np.array(tensors["output.weight"].data, dtype=np.float32),
                               sd["lm_head.weight"].numpy(), atol=1e-3)  # f16 rounding only


@pytest.mark.slow
def test_metadata(files, model_dir):
    _, tok, _ = load_model_dir(model_dir)
    r = gguf.GGUFReader(files["f16"])
    assert field(r, "general.architecture") == "llama"
    want = {"llama.context_length": 64, "llama.embedding_length": 64, "llama.block_count": 2,
            "llama.feed_forward_length": 160, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
            "llama.rope.dimension_count": 16, "llama.vocab_size": 512, "general.file_type": 1,
            "tokenizer.ggml.eos_token_id": tok.im_end_id, "tokenizer.ggml.eot_token_id": tok.im_end_id,
            "tokenizer.ggml.padding_token_id": tok.pad_id, "tokenizer.ggml.add_bos_token": False}
    assert {k: field(r, k) for k in want} == want
    assert field(r, "llama.rope.freq_base") == 5000.0
    assert field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert (field(r, "tokenizer.ggml.model"), field(r, "tokenizer.ggml.pre")) == ("gpt2", "gpt-2")
    tokens = field(r, "tokenizer.ggml.tokens")
    vocab = tok.hf.get_vocab(with_added_tokens=True)
    assert len(tokens) == 512 and all(tokens[i] == t for t, i in vocab.items())
    types = field(r, "tokenizer.ggml.token_type")
    assert [types[i] for i in range(4)] == [gguf.TokenType.CONTROL] * 4 and types[300] == gguf.TokenType.NORMAL
    merges = json.loads(tok.hf.to_str())["model"]["merges"]
    assert field(r, "tokenizer.ggml.merges")[:3] == [m if isinstance(m, str) else " ".join(m) for m in merges[:3]]
    assert field(r, "tokenizer.chat_template") == jinja_chat_template("chatml")
    assert field(gguf.GGUFReader(files["f32"]), "general.file_type") == 0


def interleaved_rope(x: np.ndarray, pos: np.ndarray, theta: float) -> np.ndarray:
    """llama.cpp's LLAMA rope (GGML_ROPE_TYPE_NORM): rotate adjacent pairs (x0,x1), (x2,x3), ...
    x: (T, heads, hd)."""
    hd = x.shape[-1]
    freq = theta ** (-np.arange(0, hd, 2) / hd)  # (hd/2,)
    ang = pos[:, None, None] * freq[None, None, :]  # (T, 1, hd/2)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * np.cos(ang) - b * np.sin(ang)
    out[..., 1::2] = a * np.sin(ang) + b * np.cos(ang)
    return out


@pytest.mark.slow
def test_permuted_q_k_give_our_attention_scores_under_interleaved_rope(files, model_dir):
    model, _, _ = load_model_dir(model_dir)
    cfg = model.config
    f32 = {t.name: np.array(t.data, dtype=np.float64) for t in gguf.GGUFReader(files["f32"]).tensors}
    h = torch.randn(10, cfg.d_model, generator=torch.Generator().manual_seed(0))  # 10 positions of hidden states
    pos = np.arange(10)
    attn = model.layers[1].self_attn
    cos, sin = rope_cos_sin(torch.arange(10), cfg.head_dim, cfg.rope_theta)
    with torch.no_grad():
        q = apply_rope(attn.q_proj(h).view(10, 4, 16).transpose(0, 1), cos, sin)  # (heads, T, hd)
        k = apply_rope(attn.k_proj(h).view(10, 2, 16).transpose(0, 1), cos, sin)
    ours = torch.einsum("htd,hsd->hts", q, k.repeat_interleave(2, dim=0)).numpy()  # GQA: 2 q heads per kv head
    hn = h.double().numpy()
    q2 = interleaved_rope((hn @ f32["blk.1.attn_q.weight"].T).reshape(10, 4, 16), pos, cfg.rope_theta)
    k2 = interleaved_rope((hn @ f32["blk.1.attn_k.weight"].T).reshape(10, 2, 16), pos, cfg.rope_theta)
    theirs = np.einsum("thd,shd->hts", q2, np.repeat(k2, 2, axis=1))
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    # without the permutation the scores differ: the test can fail
    q3 = interleaved_rope((hn @ attn.q_proj.weight.detach().double().numpy().T).reshape(10, 4, 16), pos, cfg.rope_theta)
    k3 = interleaved_rope((hn @ attn.k_proj.weight.detach().double().numpy().T).reshape(10, 2, 16), pos, cfg.rope_theta)
    assert np.abs(np.einsum("thd,shd->hts", q3, np.repeat(k3, 2, axis=1)) - ours).max() > 1e-2


def test_permutation_is_llama_cpp_s():
    w = torch.arange(2 * 8 * 3).reshape(16, 3)  # 2 heads of hd 8, 3 input features
    p = permute_for_llama_cpp(w, 2)
    assert p[:, 0].tolist() == [0, 12, 3, 15, 6, 18, 9, 21, 24, 36, 27, 39, 30, 42, 33, 45]  # rows 0,4,1,5,.. per head


@pytest.mark.slow
def test_existing_file_is_not_replaced_without_force(tmp_path, model_dir):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep")
    with pytest.raises(LLMMakerError, match=r"m.gguf exists; pass --force"):
        export_gguf(model_dir, out)
    assert out.read_bytes() == b"keep"
    with pytest.raises(LLMMakerError, match="is a directory"):
        export_gguf(model_dir, tmp_path)
    with pytest.raises(LLMMakerError, match="f16"):
        export_gguf(model_dir, tmp_path / "q.gguf", dtype="q4_0")
    export_gguf(model_dir, out, force=True)
    assert out.read_bytes()[:4] == b"GGUF"


@pytest.mark.slow
def test_llama_cpp_greedy_continuation_matches_ours(files, model_dir):
    llama_cpp = pytest.importorskip("llama_cpp")
    model, tok, _ = load_model_dir(model_dir)
    llm = llama_cpp.Llama(model_path=str(files["f32"]), n_ctx=64, verbose=False, logits_all=False)
    ids = tok.encode("The return statement")
    mine = list(generate(model, ids, 16))
    theirs = []
    for t in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        theirs.append(t)
        if len(theirs) == 16:
            break
    assert theirs == mine
