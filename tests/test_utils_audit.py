"""Findings of the 2026-12-07 audit of apdm/utils.py, each with the behaviour it fixed."""
import os
import stat

import pytest

from apdm import utils


def test_an_overwritten_file_keeps_its_permissions(tmp_path):
    f = tmp_path / "log.json"
    f.write_text("old")
    os.chmod(f, 0o600)  # the user made it private
    utils.atomic_write_text(f, "new")
    assert f.read_text() == "new" and stat.S_IMODE(f.stat().st_mode) == 0o600  # was reset to 0644


def test_atomic_dir_puts_the_old_folder_back_when_stopped_between_its_renames(tmp_path, monkeypatch):
    final = tmp_path / "model"
    final.mkdir()
    (final / "w.txt").write_text("OLD")
    real_replace = os.replace
    calls = []

    def replace(a, b):
        calls.append((a, b))
        if len(calls) == 2:  # the new folder's move into place
            raise OSError(28, "No space left on device (injected)")
        return real_replace(a, b)

    monkeypatch.setattr(utils.os, "replace", replace)
    with pytest.raises(OSError):
        with utils.atomic_dir(final) as tmp:
            (tmp / "w.txt").write_text("NEW")
    monkeypatch.setattr(utils.os, "replace", real_replace)
    assert (final / "w.txt").read_text() == "OLD"  # was: no model/ at all, only a hidden .model.old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_atomic_dir_clears_a_stale_old_folder(tmp_path):
    (tmp_path / ".model.old").mkdir()
    with utils.atomic_dir(tmp_path / "model") as tmp:
        (tmp / "w.txt").write_text("NEW")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_missing_package_hint_pins_the_installed_torch():
    from importlib.metadata import version

    with pytest.raises(utils.MissingDependency) as info:
        utils.optional_import("apdm_no_such_module_xyz", "metrics")
    assert f"torch=={version('torch').split('+')[0]} " in str(info.value)
