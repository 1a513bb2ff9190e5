"""tokenizer/: byte round trips, special tokens, the stage (bpe and pretrained), its manifest."""
import json
import random
import shutil

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from llm_maker.artifacts import read_manifest
from llm_maker.errors import LLMMakerError, RecipeError
from llm_maker.recipe import TokenizerConfig
from llm_maker.tokenizer.stage import build_tokenizer, bytes_per_token, capped_training_texts
from llm_maker.tokenizer.tokenizer import SPECIAL_TOKENS, Tokenizer, train_bpe

UNICODE_SAMPLES = [
    "plain ASCII, with punctuation: (a+b)*c != d; {x: 1}",
    "naïve café — “quotes” and ‘apostrophes’ … ½ ≤ ∞",
    "日本語のテキストと中文文本，한국어 텍스트",
    "emoji 🙂👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
    "combining: e\u0301 a\u0308 \u0915\u094d\u0937 RTL: שלום عربى",
    "whitespace\t\ttabs\r\nCRLF\n\n  leading   spaces\u00a0nbsp\u2003em",
    "control \x00 NUL \x1b[31mANSI\x1b[0m \u200b zero-width \ufeff BOM",
    "",
    " ",
    "\n",
]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer.load(tokenizer_dir)


def random_unicode(rng, n):
    """Random code points across all planes except surrogates (which UTF-8 cannot encode)."""
    out = []
    while len(out) < n:
        cp = rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0x80, 0x800), rng.randrange(0x800, 0xD800),
                         rng.randrange(0xE000, 0x10000), rng.randrange(0x10000, 0x110000)])
        out.append(chr(cp))
    return "".join(out)


def test_any_unicode_text_round_trips_byte_for_byte(tok):
    rng = random.Random(0)
    texts = UNICODE_SAMPLES + [random_unicode(rng, rng.randrange(1, 200)) for _ in range(200)]
    for text in texts:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids).encode("utf-8") == text.encode("utf-8")
    assert [tok.decode(ids) for ids in tok.encode_batch(texts)] == texts


def test_special_tokens_have_fixed_ids_and_encode_as_one_token(tok):
    assert [tok.token_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert (tok.eos_id, tok.pad_id, tok.im_start_id, tok.im_end_id) == (0, 1, 2, 3)
    ids = tok.encode("<|im_start|>user\nhi<|im_end|><|endoftext|>")
    assert ids[0] == 2 and ids[-2:] == [3, 0]
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_stage_manifest_describes_the_tokenizer(tokenizer_dir, data_dir, tok):
    m = read_manifest(tokenizer_dir)
    assert m["stage"] == "tokenizer" and m["type"] == "bpe"
    assert m["vocab_size"] == tok.vocab_size == 512
    assert m["special_tokens"] == {"<|endoftext|>": 0, "<|pad|>": 1, "<|im_start|>": 2, "<|im_end|>": 3}
    assert m["tokenizer_hash"] == tok.hash  # the hash a checkpoint will be checked against
    # a 512-token BPE on English prose compresses to ~2.5-3.5 bytes per token (bytes alone: 1.0)
    assert 2.0 < m["bytes_per_token"] < 4.0


def test_bytes_per_token_is_utf8_bytes_over_tokens(tok):
    texts = ["héllo wörld", "abc"]
    n_tokens = sum(len(tok.encode(t)) for t in texts)
    assert bytes_per_token(tok, texts) == pytest.approx((13 + 3) / n_tokens)


def test_stage_skips_when_unchanged_and_rebuilds_on_config_change(tmp_path, data_dir):
    out = tmp_path / "tok"
    cfg = TokenizerConfig(vocab_size=300)
    build_tokenizer(cfg, data_dir, out)
    first = read_manifest(out)["created_unix"]
    build_tokenizer(cfg, data_dir, out)
    assert read_manifest(out)["created_unix"] == first
    build_tokenizer(TokenizerConfig(vocab_size=320), data_dir, out)
    assert read_manifest(out)["vocab_size"] == 320


def test_max_train_chars_takes_a_fixed_hash_ordered_sample(data_dir):
    sample = list(capped_training_texts(data_dir, 20_000))
    assert sum(map(len, sample)) == 20_000
    assert sample == list(capped_training_texts(data_dir, 20_000))
    train = list(capped_training_texts(data_dir, None))
    assert len(sample) < len(train) and sample != train[: len(sample)]  # a sample, not the file's head


def test_bpe_training_is_deterministic(prose_texts):
    a = train_bpe(iter(prose_texts[:200]), 300, 2)
    b = train_bpe(iter(prose_texts[:200]), 300, 2)
    assert a.hash == b.hash


# --------------------------------------------------------------------------------------
# pretrained
# --------------------------------------------------------------------------------------

def foreign_tokenizer_file(path, texts):
    """A byte-level BPE trained elsewhere: its own <|endoftext|> at id 0, no pad/chat tokens."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(texts, trainer=trainer)
    hf.save(str(path))
    return path


def test_pretrained_tokenizer_gets_missing_special_tokens_appended(tmp_path, data_dir, prose_texts):
    src = foreign_tokenizer_file(tmp_path / "foreign.json", prose_texts[:300])
    base = HFTokenizer.from_file(str(src)).get_vocab_size()
    for path in (src, tmp_path):  # the file itself, or a folder holding tokenizer.json
        if path == tmp_path:
            shutil.copy(src, tmp_path / "tokenizer.json")
        cfg = TokenizerConfig(type="pretrained", path=str(path))
        out = build_tokenizer(cfg, data_dir, tmp_path / "out", force=True)
        tok = Tokenizer.load(out)
        assert tok.eos_id == 0  # kept where the source put it
        assert [tok.pad_id, tok.im_start_id, tok.im_end_id] == [base, base + 1, base + 2]
        assert read_manifest(out)["vocab_size"] == base + 3


def test_pretrained_path_errors_name_tokenizer_path(tmp_path, data_dir):
    with pytest.raises(RecipeError, match=r"tokenizer.path: .*nope.json not found"):
        build_tokenizer(TokenizerConfig(type="pretrained", path=str(tmp_path / "nope.json")), data_dir, tmp_path / "o")
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"tokenizer.path: .*bad.json is not a valid tokenizer.json"):
        build_tokenizer(TokenizerConfig(type="pretrained", path=str(tmp_path / "bad.json")), data_dir, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_stage_requires_the_data_stage(tmp_path):
    with pytest.raises(LLMMakerError, match=r"run the `data` stage first"):
        build_tokenizer(TokenizerConfig(), tmp_path / "missing", tmp_path / "tok")


def test_tokenizer_trains_on_the_train_split_only(data_dir):
    train = [json.loads(line)["text"] for line in (data_dir / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    val = {json.loads(line)["text"] for line in (data_dir / "val.jsonl").read_text(encoding="utf-8").splitlines()}
    assert list(capped_training_texts(data_dir, None)) == train
    assert not val & set(train)


def test_plain_text_copy_never_turns_text_into_special_tokens():
    from llm_maker.tokenizer.tokenizer import train_bpe

    tok = train_bpe(iter(["see the <|endoftext|> marker and <|im_end|> too"] * 20), vocab_size=300, min_frequency=1)
    text = "a doc that mentions <|endoftext|> and <|im_end|>"
    assert tok.eos_id in tok.encode(text)  # the library default: the string becomes the token
    plain = tok.as_plain_text()
    ids = plain.encode(text)
    assert tok.eos_id not in ids and tok.im_end_id not in ids
    assert plain.decode(ids) == text and plain.hash == tok.hash
