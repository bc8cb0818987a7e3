"""The engine is pure: no I/O library, nothing from custody/, never a clock."""

from __future__ import annotations

import ast
from pathlib import Path

import policies

PACKAGE = Path(policies.__file__).parent
ALLOWED_TOP_LEVEL = {
    "__future__",
    "collections",
    "dataclasses",
    "datetime",
    "decimal",
    "enum",
    "fractions",
    "functools",
    "itertools",
    "math",
    "pydantic",
    "re",
    "typing",
    "zoneinfo",
    "policies",
}
FORBIDDEN = {
    "socket",
    "sqlite3",
    "asyncio",
    "subprocess",
    "http",
    "urllib",
    "httpx",
    "requests",
    "sqlalchemy",
    "sqlmodel",
    "redis",
    "os",
    "pathlib",
    "io",
    "time",
    "random",
    "logging",
    "custody",
    "shutil",
    "tempfile",
    "threading",
    "multiprocessing",
    "secrets",
    "select",
    "signal",
    "sys",
    "builtins",
    "importlib",
    "ctypes",
    "pickle",
}
CLOCK_CALLS = {"now", "utcnow", "today", "monotonic", "perf_counter", "time_ns"}  # (the time module is banned)


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _imports(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_engine_imports_no_io_library_and_nothing_from_custody() -> None:
    assert len(_modules()) >= 10
    for module in _modules():
        imported = _imports(ast.parse(module.read_text(encoding="utf-8")))
        assert not imported & FORBIDDEN, (module.name, imported & FORBIDDEN)
        assert imported <= ALLOWED_TOP_LEVEL, (module.name, imported - ALLOWED_TOP_LEVEL)


def test_the_engine_never_reads_a_clock_or_opens_a_file() -> None:
    for module in _modules():
        for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                assert name not in CLOCK_CALLS | {"open", "__import__", "eval", "exec"}, (module.name, name)


def test_the_checks_catch_a_forbidden_import_and_a_clock_call() -> None:
    bad = ast.parse("import os\nfrom custody.settings import X\nfrom datetime import datetime\ndatetime.now()")
    assert _imports(bad) & FORBIDDEN == {"os", "custody"}
    calls = [n.func.attr for n in ast.walk(bad) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
    assert calls == ["now"]
