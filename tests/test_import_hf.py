"""export/import_hf.py and tokenizer/pretrained.py: a Llama that transformers itself creates and
saves becomes an llm-maker run (same logits, same greedy tokens, SFT runs on it); unsupported
architectures and occupied targets are refused before anything is written; pretrained tokenizers
(tokenizer.json, slow-tokenizer folders, .tiktoken files) encode as their source does."""
import base64
import json

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llm_maker.artifacts import read_manifest
from llm_maker.cli import main
from llm_maker.errors import LLMMakerError, RecipeError
from llm_maker.export.import_hf import import_hf, llama_config_from_hf
from llm_maker.layout import RunPaths
from llm_maker.recipe import TokenizerConfig, recipe_from_dict
from llm_maker.serve.generate import generate
from llm_maker.tokenizer.pretrained import load_pretrained_tokenizer, special_token_layout
from llm_maker.tokenizer.stage import build_tokenizer
from llm_maker.train.checkpoint import load_model_dir

transformers = pytest.importorskip("transformers")


def foreign_tokenizer(texts, specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>")) -> HFTokenizer:
    """A byte-level BPE made elsewhere: no <|pad|>, like SmolLM2's (which has the other three)."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return hf


def smol_llama(path, texts, tie=True, shard=False):
    """A SmolLM2-shaped (GQA, tied) Llama, tiny, created and saved by transformers itself."""
    path.mkdir(parents=True)
    foreign_tokenizer(texts).save(str(path / "tokenizer.json"))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie,
                                   bos_token_id=0, eos_token_id=0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # weights of real scale, not init's near-zeros, so logits are distinctive
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    model.save_pretrained(path, max_shard_size="200KB" if shard else "50GB")
    return model.eval()


@pytest.fixture(scope="module")
def texts(prose_texts):
    return prose_texts[:300]


@pytest.mark.parametrize("tie,shard", [(True, False), (False, True)])
def test_import_gives_transformers_logits_and_greedy_tokens(tmp_path, texts, tie, shard):
    hf = smol_llama(tmp_path / "smol", texts, tie=tie, shard=shard)
    if shard:
        assert (tmp_path / "smol" / "model.safetensors.index.json").is_file()
    run = import_hf(tmp_path / "smol", tmp_path / "run")
    model, tok, meta = load_model_dir(run / "pretrain" / "final")
    cfg = model.config
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_mlp, cfg.seq_len) == (2, 64, 4, 2, 160, 128)
    assert (cfg.tie_embeddings, cfg.rope_theta, cfg.norm_eps) == (tie, 5000.0, 1e-5)
    assert tok.vocab_size == cfg.vocab_size == 401 and tok.pad_id == 400  # <|pad|> appended, a row added
    assert (tok.eos_id, tok.im_start_id, tok.im_end_id) == (0, 1, 2)  # the source's own ids are kept
    assert meta.imported_from.endswith("smol")
    ids = tok.encode(texts[5][:200])
    with torch.no_grad():
        ours, theirs = model.eval()(torch.tensor([ids])), hf(torch.tensor([ids])).logits
    assert (ours[..., :400] - theirs).abs().max().item() < 1e-4
    new_row = model.embed_tokens.weight[400]
    assert torch.allclose(new_row, model.embed_tokens.weight[:400].mean(0))  # the mean: a neutral start
    mine = list(generate(model, ids[:12], 20))
    assert hf.generate(torch.tensor([ids[:12]]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                       pad_token_id=0)[0, 12:].tolist() == mine
    assert read_manifest(run / "tokenizer")["tokenizer_hash"] == tok.hash
    assert read_manifest(run / "pretrain")["stage"] == "pretrain"


def test_sft_runs_on_an_imported_model(tmp_path, texts):
    smol_llama(tmp_path / "smol", texts)
    assert main(["import-hf", str(tmp_path / "smol"), "--out", str(tmp_path / "run")]) == 0
    train = dict(max_steps=3, micro_batch_size=4, lr=1e-3, warmup_steps=1, eval_every=3, eval_batches=1,
                 checkpoint_every=3, log_every=1, progress=False, device="cpu")
    recipe = recipe_from_dict({"run_dir": str(tmp_path / "run"),
                               "sft": {"data": {"max_conversations": 40}, "train": train}})
    from llm_maker.sft.stage import run_sft

    out = run_sft(recipe, RunPaths.of(tmp_path / "run"))
    model, tok, meta = load_model_dir(out / "final")
    assert meta.stage == "sft" and meta.steps == 3 and model.config.vocab_size == 401
    hf_tok = transformers.AutoTokenizer.from_pretrained(out / "final")
    assert hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], return_dict=False)[0] == tok.im_start_id


def write_config(path, **changes):
    base = transformers.LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2).to_dict()
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**base, "architectures": ["LlamaForCausalLM"], **changes}))
    return path


@pytest.mark.parametrize("changes,message", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]},
     r"unsupported architecture \['GPT2LMHeadModel'\] \(model_type 'gpt2'\)"),
    ({"model_type": "qwen2"}, "model_type 'qwen2'"),
    ({"attention_bias": True}, "`attention_bias` is True; only False"),
    ({"hidden_act": "gelu"}, "`hidden_act` is 'gelu'"),
    ({"head_dim": 32}, "`head_dim` 32 x 4 heads != hidden_size 64"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope type 'llama3'"),
])
def test_unsupported_checkpoints_are_refused_and_nothing_is_written(tmp_path, changes, message):
    src = write_config(tmp_path / "src", **changes)
    with pytest.raises(LLMMakerError, match=rf"config.json: .*{message}"):
        import_hf(src, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_config_mapping_reads_4x_and_5x_rope_fields():
    common = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                  num_attention_heads=2)
    assert llama_config_from_hf({**common, "rope_theta": 123.0}, "c").rope_theta == 123.0
    assert llama_config_from_hf({**common, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}},
                                "c").rope_theta == 7.0
    assert llama_config_from_hf(common, "c").n_kv_heads == 2


def test_occupied_target_is_refused_and_untouched(tmp_path, texts, capsys):
    smol_llama(tmp_path / "smol", texts)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert main(["import-hf", str(tmp_path / "smol"), "--out", str(tmp_path / "run")]) == 2
    assert "exists and is not empty; pass --force" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["notes.txt"]
    assert main(["import-hf", str(tmp_path / "nothing"), "--out", str(tmp_path / "r2")]) == 2
    assert "no config.json" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- tokenizers

def test_slow_tokenizer_folder_is_converted_by_transformers(tmp_path, texts):
    """vocab.json + merges.txt (a GPT-2 style slow tokenizer, no tokenizer.json) -> the same ids."""
    fast = foreign_tokenizer(texts)
    raw = json.loads(fast.to_str())
    folder = tmp_path / "slow"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(raw["model"]["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in raw["model"]["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    tok = load_pretrained_tokenizer(folder)
    for text in texts[:50]:
        assert tok.encode(text) == fast.encode(text).ids
    assert tok.pad_id == tok.vocab_size - 1


def write_tiktoken(path, texts, n_ranks=300):
    """A small .tiktoken file (base64 token, rank) learned by tiktoken's own BPE trainer with
    r50k_base's split pattern (GPT-2's)."""
    from tiktoken._educational import bpe_train
    from tiktoken_ext.openai_public import r50k_pat_str

    ranks = bpe_train("\n\n".join(texts)[:12000], n_ranks, r50k_pat_str, visualise=None)
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks.items()))
    return ranks, r50k_pat_str


def test_tiktoken_file_encodes_exactly_as_tiktoken(tmp_path, texts, data_dir):
    import tiktoken

    path = tmp_path / "tiny.tiktoken"
    ranks, pattern = write_tiktoken(path, texts)
    reference = tiktoken.Encoding("tiny", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    tok = load_pretrained_tokenizer(path, tiktoken_encoding="r50k_base")
    for text in texts + ["naïve café 日本語 🙂  spaces\n\n\tand tabs", "x = f(1234567) + 'it's'"]:
        assert tok.encode(text) == reference.encode(text)
        assert tok.decode(tok.encode(text)) == text
    # not the published r50k file: its <|endoftext|> (50256 there) follows the 300 ranks, then ours
    assert tok.eos_id == 300 and (tok.pad_id, tok.im_start_id, tok.im_end_id) == (301, 302, 303)
    assert tok.vocab_size == 304
    # through the recipe and the tokenizer stage
    cfg = TokenizerConfig(type="pretrained", path=str(path), tiktoken_encoding="r50k_base")
    out = build_tokenizer(cfg, data_dir, tmp_path / "tok")
    assert read_manifest(out)["vocab_size"] == 304
    with pytest.raises(RecipeError, match=r"tokenizer.tiktoken_encoding: 'tiny' \(from tiny.tiktoken\) is not a "
                                          r"tiktoken encoding"):
        load_pretrained_tokenizer(path)
    (tmp_path / "bad.tiktoken").write_text("!!! 0\n")
    with pytest.raises(RecipeError, match=r"bad.tiktoken:1 is not a `base64-token rank` line"):
        load_pretrained_tokenizer(tmp_path / "bad.tiktoken", "r50k_base")


def test_published_cl100k_ids_are_kept_with_reserved_fillers():
    cl100k = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
              "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}
    layout = dict(special_token_layout(100256, cl100k, at_registry_ids=True))
    assert layout[100257] == "<|endoftext|>" and layout[100276] == "<|endofprompt|>"
    assert layout[100256] == "<|reserved_100256|>" and sorted(layout) == list(range(100256, 100277))  # no gaps
    assert special_token_layout(10, cl100k, at_registry_ids=False)[0] == (10, "<|endoftext|>")


def test_continued_pretraining_starts_from_the_imported_weights(tmp_path, texts, prose_jsonl):
    smol_llama(tmp_path / "smol", texts)
    assert main(["import-hf", str(tmp_path / "smol"), "--out", str(tmp_path / "imported")]) == 0
    imported = tmp_path / "imported"
    base = {"run_dir": str(tmp_path / "cont"),
            "data": {"sources": [{"type": "jsonl", "path": str(prose_jsonl)}]},
            "tokenizer": {"type": "pretrained", "path": str(imported / "tokenizer")},
            "model": {"init_from": str(imported / "pretrain" / "final")},
            "train": dict(max_steps=1, micro_batch_size=2, lr=1e-12, warmup_steps=0, eval_every=1, eval_batches=1,
                          checkpoint_every=1, log_every=1, progress=False, device="cpu"),
            "sft": {"enabled": False}, "eval": {"enabled": False}}
    recipe = tmp_path / "cont.yaml"
    recipe.write_text(json.dumps(base))
    assert main(["pipeline", str(recipe)]) == 0
    start, tok0, _ = load_model_dir(imported / "pretrain" / "final")
    after, tok1, meta = load_model_dir(tmp_path / "cont" / "pretrain" / "final")
    assert tok1.hash == tok0.hash and meta.steps == 1
    for name, w in start.state_dict().items():  # an lr of 1e-12 leaves the imported weights in place
        assert torch.allclose(w, after.state_dict()[name], atol=1e-6), name

    base["model"]["n_layers"] = 3
    recipe.write_text(json.dumps(base))
    with pytest.raises(RecipeError, match="model.n_layers.*init_from"):
        recipe_from_dict(base)
