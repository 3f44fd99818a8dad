"""The measurement scripts under docs/ (docs/results/checks/ and beside it) are not run by the suite (each takes
minutes to hours), but the docs cite their commands: every name they take from apdm must still exist, and every
call they make to an apdm function or class must still fit its signature, or a reader's rerun dies. Read
statically (the scripts run their work at import), so this stays fast."""

import ast
import importlib
import importlib.util
import inspect
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
SCRIPTS = sorted(p for p in DOCS.rglob("*.py") if "__pycache__" not in p.parts)


def _apdm_bindings(tree: ast.AST) -> tuple[dict[str, tuple[int, str, str]], dict[str, str]]:
    """``(names, modules)``: local name -> ``(line, module, name)`` for each ``from apdm.x import name`` (modules
    too), and local name -> module path for each apdm module imported (``from apdm.bench import jobs``,
    ``import apdm.core.diffusion as D``)."""
    names, modules = {}, {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "apdm":
            for alias in node.names:
                local, full = alias.asname or alias.name, f"{node.module}.{alias.name}"
                names[local] = (node.lineno, node.module, alias.name)
                if _is_module(full):
                    modules[local] = full
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "apdm" and alias.asname:
                    modules[alias.asname] = alias.name
    return names, modules


def apdm_names(path: Path) -> list[tuple[int, str, str]]:
    """``(line, module, name)`` for every name ``path`` imports from apdm (``from apdm.x import name``) and every
    attribute it reads from an apdm module it imported that way (``jobs.attack`` after ``from apdm.bench import
    jobs``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names, modules = _apdm_bindings(tree)
    out = list(names.values())
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            out.append((node.lineno, modules[node.value.id], node.attr))
    return sorted(out)


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


def bad_calls(path: Path) -> list[str]:
    """``file:line: module.name(...): why`` for each call to an apdm function or class (by an imported name, or as
    ``module.name`` on an imported apdm module) whose arguments do not bind to its signature: too many positional
    arguments, an unknown keyword, or (when the call spreads no ``*args`` / ``**kwargs``) a missing required one.
    Names that do not resolve are :func:`missing_names`' business and skipped here."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names, modules = _apdm_bindings(tree)
    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in names:
            module, name = names[f.id][1:]
        elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in modules:
            module, name = modules[f.value.id], f.attr
        else:
            continue
        obj = getattr(importlib.import_module(module), name, None)
        if obj is None or not callable(obj):  # unresolved, or a module imported by name
            continue
        try:
            sig = inspect.signature(obj)
        except (TypeError, ValueError):  # builtins without a signature
            continue
        spread = any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords)
        args = [None] * sum(not isinstance(a, ast.Starred) for a in node.args)
        kwargs = {k.arg: None for k in node.keywords if k.arg is not None}
        try:
            (sig.bind_partial if spread else sig.bind)(*args, **kwargs)
        except TypeError as e:
            bad.append(f"{path.name}:{node.lineno}: {module}.{name}(...): {e}")
    return bad


def test_detects_a_moved_name(tmp_path):
    script = tmp_path / "old_check.py"
    script.write_text("from apdm.bench import jobs\nfrom apdm.bench.protect_model import attack_config\n"
                      "jobs.attack\njobs.no_such_job\n")
    assert missing_names(script) == ["old_check.py:2: apdm.bench.protect_model has no attack_config",
                                     "old_check.py:4: apdm.bench.jobs has no no_such_job"]


def test_detects_a_changed_signature(tmp_path):
    script = tmp_path / "old_call.py"
    script.write_text("from apdm.utils import atomic_write_json\nfrom apdm.core import diffusion as D\n"
                      "atomic_write_json('f.json', {}, 'extra', 'args', 'here')\n"
                      "atomic_write_json('f.json', {}, no_such_option=True)\n"
                      "atomic_write_json('f.json')\n"
                      "atomic_write_json(*paths)\n"
                      "D.encode_prompt(te, tok, ['a'], **kw)\n")
    sig = inspect.signature(importlib.import_module("apdm.utils").atomic_write_json)
    assert len(sig.parameters) < 5 and "no_such_option" not in sig.parameters  # else the case below is no case
    found = bad_calls(script)
    assert [b.split(":")[1] for b in found] == ["3", "4", "5"], found
    assert "no_such_option" in found[1]


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(DOCS)))
def test_check_script_imports_resolve(path):
    assert missing_names(path) == []


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(DOCS)))
def test_check_script_calls_fit_signatures(path):
    assert bad_calls(path) == []
