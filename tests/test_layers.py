"""The package reads in layers: imports point only downward (cli -> bench -> api -> methods ->
core -> runtime), there is no import cycle, no private name crosses a module boundary, and
every module imports on its own."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "caproj"

LAYERS = {
    "runtime": ["errors", "version", "utils", "dist", "resume", "config", "batches", "stream",
                "data"],
    "core": ["sites", "metrics", "budget", "projection", "surgery", "allocate", "latency", "plan",
             "models", "losses", "refit", "factored",
             "deploy", "train", "synth"],
    "methods": ["cap", "capopt", "methods"],
    "api": ["api", "stages", "__init__"],
    "bench": ["bench", "coverage", "fuzz"],
    "cli": ["cli"],
}
LEVEL = {m: i for i, (_, mods) in enumerate(LAYERS.items()) for m in mods}


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported caproj module, names taken from it) for every import in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and \
                (node.module == "caproj" or node.module.startswith("caproj.")):
            if node.module == "caproj":  # from caproj import dist, metrics
                for a in node.names:
                    out.append((a.name, []))
            else:
                out.append((node.module.split(".", 1)[1], [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("caproj."):
                    out.append((a.name.split(".", 1)[1], []))
    return out


def _graph() -> dict[str, set[str]]:
    g = {}
    for f in PKG.glob("*.py"):
        g[f.stem] = {m for m, _ in _imports(f) if m != "__version__" and (PKG / f"{m}.py").exists()}
    return g


def test_every_module_has_a_layer():
    assert {f.stem for f in PKG.glob("*.py")} == set(LEVEL)


def test_imports_point_only_downward():
    bad = []
    for mod, deps in _graph().items():
        for d in deps:
            if mod == "__init__":
                continue  # the package front door re-exports the API
            if LEVEL[d] > LEVEL[mod]:
                bad.append(f"{mod} ({LEVEL[mod]}) imports {d} ({LEVEL[d]})")
    assert not bad, bad


def test_no_import_cycle():
    g = _graph()
    g.pop("__init__", None)
    for deps in g.values():
        deps.discard("__init__")
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in sorted(g.get(n, ())):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n)


def test_no_private_names_across_modules():
    bad = [f"{f.stem} imports {name} from {m}" for f in PKG.glob("*.py")
           for m, names in _imports(f) for name in names if name.startswith("_")
           and name != "__version__"]
    assert not bad, bad


def test_the_library_never_prints():
    printing = []
    for f in PKG.glob("*.py"):
        if f.stem in ("cli",):
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                printing.append(f"{f.name}:{node.lineno}")
    assert not printing, printing


def test_every_module_imports_alone():
    mods = sorted(LEVEL)
    code = ("import importlib, sys\n"
            f"for m in {mods!r}:\n"
            "    for k in [k for k in sys.modules if k == 'caproj' or k.startswith('caproj.')]:\n"
            "        del sys.modules[k]\n"
            "    importlib.import_module('caproj' if m == '__init__' else 'caproj.' + m)\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
