"""Audited defects of the config loader and the command line: whole-section overrides, indexed overrides into
lists, shortcut flags taken as typed, int/float parsing of overrides, duplicate recipe keys, type names in
messages, the demo's report reading and the toy upscaler's output folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from apdm import config as C
from apdm.cli import main

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- 1. a section given as a mapping
def test_a_section_override_changes_only_the_keys_it_names():
    """personalization={max_grad_norm: 2.0} built the section from PersonalizationConfig's class defaults:
    protect-images' surrogate lost its lr 5e-7, 1000 steps and trained text encoder without a word."""
    cfg = C.load_config(C.ProtectImagesRunConfig, None, ["personalization={max_grad_norm: 2.0}"])
    p = cfg.personalization
    assert (p.max_grad_norm, p.learning_rate, p.steps, p.train_text_encoder) == (2.0, 5e-7, 1000, True)
    # on top of the current value, recipe included: the recipe's model.path stays
    recipe = ROOT / "recipes" / "sd15-evaluate-apdm.yaml"
    path = C.load_config(C.EvaluateRunConfig, recipe).model.path
    cfg = C.load_config(C.EvaluateRunConfig, recipe, ["model={device: cpu}"])
    assert (cfg.model.path, cfg.model.device) == (path, "cpu")
    assert path != C.ModelConfig().path
    # and on top of earlier overrides
    cfg = C.load_config(C.PersonalizeRunConfig, None, ["personalization.steps=7", "personalization={seed: 3}"])
    assert (cfg.personalization.steps, cfg.personalization.seed) == (7, 3)


def test_a_section_override_still_refuses_unknown_keys_and_lists_stay_whole():
    with pytest.raises(C.ConfigError, match=re.escape("unknown key 'model.devise'; did you mean 'device'?")):
        C.load_config(C.PersonalizeRunConfig, None, ["model={devise: cpu}"])
    with pytest.raises(C.ConfigError, match=re.escape("'personalization.steps' expects int")):
        C.load_config(C.PersonalizeRunConfig, None, ["personalization={steps: many}"])
    # a list of sections is replaced whole: the entry is built on the class defaults (guards working behaviour)
    cfg = C.load_config(C.EvaluateRunConfig, None, ["personalizations=[{method: lora}, {method: ti}]",
                                                     "personalizations=[{method: ti}]"])
    assert [(p.method, p.steps) for p in cfg.personalizations] == [("ti", 800)]


# ---------------------------------------------------------------------------- 2. indexed overrides into lists
@pytest.mark.parametrize("cls, override, said", [
    (C.ProtectModelRunConfig, "subjects.0.instance_data=photos",
     "'subjects' has no entries (index 0 is out of range); give the whole list, e.g. subjects=[{instance_data: "),
    (C.EvaluateRunConfig, "sample.prompts.0=x", "'sample.prompts' is a list of str, not of sections"),
    (C.ProtectModelRunConfig, "protect.attacker_mix.0.method=ti",
     "'protect.attacker_mix' is a list of dict[str, Any], not of sections"),
    (C.PersonalizeRunConfig, "output_dir.x=1", "'output_dir' is a str setting, not a section"),
])
def test_an_index_into_a_list_that_has_no_such_entry_says_so(cls, override, said):
    """These said "unknown key 'subjects'; did you mean 'subjects'?"."""
    with pytest.raises(C.ConfigError) as exc:
        C.load_config(cls, None, [override])
    assert said in str(exc.value)
    assert "did you mean" not in str(exc.value) and "unknown key" not in str(exc.value)
    assert "whole" in str(exc.value)


def test_an_index_into_a_list_of_sections_that_has_the_entry_works():
    """Guards working behaviour: an in-range index into a given list of sections."""
    cfg = C.load_config(C.ProtectModelRunConfig, None, ["subjects=[{instance_data: a}, {instance_data: b}]",
                                                         "subjects.1.instance_data=photos"])
    assert [s.instance_data for s in cfg.subjects] == ["a", "photos"]


# ---------------------------------------------------------------------------- 3. shortcut flags as typed
def _printed_config(capsys, argv):
    assert main(argv + ["--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_protect_images_flags_are_taken_as_typed(capsys):
    """--input "[2024] photos/" was refused (a YAML list/mapping), --input "[me]" became a list, --output "'out'"
    lost its quotes: a flag's value is a path, not YAML."""
    got = _printed_config(capsys, ["protect-images", "--input", "[2024] photos/", "--output", "'out'",
                                   "--model", "my model: v2", "--target", "#1.png", "--rho", "010"])
    assert (got["input"], got["output_dir"], got["model"]["path"], got["target"], got["rho_path"]) == \
        ("[2024] photos/", "'out'", "my model: v2", "#1.png", "010")
    assert _printed_config(capsys, ["protect-images", "--input", "[me]"])["input"] == "[me]"
    # a key=value override still wins over its flag, and the budget flag still reads 8/255
    got = _printed_config(capsys, ["protect-images", "--output", "a", "--budget", "8/255", "output_dir=b"])
    assert (got["output_dir"], got["budget"]) == ("b", "8/255")


# ---------------------------------------------------------------------------- 4, 5. the demo's gallery
def _report_with_gallery(folder: Path, file: str) -> None:
    from apdm.evaluation.report import write_report

    write_report(folder / "report.html", C.EvaluateRunConfig(), [], [{"subject": "s", "title": "Zoë", "file": file}])


def test_demo_gallery_undoes_the_reports_url_quoting(tmp_path):
    """report.py writes src=html.escape(quote(file)); the demo undid the HTML escaping only, so its combined report
    quoted the name a second time (Jos%25C3%25A9.png: a broken image)."""
    from apdm.demo import _gallery

    name = "images/José a&b'c 100%.png"
    _report_with_gallery(tmp_path, name)
    assert _gallery(tmp_path) == [{"file": name, "title": "Zoë"}]


def test_demo_gallery_reads_the_report_as_utf8_under_an_ascii_locale(tmp_path):
    """read_text() without an encoding crashed on a report with non-ASCII text under a non-UTF-8 locale."""
    _report_with_gallery(tmp_path, "images/José.png")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = ("import sys, locale; from pathlib import Path; from apdm.demo import _gallery; "
            "assert locale.getpreferredencoding(False).lower() not in ('utf-8', 'utf8'), 'locale is UTF-8'; "
            "g = _gallery(Path(sys.argv[1])); assert g[0]['file'] == 'images/Jos\\xe9.png', g; print('ok')")
    run = subprocess.run([sys.executable, "-X", "utf8=0", "-c", code, str(tmp_path)], env=env, capture_output=True,
                         check=False, encoding="utf-8", errors="replace", timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


# ---------------------------------------------------------------------------- 6. toy upscaler out= a file
def test_toy_upscaler_refuses_an_out_that_is_a_file(tmp_path, capsys):
    """out=<a file> gave a raw NotADirectoryError traceback (iterdir on a file)."""
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(["toy", "upscaler", f"out={f}"]) == 2
    err = capsys.readouterr().err
    assert f"out={f}: is a file, not a folder" in err and "Traceback" not in err
    assert f.read_text() == "x"


def test_toy_upscaler_cli_reports_an_os_error_in_one_line(monkeypatch, capsys):
    """The handler caught ValueError and FileNotFoundError only: any other OSError was a traceback."""
    import apdm.toy.upscaler as U

    def fail(cfg):
        raise NotADirectoryError(20, "Not a directory", "somewhere/x")

    monkeypatch.setattr(U, "build_upscaler", fail)
    assert main(["toy", "upscaler", "steps=1"]) == 2
    assert "apdm toy upscaler: [Errno 20] Not a directory" in capsys.readouterr().err


# ---------------------------------------------------------------------------- 7. numbers from overrides
def test_int_overrides_are_base_10():
    """YAML 1.1 read steps=010 as octal 8 and resolution=1:30 as sexagesimal 90."""
    cfg = C.load_config(C.PersonalizeRunConfig, None, ["personalization.steps=010", "seed=1_000", "resolution=-0"])
    assert (cfg.personalization.steps, cfg.seed, cfg.resolution) == (10, 1000, 0)
    for bad in ("resolution=1:30", "seed=0x10", "seed=0o17", "personalization.steps=1e3", "seed=", "seed=true"):
        key = bad.split("=")[0]
        with pytest.raises(C.ConfigError, match=re.escape(f"'{key}' expects int, a whole number in base 10")):
            C.load_config(C.PersonalizeRunConfig, None, [bad])


@pytest.mark.parametrize("override", ["personalization.learning_rate=nan", "sample.guidance_scale=inf",
                                      "personalization.max_grad_norm=-.inf", "personalization.text_encoder_lr=nan",
                                      "personalization.adam_epsilon=1e999"])
def test_non_finite_floats_are_refused_from_overrides(override):
    key = override.split("=")[0]
    with pytest.raises(C.ConfigError, match=re.escape(f"'{key}' expects a finite number")):
        C.load_config(C.PersonalizeRunConfig, None, [override])


def test_non_finite_floats_are_refused_from_recipes(tmp_path):
    f = tmp_path / "r.yaml"
    for text, key in (("personalization:\n  learning_rate: .nan\n", "personalization.learning_rate"),
                      ("protect:\n  lr_phases: [[10, .inf]]\n", "protect.lr_phases[0][1]"),
                      ("protect:\n  beta: 1" + "0" * 400 + "\n", "protect.beta")):
        f.write_text(text)
        with pytest.raises(C.ConfigError, match=re.escape(f"r.yaml: '{key}' expects a finite number")):
            C.load_config(C.ProtectModelRunConfig, f)


# ---------------------------------------------------------------------------- 8. recipes and messages
def test_a_recipe_key_given_twice_is_refused(tmp_path):
    f = tmp_path / "dup.yaml"
    f.write_text("quiet: true\npersonalization:\n  steps: 10\n  steps: 20\n")
    with pytest.raises(C.ConfigError, match=r"dup\.yaml, line 4: key 'steps' is given twice .*first on line 3"):
        C.load_config(C.PersonalizeRunConfig, f)
    f.write_text("quiet: true\nquiet: false\n")
    with pytest.raises(C.ConfigError, match=r"dup\.yaml, line 2: key 'quiet' is given twice"):
        C.load_config(C.PersonalizeRunConfig, f)
    with pytest.raises(C.ConfigError, match="'device' is given twice"):
        C.load_config(C.PersonalizeRunConfig, None, ["model={device: cpu, device: cuda}"])
    # the same key in two mappings, and a YAML merge key overridden, are fine (guards working behaviour)
    f.write_text("model: {device: cpu}\nsample: &s {seed: 1, batch_size: 2}\npersonalization:\n  seed: 4\n")
    assert C.load_config(C.PersonalizeRunConfig, f).sample.seed == 1
    f.write_text("subjects:\n  - &a {instance_data: x, class_prompt: p}\n  - {<<: *a, instance_data: y}\n")
    assert [s.instance_data for s in C.load_config(C.ProtectModelRunConfig, f).subjects] == ["x", "y"]


def test_type_names_in_messages_show_the_inner_type(tmp_path):
    """"expects Optional" / "expects list" did not say of what."""
    with pytest.raises(C.ConfigError, match=re.escape("'personalization.text_encoder_lr' expects Optional[float]")):
        C.load_config(C.PersonalizeRunConfig, None, ["personalization.text_encoder_lr=abc"])
    f = tmp_path / "t.yaml"
    f.write_text("sample:\n  prompts: {a: 1}\n")
    with pytest.raises(C.ConfigError, match=re.escape("'sample.prompts' expects list[str], got")):
        C.load_config(C.PersonalizeRunConfig, f)
    f.write_text("protect:\n  lr_phases: 3\n")
    with pytest.raises(C.ConfigError, match=re.escape("'protect.lr_phases' expects list[list[float]], got 3")):
        C.load_config(C.ProtectModelRunConfig, f)


def test_a_config_that_is_a_folder_is_called_a_folder(tmp_path, capsys):
    with pytest.raises(C.ConfigError, match=re.escape(f"config file {tmp_path} is a folder")):
        C.load_config(C.PersonalizeRunConfig, tmp_path)
    assert main(["personalize", "--config", str(tmp_path), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "is a folder" in err and "not found" not in err
