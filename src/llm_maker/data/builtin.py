"""The built-in corpus: real English prose that ships with every Python install.

Two parts, both read offline and in a fixed order:
  * `pydoc_data.topics.topics`: the language reference sections behind `help("if")` etc.
    (79 topics, ~465K chars in CPython 3.11), one document per topic;
  * the standard library's docstrings (modules, classes, functions) of at least 200 chars,
    parsed with `ast` so no module is ever imported (importing runs code and can fail on
    platform-specific modules); ~2.4K documents, ~1.3M chars.

Test suites (test/, tests/, idlelib/idle_test/), lib2to3 and site-packages are skipped: test
docstrings are fixtures, lib2to3 is a deprecated copy of old grammar, site-packages is not stdlib.
"""
from __future__ import annotations

import ast
import sys
import sysconfig
import warnings
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

MIN_DOCSTRING_CHARS = 200
SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages",
                       "lib2to3", "__pycache__"})


class Docstring(NamedTuple):
    """One docstring of the standard library: id "stdlib:json/decoder.py:JSONDecoder.decode"."""

    doc_id: str
    qualified_name: str  # "json.decoder.JSONDecoder.decode"
    text: str


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Optional[Path] = None) -> list[Path]:
    """The stdlib's .py files in sorted order, without test/IDLE/lib2to3/site-packages dirs."""
    root = root or stdlib_dir()
    files = []
    for path in sorted(root.rglob("*.py")):
        rel_dirs = path.relative_to(root).parts[:-1]
        if not any(part in SKIP_DIRS for part in rel_dirs):
            files.append(path)
    return files


def _module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def docstrings_of_source(source: bytes, rel_path: str, module: str) -> Iterator[Docstring]:
    """Every module/class/function docstring in one file, depth first in source order."""
    with warnings.catch_warnings():  # old escape sequences in stdlib docstrings warn on parse
        warnings.simplefilter("ignore")
        tree = ast.parse(source, filename=rel_path)

    def walk(node: ast.AST, qual: list[str]) -> Iterator[Docstring]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = qual + [child.name]
                doc = ast.get_docstring(child, clean=True)
                if doc:
                    dotted = ".".join(name)
                    yield Docstring(f"stdlib:{rel_path}:{dotted}", f"{module}.{dotted}", doc)
                yield from walk(child, name)
            elif not isinstance(child, (ast.expr, ast.Lambda)):
                # functions defined under `if`/`try` at module level still count
                yield from walk(child, qual)

    doc = ast.get_docstring(tree, clean=True)
    if doc:
        yield Docstring(f"stdlib:{rel_path}:<module>", module, doc)
    yield from walk(tree, [])


def stdlib_docstrings(min_chars: int = MIN_DOCSTRING_CHARS, root: Optional[Path] = None) -> Iterator[Docstring]:
    """(id, qualified name, text) of stdlib docstrings with at least `min_chars` characters.

    The SFT builtin set reuses this to ask "what does X do?" from a docstring's first line."""
    root = root or stdlib_dir()
    for path in stdlib_files(root):
        rel = path.relative_to(root)
        try:
            found = list(docstrings_of_source(path.read_bytes(), rel.as_posix(), _module_name(rel)))
        except (SyntaxError, ValueError, OSError):  # e.g. a vendored py2 file: not prose we need
            continue
        seen: set[str] = set()
        for d in found:
            if len(d.text) >= min_chars:
                # two `def f` under `if/else` would share an id; number the later ones
                doc_id, n = d.doc_id, 1
                while doc_id in seen:
                    n += 1
                    doc_id = f"{d.doc_id}#{n}"
                seen.add(doc_id)
                yield d._replace(doc_id=doc_id)


def pydoc_topics() -> Iterator[tuple[str, str]]:
    """(id, text) of every pydoc topic, sorted by topic name."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"pydoc:{name}", topics[name]


def builtin_documents() -> Iterator[tuple[str, str]]:
    """(id, text) of the whole built-in corpus: pydoc topics, then stdlib docstrings."""
    yield from pydoc_topics()
    for d in stdlib_docstrings():
        yield d.doc_id, d.text


def builtin_signature() -> dict[str, str]:
    """What the built-in corpus depends on: the interpreter's version and stdlib location."""
    return {"python": sys.version.split()[0], "stdlib": str(stdlib_dir())}
