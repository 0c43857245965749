"""Import hygiene of gateway/ and broker/: every module imports on its own
(an import cycle shows as an ImportError for whichever module of the cycle is
imported first), and no function imports a project module to dodge one."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("gateway", "broker")

# Project imports made inside a function on purpose, (file, module) → why.
# Each is about start-up cost, never about a cycle.
LAZY_IMPORTS_ALLOWED = {
    ("gateway/cli.py", "gateway.server"): "the node's web stack (~250 ms) only for serve, dev and hooks, not token",
    ("gateway/cli.py", "gateway.hooks"): "the webhook dispatcher (~180 ms) only for herald hooks",
    ("gateway/cli.py", "broker.publisher"): "the NATS client (~140 ms) only for herald publish",
    ("gateway/cli.py", "gateway.client.listen"): "the WebSocket client (aiohttp, ~100 ms) only for herald listen",
}

# Run in a fresh interpreter: imports each module with no project module loaded
# (third-party ones stay: they cannot take part in a cycle of ours), and
# reports, per module, the error or the project modules the import loaded.
_IMPORT_EACH = """
import importlib, json, sys, traceback

packages = ("gateway", "broker")
report = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m.partition(".")[0] in packages]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        report[name] = {"error": traceback.format_exc(limit=-6)}
    else:
        report[name] = {"loaded": sorted(m for m in sys.modules if m.partition(".")[0] in packages)}
print(json.dumps(report))
"""


def _sources() -> list[Path]:
    return sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_each() -> dict[str, dict[str, Any]]:
    # __main__ modules run the CLI when imported.
    names = [_module_name(path) for path in _sources() if path.stem != "__main__"]
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, json.dumps(names)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, dict[str, Any]] = json.loads(done.stdout)
    assert sorted(report) == sorted(names)
    return report


def test_every_module_imports_on_its_own() -> None:
    report = _import_each()
    failures = {name: result["error"] for name, result in report.items() if "error" in result}
    assert not failures, "\n".join(f"import {name}:\n{error}" for name, error in failures.items())
    # Settings and auth share the key parsing (gateway.public_keys) and depend on each other no more.
    assert "gateway.auth" not in report["gateway.settings"]["loaded"]


def _imported_modules(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """Absolute names of the modules an import statement reads from."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level == 0:
        return [node.module or ""]
    package = module.split(".")
    base = package[: len(package) - node.level + (1 if is_package else 0)]
    if node.module:
        return [".".join([*base, node.module])]
    return [".".join([*base, alias.name]) for alias in node.names]  # from . import x


def _type_checking_only(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:``: imports that exist for the type checker alone."""
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _lazy_project_imports() -> dict[tuple[str, str], list[int]]:
    """(file, module) → lines where a function, or an ``if TYPE_CHECKING:``
    block, imports that project module (both hide a cycle from a plain import)."""
    found: dict[tuple[str, str], list[int]] = {}
    for path in _sources():
        module = _module_name(path)
        tree = ast.parse(path.read_text(), str(path))
        nested = {
            node
            for scope in ast.walk(tree)
            if isinstance(scope, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) or _type_checking_only(scope)
            for node in ast.walk(scope)
            if isinstance(node, ast.Import | ast.ImportFrom)
        }
        for node in sorted(nested, key=lambda node: node.lineno):
            for name in _imported_modules(node, module, path.stem == "__init__"):
                if name.partition(".")[0] in PACKAGES:
                    found.setdefault((path.relative_to(ROOT).as_posix(), name), []).append(node.lineno)
    return found


def test_no_lazy_project_imports() -> None:
    found = _lazy_project_imports()
    unexpected = {key: lines for key, lines in found.items() if key not in LAZY_IMPORTS_ALLOWED}
    assert not unexpected, (
        "imports of project modules inside functions (move them to the top of the module; "
        "if one is there for start-up cost, add it to LAZY_IMPORTS_ALLOWED with its reason): "
        + ", ".join(f"{file}:{lines} {name}" for (file, name), lines in sorted(unexpected.items()))
    )
    stale = sorted(set(LAZY_IMPORTS_ALLOWED) - set(found))
    assert not stale, f"LAZY_IMPORTS_ALLOWED entries no longer needed: {stale}"


def test_lazy_import_scan_resolves_relative_imports() -> None:
    tree = ast.parse("from .server import serve\nfrom . import hooks\nfrom ..auth import x\nimport broker.kv\n")
    imports = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
    assert [_imported_modules(node, "gateway.settings.validation", False) for node in imports] == [
        ["gateway.settings.server"],
        ["gateway.settings.hooks"],
        ["gateway.auth"],
        ["broker.kv"],
    ]
    assert _imported_modules(imports[0], "gateway.settings", True) == ["gateway.settings.server"]
