"""The package's import graph, read from the source: no module cycle, and every import points
down the layers below (a module may import its own layer and the layers under it, never above).

    0  bottom       errors, typed_yaml, devices, stopping, artifacts, layout, markdown
    1  model        the decoder alone: it imports nothing from llm_maker
    2  recipe       the typed YAML schema and its rules
    3  inputs       tokenizer, data sources and selection, packed token shards
    4  train        the loop, its loss, checkpoints, distribution, metrics sinks
    5  uses         sft (templates, datasets, formats), serve, audit, eval's scorers, plan (memory, time, cost)
    6  outputs      export (HF, GGUF, cards), registry
    7  lm-eval      eval/lm_eval_suite.py (runs on an HF export)
    8  stages       each package's stage function (data/stage.py, pack/packer.py, ...)
    9  pipeline     pipeline.py, summary.py
    10 cli          cli.py, __main__.py

Package `__init__.py` files hold only a docstring (the top one also `__version__`), so importing one module never
runs another package's stage code (and no cycle hides behind a re-export).
"""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "llm_maker"

LAYERS: list[tuple[str, ...]] = [
    ("errors", "typed_yaml", "devices", "stopping", "artifacts", "layout", "markdown"),
    ("model",),
    ("recipe",),
    ("tokenizer", "data", "pack"),
    ("train",),
    ("sft", "distill", "dpo", "serve", "audit", "eval", "plan"),
    ("export", "registry"),
    ("eval.lm_eval_suite",),
    ("export.push",),  # publishes an export with its lm-eval results
    ("data.stage", "tokenizer.stage", "pack.packer", "train.stage", "distill.stage", "sft.stage", "dpo.stage",
     "eval.evaluate"),
    ("pipeline", "summary"),
    ("cli", "__main__"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> int:
    """The layer of the most specific entry that names the module or a package above it."""
    best, best_len = None, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best_len:
                best, best_len = i, len(name)
    assert best is not None, f"llm_maker.{module} is in no layer of tests/test_architecture.py: add it"
    return best


def import_graph() -> dict[str, set[str]]:
    """module -> the llm_maker modules it imports (anywhere in the file, functions included)."""
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("llm_maker"):
                for alias in node.names:  # `from llm_maker.x import y`: y may be a module
                    target = f"{node.module}.{alias.name}"
                    deps.add(target if target.removeprefix("llm_maker.") in modules else node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("llm_maker"))
        graph[name] = {d.removeprefix("llm_maker").lstrip(".") for d in deps} - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as a path [a, b, ..., a], or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_every_module_has_a_layer():
    for module in import_graph():
        if module:
            layer_of(module)


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_imports_point_down_the_layers():
    upward = [f"{m} ({layer_of(m)}) -> {d} ({layer_of(d)})"
              for m, deps in import_graph().items() if m for d in sorted(deps) if d and layer_of(d) > layer_of(m)]
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def test_the_model_file_imports_nothing_from_llm_maker():
    assert import_graph()["model.llama"] == set()


def test_package_init_files_hold_only_a_docstring():
    for init in SRC.rglob("__init__.py"):
        body = ast.parse(init.read_text(encoding="utf-8")).body
        code = [n for n in body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
        code = [n for n in code if not (isinstance(n, ast.ImportFrom) and n.module == "__future__")]
        code = [n for n in code if not (isinstance(n, ast.Assign) and [t.id for t in n.targets] == ["__version__"])]
        assert not code, f"{init.relative_to(SRC.parent)}: imports or code; import from the defining module instead"


def test_the_checker_sees_a_cycle_and_an_upward_edge():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []
    assert layer_of("model.llama") < layer_of("train.trainer") < layer_of("train.stage") < layer_of("cli")


def test_the_readme_file_map_names_every_module():
    readme = (SRC.parents[1] / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("## Layout"):]
    missing = [str(p.relative_to(SRC)) for p in sorted(SRC.rglob("*.py"))
               if p.name != "__init__.py" and str(p.relative_to(SRC)) not in layout and p.name not in layout]
    assert not missing, f"README's Layout section does not list: {missing}"
