"""Version drift as a check: does a vLLM release still have every internal the plugin touches
(vllm_internals.INTERNALS), with the parameters the plugin uses? It reads the release's sources and never imports
them (the CUDA builds of vLLM do not import on a CPU machine).

    python -m vllm_emosteer.engine.conformance SOURCE [SOURCE ...]     (make conformance)

SOURCE: a vLLM wheel (.whl), a folder that holds the `vllm` package, or `installed`. It prints a markdown table, one
row per internal and one column per version; a cell is `ok`, `absent (allowed)`, or `MISSING ...` / `SIGNATURE ...`
with the reason. The exit status is 1 when any internal fails on any source.

Resolution, kept simple: a module's top-level bindings (also under `if` and `try`), followed through `from ...
import` (star imports too) and `import ... as`; a class's members are the names its body binds, every `self.x = ...`
in its methods and the members of its base classes found in vLLM (by name, through the module's imports).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
import sys
import time
import zipfile
from pathlib import Path

from .vllm_internals import INTERNALS, RUNNER_GROUPS, Internal

OK, ABSENT = "ok", "absent (allowed)"
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


class Source:
    """One release's `vllm/**.py` files (path -> bytes), parsed on demand."""

    def __init__(self, files: dict[str, bytes], version: str):
        self.files, self.version = files, version
        self.paths = {name[:-3].replace("/", ".").removesuffix(".__init__"): name for name in files}

    def tree(self, module: str) -> ast.Module | None:
        path = self.paths.get(module)
        return _parse(self.files[path]) if path else None

    def absolute(self, module: str, node: ast.ImportFrom) -> str:
        """The module a `from ... import` in `module` names."""
        if not node.level:
            return node.module
        package = module if self.paths[module].endswith("__init__.py") else module.rpartition(".")[0]
        package = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
        return f"{package}.{node.module}" if node.module else package

    def lookup(self, module: str, name: str, seen=None):
        """What `name` is in `module`: ("module", dotted) or (kind, module, node), kind "def", "class" or "value"."""
        seen = set() if seen is None else seen
        if (module, name) in seen or self.tree(module) is None:
            return None
        seen.add((module, name))
        for node in reversed(list(_top_level(self.tree(module).body))):  # the last binding wins, as in Python
            if name in _binds(node):
                kind = "class" if isinstance(node, ast.ClassDef) else "def" if isinstance(node, FUNCTIONS) else "value"
                return (kind, module, node)
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if (alias.asname or alias.name.partition(".")[0]) == name:
                        return ("module", alias.name if alias.asname else name)
            elif isinstance(node, ast.ImportFrom):
                source = self.absolute(module, node)
                for alias in node.names:  # a star import, or `from source import name`: a name or a submodule
                    if alias.name == "*" or (alias.asname or alias.name) == name:
                        found = self.lookup(source, name if alias.name == "*" else alias.name, seen)
                        if found:
                            return found
        return ("module", f"{module}.{name}") if f"{module}.{name}" in self.paths else None  # a submodule

    def bases(self, module: str, cls: ast.ClassDef):
        """The base classes of `cls` that are defined in this source: (module, ClassDef)."""
        for base in cls.bases:
            if isinstance(base, (ast.Name, ast.Attribute)):
                first, *rest = ast.unparse(base).split(".")
                found = self.lookup(module, first)
                for part in rest:
                    found = self.lookup(found[1], part) if found and found[0] == "module" else None
                if found and found[0] == "class" and found[2] is not cls:
                    yield found[1], found[2]

    def members(self, module: str, cls: ast.ClassDef) -> set[str]:
        names = set(_body_names(cls))
        for function in (node for node in cls.body if isinstance(node, FUNCTIONS)):  # self.x = ... in any method
            names |= {node.attr for node in ast.walk(function) if isinstance(node, ast.Attribute) and
                      isinstance(node.ctx, ast.Store) and isinstance(node.value, ast.Name) and node.value.id == "self"}
        for base_module, base in self.bases(module, cls):
            names |= self.members(base_module, base)
        return names

    def method(self, module: str, cls: ast.ClassDef, name: str):
        """`cls`'s binding of `name`, or its nearest base class's; None when none binds it."""
        found = _body_names(cls).get(name)
        inherited = (self.method(base_module, base, name) for base_module, base in self.bases(module, cls))
        return found if found is not None else next(filter(None, inherited), None)


@functools.lru_cache(maxsize=4096)
def _parse(text: bytes) -> ast.Module:  # by content: sources that share a file (doctored copies) parse it once
    return ast.parse(text)


def _top_level(body):
    for node in body:
        yield node
        if isinstance(node, (ast.If, ast.Try)):
            yield from _top_level(node.body + node.orelse + getattr(node, "finalbody", []) +
                                  [s for handler in getattr(node, "handlers", []) for s in handler.body])


def _binds(node) -> list[str]:
    """The names a definition or an assignment binds."""
    if isinstance(node, (*FUNCTIONS, ast.ClassDef)):
        return [node.name]
    targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
    return [target.id for target in targets if isinstance(target, ast.Name)]


def _body_names(cls: ast.ClassDef) -> dict:
    return {name: node for node in cls.body for name in _binds(node)}  # the last binding wins, as in Python


def signature(entry: Internal, function, method: bool) -> str:
    """OK, or what in `function`'s signature differs from what the plugin uses."""
    if not (entry.params or entry.kwargs or entry.returns):
        return OK
    if not isinstance(function, FUNCTIONS):
        return f"SIGNATURE {entry.name} is not a def: its parameters cannot be read"
    args = function.args
    positional = [a.arg for a in args.posonlyargs + args.args][1 if method else 0:]
    slots = positional + ([f"*{args.vararg.arg}"] if args.vararg else [])
    if slots[: len(entry.params)] != list(entry.params):
        return f"SIGNATURE {entry.name}({', '.join(slots)}): the plugin passes ({', '.join(entry.params)}) by position"
    missing = [k for k in entry.kwargs if k not in positional + [a.arg for a in args.kwonlyargs]]
    if missing:
        return f"SIGNATURE {entry.name} has no parameter {', '.join(missing)}"
    returns = ast.unparse(function.returns).strip("'\"") if function.returns else "nothing annotated"
    if entry.returns and returns != entry.returns:
        return f"SIGNATURE {entry.name} returns {returns}; the plugin expects {entry.returns}"
    return OK


def check(source: Source, entry: Internal) -> tuple[bool, str]:
    """(whether the internal itself was found, the cell)."""
    if entry.module not in source.paths:
        return False, f"MISSING module {entry.module}"
    if entry.kind == "module":
        return True, OK
    first, _, member = entry.name.partition(".")
    found = source.lookup(entry.module, first)
    if entry.kind in ("function", "name"):
        if found is None or (entry.kind == "function" and found[0] != "def"):
            return False, f"MISSING {entry.kind} {first} in {entry.module}"
        wrong = [m for m in importers_of(source, entry, found[1]) if m not in entry.importers]
        if wrong:
            return True, f"MISSING wrap: {', '.join(wrong)} import {first} by name; the plugin wraps it only in " \
                         f"{', '.join(entry.importers)}"
        return True, signature(entry, found[-1], method=False)
    if found is None or found[0] != "class":
        return False, f"MISSING class {first} in {entry.module}"
    module, cls = found[1], found[2]
    if entry.kind in ("method", "attribute"):
        binding = source.method(module, cls, member) if entry.kind == "method" else None
        if binding is None and (entry.kind == "method" or member not in source.members(module, cls)):
            return False, f"MISSING {entry.kind} {entry.name} in {entry.module}"
        return True, signature(entry, binding, method=True) if binding is not None else OK
    members = source.members(module, cls) if entry.attrs else set()
    missing = [a for a in entry.attrs if a not in members]
    if missing:
        return True, f"MISSING {first}." + ", .".join(missing)
    overridden = [m for m in entry.inherits if m in _body_names(cls)]
    if overridden:
        return True, f"SIGNATURE {first} overrides {', '.join(overridden)}: the plugin wraps the base class's"
    return True, signature(entry, source.method(module, cls, "__init__"), method=True)


def importers_of(source: Source, entry: Internal, defined_in: str) -> list[str]:
    """The modules that import `entry`'s function by name from the module that defines it."""
    if not entry.importers:
        return []
    found = []
    for module, path in source.paths.items():
        if entry.name.encode() in source.files[path] and module != defined_in:
            if any(isinstance(node, ast.ImportFrom) and source.absolute(module, node) == defined_in
                   and any(alias.name == entry.name for alias in node.names) for node in ast.walk(source.tree(module))):
                found.append(module)
    return sorted(found)


def check_source(source: Source, internals=INTERNALS, groups=RUNNER_GROUPS) -> list[str]:
    """One cell per internal, with the allowed absences applied."""
    results = [check(source, entry) for entry in internals]
    cells = []
    for entry, (found, cell) in zip(internals, results):
        if entry.group and groups[entry.group] not in source.paths:
            cell = ABSENT  # the whole runner group is gone
        elif not found and (entry.optional or any(
                other.one_of == entry.one_of and result == (True, OK)
                for other, result in zip(internals, results) if entry.one_of and other is not entry)):
            cell = ABSENT
        cells.append(cell)
    return cells


def read_source(spec: str) -> Source:
    """A wheel, a folder that holds `vllm`, or "installed" (found without importing vllm)."""
    if spec == "installed":
        found = importlib.util.find_spec("vllm")
        if found is None or not found.submodule_search_locations:
            raise SystemExit("conformance: vllm is not installed")
        spec = str(Path(list(found.submodule_search_locations)[0]).parent)
    path = Path(spec)
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as wheel:
            files = {n: wheel.read(n) for n in wheel.namelist() if n.startswith("vllm/") and n.endswith(".py")}
    else:
        files = {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted((path / "vllm").rglob("*.py"))}
    if not files:
        raise SystemExit(f"conformance: no vllm package in {spec}")
    version = re.search(rb"(?m)^__version__ = (?:version = )?['\"]([^'\"]+)", files.get("vllm/_version.py", b""))
    return Source(files, version[1].decode() if version else path.name.split("-")[1] if path.suffix == ".whl"
                  else path.name)


def label(entry: Internal) -> str:
    text = f"{entry.module}.{entry.name}" if entry.name else entry.module
    if entry.params or entry.kwargs:
        text += f"({', '.join(entry.params + tuple(f'{k}=' for k in entry.kwargs))})"
    text += f" -> {entry.returns}" if entry.returns else ""
    text += "".join(f" .{a}" for a in entry.attrs) + "".join(f" inherits {m}" for m in entry.inherits)
    return f"`{text}`".replace("|", "\\|")


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    columns = []
    for spec in argv:
        start = time.monotonic()
        source = read_source(spec)
        cells = check_source(source)
        failed = sum(cell not in (OK, ABSENT) for cell in cells)
        print(f"conformance: {spec}: vLLM {source.version}, {len(cells)} internals, {failed} failing "
              f"({time.monotonic() - start:.1f} s)", file=sys.stderr, flush=True)
        columns.append((source.version, cells))
    print("| internal | used by | " + " | ".join(version for version, _ in columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for row, entry in enumerate(INTERNALS):
        cells = [c[row].replace("|", "\\|") for _, c in columns]
        print(f"| {label(entry)} | {entry.used_by} | " + " | ".join(cells) + " |")
    return int(any(cell not in (OK, ABSENT) for _, cells in columns for cell in cells))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
