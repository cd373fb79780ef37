"""The layering of docs/ARCHITECTURE.md, checked on the source: every import points down (or
stays on its floor), the jobs never import each other, and no module imports itself back."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "caprese"

# The first name under caprese/ -> its floor (docs/ARCHITECTURE.md). A new module must be
# placed here, or this test fails and says so.
FLOORS = {
    **dict.fromkeys(["version", "config", "families", "io", "dtypes", "heap"], 0),
    **dict.fromkeys(["samples", "extract", "prompts", "data", "models"], 1),
    **dict.fromkeys(["methods", "kernels", "fused", "block"], 2),
    **dict.fromkeys(["phases", "adapter", "info"], 3),
    **dict.fromkeys(["capture", "generation", "compiled", "distributed", "divergence"], 4),
    **dict.fromkeys(["distillation", "evaluate", "bench"], 5),
    **dict.fromkeys(["pipeline", "cli", "__init__", "__main__"], 6),
}
JOBS = {"distillation", "evaluate", "bench"}  # floor 5: siblings share through lower floors


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def resolve(name: str, modules: set[str]) -> str | None:
    """The caprese module an imported name refers to (a submodule when one exists)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(path: Path, modules: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.startswith("caprese"):
                target = resolve(name, modules)
                if target:
                    found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) - {module_name(p)} for p in paths}


def floor_key(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_has_a_floor():
    missing = sorted({floor_key(m) for m in graph()} - set(FLOORS))
    assert missing == [], f"place these in FLOORS (and docs/ARCHITECTURE.md): {missing}"


def test_imports_point_down_and_jobs_do_not_import_each_other():
    wrong = []
    for module, targets in graph().items():
        here = floor_key(module)
        for target in targets:
            there = floor_key(target)
            if FLOORS[there] > FLOORS[here]:
                wrong.append(f"{module} (floor {FLOORS[here]}) imports {target} "
                             f"(floor {FLOORS[there]})")
            elif here in JOBS and there in JOBS and here != there:
                wrong.append(f"{module} imports the sibling job {target}")
    assert wrong == []


def test_no_import_cycles():
    edges = graph()
    cycles, state = [], {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges.get(module, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_checks_catch_what_they_claim(tmp_path):
    """The import resolution sees `from caprese.x import submodule` as that submodule."""
    modules = {"caprese", "caprese.data", "caprese.data.registry", "caprese.block"}
    source = tmp_path / "m.py"
    source.write_text("from caprese.data import registry\nfrom caprese.block import Phase\n"
                      "import caprese.data\n")
    assert imports_of(source, modules) == {"caprese.data.registry", "caprese.block",
                                           "caprese.data"}


def test_benchmarks_do_not_import_each_other():
    scripts = {p.stem for p in (ROOT / "benchmarks").rglob("*.py")}
    offenders = []
    for path in (ROOT / "benchmarks").rglob("*.py"):
        text = path.read_text()
        if "sys.path" in text:
            offenders.append(f"{path.name} edits sys.path")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module in scripts:
                offenders.append(f"{path.name} imports {node.module}")
            if isinstance(node, ast.Import):
                offenders += [f"{path.name} imports {a.name}" for a in node.names
                              if a.name in scripts]
    assert offenders == []


def test_no_machine_paths_in_the_tree():
    """A reader has no /tmp folder of ours, nor our home: committed files must not name them."""
    pattern = re.compile(r"(^|[^A-Za-z0-9_.])/(tmp|root|home|work)/")
    # tool caches and build outputs the test run itself writes (Hypothesis records file paths)
    skipped = {".git", ".venv", "bundled", "__pycache__", ".pytest_cache", ".ruff_cache",
               ".hypothesis", "build"}
    if (ROOT / ".git").exists():  # a checkout: its tracked files (not a user's run folders)
        listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
        paths = [ROOT / line for line in listed.stdout.splitlines()]
    else:  # CI's copy of the checkout: those, plus what the run writes (skipped below)
        paths = list(ROOT.rglob("*"))
    offenders = []
    for path in paths:
        parts = path.relative_to(ROOT).parts
        if skipped & set(parts) or any(part.endswith(".egg-info") for part in parts):
            continue
        if not path.is_file():
            continue
        if path.suffix in (".png", ".gz", ".safetensors") or path == Path(__file__):
            continue
        for number, line in enumerate(path.read_text(errors="ignore").splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:80]}")
    assert offenders == []
