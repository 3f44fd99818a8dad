import re
from pathlib import Path

import pytest

from apdm import config as C

RECIPES = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").glob("*.yaml"))


def test_defaults_and_overrides_types():
    cfg = C.load_config(C.PersonalizeRunConfig, None, [
        "personalization.steps=12", "personalization.learning_rate=5e-6", "output_dir=/tmp/x",
        "sample.prompts=[a, b]", "personalization.train_text_encoder=true", "personalization.text_encoder_lr=null",
    ])
    assert cfg.personalization.steps == 12
    assert isinstance(cfg.personalization.learning_rate, float) and cfg.personalization.learning_rate == 5e-6
    assert cfg.output_dir == "/tmp/x"
    assert cfg.sample.prompts == ["a", "b"]
    assert cfg.personalization.train_text_encoder is True
    assert cfg.personalization.text_encoder_lr is None


def test_yaml_then_override_precedence(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("personalization:\n  steps: 7\n  method: lora\noutput_dir: a\n")
    cfg = C.load_config(C.PersonalizeRunConfig, f, ["output_dir=b"])
    assert cfg.personalization.steps == 7 and cfg.personalization.method == "lora" and cfg.output_dir == "b"
    # untouched defaults survive
    assert cfg.personalization.prior_loss_weight == 1.0


@pytest.mark.parametrize("override, fragment", [
    ("personalization.stepz=3", "unknown key 'personalization.stepz'"),
    ("nosuch=1", "unknown key 'nosuch'"),
    ("personalization.steps=abc", "'personalization.steps' expects int"),
    ("personalization.train_text_encoder=3", "expects bool"),
    ("personalization.steps=1.5", "expects int"),
    ("model=3", "expects ModelConfig"),
    ("steps", "must look like key=value"),
])
def test_override_errors_are_clear(override, fragment):
    with pytest.raises(C.ConfigError) as exc:
        C.load_config(C.PersonalizeRunConfig, None, [override])
    assert fragment in str(exc.value)


def test_text_settings_keep_the_text_as_typed(tmp_path):
    """An override of a text field is its text, not YAML's reading of it: a folder '010' (YAML: the octal 8), a hub
    revision '0123' (83), mixed_precision 'no' (False), a prompt holding ': ' (a mapping) or starting with '#'
    (a comment: None) all arrive as typed; quoted text and null (for an optional one) still read as YAML. A list
    that is not valid YAML is an error, not one string with its brackets; a recipe's `mixed_precision: no` is 'no';
    a recipe that is not UTF-8 is named."""
    cfg = C.load_config(C.PersonalizeRunConfig, None, [
        "output_dir=010", "model.revision=0123", "personalization.mixed_precision=no",
        "personalization.instance_prompt=a photo of sks person: smiling", "personalization.class_prompt=#1 person",
        "personalization.identifier=on", "sample.prompts=a dslr photo of sks person: close-up"])
    assert (cfg.output_dir, cfg.model.revision, cfg.personalization.mixed_precision) == ("010", "0123", "no")
    assert cfg.personalization.instance_prompt == "a photo of sks person: smiling"
    assert (cfg.personalization.class_prompt, cfg.personalization.identifier) == ("#1 person", "on")
    assert cfg.sample.prompts == ["a dslr photo of sks person: close-up"]
    cfg = C.load_config(C.PersonalizeRunConfig, None, ["sample.prompts=[a, 'is it sks?']", "output_dir='a b'",
                                                       "model.revision=0123", "model.revision=null"])
    assert (cfg.sample.prompts, cfg.output_dir, cfg.model.revision) == (["a", "is it sks?"], "a b", None)
    for broken in ("sample.prompts=[is this sks person?, a photo of sks person]", "sample.prompts=[a, b"):
        with pytest.raises(C.ConfigError, match=r"not a valid YAML list/mapping.*quote items"):
            C.load_config(C.PersonalizeRunConfig, None, [broken])
    f = tmp_path / "mp.yaml"
    f.write_text("personalization:\n  mixed_precision: no\n")
    assert C.load_config(C.PersonalizeRunConfig, f).personalization.mixed_precision == "no"
    f.write_bytes("label: café\n".encode("latin-1"))
    with pytest.raises(C.ConfigError, match=r"mp\.yaml: not UTF-8 text"):
        C.load_config(C.EvaluateRunConfig, f)


def test_override_a_key_of_a_list_entry():
    """personalizations.1.steps=10 changes that entry alone; a list addressed without an index, an index past its
    end or an entry set whole is an error saying how to address it."""
    cfg = C.load_config(C.EvaluateRunConfig, None, ["personalizations=[{method: lora}, {method: ti}]",
                                                     "personalizations.1.steps=7", "personalizations.0.lora_rank=8"])
    assert [(p.method, p.steps, p.lora_rank) for p in cfg.personalizations] == [("lora", 800, 8), ("ti", 7, 4)]
    for bad, said in (("personalizations.steps=10", "'personalizations' is a list; address an entry by its index"),
                      ("personalizations.5.steps=1", "'personalizations' has 1 entries; address one by its index"),
                      ("personalizations.0.stepz=1", "unknown key 'personalizations.0.stepz'"),
                      ("personalizations.0=3", "an entry of 'personalizations' is a section")):
        with pytest.raises(C.ConfigError, match=re.escape(said)):
            C.load_config(C.EvaluateRunConfig, None, [bad])


def test_yaml_errors_name_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("personalization:\n  lerning_rate: 1\n")
    with pytest.raises(C.ConfigError, match=r"bad\.yaml.*unknown key 'personalization.lerning_rate'"):
        C.load_config(C.PersonalizeRunConfig, f)
    f.write_text("- a\n- b\n")
    with pytest.raises(C.ConfigError, match="must be a mapping"):
        C.load_config(C.PersonalizeRunConfig, f)
    with pytest.raises(C.ConfigError, match="not found"):
        C.load_config(C.PersonalizeRunConfig, tmp_path / "missing.yaml")


def test_yaml_round_trip():
    cfg = C.load_config(C.PersonalizeRunConfig, None, ["personalization.steps=3"])
    import yaml

    again = C._build(C.PersonalizeRunConfig, yaml.safe_load(C.to_yaml(cfg)), "dump", "")
    assert again == cfg


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads(recipe):
    from apdm.cli import COMMANDS

    text = recipe.read_text()
    assert text.lstrip().startswith("#"), f"{recipe.name} needs a header comment saying how to run it"
    from apdm.toy.world import ToyBuildConfig

    classes = {getattr(C, c) for c, *_ in COMMANDS.values()} | {ToyBuildConfig}
    errors = []
    for cls in classes:
        try:
            cfg = C.load_config(cls, recipe)
        except C.ConfigError as exc:
            errors.append(str(exc))
            continue
        if isinstance(cfg, C.EvaluateRunConfig):  # every attack of an evaluation recipe parses
            from apdm.attacks.transforms import check_attack

            for spec in cfg.attacks:
                check_attack(spec)
        return
    pytest.fail(f"{recipe.name} fits no command config: {errors}")


def test_lora_block_recipe_is_the_measured_setting():
    """recipes/toy-protect-model-lora-block.yaml quotes numbers measured by `apdm bench protect-model` with the toy
    recipe and the overrides below; the recipe must be that setting (only its output folder differs)."""
    import dataclasses

    root = RECIPES[0].parent
    measured = C.load_config(C.ProtectModelRunConfig, str(root / "toy-protect-model.yaml"), [
        "protect.outer_steps=340", "protect.lr_phases=[[300,2.0e-4],[40,2.0e-5]]"])
    recipe = C.load_config(C.ProtectModelRunConfig, str(root / "toy-protect-model-lora-block.yaml"), [])
    assert dataclasses.replace(recipe, output_dir=measured.output_dir) == measured


def test_encoder_trap_recipe_is_the_measured_setting():
    """recipes/toy-protect-model-encoder-trap.yaml is what `apdm bench protect-model protect.outer_steps=0
    encoder_trap.steps=1500` measured (docs/protect_model.md, "The encoder trap"); only its output folder differs."""
    import dataclasses

    root = RECIPES[0].parent
    measured = C.load_config(C.ProtectModelRunConfig, str(root / "toy-protect-model.yaml"), [
        "protect.outer_steps=0", "encoder_trap.steps=1500"])
    recipe = C.load_config(C.ProtectModelRunConfig, str(root / "toy-protect-model-encoder-trap.yaml"), [])
    assert recipe.encoder_trap.steps == 1500 and recipe.protect.outer_steps == 0
    assert dataclasses.replace(recipe, output_dir=measured.output_dir) == measured


def test_unknown_keys_suggest_the_near_miss_and_the_missing_space():
    """protect.outer_step=3 listed 35 keys and no hint; {instance_data:/path} (no space after the colon, so YAML
    reads one key) named the key 'instance_data:/path'."""
    with pytest.raises(C.ConfigError, match="unknown key 'protect.outer_step'; did you mean 'outer_steps'"):
        C.load_config(C.ProtectModelRunConfig, None, ["protect.outer_step=3"])
    with pytest.raises(C.ConfigError, match="YAML needs a space after the colon: 'instance_data: /p'"):
        C.load_config(C.ProtectModelRunConfig, None, ["subjects=[{instance_data:/p}]"])
    with pytest.raises(C.ConfigError) as far:
        C.load_config(C.ProtectModelRunConfig, None, ["nonsense=1"])
    assert "did you mean" not in str(far.value)


def test_a_recipe_section_sets_only_its_keys_on_the_fields_own_default(tmp_path):
    """A recipe's personalization: section was built on PersonalizationConfig's class defaults, so protect-images'
    published surrogate (lr 5e-7, text encoder trained, 1000 steps) fell back to lr 5e-6 / 800 steps as soon as a
    recipe set a prompt; an override on the command line kept it. Both now agree."""
    recipe = tmp_path / "p.yaml"
    recipe.write_text("method: aspl\npersonalization:\n  class_prompt: a photo of a dog\n")
    from_yaml = C.load_config(C.ProtectImagesRunConfig, recipe).personalization
    from_cli = C.load_config(C.ProtectImagesRunConfig, None, ["personalization.class_prompt=a photo of a dog"])
    assert from_yaml == from_cli.personalization
    assert (from_yaml.learning_rate, from_yaml.steps, from_yaml.train_text_encoder) == (5e-7, 1000, True)
    assert from_yaml.class_prompt == "a photo of a dog"
