"""The package's layers point one way (README, "Which part may use which"), read from the
source with `ast`: every import counts, also those inside functions and under
TYPE_CHECKING, and so does a "gptoss_ray.x:Name" string (an import by name is still an
import). No module may reach a part it is not allowed to use, and no import cycle exists
between modules."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"gptoss_ray": ROOT / "gptoss_ray", "gptoss_kernels": ROOT / "gptoss_kernels"}

# part -> the parts it may import (a part always may import itself). A part is a
# subpackage of gptoss_ray, a top-level module of it, or "kernels" (gptoss_kernels).
BASE = {"errors", "config", "sampling_params"}
MAY_IMPORT: dict[str, set[str]] = {
    "errors": set(),
    "config": {"errors"},
    "sampling_params": {"errors"},
    "engine_api": BASE,  # the Engine protocol and its typed stats: what serve and engine share
    "metrics": {"engine_api"},
    "kernels": set(),
    "harmony": {"errors", "config"},
    "output": BASE | {"harmony"},  # the output processor: torch-free, shared by serve and LLM
    "checkpoint": {"errors", "config", "kernels"},  # write.py packs MXFP4
    "model": BASE | {"checkpoint", "kernels"},
    "parallel": BASE,  # torch.distributed concerns only: never the engine
    # engine/llm.py runs the output processor for the offline API's text
    "engine": BASE | {"engine_api", "parallel", "model", "checkpoint", "harmony", "kernels", "output"},
    # serve/cli.py reads the checkpoint's config before it starts Ray (in the CLI process;
    # the ingress, which must stay torch-free, never imports it: tests/serve/test_schema.py)
    "serve": BASE | {"engine_api", "harmony", "metrics", "checkpoint", "output"},
    "bench": BASE,
    "generate": BASE | {"engine", "harmony"},
    "cli": BASE | {"serve", "bench", "generate", "checkpoint", "engine"},
    "gptoss_ray": BASE | {"engine"},  # the package root: `from gptoss_ray import LLM`
}
# The one import by name that crosses layers on purpose: the serve layer names the engine
# class its replicas build (serve/config.py), so the ingress process never imports torch.
BY_NAME_ONLY = {("serve", "engine")}

_NAME_REF = re.compile(r"^(gptoss_(?:ray|kernels)(?:\.\w+)+):\w+$")


def _module_name(package: str, path: Path) -> str:
    rel = path.relative_to(PACKAGES[package]).with_suffix("")
    parts = [package, *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(pkg, p): p for pkg, root in PACKAGES.items() for p in root.rglob("*.py")}


def part_of(module: str) -> str:
    if module.startswith("gptoss_kernels"):
        return "kernels"
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else pieces[0]


def imports_of(path: Path, module: str, known: set[str]) -> tuple[set[str], set[str]]:
    """(modules imported by statements, modules named in "module:Name" strings)."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    stmts, by_name = set(), set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = _NAME_REF.match(node.value)
            if m and m.group(1) in known:
                by_name.add(m.group(1))
        stmts |= {t for t in targets if t in known}
    return stmts - {module}, by_name - {module}


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = _modules()
    known = set(modules)
    graph, names = {}, {}
    for module, path in modules.items():
        graph[module], names[module] = imports_of(path, module, known)
    return graph, names


def layer_violations(graph, names) -> list[str]:
    bad = []
    for module in graph:
        src = part_of(module)
        allowed = MAY_IMPORT[src] | {src}
        for target in sorted(graph[module]):
            if part_of(target) not in allowed:
                bad.append(f"{module} imports {target}")
        for target in sorted(names[module]):
            dst = part_of(target)
            if dst not in allowed and (src, dst) not in BY_NAME_ONLY:
                bad.append(f"{module} names {target}")
    return bad


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_part_has_a_rule():
    graph, _ = import_graph()
    assert {part_of(m) for m in graph} <= set(MAY_IMPORT)


def test_layers_point_one_way():
    graph, names = import_graph()
    assert layer_violations(graph, names) == []


def test_parallel_imports_nothing_from_engine():
    graph, names = import_graph()
    parallel = [m for m in graph if part_of(m) == "parallel"]
    assert parallel, "no gptoss_ray.parallel modules found"
    for module in parallel:
        assert not {t for t in graph[module] | names[module] if part_of(t) == "engine"}, module


def test_no_import_cycles():
    graph, names = import_graph()
    both = {m: graph[m] | names[m] for m in graph}
    assert find_cycle(both) is None


def test_the_checks_see_what_they_forbid(tmp_path):
    """The checks above would catch an engine import in parallel/ (by statement, inside a
    function, or by name) and a cycle: run them on a graph with those added."""
    graph, names = import_graph()
    lazy = "def f():\n    from gptoss_ray.engine.worker import Worker\n"
    (tmp_path / "bad.py").write_text(lazy)
    stmts, _ = imports_of(tmp_path / "bad.py", "gptoss_ray.parallel.bad", set(graph))
    assert stmts == {"gptoss_ray.engine.worker"}
    (tmp_path / "named.py").write_text('EXECUTOR = "gptoss_ray.engine.ray_executor:RayExecutor"\n')
    _, by_name = imports_of(tmp_path / "named.py", "gptoss_ray.parallel.named", set(graph))
    assert by_name == {"gptoss_ray.engine.ray_executor"}
    assert layer_violations({"gptoss_ray.parallel.bad": stmts}, {"gptoss_ray.parallel.bad": set()})
    assert layer_violations({"gptoss_ray.parallel.named": set()}, {"gptoss_ray.parallel.named": by_name})
    cyclic = {m: set(t) for m, t in graph.items()}
    cyclic["gptoss_ray.engine.plan"].add("gptoss_ray.engine.worker")  # worker imports plan
    assert find_cycle(cyclic) is not None
