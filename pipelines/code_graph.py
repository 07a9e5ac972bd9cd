"""The project code a stage runs, found from its imports: what a stage's cache key hashes.

A module's dependencies are the project modules its source imports anywhere (at the top or
inside a function), read from the syntax tree without executing anything, and theirs in turn.
`from a.b import c` depends on the module a.b.c when there is one, else on a.b. Importing a
module also runs its packages' __init__.py, but those are not dependencies unless named: the
package `stages` registers every stage and would tie each stage's key to all the others.
What a module imports by a computed name (importlib) the graph cannot see: the stage names it
(`@stage(code=...)`). Project modules are the .py files under the checkout, outside .venv.
"""
from __future__ import annotations

import ast
import hashlib
import re
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXCLUDED = (".venv", "outputs", "tests")
# an import statement at any indentation (a whole syntax tree walk is 20x slower: a warm run
# pays this); one that only looks like one (in a docstring) adds a dependency, never loses one
STATEMENT = re.compile(r"^[ \t]*(?:from[ \t]+[.\w]+[ \t]+import[ \t]+(?:\([^)]*\)|[^\n#;]*)|import[ \t]+[^\n#;]+)",
                       re.MULTILINE)


def module_file(module: str, root: Path = ROOT) -> Path | None:
    """The project file of a dotted module name (a package's __init__.py), or None outside it."""
    parts = module.split(".")
    if not parts[0] or parts[0] in EXCLUDED:
        return None
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def direct_imports(module: str, root: Path = ROOT) -> frozenset[str]:
    """The project modules one module's source imports."""
    path = module_file(module, root)
    if path is None:
        return frozenset()
    stat = path.stat()
    return _imports(module, path, root, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=None)
def _imports(module: str, path: Path, root: Path, mtime_ns: int, size: int) -> frozenset[str]:
    """Parsed once per process and file version (mtime and size are the cache's key)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for statement in STATEMENT.findall(path.read_text().replace("\\\n", " ")):
        try:
            node = ast.parse(statement.strip()).body[0]
        except SyntaxError:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, package)
            for alias in node.names:
                name = f"{base}.{alias.name}" if base else alias.name
                found.add(name if module_file(name, root) else base)
    return frozenset(m for m in found if m and m != module and module_file(m, root))


def parse_packages(packages: tuple[str, ...], root: Path = ROOT) -> None:
    """Parse the imports of every module in these packages now (30 ms for the project): a
    sweep's process does before it forks its jobs, which then inherit the parsed graph rather
    than each parsing it again for its stages' keys."""
    for package in packages:
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            direct_imports(".".join(parts[:-1] if parts[-1] == "__init__" else parts), root)


def _absolute(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    base = ".".join(parts[:len(parts) - node.level + 1])
    return f"{base}.{node.module}" if node.module else base


def closure(modules: tuple[str, ...], root: Path = ROOT) -> list[str]:
    """The project modules reachable from `modules` through their imports, themselves included."""
    seen: set[str] = set()
    todo = [m for m in modules if module_file(m, root)]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(direct_imports(module, root) - seen)
    return sorted(seen)


def code_version(modules: tuple[str, ...], root: Path = ROOT) -> str:
    """sha256 of the source of every module reachable from `modules` (names and bytes)."""
    digest = hashlib.sha256()
    for module in closure(modules, root):
        digest.update(f"{module}:".encode() + module_file(module, root).read_bytes() + b"\n")
    return digest.hexdigest()
