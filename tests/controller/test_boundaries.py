"""The controller's side of the seam: it imports only the workers' contract, and never torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def test_no_controller_module_imports_workers_or_memory_except_the_contract():
    offenders = {}
    for path in sorted((ROOT / "controller").rglob("*.py")):
        bad = sorted(
            name for name in imported_modules(path)
            if name.split(".")[0] in ("workers", "memory") and not name.startswith("workers.contract") and name != "workers"
        )
        if bad:
            offenders[str(path.relative_to(ROOT))] = bad
    assert offenders == {}


def test_the_contract_imports_nothing_of_the_workers_but_itself_and_no_torch():
    for path in sorted((ROOT / "workers" / "contract").rglob("*.py")):
        names = imported_modules(path)
        assert not any(n.split(".")[0] in ("torch", "memory") for n in names), path
        assert all(n.startswith("workers.contract") for n in names if n.split(".")[0] == "workers"), path


def test_importing_the_server_and_the_app_leaves_torch_out():
    code = (
        "import sys\n"
        "import controller.app, controller.cli, controller.server\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
