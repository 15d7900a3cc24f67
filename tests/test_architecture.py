"""The package's layering (ARCHITECTURE.md): no import cycles, each floor imports only the floors below.

Reads the source with ``ast`` (nothing is imported). Module-level imports
define the graph; function-local imports are allowed only with a reason in a
trailing comment (they break a cycle or defer a heavy optional dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "asff_jax"

# floor -> floors it may import (besides itself and the leaves).
LEAVES = {"asff_jax.errors", "asff_jax.boxes", "asff_jax.config", "asff_jax.progress",
          "asff_jax._tensorflow"}
ALLOWED = {
    "data": set(),
    "models": set(),
    "training": {"models"},
    "evaluation": {"data", "models", "training"},
    "train": {"cli", "data", "models", "training", "evaluation"},
    "tools": {"cli", "data", "models", "training", "evaluation", "tools"},
    "cli": set(),
}


def _module_name(path: Path) -> str:
  rel = path.relative_to(PKG.parent).with_suffix("")
  parts = list(rel.parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _imports(path: Path):
  """(module-level imported asff_jax modules, function-local import lines without a reason)."""
  tree = ast.parse(path.read_text())
  lines = path.read_text().splitlines()
  top, unexplained = set(), []

  def names(node):
    if isinstance(node, ast.Import):
      return [a.name for a in node.names]
    if node.module is None:
      return []
    return [node.module] + [f"{node.module}.{a.name}" for a in node.names]

  for node in tree.body:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      top.update(n for n in names(node) if n.startswith("asff_jax"))
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      for sub in ast.walk(node):
        if isinstance(sub, (ast.Import, ast.ImportFrom)):
          line = lines[sub.lineno - 1]
          if "(" not in line.split("#", 1)[-1] or "#" not in line:
            unexplained.append(f"{path.name}:{sub.lineno}: {line.strip()}")
  return top, unexplained


def _graph():
  modules = {_module_name(p): p for p in PKG.rglob("*.py")}
  graph, unexplained = {}, []
  for name, path in modules.items():
    top, bad = _imports(path)
    graph[name] = {m for m in top if m in modules}
    unexplained += bad
  return graph, unexplained


def _floor(module: str) -> str:
  parts = module.split(".")
  if len(parts) == 1:
    return "root"
  if module in LEAVES:
    return "leaf"
  if parts[1] in ("data", "models", "training", "evaluation", "tools"):
    return parts[1]
  if parts[1] in ("train", "cli"):
    return parts[1]
  return "entry"  # evaluate, predict, convert, export, benchmark: thin command lines


def test_no_import_cycles():
  graph, _ = _graph()
  state = {}

  def visit(n, stack):
    state[n] = 1
    for m in graph[n]:
      if state.get(m) == 1:
        raise AssertionError("import cycle: " + " -> ".join(stack + [n, m]))
      if m not in state:
        visit(m, stack + [n])
    state[n] = 2

  for n in graph:
    if n not in state:
      visit(n, [])


def test_each_floor_imports_only_the_floors_below():
  graph, _ = _graph()
  bad = []
  for n, deps in graph.items():
    f = _floor(n)
    if f not in ALLOWED:
      continue
    for m in deps:
      g = _floor(m)
      if g in ("leaf", "root") or g == f or g in ALLOWED[f]:
        continue
      bad.append(f"{n} ({f}) imports {m} ({g})")
  assert not bad, "\n".join(bad)
  # the data layer sits below the model and evaluation code
  assert not any(_floor(m) in ("models", "evaluation", "training", "tools")
                 for n, deps in graph.items() if _floor(n) == "data" for m in deps)


def test_function_local_imports_say_why():
  _, unexplained = _graph()
  assert not unexplained, "function-local imports need a '# ... (reason)' comment:\n" + "\n".join(unexplained)
