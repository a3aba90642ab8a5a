"""posttrain's imports point down the floors and never run in a circle (lazy imports inside functions count).

Floors, lowest first: config/dist/errors -> data, optim -> models -> augment -> train|eval -> select|hub|finetuning -> the loading facade
-> commands/cli/bench. A module may import its own floor or any lower one; circles are refused on every floor.
"""

from __future__ import annotations

import ast
from pathlib import Path

import posttrain

PACKAGE_DIR = Path(posttrain.__file__).resolve().parent
FLOORS = {
    "posttrain": 0, "posttrain.config": 0, "posttrain.dist": 0, "posttrain.errors": 0, "posttrain.hubcache": 0,
    "posttrain.data": 1, "posttrain.optim": 1,
    "posttrain.models": 2,
    "posttrain.augment": 3,
    "posttrain.train": 4, "posttrain.eval": 4,
    "posttrain.select": 5, "posttrain.hub": 5, "posttrain.finetuning": 5,
    "posttrain.loading": 6,
    "posttrain.serve": 7, "posttrain.commands": 7, "posttrain.cli": 7, "posttrain.bench": 7, "posttrain.__main__": 7,
}


def module_files() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(source: str, name: str, package: str, modules: set[str]) -> set[str]:
    """The posttrain modules ``source`` (module ``name`` in ``package``) imports anywhere, function bodies
    included, each resolved to the deepest module that exists."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                kept = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(kept + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rsplit(".", 1)[0] if "." in target else ""
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def import_edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Every module -> the posttrain modules it imports."""
    return {name: imported_modules(path.read_text(), name,
                                   name if path.name == "__init__.py" else name.rsplit(".", 1)[0], set(modules))
            for name, path in modules.items()}


def floor_of(module: str) -> int:
    key = module
    while key not in FLOORS:
        if "." not in key:
            raise AssertionError(f"{module} sits on no floor: add its package to FLOORS in {__file__}")
        key = key.rsplit(".", 1)[0]
    return FLOORS[key]


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    found.append(sorted(group))
    return found


def test_no_import_circle():
    assert circles(import_edges(module_files())) == []


def test_no_import_runs_up_a_floor():
    upward = sorted(f"{source} (floor {floor_of(source)}) imports {target} (floor {floor_of(target)})"
                    for source, targets in import_edges(module_files()).items()
                    for target in targets if floor_of(target) > floor_of(source))
    assert upward == []


def test_the_checks_see_a_planted_circle_and_upward_arrow():
    edges = {"posttrain.data.a": {"posttrain.train.b"}, "posttrain.train.b": {"posttrain.data.a"}}
    assert circles(edges) == [["posttrain.data.a", "posttrain.train.b"]]
    assert floor_of("posttrain.train.b") > floor_of("posttrain.data.a")


def test_lazy_and_relative_imports_inside_functions_are_seen():
    source = "def f():\n    from posttrain.train import sam\n\nclass C:\n    def g(self):\n        from ..hub import card\n"
    modules = {"posttrain.data.x", "posttrain.train.sam", "posttrain.hub.card", "posttrain.hub", "posttrain.train"}
    assert imported_modules(source, "posttrain.data.x", "posttrain.data", modules) == {
        "posttrain.train", "posttrain.train.sam", "posttrain.hub", "posttrain.hub.card"}


def package_of(module: str) -> str:
    """The floor entry a module belongs to (``posttrain.train.sam`` -> ``posttrain.train``)."""
    key = module
    while key not in FLOORS:
        key = key.rsplit(".", 1)[0]
    return key


def test_packages_on_one_floor_do_not_import_each_other_both_ways():
    """train and eval share a floor: one may use the other (the trainer's validation EER), never both ways."""
    arrows = {(package_of(source), package_of(target)) for source, targets in import_edges(module_files()).items()
              for target in targets if package_of(source) != package_of(target)
              and floor_of(source) == floor_of(target) and package_of(source) != "posttrain"}
    assert sorted(pair for pair in arrows if pair[::-1] in arrows) == []


def test_no_module_is_longer_than_500_lines_and_none_of_data_over_400():
    long = {name: len(path.read_text().splitlines()) for name, path in module_files().items()}
    assert {name: lines for name, lines in long.items() if lines > 500} == {}
    # the loader and the shard builder are read most by newcomers: each concept in a module of its own
    assert {name: lines for name, lines in long.items() if name.startswith("posttrain.data.") and lines > 400} == {}
