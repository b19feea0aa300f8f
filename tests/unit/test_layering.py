"""The house's layering, stated once: imports go one way, down the data flow.

    base -> config -> plan -> launch -> dist -> stage code -> modes -> pipeline / cli

A module may import its own unit, a unit of its own layer, or a lower layer, never a higher one.
No cycle between units (packages or loose modules), counting function-level (lazy) imports too:
a lazy import hides a cycle from Python, not from a reader. The few lazy imports that do reach up
(or close a cycle: a `python -m` entry point handing over to ``tulu.cli``) are listed in
``ALLOWED_LAZY`` with the reason; a module-level upward import is never allowed.
``monitoring`` (the sidecar) watches from the side: it never imports tulu, and only the launch
layer and above call into it.

A new module must be placed in ``LAYERS`` (the test names it); a new upward import fails here with
the edge and the layers it crosses.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Lowest first. A unit is a package (every module under it) or a single module.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("tulu", "tulu.errors", "tulu.atomic", "tulu.deletion")),
    ("config", ("tulu.config",)),
    ("plan", ("tulu.plan",)),
    ("launch", ("tulu.launch",)),
    ("dist", ("tulu.dist",)),
    ("stage", ("tulu.train", "tulu.rl", "tulu.rlvr", "tulu.inference", "tulu.rewards", "tulu.checkpoint",
               "tulu.data", "tulu.models")),
    ("modes", ("tulu.modes",)),
    ("top", ("tulu.pipeline", "tulu.cli", "tulu.export", "tulu.twin")),
]
MONITOR_CALLERS_FROM = "launch"  # the lowest layer that may import monitoring
# ... except its config: plain data that imports nothing, embedded by the job config as its
# `monitoring:` section (one definition of every monitor knob).
MONITOR_DATA = ("monitoring.config",)

# Function-level imports excused from both rules (reaching a higher layer, closing a cycle):
# (importing module, imported module): why. Nothing else; never a module-level import.
ALLOWED_LAZY: dict[tuple[str, str], str] = {
    ("tulu.config.shapes", "tulu.checkpoint.stage"):
        "an earlier stage's checkpoint given as model.name_or_path records its shape",
    ("tulu.config.shapes", "tulu.models.presets"):
        "the preset table (LLAMA_PRESETS) names the built-in architectures' shapes",
    ("tulu.rewards.score_cli", "tulu.cli"):
        "`python -m tulu.rewards.score_cli` hands over to the one command line",
    ("tulu.export", "tulu.cli"):
        "`python -m tulu.export` hands over to the one command line (which imports export)",
}


@dataclass(frozen=True)
class Edge:
    src: str       # importing module
    dst: str       # imported module (or package)
    lazy: bool     # inside a function
    line: int

    def __str__(self) -> str:
        return f"{self.src}:{self.line} -> {self.dst}{' (in a function)' if self.lazy else ''}"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def import_edges(root: Path = REPO, packages: tuple[str, ...] = ("tulu", "monitoring")) -> list[Edge]:
    """Every import of a tulu or monitoring module by a module of ``packages``."""
    modules = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            modules[_module_name(path, root)] = path
    edges: list[Edge] = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]

        def visit(node, lazy: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and _is_type_checking(child):
                    continue  # annotations only
                if isinstance(child, ast.Import):
                    edges.extend(Edge(name, a.name, lazy, child.lineno) for a in child.names)
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        up = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                        base = ".".join(up + ([child.module] if child.module else []))
                    for a in child.names:  # `from pkg import submodule` imports the submodule
                        sub = f"{base}.{a.name}"
                        edges.append(Edge(name, sub if sub in modules else base, lazy, child.lineno))
                visit(child, lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

        visit(ast.parse(path.read_text(), str(path)), False)
    return [e for e in edges if e.dst.split(".")[0] in ("tulu", "monitoring")]


def unit_of(module: str) -> str | None:
    """The longest listed unit that is ``module`` or a package holding it."""
    best = None
    for _, units in LAYERS:
        for u in units:
            if (module == u or module.startswith(u + ".")) and (u != "tulu" or module == "tulu"):
                if best is None or len(u) > len(best):
                    best = u
    return best


LAYER_OF = {u: i for i, (_, units) in enumerate(LAYERS) for u in units}
LAYER_NAMES = [n for n, _ in LAYERS]


def upward_imports(edges: list[Edge], allowed: dict = ALLOWED_LAZY) -> list[str]:
    out = []
    for e in edges:
        if not e.src.startswith("tulu") or not e.dst.startswith("tulu"):
            continue
        s, d = unit_of(e.src), unit_of(e.dst)
        if s is None or d is None or LAYER_OF[d] <= LAYER_OF[s]:
            continue
        if e.lazy and (e.src, e.dst) in allowed:
            continue
        out.append(f"{e}: {LAYER_NAMES[LAYER_OF[s]]} layer imports the higher {LAYER_NAMES[LAYER_OF[d]]} layer")
    return out


def unit_cycles(edges: list[Edge], allowed: dict = ALLOWED_LAZY) -> list[list[str]]:
    """Cycles between units (Tarjan's strongly connected components of more than one unit)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        s, d = unit_of(e.src), unit_of(e.dst)
        if s and d and s != d and not (e.lazy and (e.src, e.dst) in allowed):
            graph.setdefault(s, set()).add(d)
            graph.setdefault(d, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def _edges_between(edges: list[Edge], units: list[str]) -> list[str]:
    return [str(e) for e in edges if unit_of(e.src) in units and unit_of(e.dst) in units
            and unit_of(e.src) != unit_of(e.dst)]


@pytest.fixture(scope="module")
def edges() -> list[Edge]:
    return import_edges()


# --- the repository ------------------------------------------------------------------------------

def test_every_tulu_module_has_a_layer(edges):
    modules = {_module_name(p, REPO) for p in (REPO / "tulu").rglob("*.py")}
    assert sorted(m for m in modules if unit_of(m) is None) == [], "place the new module in LAYERS"


def test_no_module_imports_a_higher_layer(edges):
    assert upward_imports(edges) == []


def test_no_cycle_between_units_even_through_function_level_imports(edges):
    cycles = unit_cycles(edges)
    assert cycles == [], "\n".join(f"cycle {c}: " + "; ".join(_edges_between(edges, c)) for c in cycles)


def test_every_allowed_upward_import_still_exists_and_is_lazy(edges):
    found = {(e.src, e.dst): e.lazy for e in edges}
    stale = [k for k in ALLOWED_LAZY if k not in found]
    eager = [k for k in ALLOWED_LAZY if found.get(k) is False]
    assert stale == [] and eager == [], f"drop from ALLOWED_LAZY: {stale}; at module level: {eager}"


def test_monitoring_never_imports_tulu(edges):
    assert [str(e) for e in edges if e.src.startswith("monitoring") and e.dst.startswith("tulu")] == []


def test_only_launch_and_above_call_the_monitor(edges):
    floor = LAYER_NAMES.index(MONITOR_CALLERS_FROM)
    low = [str(e) for e in edges if e.src.startswith("tulu") and e.dst.startswith("monitoring")
           and e.dst not in MONITOR_DATA and LAYER_OF[unit_of(e.src)] < floor]
    assert low == []


def test_the_monitor_config_the_job_embeds_imports_nothing_of_the_project(edges):
    assert [str(e) for e in edges if e.src in MONITOR_DATA] == []


def test_training_does_not_reach_into_launch_for_its_writer(edges):
    assert [str(e) for e in edges if e.src.startswith("tulu.train") and e.dst.startswith("tulu.launch")] == []


# --- the check itself, on planted back-edges -----------------------------------------------------

def test_a_planted_module_level_back_edge_fails(edges):
    planted = Edge("tulu.config.job", "tulu.train.loop", lazy=False, line=1)
    assert upward_imports(edges + [planted]) == [
        "tulu.config.job:1 -> tulu.train.loop: config layer imports the higher stage layer"]


def test_a_planted_lazy_back_edge_fails_unless_listed(edges):
    planted = Edge("tulu.plan.layout", "tulu.launch.executor", lazy=True, line=7)
    assert len(upward_imports(edges + [planted])) == 1
    assert upward_imports(edges + [planted], {**ALLOWED_LAZY, ("tulu.plan.layout", "tulu.launch.executor"): "x"}) == []


def test_a_listed_lazy_import_does_not_excuse_the_same_import_at_module_level(edges):
    eager = Edge("tulu.config.shapes", "tulu.checkpoint.stage", lazy=False, line=3)
    assert len(upward_imports(edges + [eager])) == 1


def test_a_planted_cycle_within_a_layer_is_found():
    synthetic = [Edge("tulu.train.model", "tulu.checkpoint.stage", False, 1),
                 Edge("tulu.checkpoint.manager", "tulu.data.loader", True, 2),
                 Edge("tulu.data.loader", "tulu.train.batches", True, 3)]
    assert unit_cycles(synthetic) == [["tulu.checkpoint", "tulu.data", "tulu.train"]]
    assert unit_cycles(synthetic[:2]) == []


def test_the_old_cycle_config_model_shapes_train_would_be_caught():
    old = [Edge("tulu.config.job", "tulu.config.shapes", True, 1),
           Edge("tulu.config.shapes", "tulu.train.model", True, 2),
           Edge("tulu.train.model", "tulu.config.job", True, 3)]
    assert upward_imports(old) == ["tulu.config.shapes:2 -> tulu.train.model (in a function): "
                                   "config layer imports the higher stage layer"]
    assert unit_cycles(old) == [["tulu.config", "tulu.train"]]


def test_a_relative_import_resolves_to_its_module(tmp_path):
    pkg = tmp_path / "tulu" / "checkpoint"
    pkg.mkdir(parents=True)
    (tmp_path / "tulu" / "__init__.py").write_text("")
    (tmp_path / "tulu" / "cli.py").write_text("")
    (pkg / "__init__.py").write_text("from .manager import X\n")
    (pkg / "manager.py").write_text("from .. import cli\ndef f():\n    import tulu.cli\n")
    got = {(e.src, e.dst, e.lazy) for e in import_edges(tmp_path, ("tulu",))}
    assert got == {("tulu.checkpoint", "tulu.checkpoint.manager", False),
                   ("tulu.checkpoint.manager", "tulu.cli", False),
                   ("tulu.checkpoint.manager", "tulu.cli", True)}
