"""Fixes of the 2026-12-07 (second) session, each with the behaviour it fixed."""
from __future__ import annotations

import json
from pathlib import Path

from helpers import noise_photo

from apdm.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_a_rho_in_a_folder_named_toy_is_resolved_once_a_run(tmp_path, monkeypatch, apdm_log):
    """``--rho toy`` with a ρ in ./toy resolved the folder three times (checked, loaded, hashed), so its warning
    was logged three times; it is resolved once and said once, and the run still uses ./toy's ρ."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "toy").mkdir()
    for f in (REPO / "assets" / "toy" / "rho").iterdir():
        (tmp_path / "toy" / f.name).write_bytes(f.read_bytes())
    src = noise_photo(tmp_path / "a.png", 32, 32)
    assert main(["protect-images", "--method", "ldu", "--rho", "toy", "--model", "toy", "--input", str(src),
                 "--output", str(tmp_path / "out"), "quiet=true"]) == 0
    assert apdm_log().count("it holds a ρ") == 1
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["settings"]["rho_path"] == "toy"  # the path as given is what the manifest records
