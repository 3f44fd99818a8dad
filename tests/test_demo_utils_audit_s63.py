"""Audit of the demo, apdm.utils and the toy instruments (session 63): a damaged instruments file gave a traceback
naming no file; atomic_dir replaced a symlinked output folder by a local one (and failed the next time); the demo's
quiet=True still showed the L2P and evaluation bars; `apdm demo --out ""` ran in the current folder."""

import os
import shutil

import pytest

from apdm.cli import main


@pytest.fixture
def instruments_copy(tmp_path):
    from apdm.toy.world import instruments_path

    dst = tmp_path / "inst"
    shutil.copytree(instruments_path(), dst)
    return dst


def test_a_truncated_instruments_file_is_named(instruments_copy):
    from apdm.toy.instruments import load_instruments

    f = instruments_copy / "encoder.safetensors"
    f.write_bytes(f.read_bytes()[:700])
    with pytest.raises(ValueError, match=f"{f}: not a readable safetensors file"):
        load_instruments(instruments_copy)


def test_a_corrupt_instruments_json_is_named(instruments_copy):
    from apdm.toy.instruments import load_instruments

    f = instruments_copy / "instruments.json"
    f.write_text(f.read_text()[:50])
    with pytest.raises(ValueError, match=f"{f}: not valid JSON"):
        load_instruments(instruments_copy)


def test_atomic_dir_writes_through_a_symlinked_folder(tmp_path):
    from apdm.utils import atomic_dir

    real = tmp_path / "bigdisk" / "model"
    real.mkdir(parents=True)
    (real / "old.txt").write_text("old")
    link = tmp_path / "out" / "model"
    link.parent.mkdir()
    link.symlink_to(real, target_is_directory=True)
    for k in range(2):  # the second time failed ("Cannot call rmtree on a symbolic link")
        with atomic_dir(link) as tmp:
            (tmp / "new.txt").write_text(str(k))
        assert link.is_symlink() and (real / "new.txt").read_text() == str(k)
        assert not (real / "old.txt").exists()
        assert sorted(os.listdir(link.parent)) == ["model"]  # no .model.old link left
        assert sorted(os.listdir(real.parent)) == ["model"]


def test_atomic_dir_replacing_a_file_leaves_no_litter(tmp_path):
    from apdm.utils import atomic_dir

    f = tmp_path / "f"
    f.write_text("a file")
    for _ in range(2):
        with atomic_dir(f) as tmp:
            (tmp / "x").write_text("x")
        assert f.is_dir() and sorted(os.listdir(tmp_path)) == ["f"]


def test_run_demo_quiet_hides_every_bar(monkeypatch):
    from apdm import demo
    from apdm.utils import progress_enabled, set_progress

    seen = []
    monkeypatch.setattr(demo, "_run_demo", lambda out, quick, quiet: seen.append(progress_enabled()))
    set_progress(True)
    demo.run_demo("x", quiet=True)
    demo.run_demo("x", quiet=False)
    assert seen == [False, True] and progress_enabled()  # and the caller's setting is back


def test_demo_refuses_an_empty_out(tmp_path, monkeypatch, capsys):
    from apdm import demo

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: pytest.fail("the demo ran"))  # (fails fast)
    assert main(["demo", "--quick", "--out", ""]) == 2
    assert "--out is empty" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
