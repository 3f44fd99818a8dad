"""The measurement scripts under docs/ (docs/results/checks/ and beside it) are not run by the suite (each takes
minutes to hours), but the docs cite their commands: every name they take from apdm must still exist, or a reader's
rerun dies at import. Read statically (the scripts run their work at import), so this stays fast."""

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
SCRIPTS = sorted(p for p in DOCS.rglob("*.py") if "__pycache__" not in p.parts)


def apdm_names(path: Path) -> list[tuple[int, str, str]]:
    """``(line, module, name)`` for every name ``path`` imports from apdm (``from apdm.x import name``) and every
    attribute it reads from an apdm module it imported that way (``jobs.attack`` after ``from apdm.bench import
    jobs``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out, modules = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "apdm":
            for alias in node.names:
                out.append((node.lineno, node.module, alias.name))
                full = f"{node.module}.{alias.name}"
                if _is_module(full):
                    modules[alias.asname or alias.name] = full
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "apdm" and alias.asname:
                    modules[alias.asname] = alias.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            out.append((node.lineno, modules[node.value.id], node.attr))
    return out


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def missing_names(path: Path) -> list[str]:
    """``file:line: module has no name`` for each name of :func:`apdm_names` that does not resolve."""
    bad = []
    for line, module, name in apdm_names(path):
        mod = importlib.import_module(module)
        if not hasattr(mod, name) and not _is_module(f"{module}.{name}"):
            bad.append(f"{path.name}:{line}: {module} has no {name}")
    return bad


def test_detects_a_moved_name(tmp_path):
    script = tmp_path / "old_check.py"
    script.write_text("from apdm.bench import jobs\nfrom apdm.bench.protect_model import attack_config\n"
                      "jobs.attack\njobs.no_such_job\n")
    assert missing_names(script) == ["old_check.py:2: apdm.bench.protect_model has no attack_config",
                                     "old_check.py:4: apdm.bench.jobs has no no_such_job"]


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(DOCS)))
def test_check_script_imports_resolve(path):
    assert missing_names(path) == []
