"""Config audit (session 63): --print-config output did not always reload to the same config (text such as 089
came back as 89), a chained YAML merge was refused as a repeated key, `key=` on a list gave [''], and
`subjects[0].name=` got an unhelpful hint."""

import pytest

from apdm.config import (
    ConfigError,
    EvaluateRunConfig,
    PersonalizeRunConfig,
    ProtectModelRunConfig,
    load_config,
    to_yaml,
)


@pytest.mark.parametrize("override", ["output_dir=089", "personalization.identifier=09", "model.revision=0189",
                                      "output_dir=0_9", "label=on", "label=1:30"])  # (the last two: guards)
def test_print_config_reloads_to_the_same_config(tmp_path, override):
    cls = EvaluateRunConfig if override.startswith("label") else PersonalizeRunConfig
    cfg = load_config(cls, None, [override])
    f = tmp_path / "c.yaml"
    f.write_text(to_yaml(cfg))
    assert load_config(cls, f, []) == cfg


def test_a_chained_merge_is_not_a_repeated_key(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("protect:\n  attacker_mix:\n    - &lora {method: lora, learning_rate: 2.0e-3, lora_rank: 8}\n"
                 "    - &lora16 {<<: *lora, lora_rank: 16}\npersonalization: {<<: *lora16, steps: 30}\n")
    cfg = load_config(ProtectModelRunConfig, f, [])
    assert cfg.personalization.lora_rank == 16 and cfg.personalization.steps == 30
    assert [m["lora_rank"] for m in cfg.protect.attacker_mix] == [8, 16]
    f.write_text("personalization: {steps: 10, steps: 20}\n")  # guard: a key given twice is still refused
    with pytest.raises(ConfigError, match="given twice"):
        load_config(ProtectModelRunConfig, f, [])


def test_an_empty_list_value_is_refused_with_the_way_out():
    with pytest.raises(ConfigError, match=r"is a list; give protect.dpo_extra_prompts=\[\] for an empty one"):
        load_config(ProtectModelRunConfig, None, ["protect.dpo_extra_prompts="])
    assert load_config(ProtectModelRunConfig, None, ["protect.dpo_extra_prompts=[]"]).protect.dpo_extra_prompts == []


def test_a_bracket_index_is_answered_with_the_dot_form():
    with pytest.raises(ConfigError, match="by its index after a dot: 'personalizations.0'"):
        load_config(EvaluateRunConfig, None, ["personalizations[0].steps=7"])
