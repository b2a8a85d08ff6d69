"""The package's import graph: sibling imports at the top of each module, and no cycle among them."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sieve_cli"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(module: str, node: ast.ImportFrom, is_package: bool) -> list[str]:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)] if node.level else []
    target = ".".join(base + ([node.module] if node.module else []))
    if node.module is None:  # `from . import x`: x is a module
        return [f"{target}.{alias.name}" for alias in node.names]
    return [target]


def sibling_imports(path: Path, top_level_only: bool) -> list[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level:
            found += resolve(module_name(path), node, path.name == "__init__.py")
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {t for t in sibling_imports(path, top_level_only=True) if t in modules and t != name}
            for name, path in modules.items()}


def test_no_import_cycle_among_the_package_modules():
    edges, state, cycles = graph(), {}, []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_sibling_imports_sit_at_the_top_except_where_commands_defer_torch():
    """Commands import their stage when they run (so `sieve --help` loads no torch); nothing else defers."""
    late = {}
    for path in PACKAGE.rglob("*.py"):
        if "commands" in path.parts:
            continue
        deferred = set(sibling_imports(path, top_level_only=False)) - set(sibling_imports(path, top_level_only=True))
        if deferred:
            late[module_name(path)] = sorted(deferred)
    assert not late, late


# ---- optional extras: imported only by the code that uses them ------------------------------------
EXTRAS = {  # package -> the modules that may import it (each needs its extra, or draws figures)
    "torchao": {"sieve_cli.quantize"},
    "peft": {"sieve_cli.heal"},
    "ray": {"sieve_cli.pool"},
    "lm_eval": set(),  # sieve writes lm-eval's task files and prints its command; it never imports it
    "matplotlib": {"sieve_cli.report", "sieve_cli.report.figures"},
}


def third_party_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_optional_extras_are_imported_only_by_their_modules():
    wrong = {}
    for path in PACKAGE.rglob("*.py"):
        for package in third_party_imports(path) & set(EXTRAS):
            if module_name(path) not in EXTRAS[package]:
                wrong.setdefault(package, []).append(module_name(path))
    assert not wrong, wrong


def test_the_demos_pipeline_imports_no_optional_extra():
    """What `sieve demo` imports before it runs a stage (the CLI, the pipeline and every stage it calls, model
    loading) pulls in none of torchao, peft, Ray, lm-eval or matplotlib; the report imports matplotlib itself."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import sieve_cli, sieve_cli.cli, sieve_cli.pipeline, sieve_cli.models, sieve_cli.search, sieve_cli.apply\n"
        "from sieve_cli.commands import run\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout.split()
    assert "torch" in out and "sieve_cli" in out  # the check ran in a real import of the pipeline
    assert not set(EXTRAS) & set(out), sorted(set(EXTRAS) & set(out))


def test_the_evaluators_names_stay_importable_from_evaluate():
    """evaluate.py's jobs live in their own modules; what callers imported from it still comes from there."""
    import sieve_cli.evaluate as evaluate
    from sieve_cli import generation, intervals, metrics, prepared, scoring

    moved = {prepared: ("PreparedSplit", "prepare", "split_tokens", "longest_input"),
             metrics: ("EvalResult", "result_of"), intervals: ("wilson_interval", "ratio_interval", "Z95"),
             generation: ("generate_greedy", "cut_at_stop", "normalise_answer"),
             scoring: ("score_sequences", "shared_prefix_length", "MIN_SHARED_PREFIX", "Sequence", "Span")}
    for module, names in moved.items():
        for name in names:
            assert getattr(evaluate, name) is getattr(module, name), name
    for name in ("evaluate", "stream_evaluate", "run_eval", "record_eval", "run_label", "load_eval_model"):
        assert callable(getattr(evaluate, name)), name
