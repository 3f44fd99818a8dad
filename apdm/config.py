"""Run configurations: dataclasses are the schema, YAML recipes the values, ``key=value`` overrides win.

``load_config(PersonalizeRunConfig, "recipes/tiny-dreambooth.yaml", ["personalization.steps=10"])`` returns a
real, typed dataclass instance. Unknown keys, keys given twice and values of the wrong type raise
:class:`ConfigError` with a message naming the key, the file and the expected type. No Python is ever executed
from a config.

The config object stops at each command's ``run(cfg)``: library functions below it take plain arguments.
"""

from __future__ import annotations

import dataclasses
import math
import re
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
    #: ``ddim`` (apdm's own, deterministic) or a diffusers scheduler: ``ddpm`` (stochastic, seeded per image),
    #: ``pndm``, ``dpmsolver``, ``euler``.
    sampler: str = "ddim"
    batch_size: int = 8
    seed: int = 0


@dataclass
class PersonalizationConfig:
    """The attacker's personalization (the shared simulator): DreamBooth, LoRA or Textual Inversion.

    Defaults are DreamBooth's for Stable Diffusion (lr 5e-6, 800 steps, prior weight 1: the attack of the APDM
    paper). There is one ``learning_rate`` for every method: set it with the method (LoRA: 1e-4, TI: 5e-4 are the
    field's usual rates; the sd15-lora / sd21-ti recipes do). Tiny recipes override them for CPU models.
    """

    #: ``dreambooth`` | ``lora`` | ``ti`` (textual inversion) | ``custom_diffusion`` (cross-attention K/V + a new
    #: token, Kumari et al. 2023).
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
    #: learning rate of the text encoder when trained (Custom Diffusion: of its token); ``None`` = ``learning_rate``.
    text_encoder_lr: Optional[float] = None
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    #: DreamBooth: train only the UNet parameters whose names contain one of these strings (e.g.
    #: ``[attn2.to_k, attn2.to_v]``, the cross-attention keys and values that Custom Diffusion and CAAT train);
    #: empty = every UNet parameter. Custom Diffusion: empty = ``[attn2.to_k, attn2.to_v]``.
    unet_trainable: list[str] = field(default_factory=list)
    #: TI, Custom Diffusion: token whose embedding initialises the new token.
    ti_initializer_token: str = "person"
    #: ``adamw`` or ``adamw8bit`` (bitsandbytes, CUDA only).
    optimizer: str = "adamw"
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
    #: the attacker's seed: replaces personalization.seed (noise, timesteps, minibatches, LoRA init, class images),
    #: as apdm evaluate's seed does; the samples follow sample.seed.
    seed: int = 0
    quiet: bool = False


@dataclass
class SubjectConfig:
    """One subject to protect: its photos and the prompts an attacker would personalize with."""

    #: folder or comma-separated files of the subject's photos.
    instance_data: str = ""
    #: empty = ``personalization.instance_prompt`` / ``personalization.class_prompt`` of the recipe.
    instance_prompt: str = ""
    class_prompt: str = ""
    #: other photos of the subject, held back: never trained on, only used to check that the encoder trap reaches
    #: photos it never saw (folder or comma-separated files; empty = no check). docs/protect_model.md, "Checking
    #: the trap on held-back photos".
    check_data: str = ""


@dataclass
class ProtectConfig:
    """APDM protection (Lee et al., NeurIPS 2025): DPO loss + Learning-to-Protect. Defaults = the paper for SD."""

    #: ``dpo`` (L_DPO + L_ppl, the paper) or ``naive`` (-L_per + λ·L_ppl, the baseline the paper argues against).
    loss: str = "dpo"
    #: N_protect: outer protection steps.
    outer_steps: int = 800
    #: N_per: simulated personalization steps per outer step (0 = no L2P: protect at θ itself).
    inner_steps: int = 20
    learning_rate: float = 5e-6
    #: optional piecewise-constant learning rate over the outer steps, ``[[steps, lr], ...]``: e.g.
    #: ``[[100, 2.0e-4], [40, 2.0e-5]]`` = 100 outer steps at 2e-4, then 40 at 2e-5 (one optimizer throughout,
    #: its moments carry over). The steps must add up to ``outer_steps``. Empty = ``learning_rate`` throughout.
    lr_phases: list[list[float]] = field(default_factory=list)
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    #: ``adamw`` or ``adamw8bit`` (bitsandbytes, CUDA).
    optimizer: str = "adamw"
    #: DPO inverse temperature β.
    beta: float = 1.0
    #: ``elementwise`` (log σ per latent element, as the reference code) or ``summed`` (paper eq. 14 on ‖·‖²).
    dpo_form: str = "elementwise"
    prior_loss_weight: float = 1.0
    #: further prompts under which the DPO term is also taken (our addition; empty = the paper): each (x⁺, x⁻)
    #: pair is conditioned on the instance prompt or one of these, drawn uniformly. ``{class_prompt}`` and
    #: ``{instance_prompt}`` are filled in; ``""`` is the unconditional prompt. A simulated attacker that also
    #: trains the text encoder moves the instance prompt's conditioning away from where a trap keyed to it
    #: works; ``["{class_prompt}", ""]`` asks the trap to hold under other conditionings too
    #: (docs/protect_model.md, "Along the attack"; on the toy world it did not help).
    dpo_extra_prompts: list[str] = field(default_factory=list)
    #: K > 0 (our addition; 0 = the paper): before each DPO term, K normalized gradient steps move the pairs'
    #: conditioning c to the one near it under which θ′ denoises the subject's photos best, ``c + δ`` with
    #: ‖δ‖ ≤ ``conditioning_attack_radius`` · ‖c‖ per pair, and the DPO pairs (θ′ and φ alike) are taken there.
    #: An attacker who fine-tunes the text encoder or names the subject with another word reaches the subject
    #: through a conditioning of its own; this asks the protection to hold around the attacker's best one
    #: (docs/protect_model.md, "Protecting around the attacker's conditioning").
    conditioning_attack_steps: int = 0
    #: the bound of that search, relative to the conditioning's norm (the toy attacker's text encoder moves the
    #: instance prompt's conditioning by 0.5–0.8 of its norm in 300 steps).
    conditioning_attack_radius: float = 0.5
    #: identifiers the protection draws from, one per outer step (our addition; empty = the paper: each subject's
    #: own instance prompt). The identifier word of the instance prompt (``personalization.identifier``) is
    #: replaced by the drawn one for that step's simulated attacker and DPO pairs, so that the protection is tied
    #: to the subject's photos rather than to one word, which an attacker picks freely (docs/protect_model.md,
    #: "Another identifier"). Include the instance prompt's own word to keep it protected too.
    identifiers: list[str] = field(default_factory=list)
    #: weight of an extra prior-preservation term taken at θ itself (not at the personalized θ′), per inner
    #: term. 0 = Algorithm 1 as published. Needed when the simulated attacker's lr is much larger than the
    #: protection lr: θ is then only ever judged through θ′ and can drift into weights that are broken until
    #: personalized (docs/protect_model.md, "anchor"). Only with ``inner_steps`` > 0 (without, θ′ is θ).
    anchor_weight: float = 0.0
    #: λ of the naive loss.
    naive_lambda: float = 1.0
    #: reproduce the reference code's leak of the personalization gradient into the transferred gradient.
    gradient_leak: bool = False
    #: further simulated attackers for the inner loop, taken in turn with ``personalization``: each entry
    #: lists the ``personalization`` keys it changes, e.g. ``[{method: lora, learning_rate: 2.0e-3, lora_rank: 8,
    #: lora_alpha: 8, with_prior_preservation: false}]``. With K subjects, outer step j simulates attacker
    #: ``(j // K) mod (1 + len(attacker_mix))`` (0 = ``personalization``). Empty = one attacker (the paper).
    attacker_mix: list[dict[str, Any]] = field(default_factory=list)
    #: R: the simulated attacker restarts from θ every R of its outer steps and otherwise *continues* where it
    #: stopped (its weights follow θ's updates, its optimizer state carries over), so L2P sees the protected
    #: subject at attack depths up to R·N_per steps for the cost of N_per. 1 = Algorithm 1 (a fresh copy of θ every
    #: outer step). Our addition (docs/protect_model.md, "A continuing attacker"). With K subjects and A attackers
    #: each (subject, attacker) pair keeps its own continuing copy and comes up every K·A outer steps, so all
    #: restart every R·K·A outer steps (R visits each); ``checkpoint_every`` must be a multiple of R·K·A.
    inner_restart_every: int = 1
    #: how the N_per protection gradients are combined: ``sum`` (Algorithm 1) or ``mean``.
    grad_accum: str = "sum"
    #: pairs (x⁺, x⁻) per protection step and class images per L_ppl term.
    batch_size: int = 1
    num_class_images: int = 200
    #: what θ trains: ``all`` (full UNet), ``lora`` (adapters of rank ``lora_rank``, merged at the end) or a
    #: comma-separated list of parameter-name substrings (e.g. ``attn2,up_blocks``).
    trainable: str = "all"
    lora_rank: int = 16
    #: also protect the text encoder (our addition; off = the paper, which trains the UNet only): θ's text encoder
    #: becomes trainable (fp32, full, whatever ``trainable`` says for the UNet), receives the protection gradient
    #: through the conditioning at θ′, and is released with the UNet. An attacker who fine-tunes the text encoder
    #: can move the instance prompt's conditioning away from a trap built in the UNet alone (docs/protect_model.md,
    #: "Along the attack"). Not with a Textual Inversion attacker in the inner loop (it adds a token).
    train_text_encoder: bool = False
    #: the protected text encoder's learning rate, constant (``lr_phases`` apply to the UNet only); unset = the
    #: UNet's learning rate at each step.
    text_encoder_lr: Optional[float] = None
    #: autocast for the frozen reference φ and the protection forward passes (CUDA only): ``no`` or ``bf16``
    #: (``fp16`` is refused: without loss scaling its small protection gradients flush to zero).
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    #: save a resumable checkpoint every K outer steps (0 = never).
    checkpoint_every: int = 50
    #: continue from ``output_dir/checkpoint`` when it exists.
    resume: bool = True


@dataclass
class EncoderTrapConfig:
    """The encoder trap (apdm's addition, not in the APDM paper; :mod:`apdm.protect_model.encoder_trap`): the
    released checkpoint's VAE encoder is fine-tuned so that the protected subjects' photos encode to the latents of
    generic class images, while other images keep theirs. Every personalization method trains on those latents.
    Off by default (``steps=0``); an attacker with another compatible VAE gets around it (docs/protect_model.md)."""

    #: training steps (0 = off: the paper's protection only). Each step sees every subject photo, changed.
    steps: int = 0
    learning_rate: float = 1.0e-4
    #: weight w of the term that keeps other images' latents (class images of the base model). A dial between the
    #: decoy's precision and the cost to other images: on the toy world w = 2 / 4 cut the encode → decode loss on
    #: generated images from 0.9 to 0.6 / 0.3 dB, but the photos then land less precisely on the decoy and the
    #: protection fell (DreamBooth on three persons 1.28 / 1.22 / 1.06 → 1.20 / 1.18 / 0.91 → 1.09 / 1.14 / 0.80;
    #: docs/protect_model.md, "The keep term's weight").
    preserve_weight: float = 1.0
    #: where that term compares the kept images: ``latent`` (the posterior's mean and log-variance) or ``decoded``
    #: (a posterior draw of each encoder with the same noise, decoded: mse in image space, whose values are some 30×
    #: smaller, so w must be larger): the decoded form holds what an encode → decode gives and lets the encoder move
    #: along latent directions the decoder ignores. Measured at w = 30: generated images lose 0.47 dB of encode →
    #: decode PSNR instead of 0.93 at the same protection (three persons 1.29 / 1.21 / 1.07), other photos as much as
    #: with ``latent``, 1.6× the trap's time (docs/protect_model.md, "The keep term in image space").
    keep_space: str = "latent"
    #: class images per step in that term.
    preserve_batch: int = 8
    #: strength of the random geometric change of each image per step (rotation, scale, shift; 0 = none;
    #: flips and colour changes always apply): the trap must hold for other photos of the subject than these.
    augment: float = 1.0
    #: what the photos encode as (their *decoys*): ``paired`` (photo i → the DPO pairs' generic image x⁺_i) or
    #: ``farthest`` (the N class images, of the prior images and the x⁺, whose identity is least like the subject's
    #: by the face recognizer ``identity``; the idea of Fawkes' target choice). What a personalization learns
    #: through the trap is the decoys, so their likeness to the subject is what it keeps (docs/protect_model.md,
    #: "What the trap's DreamBooth learns").
    targets: str = "paired"
    #: the face recognizer that chooses ``farthest`` decoys: ``dlib`` (extra ``faces``), ``toy`` or ``toy:DIR``
    #: (a toy-world identity encoder: the committed one, or one built with ``apdm toy build skip_model=true
    #: seed=1 output_dir=DIR``). Use another recognizer than the one you evaluate with.
    identity: str = ""
    #: how many different decoys per subject (0 = one per photo): with N, photo i encodes as decoy i mod N, so
    #: many photos share a decoy (with ``farthest``: the N least like the subject; with ``paired``: x⁺_0 … x⁺_N-1).
    decoys: int = 0
    #: a folder (with its sub-folders; or comma-separated files / folders) of photos whose latents the encoder must
    #: keep, besides the class images: photos of other people and things like those the checkpoint's users will
    #: encode (img2img, inpainting, personalization of anyone else). Generated class images alone teach the encoder
    #: to keep those images, not the photos around them (docs/protect_model.md, "A keep set of photos"; 200 photos
    #: cut the cost on other photos by two thirds). Empty = none.
    keep_images: str = ""
    #: N more class-prompt images of the base model for the encoder to keep, per class prompt, from a seed apart from
    #: the class images'. They add generated images to the keep term without changing the class images, which are
    #: also the prior images of L2P and of the copy that makes ``synthetic_photos``. img2img and inpainting on
    #: generated images encode such images; 0 = none (docs/protect_model.md, "Generated images in the keep set").
    keep_generated: int = 0
    #: N more pictures of each subject for the trap to hold, for a provider with few photos: a copy of the base model
    #: is personalized on the subject's photos (the shared simulator with the recipe's ``personalization``, prior
    #: preservation on the subject's class images) and samples N images of its instance prompt (``class_sample_steps``,
    #: ``class_guidance_scale``). They share the photos' decoys; the decoys are still chosen from the photos alone.
    #: 0 = none (docs/protect_model.md, "Few photos: pictures from a personalized copy").
    synthetic_photos: int = 0
    #: with a face recognizer (``identity``), sample this many pictures per one kept and keep the N it finds most
    #: like the photos (1 = keep what is sampled). Without one the pictures are not screened (a warning says so).
    synthetic_pool: int = 3
    #: how many copies are personalized for those pictures (seeds ``personalization.seed`` + c), sharing the
    #: P·N samples; the screen keeps the N most alike of them all. A personalization is a draw and may miss the
    #: subject; several copies make the screen's choice less dependent on one draw. On the toy world three copies
    #: gave more alike pictures and a narrower trap: less protection on new photos (0.65 / 0.81 against 0.79–0.99)
    #: at a third of the cost to other images (docs/protect_model.md, "Three personalized copies").
    synthetic_copies: int = 1
    #: save a resumable checkpoint every K steps (0 = never).
    checkpoint_every: int = 500
    #: images per encoder forward / backward within a step (0 = all of the step's images at once). The gradient is
    #: the same (summed over chunks, each weighted by its share of the batch); only peak memory changes. A step holds
    #: every subject photo and picture plus ``preserve_batch`` kept images: at 512 px set 2–8 (``apdm bench speed
    #: parts=encoder-trap`` measures a setting).
    micro_batch: int = 0
    #: recompute the VAE's activations in the backward pass (diffusers' gradient checkpointing) instead of keeping
    #: them: less memory, more time.
    gradient_checkpointing: bool = False


@dataclass
class ProtectModelRunConfig:
    """``apdm protect-model``: fine-tune a checkpoint so personalizing the protected subject(s) fails."""

    model: ModelConfig = field(default_factory=ModelConfig)
    subjects: list[SubjectConfig] = field(default_factory=list)
    protect: ProtectConfig = field(default_factory=ProtectConfig)
    #: the encoder trap, run after the L2P protection (off by default).
    encoder_trap: EncoderTrapConfig = field(default_factory=EncoderTrapConfig)
    #: the simulated attacker of the L2P inner loop (DreamBooth by default; ``lora``/``ti`` as options).
    personalization: PersonalizationConfig = field(default_factory=PersonalizationConfig)
    #: resolution images are brought to: 0 or the model's native resolution (another is refused: the class images
    #: are generated at the native one).
    resolution: int = 0
    output_dir: str = "outputs/protect-model"
    seed: int = 0
    quiet: bool = False


def antidreambooth_surrogate() -> PersonalizationConfig:
    """Anti-DreamBooth's published surrogate DreamBooth (its scripts): lr 5e-7, text encoder trained, batch 1,
    prior weight 1.0 with 200 class images, 1000 steps. The default surrogate of ``apdm protect-images``, and what
    :func:`apdm.protect_images.baselines.antidreambooth_personalization` gives."""
    return PersonalizationConfig(method="dreambooth", learning_rate=5e-7, train_text_encoder=True, batch_size=1,
                                 steps=1000, with_prior_preservation=True, prior_loss_weight=1.0, max_grad_norm=1.0,
                                 num_class_images=200)


@dataclass
class ProtectImagesRunConfig:
    """``apdm protect-images``: perturb photos so that personalization on them fails."""

    model: ModelConfig = field(default_factory=ModelConfig)
    #: ``ldu`` (trajectory-shifted latent perturbation, needs a trained ρ), ``aspl``, ``fsmg``, ``advdm``,
    #: ``photoguard``, ``sds`` (Diff-Protect's SDS(−)), ``mist`` (Mist's fused mode), ``pid``, ``caat``,
    #: ``metacloak``, ``simac``.
    method: str = "ldu"
    #: L∞ budget on [0,1] images: ``8/255``, ``8`` (= 8/255) or ``0.0314``.
    budget: str = "8/255"
    #: folder, file, or comma-separated files.
    input: str = ""
    output_dir: str = "outputs/protected"
    #: also protect the photos in sub-folders of an input folder; the outputs keep the sub-folder structure under
    #: ``output_dir``. An output folder inside an input folder is never read as input; with a ``suffix`` the output
    #: folder may be the input folder (or above it), and only this command's outputs in it are left out.
    recursive: bool = False
    #: ``png`` (default, lossless) or ``jpeg`` (weakens the protection; a warning is printed).
    format: str = "png"
    jpeg_quality: int = 95
    #: appended to each output file's stem.
    suffix: str = ""
    #: keep EXIF (including GPS if present); default strips it and keeps the ICC profile.
    keep_exif: bool = False
    strip_metadata: bool = False
    #: iterations of the method; 0 = its published default (ASPL 50, FSMG/AdvDM/SDS/Mist 100, CAAT 250,
    #: PhotoGuard/PID 1000, MetaCloak 2400, SimAC 50).
    steps: int = 0
    #: PGD step size on [0,1]; 0 = the method's default.
    pgd_alpha: float = 0.0
    #: expectation over transformation during PGD: any of ``blur``, ``jpeg``, ``resize``, ``flip``, ``blur+flip``
    #: (empty: none; MetaCloak then keeps its own ``blur+flip``).
    eot: list[str] = field(default_factory=list)
    #: PhotoGuard and Mist: an image file the attack pulls the photos' latents towards (resized to the model
    #: resolution); empty = a flat gray image (0.5), the default.
    target: str = ""
    #: SDS: ``-`` descends the denoising loss (SDS(−), the default and the paper's best) or ``+`` ascends it.
    sds_direction: str = "-"
    #: PID: the posterior distance it raises: ``add-log`` (default), ``mean``, ``var``, ``add`` or ``kl``.
    pid_loss: str = "add-log"
    #: SimAC: the weight of its feature-interference term (1 = as the denoising loss; 0 = what SimAC's code
    #: computes).
    simac_feature_weight: float = 1.0
    #: MetaCloak: where its pool of surrogate weights is kept, ``model`` (with the model, the default) or ``cpu``
    #: (for SD DreamBooth the pool is 6 × 3.9 GB in float32; ``cpu`` frees that GPU memory for two copies per
    #: iteration). The protected photos are the same either way, so a resumed run may change it.
    metacloak_pool_device: str = "model"
    #: LDU: folder of a trained perturbation network ρ (``apdm train-perturber``).
    rho_path: str = ""
    #: images per forward pass (LDU) / per protection group (pixel methods protect each group jointly).
    batch_size: int = 8
    #: the size each photo is protected at: ``aspect`` (short side = the model's resolution, aspect ratio kept up
    #: to 2:1, as an attacker resizes) or ``squeeze`` (the whole photo squeezed to a square). ASPL/FSMG protect a
    #: group at one size: its photos' most common one.
    resolution_policy: str = "aspect"
    #: the surrogate personalization of ASPL/FSMG/MetaCloak/SimAC; the default is Anti-DreamBooth's published one
    #: (:func:`antidreambooth_surrogate`: DreamBooth with prior preservation, 200 class images, text encoder trained,
    #: lr 5e-7, batch 1; ``steps`` 1000 is FSMG's surrogate training and MetaCloak's horizon, the training its pool
    #: spans). CAAT keeps its own published surrogate (cross-attention K/V, lr 1e-5:
    #: ``baselines.caat_personalization``). Tiny and toy models need a larger learning rate (toy recipes set one).
    personalization: PersonalizationConfig = field(default_factory=antidreambooth_surrogate)
    seed: int = 0
    #: skip the photos that ``output_dir/manifest.json`` lists as protected with the same settings (same input
    #: bytes, output file present), e.g. after a killed run; other settings there are refused. false = protect
    #: every photo again.
    resume: bool = True
    quiet: bool = False


@dataclass
class TrainPerturberRunConfig:
    """``apdm train-perturber``: train the LDU perturbation network ρ for a model."""

    model: ModelConfig = field(default_factory=ModelConfig)
    #: folder with one sub-folder of photos per identity (training identities; never the ones you protect later).
    data: str = ""
    budget: str = "10/255"
    steps: int = 2000
    learning_rate: float = 1e-4
    batch_size: int = 4
    #: the frozen personalization anchors (paper: Textual Inversion, lr 5e-4, 1500 steps).
    personalization: PersonalizationConfig = field(default_factory=lambda: PersonalizationConfig(
        method="ti", learning_rate=5e-4, steps=1500, with_prior_preservation=False, adam_weight_decay=0.0))
    anchor_steps: int = 0
    shuffle_prob: float = 0.5
    lambda_init: float = 1.0
    lambda_step: float = 0.01
    #: optional PSNR floor (dB) as a second training constraint next to the L∞ budget; 0 = off (the paper).
    min_psnr: float = 0.0
    denoise_steps: int = 4
    width: int = 32
    #: training augmentations the personalization loss sees the published image through, one drawn per step
    #: (``blur+flip``, ``blur``, ``flip``, ``resize``, ``jpeg``; the paper trains with Gaussian blur and flips, as
    #: MetaCloak); empty = none (as every ρ before 2026-12-07, the shipped toy ρ included).
    eot: list[str] = field(default_factory=list)
    output_dir: str = "outputs/rho"
    #: save a resumable checkpoint (ρ, Adam, λ, random states; TI anchors as they finish) in
    #: ``output_dir/checkpoint`` every K steps (0 = anchors only); removed when the training completes.
    checkpoint_every: int = 100
    #: continue from ``output_dir/checkpoint`` if there is one (false: start over).
    resume: bool = True
    seed: int = 0
    quiet: bool = False


@dataclass
class EvalSubjectConfig:
    """One subject of an evaluation: clean photos (and their protected versions, if any)."""

    #: the subject's name in results and file names; empty = its clean_data folder's name. Two subjects may not
    #: share one.
    name: str = ""
    #: folder/files of the clean photos (the attacker's clean data and, by default, the ISM/DINO references).
    clean_data: str = ""
    #: folder/files of the protected photos; empty = none. Each clean photo is paired with the protected file of
    #: its name (any extension), else in sorted order when both are as many; an ``apdm protect-images`` output
    #: folder through its manifest (each clean photo with the file made from it, matched by content). A photo
    #: that fails to load is skipped with its twin.
    protected_data: str = ""
    #: separate reference photos for identity metrics; empty = clean_data.
    reference_data: str = ""
    instance_prompt: str = "a photo of sks person"
    class_prompt: str = "a photo of a person"
    #: subject class for detectors that need one (toy detector: person | dog).
    subject_class: str = "person"


@dataclass
class MetricsConfig:
    """Which metric backends to run. Every value is tagged with its implementation in results.json."""

    #: identity embedder for ISM: ``toy`` (toy-world identity encoder), ``dlib`` (faces extra), ``none``.
    identity: str = "none"
    #: subject/face detector for FDFR/SDS: ``toy``, ``dlib-hog``, ``haar``, ``mtcnn``, ``none``.
    detector: str = "none"
    #: features for FID/KID of generations vs references: ``toy``, ``inception:/path/weights.pth``, ``none``.
    features: str = "none"
    #: local paths of transformers models; empty = skip (reported unavailable).
    dino_path: str = ""
    clip_path: str = ""
    brisque: bool = True
    clip_iqa: bool = False
    liqe: bool = False
    #: imperceptibility of protected vs clean inputs (PSNR/SSIM/MS-SSIM/L∞/LPIPS).
    fidelity: bool = True
    #: LPIPS among the fidelity records (extra ``lpips`` + torchvision backbone weights; else reported unavailable).
    lpips: bool = False


@dataclass
class EvaluateRunConfig:
    """``apdm evaluate``: personalize (clean or protected data, purified or not) and score the generations."""

    model: ModelConfig = field(default_factory=ModelConfig)
    #: a label for what is evaluated (``unprotected``, ``apdm``, ``aspl``...), copied into every record.
    label: str = "unprotected"
    subjects: list[EvalSubjectConfig] = field(default_factory=list)
    #: ``all_clean``, ``all_perturbed``, ``one_clean``, ``one_perturbed`` (the last three need protected_data).
    scenarios: list[str] = field(default_factory=lambda: ["all_clean"])
    #: attacks applied to the training images before personalization: ``none``, ``jpeg:quality=75``, ``blur``,
    #: ``resize``, ``crop``, ``flip``, ``noise``, and the model purifiers ``diffpure:strength=0.2``, ``gridpure``,
    #: ``impress:steps=3000,radius=16/255``, ``noisy_upscale:upscaler=PATH`` (docs/evaluate.md, "Protocol"
    #: and "Adaptive purification"; docs/metrics.md lists them all). Checked before the run starts.
    attacks: list[str] = field(default_factory=lambda: ["none"])
    #: personalization methods (the shared simulator); each entry a full PersonalizationConfig.
    personalizations: list[PersonalizationConfig] = field(default_factory=lambda: [PersonalizationConfig()])
    sample: SampleConfig = field(default_factory=lambda: SampleConfig(
        prompts=["a photo of sks person", "a dslr portrait of sks person"]))
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    #: class-prompt generations scored against the references (the "no personalization" baseline).
    class_prompt_baseline: bool = True
    resolution: int = 0
    output_dir: str = "outputs/evaluate"
    #: skip cells whose results already exist in output_dir.
    resume: bool = True
    seed: int = 0
    quiet: bool = False


# ============================================================================ loading
def load_config(cls, path: str | Path | None = None, overrides: typing.Sequence[str] = ()):
    """Build a ``cls`` instance from defaults, then a YAML recipe, then ``key=value`` overrides.

    Args:
        cls: a config dataclass type.
        path: YAML recipe (mapping at top level) or ``None`` for defaults only.
        overrides: strings ``a.b.c=value`` (``a.0.c=value`` for a key of a list's entry, e.g.
            ``personalizations.1.steps=10``); the value is parsed as YAML (``steps=10``, ``flag=true``,
            ``prompts=[a, b]``), then checked against the field type; for a text field it is the text as typed
            (``output_dir=010``, ``mixed_precision=no``, a prompt with ``: ``) unless quoted or a ``[...]`` list;
            for a whole number field it is a base-10 integer (``steps=010`` is 10), as in recipes and mappings
            (:data:`_RecipeLoader` reads plain digits only as numbers, base 10). A mapping given to a section
            (``model={device: cpu}``) changes only the keys it names, as a recipe's section does; a list of
            sections (``subjects=[{...}]``) is given whole.

    Raises:
        ConfigError: unreadable file, unknown key, wrong type; the message names the file/override and key.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"config file {p} is a folder; give a YAML recipe file (see recipes/)")
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.load(p.read_text(encoding="utf-8"), Loader=_RecipeLoader)
        except _DuplicateKey as exc:
            raise ConfigError(f"{p}, line {exc.line}: key '{exc.key}' is given twice in one mapping (first on line "
                              f"{exc.first}); keep one") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{p}: not UTF-8 text (byte {exc.start}); save the recipe as UTF-8") from exc
        except OSError as exc:
            raise ConfigError(f"{p}: cannot read ({exc})") from exc
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
    """Apply one ``dotted.key=value`` override to a config dataclass instance (in place); returns it.

    A mapping given to a section (``model={device: cpu}``) changes only the keys it names on the section's current
    value (nested sections likewise), as a recipe's section does; a list (``subjects=[{...}]``) is given whole. A
    whole number field takes a base-10 integer (``steps=010`` is 10, not YAML 1.1's octal 8).
    """
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value (e.g. output_dir=out/)")
    key, raw = item.split("=", 1)
    key = key.strip()
    text = raw.strip()
    where = f"override '{item}'"
    try:
        value = yaml.load(raw, Loader=_RecipeLoader) if text != "" else ""
    except _DuplicateKey as exc:
        raise ConfigError(f"{where}: key '{exc.key}' is given twice in one mapping; keep one") from exc
    except yaml.YAMLError as exc:
        if text[:1] in "[{":  # meant as a list or mapping: taking it as one string would run with the brackets
            raise ConfigError(f"override '{item}': not a valid YAML list/mapping ({str(exc).splitlines()[0]}); quote "
                              "items holding ': ', '#', '?' or commas, e.g. \"sample.prompts=['is it sks?', b]\"") \
                from exc
        value = raw
    target, leaf, tp = _field_at(cfg, key, where)
    if text == "" and _list_item(tp) is not None:  # was [''] ('' is a prompt: dpo_extra_prompts' unconditional one)
        raise ConfigError(f"{where}: '{key}' is a list; give {key}=[] for an empty one")
    if _is_text(tp) and not ((text and text[:1] in "[{") or (len(text) > 1 and text[0] == text[-1] and text[0] in "'\"")
                             or (tp is not str and text in ("null", "~"))):
        value = text  # a text setting is the text as typed: output_dir=010 stays 010 (YAML: 8), no stays no (False)
    elif _is_int(tp) and not (tp is not int and text in ("null", "~")):
        value = _base10(text, where, key)  # steps=010 is 10 (YAML 1.1: octal 8), resolution=1:30 is refused (90)
    current = getattr(target, leaf)
    if isinstance(value, dict) and dataclasses.is_dataclass(current) and not isinstance(current, type):
        setattr(target, leaf, _merged(current, value, where, key + "."))
    else:
        setattr(target, leaf, _coerce(tp, value, where, key))
    return cfg


def set_text(cfg, key: str, text: str, source: str):
    """Set the text field ``key`` (dotted, as in an override) of ``cfg`` to ``text`` exactly as given, without
    YAML parsing: a command-line flag's path (``--input "[2024] photos/"``, ``--output "'out'"``). A list-of-text
    field gets ``[text]``. ``source`` (e.g. ``--input``) names the setting in a ConfigError. Returns ``cfg``."""
    target, leaf, tp = _field_at(cfg, key, source)
    if not _is_text(tp):
        raise ConfigError(f"{source}: '{key}' expects {_type_name(tp)}, not text; give it as an override {key}=...")
    setattr(target, leaf, _coerce(tp, text, source, key))
    return cfg


def _field_at(cfg, key: str, where: str):
    """``(section, field name, field type)`` that the dotted ``key`` names in ``cfg``; ConfigError (naming
    ``where``) for an unknown key, an entry of a list that is not there, or a key under a setting that is no
    section."""
    parts = key.split(".")
    target = cfg
    for i, part in enumerate(parts[:-1]):
        if isinstance(target, list):  # an entry of a list of sections: personalizations.1.steps=10
            at = ".".join(parts[:i])
            if not target and part.isdigit():
                raise ConfigError(f"{where}: '{at}' has no entries (index {part} is out of range); give the whole "
                                  f"list, e.g. {at}=[{{{parts[i + 1]}: ...}}]")
            if not part.isdigit() or int(part) >= len(target):
                raise ConfigError(f"{where}: '{at}' has {len(target)} entries; address one by its index "
                                  f"0..{len(target) - 1} (e.g. {at}.0.{parts[-1]}=...), or give the whole list")
            target = target[int(part)]
            continue
        at = ".".join(parts[: i + 1])
        names = {f.name for f in dataclasses.fields(target)}
        if part not in names:
            raise ConfigError(_unknown_key_msg(at, target, where))
        hint = typing.get_type_hints(type(target))[part]
        value_here = getattr(target, part)
        item_t = _list_item(hint)
        if item_t is not None and dataclasses.is_dataclass(item_t) and isinstance(value_here, list):
            if not parts[i + 1].isdigit():
                raise ConfigError(f"{where}: '{at}' is a list; address an entry by its index (e.g. "
                                  f"{at}.0.{parts[-1]}=...), or give the whole list")
            target = value_here
            continue
        if item_t is not None:
            raise ConfigError(f"{where}: '{at}' is a list of {_type_name(item_t)}, not of sections: its entries are "
                              f"not set one by one; give the whole list ({at}=[...])")
        if not dataclasses.is_dataclass(value_here):
            raise ConfigError(f"{where}: '{at}' is a {_type_name(hint)} setting, not a section: it has no key "
                              f"'{parts[i + 1]}'; set it whole ({at}=...)")
        target = value_here
    if isinstance(target, list):
        at = ".".join(parts[:-1])
        if not target:
            raise ConfigError(f"{where}: '{at}' has no entries (index {parts[-1]} is out of range); give the whole "
                              f"list, e.g. {at}=[{{KEY: ...}}]")
        raise ConfigError(f"{where}: an entry of '{at}' is a section; set one of its "
                          f"keys ({key}.KEY=...), or give the whole list")
    leaf = parts[-1]
    fields = {f.name: f for f in dataclasses.fields(target)}
    if leaf not in fields:
        raise ConfigError(_unknown_key_msg(key, target, where))
    return target, leaf, typing.get_type_hints(type(target))[leaf]


def _list_item(tp):
    """The entry type of a list field (``list[X]`` or ``Optional[list[X]]``), else None."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (Union, types.UnionType) and len(args) == 1:
        tp = args[0]
    if typing.get_origin(tp) is list or tp is list:
        return (typing.get_args(tp) or (Any,))[0]
    return None


def _is_int(tp) -> bool:
    """Whether a field of type ``tp`` holds a whole number: ``int`` or ``Optional[int]``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return tp is int or (typing.get_origin(tp) in (Union, types.UnionType) and args == [int])


def _base10(text: str, where: str, key: str) -> int:
    """``text`` as a base-10 integer (``010`` is 10, ``1_000`` 1000); ConfigError naming ``key`` otherwise."""
    if not re.fullmatch(r"[+-]?\d+(_\d+)*", text):
        raise ConfigError(f"{where}: '{key}' expects int, a whole number in base 10 (e.g. 10), got {text!r}")
    return int(text)


def _merged(current, data: dict, source: str, prefix: str):
    """A copy of the section ``current`` with the keys of ``data`` changed (nested sections likewise, on their
    current values); unknown keys and wrong types raise ConfigError naming ``source`` and the key."""
    cls = type(current)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    changes = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(_unknown_key_msg(f"{prefix}{key}", cls, source))
        here = getattr(current, key)
        if isinstance(value, dict) and dataclasses.is_dataclass(here) and not isinstance(here, type):
            changes[key] = _merged(here, value, source, f"{prefix}{key}.")
        else:
            changes[key] = _coerce(hints[key], value, source, prefix + key)
    return dataclasses.replace(current, **changes)


def _is_text(tp) -> bool:
    """Whether a field of type ``tp`` holds text: ``str``, ``Optional[str]`` or ``list[str]``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return tp is str or (typing.get_origin(tp) in (Union, types.UnionType, list) and args == [str])


def replace_checked(cfg, changes: dict, source: str):
    """A copy of the config dataclass ``cfg`` with ``changes`` ({field: value}) applied, each value checked
    against its field type like a recipe value; ConfigError names ``source`` and the key otherwise."""
    return dataclasses.replace(cfg, **_checked_kwargs(type(cfg), changes, source, ""))


def to_dict(cfg) -> dict:
    """The config as plain nested dicts (for YAML dumps and ``config.yaml`` in output folders)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg) -> str:
    """The resolved config as YAML text, read back by :func:`load_config` as the same config: text that the recipe
    loader would read as a number is quoted (``yaml.safe_dump`` left ``output_dir: 089`` bare, YAML 1.1 text,
    which the loader's base-10 integers read back as 89)."""
    return yaml.dump(to_dict(cfg), Dumper=_RecipeDumper, sort_keys=False)


# ---------------------------------------------------------------------------- internals
def _unknown_key_msg(key: str, target, where: str) -> str:
    names = [f.name for f in dataclasses.fields(target)]
    return f"{where}: unknown key '{key}'{_did_you_mean(key, names)} (known keys here: {', '.join(names)})"


def _did_you_mean(key: str, names: list[str]) -> str:
    """``; did you mean 'outer_steps'?`` for a near miss of one of ``names``; a hint for ``key:value`` (YAML needs a
    space after the colon); else empty."""
    import difflib

    last = key.rsplit(".", 1)[-1]
    bracket = re.fullmatch(r"(\w+)\[(\d+)\]", last)
    if bracket and bracket.group(1) in names:  # subjects[0].name=x: the entries are addressed subjects.0.name=x
        return f"; address an entry of the list by its index after a dot: '{bracket.group(1)}.{bracket.group(2)}'"
    if ":" in last and last.split(":", 1)[0] in names:
        return f"; YAML needs a space after the colon: '{last.split(':', 1)[0]}: {last.split(':', 1)[1]}'"
    close = difflib.get_close_matches(last, names, n=1, cutoff=0.75)
    return f"; did you mean '{close[0]}'?" if close else ""


def _build(cls, data: dict, source: str, prefix: str):
    return cls(**_checked_kwargs(cls, data, source, prefix))


def _checked_kwargs(cls, data: dict, source: str, prefix: str) -> dict:
    """``data`` as keyword arguments of the dataclass ``cls``: unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(_unknown_key_msg(f"{prefix}{key}", cls, source))
        factory = fields[key].default_factory
        if isinstance(value, dict) and dataclasses.is_dataclass(hints[key]) and factory is not dataclasses.MISSING:
            # a recipe's section sets only the keys it names on the field's own default, as an override does:
            # protect-images' surrogate keeps its published lr 5e-7 when a recipe sets only the prompts (before,
            # the section was built on the class defaults and lr 5e-6 came back)
            base = factory()
            kwargs[key] = dataclasses.replace(base, **_checked_kwargs(type(base), value, source, prefix + key + "."))
        else:
            kwargs[key] = _coerce(hints[key], value, source, prefix + key)
    return kwargs


def _type_name(tp) -> str:
    """A field type as a recipe's writer reads it: ``int``, ``Optional[float]``, ``list[str]``, ``dict[str, Any]``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        inner = ", ".join(_type_name(a) for a in rest)
        if len(rest) == len(args):
            return f"Union[{inner}]"
        return f"Optional[{inner}]" if len(rest) == 1 else f"Optional[Union[{inner}]]"
    if origin is not None:
        name = getattr(origin, "__name__", None) or str(origin).replace("typing.", "")
        return f"{name}[{', '.join(_type_name(a) for a in args)}]" if args else name
    if tp is Any:
        return "Any"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


class _NonFinite(ConfigError):
    """A float setting given as nan or ±inf."""


class _DuplicateKey(yaml.YAMLError):
    """A key given twice in one YAML mapping (``line`` and ``first`` are 1-based)."""

    def __init__(self, key, line: int, first: int):
        super().__init__(f"key {key!r} on line {line} is given twice (first on line {first})")
        self.key, self.line, self.first = key, line, first


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (plain YAML keeps the last one silently:
    ``personalization: {steps: 10, steps: 20}`` ran 20 steps)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._checked: set[int] = set()

    def flatten_mapping(self, node):
        """Check each mapping for a repeated key once, as written, before YAML merges (``<<: *base``) are
        flattened into it: a chained merge (``&b {<<: *a, k: 2}`` merged into another mapping) flattened the inner
        mapping in place first, and its merged keys were reported as given twice."""
        if id(node) not in self._checked:
            self._checked.add(id(node))
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden by later keys
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise _DuplicateKey(key, key_node.start_mark.line + 1, seen[key])
                except TypeError:  # an unhashable key: SafeLoader's own error follows
                    continue
                seen[key] = key_node.start_mark.line + 1
        super().flatten_mapping(node)


def _base10_int(loader: yaml.SafeLoader, node) -> int:
    return int(loader.construct_scalar(node).replace("_", ""), 10)


# whole numbers are base 10 in recipes as in overrides: YAML 1.1 reads `steps: 010` as 8 (octal), `1:30` as 90
# (sexagesimal) and `0x10` as 16; here only plain digits are numbers (the others are text, refused by a number field)
_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:int"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9][0-9_]*$"),
                                    list("-+0123456789"))
_RecipeLoader.add_constructor("tag:yaml.org,2002:int", _base10_int)


class _RecipeDumper(yaml.SafeDumper):
    """``yaml.SafeDumper`` that quotes text :class:`_RecipeLoader` would read as something else (``089``), as well
    as what plain YAML 1.1 would (``010``, ``1:30``), so both read the dump back as written."""


_RecipeDumper.yaml_implicit_resolvers = {
    first: list(yaml.SafeDumper.yaml_implicit_resolvers.get(first, []))
    + [r for r in _RecipeLoader.yaml_implicit_resolvers.get(first, [])
       if r not in yaml.SafeDumper.yaml_implicit_resolvers.get(first, [])]
    for first in set(yaml.SafeDumper.yaml_implicit_resolvers) | set(_RecipeLoader.yaml_implicit_resolvers)}


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
        for exc in errors:
            if isinstance(exc, _NonFinite):  # the clearer message
                raise exc
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
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad
        if key.rsplit(".", 1)[-1].endswith("seed") and not -2 ** 63 <= value < 2 ** 64:  # torch.manual_seed's range
            raise ConfigError(f"{source}: '{key}' must be between -2**63 and 2**64-1 (a random generator's seed), "
                              f"got {value}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad
        try:
            number = float(value)  # YAML reads "5e-6" (no dot) as a string
        except ValueError:
            raise bad from None
        except OverflowError:  # an integer past the float range
            number = math.inf
        if not math.isfinite(number):
            raise _NonFinite(f"{source}: '{key}' expects a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads a recipe's `mixed_precision: no` as False; the word was meant
            return "yes" if value else "no"
        if isinstance(value, (str, int, float)):
            return str(value)
        raise bad
    return value
