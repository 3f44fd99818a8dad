"""Run configurations: dataclasses are the schema, YAML recipes the values, ``key=value`` overrides win.

``load_config(PersonalizeRunConfig, "recipes/tiny-dreambooth.yaml", ["personalization.steps=10"])`` returns a
real, typed dataclass instance. Unknown keys and values of the wrong type raise :class:`ConfigError` with a
message naming the key, the file and the expected type. No Python is ever executed from a config.

The config object stops at each command's ``run(cfg)``: library functions below it take plain arguments.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml


class ConfigError(ValueError):
    """A recipe or override is invalid (unknown key, wrong type, unreadable file)."""


# ============================================================================ shared config sections
@dataclass
class ModelConfig:
    """Which diffusion model to load and where to run it."""

    #: diffusers directory, hub id (needs network or a warm HF cache), ``tiny`` (random test pipeline)
    #: or ``toy`` (the toy-world model shipped in assets/ or built by ``apdm toy build``).
    path: str = "tiny"
    #: ``auto`` (CUDA > MPS > CPU), ``cpu``, ``cuda``, ``cuda:1`` ...
    device: str = "auto"
    #: dtype of the frozen weights: ``auto`` (bf16/fp16 on CUDA, fp32 on CPU), ``fp32``, ``fp16``, ``bf16``.
    dtype: str = "auto"
    #: hub revision, ignored for local paths.
    revision: Optional[str] = None


@dataclass
class SampleConfig:
    """How images are generated from a (personalized) model."""

    prompts: list[str] = field(default_factory=lambda: ["a photo of sks person"])
    num_images_per_prompt: int = 4
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    #: ``ddim`` (apdm's own, deterministic) or a diffusers scheduler: ``pndm``, ``dpmsolver``, ``euler``.
    sampler: str = "ddim"
    batch_size: int = 8
    seed: int = 0


@dataclass
class PersonalizationConfig:
    """The attacker's personalization (the shared simulator): DreamBooth, LoRA or Textual Inversion.

    Defaults follow the field for Stable Diffusion (DreamBooth lr 5e-6, 800 steps, prior weight 1;
    LoRA lr 1e-4; TI lr 5e-4); tiny recipes override them for CPU models.
    """

    #: ``dreambooth`` | ``lora`` | ``ti`` (textual inversion).
    method: str = "dreambooth"
    instance_prompt: str = "a photo of sks person"
    class_prompt: str = "a photo of a person"
    #: the rare identifier word of ``instance_prompt``; TI replaces it by the learned token ``<identifier>``.
    identifier: str = "sks"
    steps: int = 800
    learning_rate: float = 5e-6
    #: instance images per step (DreamBooth uses as many class images again when prior preservation is on).
    batch_size: int = 1
    with_prior_preservation: bool = True
    prior_loss_weight: float = 1.0
    num_class_images: int = 200
    #: where generated class images are cached; empty = ``<apdm cache>/class_images/<model-hash>/...``.
    class_data_dir: str = ""
    class_sample_steps: int = 25
    class_guidance_scale: float = 7.5
    train_text_encoder: bool = False
    #: learning rate of the text encoder when trained; ``None`` = ``learning_rate``.
    text_encoder_lr: Optional[float] = None
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    #: TI: token whose embedding initialises the new token.
    ti_initializer_token: str = "person"
    adam_weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    #: ``no`` | ``fp16`` | ``bf16`` autocast for the trainable forward pass (CUDA only; ignored on CPU).
    mixed_precision: str = "no"
    #: apply a random horizontal flip to instance/class images each step.
    random_flip: bool = False
    #: sample latents from the VAE posterior (``True``, as diffusers' DreamBooth) or use its mean.
    sample_vae_posterior: bool = True
    seed: int = 0


# ============================================================================ command configs
@dataclass
class PersonalizeRunConfig:
    """``apdm personalize``: run the personalization attack on a folder of images and save the result."""

    model: ModelConfig = field(default_factory=ModelConfig)
    personalization: PersonalizationConfig = field(default_factory=PersonalizationConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    #: folder or file(s) of the subject's images (comma separated for several files).
    instance_data: str = ""
    #: resolution the images are brought to; 0 = the model's native resolution.
    resolution: int = 0
    output_dir: str = "outputs/personalize"
    seed: int = 0
    quiet: bool = False


@dataclass
class PlaceholderRunConfig:
    """Config of a command whose engine is not built yet (it only knows where it would write)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    output_dir: str = "outputs"
    seed: int = 0
    quiet: bool = False


# ============================================================================ loading
def load_config(cls, path: str | Path | None = None, overrides: typing.Sequence[str] = ()):
    """Build a ``cls`` instance from defaults, then a YAML recipe, then ``key=value`` overrides.

    Args:
        cls: a config dataclass type.
        path: YAML recipe (mapping at top level) or ``None`` for defaults only.
        overrides: strings ``a.b.c=value``; the value is parsed as YAML (``steps=10``, ``flag=true``,
            ``prompts=[a, b]``), then checked against the field type.

    Raises:
        ConfigError: unreadable file, unknown key, wrong type; the message names the file/override and key.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of keys, got {type(loaded).__name__}")
        data = loaded
    cfg = _build(cls, data, source, prefix="")
    for item in overrides:
        cfg = apply_override(cfg, item)
    return cfg


def apply_override(cfg, item: str):
    """Apply one ``dotted.key=value`` override to a config dataclass instance (in place); returns it."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value (e.g. output_dir=out/)")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    target = cfg
    for i, part in enumerate(parts[:-1]):
        names = {f.name for f in dataclasses.fields(target)}
        if part not in names or not dataclasses.is_dataclass(getattr(target, part)):
            raise ConfigError(_unknown_key_msg(".".join(parts[: i + 1]), target, f"override '{item}'"))
        target = getattr(target, part)
    leaf = parts[-1]
    fields = {f.name: f for f in dataclasses.fields(target)}
    if leaf not in fields:
        raise ConfigError(_unknown_key_msg(key, target, f"override '{item}'"))
    hints = typing.get_type_hints(type(target))
    setattr(target, leaf, _coerce(hints[leaf], value, f"override '{item}'", key))
    return cfg


def to_dict(cfg) -> dict:
    """The config as plain nested dicts (for YAML dumps and ``config.yaml`` in output folders)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ---------------------------------------------------------------------------- internals
def _unknown_key_msg(key: str, target, where: str) -> str:
    known = ", ".join(f.name for f in dataclasses.fields(target))
    return f"{where}: unknown key '{key}' (known keys here: {known})"


def _build(cls, data: dict, source: str, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            known = ", ".join(fields)
            raise ConfigError(f"{source}: unknown key '{prefix}{key}' (known keys here: {known})")
        kwargs[key] = _coerce(hints[key], value, source, prefix + key)
    return cls(**kwargs)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp, value, source: str, key: str):
    """Check/convert ``value`` to the annotated type ``tp``; raise ConfigError naming ``key`` otherwise."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = ConfigError(f"{source}: '{key}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, source, key)
            except ConfigError as exc:
                errors.append(exc)
        raise bad
    if dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, source, key + ".")
        raise bad
    if origin in (list, tuple):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and origin is list and args \
                and args[0] is str and isinstance(value, str):
            value = [value]  # a single string where a list of strings is expected
        if not isinstance(value, (list, tuple)):
            raise bad
        item_t = args[0] if args else Any
        return [_coerce(item_t, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "5e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    return value
