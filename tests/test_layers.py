"""The layers of ../shared/DESIGN.md point one way, read from the import statements of every module (ast).

    top: tokenmem (the package's __init__: it registers the built-in evictors), tokenmem.cli, tokenmem.zoo
    envs       -> adapters, plugins, core     (envs import adapters, never the other way round)
    adapters   -> plugins, core
    plugins    -> core
    core: tokenmem/*.py, tokenmem/kernels, tokenmem/bank

Every import counts, also the ones inside functions and under ``TYPE_CHECKING``. No two modules import each
other. And ``import tokenmem`` / ``tokenmem evictors`` load no training code.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"tokenmem": ROOT / "tokenmem", "tokenmem.plugins": ROOT / "plugins", "tokenmem.adapters": ROOT / "adapters",
           "tokenmem.envs": ROOT / "envs"}  # pyproject's package-dir: one import namespace

# Violations that are allowed for now, each (importer, imported) with its reason; none left.
ALLOWED: set[tuple[str, str]] = set()

TRAINING = ("tokenmem.zoo.train_lm", "tokenmem.zoo.lm_eval", "tokenmem.zoo.train_video", "tokenmem.zoo.video_model",
            "tokenmem.zoo.evolve_language", "tokenmem.zoo.lm_tasks", "tokenmem.zoo.corpus", "tokenmem.zoo.tokenizer",
            "tokenmem.zoo.planting", "tokenmem.envs.train_dt", "tokenmem.envs.make_dataset", "tokenmem.plugins.namm.evolve",
            "tokenmem.plugins.namm.tasks")


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("").parts
            if package == "tokenmem" and rel[0] in ("plugins", "adapters", "envs"):
                continue  # not in the tokenmem/ folder, but keep the rule simple if one appears
            name = ".".join((package, *rel))
            found[name.removesuffix(".__init__")] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The tokenmem modules that ``name`` imports (a ``from package import x`` of a submodule counts as x)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                out.add(sub if sub in known else source)
    return {m for m in out if m == "tokenmem" or m.startswith("tokenmem.")}


def layer(module: str) -> str:
    if module in ("tokenmem", "tokenmem.cli") or module.startswith("tokenmem.zoo"):
        return "top"
    for part in ("envs", "adapters", "plugins"):
        if module == f"tokenmem.{part}" or module.startswith(f"tokenmem.{part}."):
            return part
    return "core"


MAY_IMPORT = {
    "core": {"core"},
    "plugins": {"core", "plugins"},
    "adapters": {"core", "plugins", "adapters"},
    "envs": {"core", "plugins", "adapters", "envs"},
    "top": {"core", "plugins", "adapters", "envs", "top"},
}


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports(name, path, known) - {name} for name, path in found.items()}


def test_the_sources_are_found():
    g = graph()
    assert {"tokenmem.memory", "tokenmem.plugins.sink", "tokenmem.adapters.base", "tokenmem.envs.rollout",
            "tokenmem.bank", "tokenmem.kernels.cpu", "tokenmem.zoo.transfer"} <= set(g)
    assert "tokenmem.attention" in g["tokenmem.layer"]  # relative imports resolve
    assert "tokenmem.kernels" in g["tokenmem.bank.store"]  # `from tokenmem import kernels` is the submodule


def test_imports_point_downwards():
    wrong = []
    for importer, targets in graph().items():
        for target in sorted(targets):
            if layer(target) not in MAY_IMPORT[layer(importer)] and (importer, target) not in ALLOWED:
                wrong.append(f"{importer} ({layer(importer)}) imports {target} ({layer(target)})")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_two_modules_import_each_other():
    g = graph()
    pairs = sorted({tuple(sorted((a, b))) for a, targets in g.items() for b in targets if a in g.get(b, ())})
    pairs = [p for p in pairs if p not in ALLOWED and p[::-1] not in ALLOWED]
    assert not pairs, f"modules importing each other: {pairs}"


def test_no_import_cycles():
    """No longer cycles either (a -> b -> c -> a): every strongly connected part of the graph is one module."""
    g = graph()
    for a, b in ALLOWED:
        g[a] = g[a] - {b}
    order, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        order[v] = low[v] = len(order)
        stack.append(v)
        on_stack.add(v)
        for w in g[v] & set(g):
            if w not in order:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], order[w])
        if low[v] == order[v]:
            part = []
            while not part or part[-1] != v:
                part.append(stack.pop())
                on_stack.discard(part[-1])
            if len(part) > 1:
                cycles.append(sorted(part))

    for v in sorted(g):
        if v not in order:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_allowed_violations_are_still_real():
    """An allow-list entry whose import is gone must be removed (it would hide a new violation)."""
    g = graph()
    assert all(target in g[importer] for importer, target in ALLOWED)


def test_import_tokenmem_and_the_evictors_command_load_no_training_code():
    code = ("import sys, tokenmem; tokenmem.list_evictors(); first = set(sys.modules); "
            "import tokenmem.cli; tokenmem.cli.main(['evictors']); "
            "print(sorted(first)); print(sorted(sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    after_import, after_command = (eval(line) for line in out.stdout.strip().splitlines()[-2:])
    assert "namm" in out.stdout and "sink" in out.stdout  # the command listed the built-in evictors
    for loaded in (after_import, after_command):
        training = [m for m in loaded if m in TRAINING or m.rsplit(".", 1)[-1].startswith(("train", "evolve"))]
        assert not training, f"training code imported: {training}"
        assert not {"cma", "stable_baselines3"} & set(loaded)
