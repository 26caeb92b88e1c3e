"""The module import graph of alpaca_jax and data_gen, read statically from the source (ast):
no cycles, no imports hidden inside functions to dodge one, and the layering rules of STYLE.md
(data_gen and the LLM client never load model code; eval never reaches into data_gen)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("alpaca_jax", "data_gen")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted import target that is one of our modules."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path, modules: dict[str, Path]):
    """(target module, line, at top level?) for every import of one of our modules."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    # `if TYPE_CHECKING:` blocks at top level count as top level (they never run).
    for node in tree.body:
        if isinstance(node, ast.If):
            top.update(id(n) for n in ast.walk(node))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] or [base]
        else:
            continue
        for target in targets:
            resolved = _resolve(target, modules)
            if resolved is not None and resolved != module:
                yield resolved, node.lineno, id(node) in top


def _graph(top_level_only: bool = False) -> dict[str, set[str]]:
    """module -> the modules importing it runs: each imported module and the __init__ of every
    package above it (`import a.b.c` runs a/b/__init__ first, and whatever that imports), except
    the packages the importer itself lives in (already running when it is imported)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for target, _, at_top in _imports(module, path, modules):
            if top_level_only and not at_top:
                continue
            node = target
            while node:
                if node in modules and node != module and not module.startswith(node + "."):
                    graph[module].add(node)
                node = node.rpartition(".")[0]
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        for nxt in graph[node]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _find_cycle(graph) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_counting_function_level_imports():
    """Function-level imports count: a deferred import that closes a loop is still a cycle."""
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_lower_layers_import_no_upper_layer():
    graph = _graph()
    jax_free = ["alpaca_jax.errors", "alpaca_jax.jsonl", "alpaca_jax.files", "alpaca_jax.configlib"]
    llm = [m for m in graph if m == "alpaca_jax.llm" or m.startswith("alpaca_jax.llm.")]
    assert llm, "alpaca_jax/llm/ is missing"
    allowed_below = set(jax_free) | set(llm) | {"alpaca_jax"}
    for module in jax_free + llm:
        above = _reachable(graph, module) - allowed_below
        assert not above, f"{module} reaches up to {sorted(above)}"
    # data_gen uses the LLM client and the generic config library, never model code.
    for module in [m for m in graph if m.split(".")[0] == "data_gen"]:
        reached = {m for m in _reachable(graph, module) if m.startswith("alpaca_jax")}
        assert reached <= allowed_below, f"{module} reaches {sorted(reached - allowed_below)}"
    # eval builds on the LLM client, not on the generator's internals.
    for module in [m for m in graph if m.startswith("alpaca_jax.eval")]:
        assert not any(m.startswith("data_gen") for m in _reachable(graph, module)), module


@pytest.mark.parametrize("module,forbidden", [
    ("alpaca_jax.hf.convert", "alpaca_jax.train"),       # export-hf --merge must not load the training loop
    ("alpaca_jax.hf.peft", "alpaca_jax.train"),
    ("alpaca_jax.model.lora_base", "alpaca_jax.hf"),    # LoRA base preparation sits below hf/ and train/
    ("alpaca_jax.model.lora_base", "alpaca_jax.train"),
    ("alpaca_jax.infer", "alpaca_jax.train.loop"),      # decoding loads no training loop
    ("alpaca_jax.infer", "alpaca_jax.train.step_loop"),
])
def test_named_modules_stay_below(module, forbidden):
    reached = _reachable(_graph(), module)
    assert not any(m == forbidden or m.startswith(forbidden + ".") for m in reached), \
        f"{module} reaches {forbidden}: {sorted(m for m in reached if m.startswith(forbidden))}"


def test_data_gen_and_the_llm_client_load_no_jax_at_run_time():
    import subprocess
    import sys
    code = ("import sys, data_gen, data_gen.cli, alpaca_jax.llm.client, alpaca_jax.eval.judge; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'optax')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
