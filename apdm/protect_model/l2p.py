"""Learning to Protect (L2P, APDM Algorithm 1): alternate simulated personalization and protection steps.

::

    θ  <- base UNet (fp32 master weights; all / selected blocks / LoRA adapters trainable)
    φ  <- frozen original (never updated)
    for j in 1..N_protect:                          # outer protection path
        θ' <- copy of θ ;  G <- 0
        for i in 1..N_per:                          # inner: the attacker's personalization (shared simulator)
            θ' <- θ' - γ_per ∇L_per(θ')             #   one DreamBooth (or LoRA / TI) step
            G  <- G + ∇_θ' L_protect(θ')            #   protection gradient at the personalized weights
        θ  <- AdamW step on θ with gradient G       # first order: nothing is differentiated through the inner steps

``L_protect = L_DPO + prior_loss_weight · L_ppl`` (:mod:`apdm.protect_model.losses`). With ``inner_steps = 0``
the protection gradient is taken at θ itself (the paper's "without L2P" ablation).

Design choices (see docs/protect_model.md):

* the paper's clean gradient by default; ``gradient_leak=true`` reproduces the reference code, where the
  personalization gradient ∇L_per(θ'_i) is added to each transferred gradient; the leaked gradient is the one the
  simulator clipped at ``personalization.max_grad_norm`` (1.0 by default and in the SD recipes), while the reference
  code does not clip, so reproducing it also needs ``personalization.max_grad_norm=0``;
* every random draw of outer step j comes from generators seeded by ``(seed, j)``, so a run resumed from a
  checkpoint continues exactly as an uninterrupted one; with several processes (``torchrun``), rank r uses
  ``seed + 1_000_003 r`` and the gradients are averaged (:mod:`apdm.core.distributed`);
* several subjects: outer step j protects subject ``j mod K`` (round robin); several simulated attackers
  (``attacker_mix``, our addition) are taken in turn in the same way;
* ``anchor_weight > 0`` adds L_ppl taken at θ itself to every outer step with ``inner_steps > 0`` (our addition,
  off by default; with no inner step θ′ is θ, whose L_ppl is in the loss already);
* θ trained as LoRA: φ is θ with its adapters disabled (no extra full copy), and the adapters are merged into
  the UNet at the end;
* ``train_text_encoder`` (our addition) makes θ's text encoder trainable too: its parameters are in the trainable
  dict under ``text_encoder.<name>``, θ′ starts from it, and the protection gradient reaches it through the
  conditioning of the DPO pairs and of L_ppl;
* ``conditioning_attack_steps`` (our addition) takes the DPO pairs at the conditioning near the prompt's under which
  θ′ denoises the subject best (:func:`attacked_conditioning`), not at the prompt's own.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from apdm.config import PersonalizationConfig, ProtectConfig
from apdm.core import diffusion as D
from apdm.core import distributed
from apdm.core.models import SD
from apdm.personalization import simulator as S
from apdm.protect_model.losses import dpo_loss, naive_loss
from apdm.utils import LOG, atomic_write_json, progress, seeded_global_rng


@dataclass
class Subject:
    """One protected subject's tensors, all (N,3,H,W) in [0,1] on the model device.

    Attributes:
        images: the subject's photos (x⁻ of the DPO loss, instance images of the simulated attacker).
        paired: generic class-prompt images from φ, one per photo (x⁺ of the DPO loss).
        class_images: prior-preservation images of ``class_prompt`` from φ.
    """

    name: str
    images: torch.Tensor
    paired: torch.Tensor
    class_images: torch.Tensor
    instance_prompt: str
    class_prompt: str
    #: VAE posteriors of the three image sets, encoded once per VAE (see :func:`_latents`)
    _posteriors: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)


def _latents(vae, subject: Subject, which: str, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A posterior sample of ``getattr(subject, which)[idx]`` as scaled float32 latents: the same numbers as
    encoding those images with ``generator``, but the VAE encoder runs once per image and run, not per step."""
    key = (which, id(vae))
    if key not in subject._posteriors:
        with torch.no_grad():
            subject._posteriors[key] = D.vae_posterior(vae, getattr(subject, which), batch=S.ENCODE_BATCH)
    mean, std = subject._posteriors[key]
    rows = idx.to(mean.device)
    return D.posterior_latents(vae, mean[rows], std[rows], sample=True, generator=generator).float()


# ============================================================================ θ and φ
def _standard_layout_sample(module, args, kwargs):
    """Forward pre-hook of a partially trainable θ: hand the UNet its ``sample`` (B, 4, h, w) in the standard
    (contiguous) memory layout. VAE latents come out channels-last on CPU, and torch's CPU GroupNorm backward for
    a channels-last input that needs no gradient while the norm's weight does (a frozen ``conv_in`` in front of a
    trainable ResNet norm) crashes the process (torch 2.13; ``tests/test_protect_model.py``, the "resnets" case).
    Only partial θ gets the hook, so the full-UNet and LoRA paths keep their exact numbers."""
    if args:
        return (args[0].contiguous(),) + tuple(args[1:]), kwargs
    if "sample" in kwargs:
        kwargs = {**kwargs, "sample": kwargs["sample"].contiguous()}
    return args, kwargs


def prepare_theta(sd: SD, pcfg: ProtectConfig, seed: int = 0
                  ) -> tuple[torch.nn.Module, dict[str, torch.nn.Parameter]]:
    """Build θ, the UNet being protected: a copy of ``sd.unet`` with the requested trainable subset in fp32.

    Full or partial θ is an fp32 copy (master weights). LoRA-θ keeps its frozen base in the model's own dtype
    (bf16 on GPUs: an exact copy of φ's weights, so no second full fp32 UNet is held) with fp32 adapters; the
    simulated attacker's θ′ is an fp32 copy either way.

    Returns:
        (theta_unet, {name: parameter} of the trainable parameters).
    """
    theta = copy.deepcopy(sd.unet)
    if pcfg.trainable != "lora":  # torch's own Module.to: diffusers' override adds a notice about nothing here
        torch.nn.Module.to(theta, torch.float32)
    theta.requires_grad_(False)
    if pcfg.trainable == "lora":
        from peft import LoraConfig

        with seeded_global_rng(seed, theta.device):  # the adapters' random init follows the run's seed
            theta.add_adapter(LoraConfig(r=pcfg.lora_rank, lora_alpha=pcfg.lora_rank, init_lora_weights=True,
                                         target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="apdm")
        names = [n for n, _ in theta.named_parameters() if "lora_" in n]
        for n, p in theta.named_parameters():  # fp32 adapters on a base in the model's dtype
            if "lora_" in n:
                p.data = p.data.float()
    elif pcfg.trainable == "all":
        names = [n for n, _ in theta.named_parameters()]
    else:
        keys = [k.strip() for k in pcfg.trainable.split(",") if k.strip()]
        names = [n for n, _ in theta.named_parameters() if any(k in n for k in keys)]
        if not names:
            raise ValueError(f"protect.trainable='{pcfg.trainable}' matches no UNet parameter name")
        theta.register_forward_pre_hook(_standard_layout_sample, with_kwargs=True)
    params = dict(theta.named_parameters())
    trainable = {n: params[n] for n in names}
    for p in trainable.values():
        p.requires_grad_(True)
    return theta, trainable


TE_PREFIX = "text_encoder."


def prepare_text_encoder(sd: SD, pcfg: ProtectConfig, trainable: dict[str, torch.nn.Parameter]):
    """θ's text encoder when ``pcfg.train_text_encoder``: an fp32 copy of ``sd.text_encoder`` whose parameters are
    added to ``trainable`` as ``text_encoder.<name>``; else ``sd.text_encoder`` itself (frozen, shared)."""
    if not pcfg.train_text_encoder:
        return sd.text_encoder
    te = copy.deepcopy(sd.text_encoder).to(torch.float32).eval()
    te.requires_grad_(True)
    for n, p in te.named_parameters():
        trainable[TE_PREFIX + n] = p
    return te


@contextlib.contextmanager
def _phi(theta, phi):
    """Yield the reference model φ: the frozen copy, or θ with its LoRA adapters switched off."""
    if phi is not None:
        yield phi
        return
    theta.disable_adapters()
    try:
        yield theta
    finally:
        theta.enable_adapters()


def _autocast(device: torch.device, mode: str):
    if mode in ("fp16", "bf16") and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16 if mode == "fp16" else torch.bfloat16)
    return contextlib.nullcontext()


# ============================================================================ the protection loss at θ'
def protection_loss(unet, phi_ctx, sd: SD, text_encoder, tokenizer, subject: Subject, instance_prompt: str,
                    pcfg: ProtectConfig, g: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
    """L_protect at the (personalized) weights ``unet``; differentiable w.r.t. ``unet``'s parameters.

    Args:
        unet: θ' (or θ when there is no inner loop).
        phi_ctx: zero-argument callable returning a context manager that yields φ.
        sd: the base model (VAE and schedule are read from it).
        text_encoder, tokenizer: those of θ' (Textual Inversion adds its learned token there); differentiated
            through when ``pcfg.train_text_encoder``. φ's error is taken under the same conditioning.
        subject: the protected subject's tensors.
        instance_prompt: the personalization prompt as the attacker uses it (TI: with its token).
        pcfg: protection settings (loss, β, form, prior weight, batch size).
        g: RNG for image choice, VAE posterior sample, noise and timesteps.
    """
    sched = sd.noise_scheduler
    n, b = subject.images.shape[0], pcfg.batch_size
    idx = torch.randint(n, (b,), generator=g)
    cls_idx = torch.randint(subject.class_images.shape[0], (b,), generator=g)
    vae_gen = torch.Generator(device=sd.vae.device).manual_seed(int(torch.randint(2**31, (1,), generator=g)))
    with torch.no_grad():
        lose = _latents(sd.vae, subject, "images", idx, vae_gen)
        win = _latents(sd.vae, subject, "paired", idx, vae_gen)
        cls = _latents(sd.vae, subject, "class_images", cls_idx, vae_gen)
    with torch.set_grad_enabled(pcfg.train_text_encoder):  # the gradient reaches θ's text encoder through these
        c_inst = D.encode_prompt(text_encoder, tokenizer, [instance_prompt]).expand(b, -1, -1).float()
        c_cls = D.encode_prompt(text_encoder, tokenizer, [subject.class_prompt]).expand(b, -1, -1).float()
    dev = lose.device

    def randn(shape):
        return torch.randn(shape, generator=g).to(dev)

    def randt(k):
        return D.sample_timesteps(sched, k, dev, g)

    # prior preservation L_ppl on class images at their own noise and t
    noise_cls, t_cls = randn(cls.shape), randt(b)
    with _autocast(dev, pcfg.mixed_precision):
        if pcfg.loss == "dpo":
            noise, t = randn(lose.shape), randt(b)          # shared by x⁺ and x⁻, θ and φ
            c_pair = _pair_conditioning(pcfg, text_encoder, tokenizer, instance_prompt, subject.class_prompt,
                                        c_inst, g)
            if pcfg.conditioning_attack_steps > 0:  # draws last too: without it the random stream is the paper's
                c_pair, shift = attacked_conditioning(unet, sched, lose, c_pair, pcfg.conditioning_attack_steps,
                                                      pcfg.conditioning_attack_radius, g)
            # one θ' pass over [class | x⁺ | x⁻] (each row keeps its own prompt, noise and t)
            x = torch.cat([cls, win, lose])
            cond, eps, tt = torch.cat([c_cls, c_pair, c_pair]), torch.cat([noise_cls, noise, noise]), \
                torch.cat([t_cls, t, t])
            err = D.noise_prediction_loss(unet, sched, x, cond, eps, tt, reduction="elementwise")
            loss_ppl = err[:b].mean()
            with torch.no_grad(), phi_ctx() as phi:
                err_ref = D.noise_prediction_loss(phi, sched, x[b:], cond[b:], eps[b:], tt[b:],
                                                  reduction="elementwise")
            et_w, et_l = err[b:].chunk(2)
            er_w, er_l = err_ref.chunk(2)
            loss_main = dpo_loss(et_w, er_w, et_l, er_l, beta=pcfg.beta, form=pcfg.dpo_form)
            total = loss_main + pcfg.prior_loss_weight * loss_ppl
            logs = {"loss_dpo": float(loss_main.detach()), "mse_subject": float(et_l.mean().detach()),
                    "mse_paired": float(et_w.mean().detach())}
            if pcfg.conditioning_attack_steps > 0:
                logs["cond_attack_shift"] = shift
        elif pcfg.loss == "naive":
            loss_ppl = D.noise_prediction_loss(unet, sched, cls, c_cls, noise_cls, t_cls)
            loss_inst = D.noise_prediction_loss(unet, sched, lose, c_inst, randn(lose.shape), randt(b))
            total = naive_loss(loss_inst, loss_ppl, pcfg.naive_lambda)
            logs = {"mse_subject": float(loss_inst.detach())}
        else:
            raise ValueError(f"protect.loss must be 'dpo' or 'naive', got '{pcfg.loss}'")
    logs["loss_ppl"] = float(loss_ppl.detach())
    logs["loss_protect"] = float(total.detach())
    return total, logs


def _pair_conditioning(pcfg: ProtectConfig, text_encoder, tokenizer, instance_prompt: str, class_prompt: str,
                       c_inst: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The text conditioning of the b DPO pairs, (b, L, D) float32: ``c_inst`` (the instance prompt), or with
    ``pcfg.dpo_extra_prompts`` each pair's prompt drawn uniformly from the instance prompt and those (the draw
    comes last, so without extra prompts the random stream is that of the paper's loss)."""
    if not pcfg.dpo_extra_prompts:
        return c_inst
    extra = [p.replace("{class_prompt}", class_prompt).replace("{instance_prompt}", instance_prompt)
             for p in pcfg.dpo_extra_prompts]
    with torch.set_grad_enabled(pcfg.train_text_encoder):  # row 0: the instance prompt, already encoded
        table = torch.cat([c_inst[:1]] + [D.encode_prompt(text_encoder, tokenizer, [p]).float() for p in extra])
    choice = torch.randint(len(table), (c_inst.shape[0],), generator=g)
    return table[choice.to(table.device)]


def attacked_conditioning(unet, sched, latents: torch.Tensor, cond: torch.Tensor, steps: int, radius: float,
                          g: torch.Generator) -> tuple[torch.Tensor, float]:
    """The conditioning near ``cond`` under which ``unet`` denoises ``latents`` best (the attacker's view).

    ``steps`` normalized gradient steps (size 2.5 · radius / steps, each on fresh noise and timesteps from ``g``)
    lower the noise-prediction loss of ``unet`` on ``latents`` under ``cond + δ``, with δ projected back to
    ‖δ_i‖ ≤ radius · ‖cond_i‖ (Frobenius norm over (L, D), per row). Only δ is differentiated: no gradient is
    left on ``unet`` or on whatever produced ``cond``.

    Args:
        unet: the denoiser (θ′).
        sched: its training scheduler.
        latents: (b, C, h, w) clean scaled latents (the subject's photos).
        cond: (b, L, D) conditioning.
        steps: K ≥ 1.
        radius: bound of δ relative to ‖cond_i‖.
        g: CPU generator for the noise and timesteps.

    Returns:
        ``(cond + δ)`` detached, (b, L, D), and the mean relative shift ‖δ_i‖ / ‖cond_i‖.
    """
    c = cond.detach()
    norm = c.flatten(1).norm(dim=1).view(-1, 1, 1)
    bound, size = radius * norm, 2.5 * radius * norm / steps
    delta = torch.zeros_like(c, requires_grad=True)
    for _ in range(steps):
        noise = torch.randn(latents.shape, generator=g).to(latents.device)
        t = D.sample_timesteps(sched, latents.shape[0], latents.device, g)
        loss = D.noise_prediction_loss(unet, sched, latents, c + delta, noise, t)
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta -= size * grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1).clamp_min(1e-12)
            delta *= (bound / delta.flatten(1).norm(dim=1).view(-1, 1, 1).clamp_min(1e-12)).clamp(max=1.0)
    shift = float((delta.detach().flatten(1).norm(dim=1) / norm.flatten()).mean())
    return (c + delta).detach(), shift


def anchor_loss(theta, sd: SD, subject: Subject, pcfg: ProtectConfig, g: torch.Generator,
                text_encoder=None) -> torch.Tensor:
    """L_ppl at θ itself: the noise-prediction loss of θ on a batch of class images under the class prompt
    (encoded by ``text_encoder``: θ's own when it is protected too, else ``sd.text_encoder``)."""
    text_encoder = sd.text_encoder if text_encoder is None else text_encoder
    b = pcfg.batch_size
    idx = torch.randint(subject.class_images.shape[0], (b,), generator=g)
    vae_gen = torch.Generator(device=sd.vae.device).manual_seed(int(torch.randint(2**31, (1,), generator=g)))
    with torch.no_grad():
        cls = _latents(sd.vae, subject, "class_images", idx, vae_gen)
    with torch.set_grad_enabled(pcfg.train_text_encoder):
        c_cls = D.encode_prompt(text_encoder, sd.tokenizer, [subject.class_prompt]).expand(b, -1, -1).float()
    noise = torch.randn(cls.shape, generator=g).to(cls.device)
    t = D.sample_timesteps(sd.noise_scheduler, b, cls.device, g)
    with _autocast(cls.device, pcfg.mixed_precision):
        return D.noise_prediction_loss(theta, sd.noise_scheduler, cls, c_cls, noise, t)


# ============================================================================ one outer step
def _seeded(seed: int, j: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + j * 7_919 + stream) % (2**63 - 1))


def _map_inner_params(theta_names, inner_unet, inner_text_encoder=None) -> dict[str, torch.nn.Parameter]:
    """θ parameter name -> the same parameter of θ' (a LoRA attacker wraps layers: ``x.weight`` becomes
    ``x.base_layer.weight``; ``text_encoder.<name>`` is looked up in θ′'s text encoder)."""
    inner = dict(inner_unet.named_parameters())
    if inner_text_encoder is not None:
        inner.update({TE_PREFIX + n: p for n, p in inner_text_encoder.named_parameters()})
    out = {}
    for n in theta_names:
        prefix, leaf = n.rsplit(".", 1)
        p = inner.get(n, inner.get(f"{prefix}.base_layer.{leaf}"))
        if p is None:
            raise RuntimeError(f"the personalized copy has no parameter matching protected '{n}'")
        out[n] = p
    return out


def outer_step(j: int, theta, trainable: dict, phi, sd: SD, subjects: list[Subject], per_cfg: PersonalizationConfig,
               pcfg: ProtectConfig, optimizer: torch.optim.Optimizer, seed: int,
               carry: dict | None = None, carry_key=None, text_encoder=None) -> dict[str, float]:
    """One protection step (outer iteration j of Algorithm 1). Updates θ in place; φ is never touched.

    ``text_encoder`` is θ's text encoder (:func:`prepare_text_encoder`; ``None`` = ``sd.text_encoder``): θ′ starts
    from it, and when it is protected its parameters are in ``trainable`` under ``text_encoder.<name>``.

    Under data parallelism (:mod:`apdm.core.distributed`) each process draws from its own seed
    (``rank_seed(seed)``) and the protection gradients are averaged before the update.

    ``carry`` (a dict owned by the caller; ``protect.inner_restart_every`` > 1) keeps the simulated attacker
    between outer steps under ``carry_key``: instead of a fresh copy of θ, θ' continues from where the last step
    with this key left it, as ``θ + (θ'_end − θ_then)``, i.e. its own progress on top of θ's current weights,
    with its optimizer state and random stream. An empty entry starts a fresh attacker.
    """
    seed = distributed.rank_seed(seed)
    subject = subjects[j % len(subjects)]
    word_index = None
    if pcfg.identifiers:  # this step's identifier, drawn from its own stream (exact resume)
        word_index = int(torch.randint(len(pcfg.identifiers), (1,), generator=_seeded(seed, j, 3)))
        subject, per_cfg = with_identifier(subject, per_cfg, pcfg.identifiers[word_index])
    g = _seeded(seed, j, 1)
    phi_ctx = lambda: _phi(theta, phi)  # noqa: E731
    te = sd.text_encoder if text_encoder is None else text_encoder
    names = list(trainable)
    acc = {n: torch.zeros_like(p) for n, p in trainable.items()}
    logs_sum: dict[str, float] = {}
    if pcfg.inner_steps == 0:  # "without L2P": protect at θ directly
        loss, logs = protection_loss(theta, phi_ctx, sd, te, sd.tokenizer, subject,
                                     subject.instance_prompt, pcfg, g)
        loss.backward()
        for n, p in trainable.items():
            if p.grad is not None:
                acc[n] += p.grad
            p.grad = None
        logs_sum = logs
        n_terms = 1
    else:
        carried = carry.get(carry_key) if carry is not None else None
        if carried is None:
            # θ' = a fresh copy of θ, personalized by the shared simulator with a fresh optimizer
            inner_sd = dataclasses.replace(sd, unet=theta, text_encoder=te)
            cfg = dataclasses.replace(per_cfg, instance_prompt=subject.instance_prompt,
                                      class_prompt=subject.class_prompt,
                                      seed=int(torch.randint(2**31, (1,), generator=_seeded(seed, j, 2))))
            state = S.setup(inner_sd, cfg, subject.class_images)
            if pcfg.gradient_checkpointing:
                state.sd.unet.enable_gradient_checkpointing()
            inner = _map_inner_params(names, state.sd.unet,
                                      state.sd.text_encoder if pcfg.train_text_encoder else None)
            for p in inner.values():
                p.requires_grad_(True)
        else:
            # the continuing attacker: its progress so far, moved onto θ's current weights
            state, inner, delta = carried
            cfg = state.cfg
            with torch.no_grad():
                for n, p in inner.items():
                    if p is not trainable[n]:  # (TI personalizes θ's own UNet object: nothing to move)
                        p.copy_(trainable[n].detach().to(p.dtype) + delta[n])
        for _ in range(pcfg.inner_steps):
            S.step(state, subject.images)          # θ'_{i+1} = θ'_i - γ ∇L_per(θ'_i); leaves ∇L_per in .grad
            if not pcfg.gradient_leak:
                for p in inner.values():
                    p.grad = None
            loss, logs = protection_loss(state.sd.unet, phi_ctx, sd, state.sd.text_encoder, state.sd.tokenizer,
                                         subject, state.instance_prompt, pcfg, g)
            loss.backward()
            for n, p in inner.items():
                if p.grad is not None:
                    acc[n] += p.grad
                    p.grad = None
            for k, v in logs.items():
                logs_sum[k] = logs_sum.get(k, 0.0) + v
        logs_sum = {k: v / pcfg.inner_steps for k, v in logs_sum.items()}
        n_terms = pcfg.inner_steps
        logs_sum["loss_personalization"] = sum(state.history[-pcfg.inner_steps:]) / pcfg.inner_steps
        logs_sum["attack_depth"] = float(len(state.history))  # simulated personalization steps θ' has taken
        if cfg.method == "ti":  # TI shares θ's UNet object: leave it as it was
            state.sd.unet.train(theta.training)
        if carry is not None:
            with torch.no_grad():
                delta = {n: (p.detach() - trainable[n].detach().to(p.dtype)) for n, p in inner.items()
                         if p is not trainable[n]}
            carry[carry_key] = (state, inner, delta)
        del state
    if pcfg.anchor_weight > 0 and pcfg.inner_steps > 0:
        # the anchor: θ itself must keep its class prior (Algorithm 1 only ever evaluates θ′)
        loss_anchor = pcfg.anchor_weight * anchor_loss(theta, sd, subject, pcfg, g, te)
        loss_anchor.backward()
        for n, p in trainable.items():
            if p.grad is not None:
                acc[n] += p.grad * n_terms
            p.grad = None
        logs_sum["loss_anchor"] = float(loss_anchor.detach())
    if word_index is not None:
        logs_sum["identifier_index"] = float(word_index)  # into protect.identifiers
    for n, p in trainable.items():
        p.grad = acc[n] / (n_terms if pcfg.grad_accum == "mean" else 1)
    _all_reduce_grads(trainable)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return logs_sum


def with_identifier(subject: Subject, per_cfg: PersonalizationConfig, word: str
                    ) -> tuple[Subject, PersonalizationConfig]:
    """``subject`` and the simulated attacker's config with the identifier word ``per_cfg.identifier`` of the
    subject's instance prompt replaced by ``word`` ("a photo of sks person" -> "a photo of zwx person"; a TI attacker
    then learns ``<zwx>``).

    Raises:
        ValueError: the instance prompt does not contain the identifier word.
    """
    try:
        prompt = S.swap_identifier(subject.instance_prompt, per_cfg.identifier, word)
    except ValueError as e:
        raise ValueError(f"protect.identifiers: subject '{subject.name}': {e} (personalization.identifier) "
                         f"to replace") from None
    return dataclasses.replace(subject, instance_prompt=prompt), dataclasses.replace(per_cfg, identifier=word)


def _all_reduce_grads(trainable: dict) -> None:
    """Average the protection gradient over processes (``accelerate launch`` / torchrun data parallelism)."""
    world = distributed.rank_world()[1]
    if world > 1:
        for p in trainable.values():
            torch.distributed.all_reduce(p.grad)
            p.grad /= world


# ============================================================================ checkpoints
class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: corrupt, from another model, or made with other settings."""


def tensor_digest(x: torch.Tensor) -> str:
    """A short sha256 of a tensor's dtype, shape and bytes (any device or dtype): the fingerprint of a set of images in
    a checkpoint's settings. The same images loaded the same way give the same digest."""
    import hashlib

    x = x.detach().cpu().contiguous()
    h = hashlib.sha256(f"{x.dtype}{tuple(x.shape)}".encode())
    h.update(memoryview(x.view(torch.uint8).reshape(-1).numpy()))
    return h.hexdigest()[:16]


def config_settings(section: str, cfg, leave_out: tuple[str, ...] = ()) -> dict:
    """The fields of the config dataclass ``cfg`` as ``{"section.key": JSON value}`` (``section`` empty: bare keys),
    without ``leave_out``: a part of a checkpoint's settings (:func:`save_checkpoint`)."""
    prefix = f"{section}." if section else ""
    return {prefix + k: json.loads(json.dumps(v, default=str)) for k, v in dataclasses.asdict(cfg).items()
            if k not in leave_out}


#: protect.* keys left out of the settings a protection checkpoint must match: the run's length (a run may be
#: extended), checkpointing and memory options that do not change the numbers
PROTECT_RESUMABLE = ("outer_steps", "checkpoint_every", "resume", "gradient_checkpointing")
#: personalization.* keys left out likewise (the class images' cache folder; the images are the model's)
PERSONALIZATION_RESUMABLE = ("class_data_dir", "gradient_checkpointing")


def protection_settings(sd: SD, subjects: list[Subject], per_cfg: PersonalizationConfig, pcfg: ProtectConfig,
                        seed: int) -> dict:
    """What determines a protection's result, as flat JSON (the fingerprint a checkpoint records and a resumed run
    must match): the model (:meth:`SD.fingerprint`, dtype), each subject's photos (:func:`tensor_digest`) and prompts,
    ``protect.*`` but :data:`PROTECT_RESUMABLE`, ``personalization.*`` but :data:`PERSONALIZATION_RESUMABLE`, the
    seed and the number of processes (each draws its own noise)."""
    out = {"model": sd.fingerprint(), "model.dtype": str(sd.dtype).replace("torch.", ""), "seed": seed,
           "processes": distributed.rank_world()[1], "subjects": len(subjects)}
    for k, s in enumerate(subjects):
        out.update({f"subjects[{k}].photos": tensor_digest(s.images),
                    f"subjects[{k}].instance_prompt": s.instance_prompt,
                    f"subjects[{k}].class_prompt": s.class_prompt})
    out.update(config_settings("protect", pcfg, PROTECT_RESUMABLE))
    out.update(config_settings("personalization", per_cfg, PERSONALIZATION_RESUMABLE))
    return out


def _short(v) -> str:
    text = json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _a(what: str) -> str:
    return f"{'an' if what[:1] in 'aeiou' else 'a'} {what}"


def _start_over(folder: Path, how: str) -> str:
    return f"start over with {how} or delete {folder}" if how else f"delete {folder} to start over"


def read_progress(folder: Path, settings: dict | None = None, what: str = "run", start_over: str = "") -> dict:
    """Read ``folder/progress.json`` (written by :func:`save_checkpoint`) and check it against this run.

    Args:
        folder: the checkpoint folder.
        settings: this run's settings (flat JSON; e.g. :func:`protection_settings`); the checkpoint's must have the
            same value at every key both record. A key recorded on one side only (another apdm version) and a
            checkpoint that records none (written before apdm recorded them) are resumed with a warning.
        what: what the checkpoint is of, for the messages ("protection", "ρ training", "encoder trap").
        start_over: the option that starts the run afresh (e.g. ``protect.resume=false``), for the messages.

    Returns:
        the parsed progress (``next_step``, ``param_groups``, ``history``, ``extra``, ``settings``).

    Raises:
        CheckpointError: the file is unreadable or incomplete, or the settings differ (the message names the
            differing keys with both values, the folder, and how to start over).
    """
    path = folder / "progress.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise TypeError(f"a JSON {type(meta).__name__}, not an object")
        missing = [k for k in ("next_step", "history") if k not in meta]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
        meta["next_step"] = int(meta["next_step"])
        if meta["next_step"] < 0 or not isinstance(meta["history"], list) or not isinstance(meta.get("extra", {}),
                                                                                              dict):
            raise ValueError("next_step, history or extra out of form")
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: the {what} checkpoint is corrupt ({type(exc).__name__}: {exc}); "
                              f"{_start_over(folder, start_over)}") from None
    saved = meta.get("settings")
    if settings is None:
        return meta
    if not isinstance(saved, dict):
        LOG.warning("%s: %s checkpoint written before apdm recorded its settings: resumed without checking that "
                    "they are this run's (if they are not, %s)", folder, _a(what), _start_over(folder, start_over))
        return meta
    now = json.loads(json.dumps(settings, default=str))
    differ = [k for k in now if k in saved and saved[k] != now[k]]
    if differ:
        shown = "; ".join(f"{k}: {_short(saved[k])} there, {_short(now[k])} now" for k in differ[:8])
        more = f"; and {len(differ) - 8} more" if len(differ) > 8 else ""
        raise CheckpointError(
            f"{folder}: a checkpoint of another {what}, made with other settings ({shown}{more}); resuming it would "
            f"mix two runs. Run with the checkpoint's settings to continue it, or {_start_over(folder, start_over)}")
    one_side = sorted(set(now) ^ set(saved))
    if one_side:
        LOG.warning("%s: settings recorded by this run or by the checkpoint only (another apdm version?): %s; "
                    "resuming", folder, ", ".join(one_side))
    return meta


def save_checkpoint(folder: Path, step: int, trainable: dict, optimizer: torch.optim.Optimizer,
                    history: list[dict], extra: dict | None = None,
                    extra_tensors: dict[str, torch.Tensor] | None = None, settings: dict | None = None) -> None:
    """Write θ's trainable tensors and the optimizer state as safetensors, plus progress as JSON (atomically).

    ``extra`` (JSON values) and ``extra_tensors`` (e.g. generator states) are what a caller needs besides these
    to resume exactly; :func:`load_checkpoint` gives them back. ``settings`` (flat JSON) is what determines the
    run's result; :func:`load_checkpoint` refuses a run whose settings differ.
    """
    from safetensors.torch import save_file

    from apdm.utils import atomic_dir

    names = list(trainable)
    tensors = {f"param/{n}": p.detach().cpu().contiguous() for n, p in trainable.items()}
    tensors.update({f"extra/{k}": v.detach().cpu().contiguous() for k, v in (extra_tensors or {}).items()})
    osd = optimizer.state_dict()
    for idx, st in osd["state"].items():
        for k, v in st.items():
            t = v if torch.is_tensor(v) else torch.tensor(v)
            tensors[f"opt/{names[idx]}/{k}"] = t.detach().cpu().contiguous()
    progress_json = {"next_step": step, "param_groups": osd["param_groups"], "history": history,
                     "extra": extra or {}}
    if settings is not None:
        progress_json["settings"] = settings
    with atomic_dir(folder) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        atomic_write_json(tmp / "progress.json", progress_json)


def load_checkpoint(folder: Path, trainable: dict, optimizer: torch.optim.Optimizer,
                    extra: dict | None = None, settings: dict | None = None, what: str = "run",
                    start_over: str = "") -> tuple[int, list[dict]]:
    """Restore what :func:`save_checkpoint` wrote; returns (next outer step, history).

    ``extra``, if given, is filled with the saved ``extra`` values and ``extra_tensors`` (under ``"tensors"``).
    ``settings``, ``what`` and ``start_over`` as :func:`read_progress`. The optimizer keeps its own (configured)
    hyperparameters: only its state (moments, step counts) comes from the checkpoint.

    Raises:
        CheckpointError: the checkpoint is corrupt, of another model (other tensors or shapes), or made with other
            settings; the message names the file or folder and how to start over.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = read_progress(folder, settings, what, start_over)
    path = folder / "state.safetensors"
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:  # truncated or not safetensors; missing
        raise CheckpointError(f"{path}: the {what} checkpoint's tensors cannot be read, the file is corrupt or "
                              f"missing ({type(exc).__name__}: {exc}); {_start_over(folder, start_over)}") from None

    def foreign(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: {_a(what)} checkpoint of another model or settings ({why}); "
                               f"{_start_over(folder, start_over)}")

    names = list(trainable)
    saved = {k[len("param/"):] for k in tensors if k.startswith("param/")}
    lacks, more = sorted(set(names) - saved), sorted(saved - set(names))
    if lacks or more:
        def some(keys: list[str]) -> str:
            return keys[0] + (f" and {len(keys) - 1} more" if len(keys) > 1 else "")

        raise foreign("; ".join(([f"it lacks {some(lacks)}"] if lacks else [])
                                + ([f"it holds {some(more)}, which this run does not train"] if more else [])))
    state = {}
    for i, n in enumerate(names):
        p = trainable[n]
        if tuple(tensors[f"param/{n}"].shape) != tuple(p.shape):
            raise foreign(f"{n} has shape {tuple(tensors[f'param/{n}'].shape)} there, {tuple(p.shape)} here")
        st = {k.split("/")[-1]: v.to(p.device) for k, v in tensors.items() if k.startswith(f"opt/{n}/")}
        for k, v in st.items():  # AdamW's moments (8-bit Adam keeps block-wise tensors of other shapes)
            if k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") and tuple(v.shape) != tuple(p.shape):
                raise foreign(f"the optimizer's {k} of {n} has shape {tuple(v.shape)}, the parameter {tuple(p.shape)}")
        if st:
            if "step" not in st:
                raise foreign(f"the optimizer state of {n} has no step count")
            st["step"] = st["step"].cpu()
            state[i] = st
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(tensors[f"param/{n}"].to(p.device, p.dtype))
    if extra is not None:
        extra.update(meta.get("extra", {}))
        extra["tensors"] = {k[len("extra/"):]: v for k, v in tensors.items() if k.startswith("extra/")}
    # this run's param_groups: its configured lr, betas, weight decay (never the checkpoint's)
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    return meta["next_step"], list(meta["history"])


# ============================================================================ the loop
def learning_rate_at(pcfg: ProtectConfig, j: int) -> float:
    """The protection learning rate of outer step ``j`` (0-based): ``pcfg.lr_phases`` if set, else constant."""
    if not pcfg.lr_phases:
        return pcfg.learning_rate
    end = 0
    for steps, lr in pcfg.lr_phases:
        end += int(steps)
        if j < end:
            return float(lr)
    return float(pcfg.lr_phases[-1][1])


def attackers(per_cfg: PersonalizationConfig, pcfg: ProtectConfig) -> list[PersonalizationConfig]:
    """The simulated attackers of the inner loop: ``per_cfg``, then each ``pcfg.attacker_mix`` entry applied to it.

    Raises:
        ConfigError: an entry names an unknown key or a value of the wrong type.
        ValueError: a LoRA attacker is combined with ``trainable=lora``.
    """
    from apdm.config import replace_checked

    out = [per_cfg] + [replace_checked(per_cfg, changes, f"protect.attacker_mix[{i}]")
                       for i, changes in enumerate(pcfg.attacker_mix)]
    if pcfg.trainable == "lora" and pcfg.inner_steps > 0 and any(a.method == "lora" for a in out):
        raise ValueError("protect.trainable=lora cannot be combined with a LoRA attacker in the inner loop; "
                         "use trainable=all or a list of blocks, or a dreambooth/ti attacker")
    return out


#: the choices of the ``protect.*`` keys that take one of a few words
PROTECT_CHOICES = {"loss": ("dpo", "naive"), "dpo_form": ("elementwise", "summed"), "grad_accum": ("sum", "mean"),
                   "mixed_precision": ("no", "fp16", "bf16")}


def check_protect_ranges(pcfg: ProtectConfig, encoder_trap_steps: int | None = None) -> None:
    """Raise ValueError naming the ``protect.*`` key whose value is out of range or not one of its choices.

    Args:
        pcfg: protection settings.
        encoder_trap_steps: the run's ``encoder_trap.steps`` when the caller runs the whole command: then
            ``outer_steps=0`` (the encoder trap alone) needs a trap, or the model would come out unprotected.
            ``None`` (a library call, e.g. a benchmark job): ``outer_steps=0`` is allowed.
    """
    low_outer = 0 if encoder_trap_steps is None or encoder_trap_steps > 0 else 1
    for key, low in (("outer_steps", low_outer), ("inner_steps", 0), ("batch_size", 1), ("num_class_images", 1),
                     ("checkpoint_every", 0), ("lora_rank", 1)):
        v = getattr(pcfg, key)
        if isinstance(v, bool) or int(v) != v or v < low:
            why = (" (0 only for the encoder trap alone, with encoder_trap.steps > 0: without either the model would "
                   "be released unprotected)" if key == "outer_steps" and low == 1 else "")
            raise ValueError(f"protect.{key} must be a whole number >= {low}{why}, got {v}")
    if pcfg.mixed_precision == "fp16":
        raise ValueError("protect.mixed_precision=fp16 is refused: the protection loss is a mean over every latent "
                         "element, and its gradient in fp16 without loss scaling flushes to zero where it is small; "
                         "use bf16 (Ampere GPUs and later) or no")
    for key, choices in PROTECT_CHOICES.items():
        if getattr(pcfg, key) not in choices:
            raise ValueError(f"protect.{key} must be one of {', '.join(choices)}, got '{getattr(pcfg, key)}'")
    for key in ("learning_rate", "weight_decay", "beta", "prior_loss_weight", "anchor_weight"):
        if not getattr(pcfg, key) >= 0:  # also refuses NaN
            raise ValueError(f"protect.{key} must be >= 0, got {getattr(pcfg, key)}")


def check_protect_config(per_cfg: PersonalizationConfig, pcfg: ProtectConfig, encoder_trap_steps: int | None = None,
                         num_subjects: int = 1, instance_prompts: dict[str, str] | None = None
                         ) -> list[PersonalizationConfig]:
    """Every check that needs no model: ranges and choices (:func:`check_protect_ranges`, where
    ``encoder_trap_steps`` is explained), lr phases, attackers, the attacker restart period (for ``num_subjects``
    subjects), identifiers, extra DPO prompts and the conditioning attack only with the DPO loss, no TI attacker
    when the text encoder is protected. ``instance_prompts``: the subjects' prompts the attacker trains with, by the
    key naming each (None: ``per_cfg.instance_prompt``), for a token-learning attacker's identifier check. Raises
    before any work starts; returns the simulated attackers (:func:`attackers`)."""
    check_protect_ranges(pcfg, encoder_trap_steps)
    S.check_personalization(per_cfg, instance_prompts=instance_prompts)  # the simulated attacker
    check_lr_phases(pcfg)
    check_restart(pcfg, num_subjects)
    bad = [w for w in pcfg.identifiers if not isinstance(w, str) or not w or any(ch.isspace() for ch in w)]
    if bad:
        raise ValueError(f"protect.identifiers: each must be one word without spaces (e.g. zwx), got {bad}")
    if pcfg.identifiers and pcfg.inner_restart_every > 1:
        raise ValueError("protect.identifiers draws a new identifier every outer step; it cannot be combined with "
                         "a continuing simulated attacker (protect.inner_restart_every > 1)")
    for key in ("dpo_extra_prompts", "conditioning_attack_steps"):
        if getattr(pcfg, key) and pcfg.loss != "dpo":
            raise ValueError(f"protect.{key} conditions the DPO pairs; it has no effect with "
                             f"protect.loss={pcfg.loss}, so remove it")
    k, r = pcfg.conditioning_attack_steps, pcfg.conditioning_attack_radius
    if int(k) != k or k < 0:
        raise ValueError(f"protect.conditioning_attack_steps must be a whole number >= 0, got {k}")
    if k and not r > 0:
        raise ValueError(f"protect.conditioning_attack_radius must be > 0, got {r}")
    per_cfgs = attackers(per_cfg, pcfg)
    for i, mixed in enumerate(per_cfgs[1:]):  # each attacker_mix attacker, checked as the main one is
        S.check_personalization(mixed, f"protect.attacker_mix[{i}]", instance_prompts=instance_prompts)
    if pcfg.text_encoder_lr is not None and not pcfg.train_text_encoder:  # e.g. a recipe's TE protection switched off
        LOG.warning("protect.text_encoder_lr=%g is ignored: protect.train_text_encoder is false, so the text encoder "
                    "is not protected", pcfg.text_encoder_lr)
    if pcfg.train_text_encoder and pcfg.inner_steps > 0 and any(a.method in S.TOKEN_METHODS for a in per_cfgs):
        raise ValueError("protect.train_text_encoder cannot be combined with a Textual Inversion or Custom Diffusion "
                         "attacker in the inner loop (it adds a token to the text encoder); use a dreambooth or lora "
                         "attacker")
    return per_cfgs


def restart_period(pcfg: ProtectConfig, num_subjects: int) -> int:
    """Outer steps between two restarts of the simulated attackers: ``inner_restart_every`` (R) visits of each
    (subject, attacker) pair, which come up in turn, so R · K subjects · A attackers. Counting R in outer steps (as
    before 2026-12-07) restarted each pair after R/(K·A) visits: with R ≤ K·A none ever continued."""
    return int(pcfg.inner_restart_every) * max(1, num_subjects) * (1 + len(pcfg.attacker_mix))


def check_restart(pcfg: ProtectConfig, num_subjects: int = 1) -> None:
    """Raise ValueError unless ``inner_restart_every`` ≥ 1 and checkpoints fall on attacker restarts (a resumed
    run must restart its simulated attackers exactly where an uninterrupted run does: every
    :func:`restart_period` outer steps)."""
    r = pcfg.inner_restart_every
    if int(r) != r or r < 1:
        raise ValueError(f"protect.inner_restart_every must be a whole number >= 1, got {r}")
    period = restart_period(pcfg, num_subjects)
    if r > 1 and pcfg.checkpoint_every > 0 and pcfg.checkpoint_every % period:
        pairs = period // int(r)
        raise ValueError(f"protect.checkpoint_every={pcfg.checkpoint_every} must be a multiple of {period} "
                         f"(protect.inner_restart_every={r}" + (f" visits of each of the {pairs} (subject, attacker) "
                                                                f"pairs" if pairs > 1 else "")
                         + ") or 0, so that a resumed run restarts its simulated attackers where an uninterrupted run "
                           "does")


def check_lr_phases(pcfg: ProtectConfig) -> None:
    """Raise ValueError unless ``pcfg.lr_phases`` is empty or a list of ``[steps, lr]`` summing to outer_steps."""
    if not pcfg.lr_phases:
        return
    for phase in pcfg.lr_phases:
        if len(phase) != 2 or phase[0] <= 0 or int(phase[0]) != phase[0] or not phase[1] >= 0:
            raise ValueError(f"protect.lr_phases: each phase must be [steps, lr] with steps a positive whole "
                             f"number and lr >= 0, got {phase}")
    total = sum(int(p[0]) for p in pcfg.lr_phases)
    if total != pcfg.outer_steps:
        raise ValueError(f"protect.lr_phases covers {total} outer steps but protect.outer_steps is "
                         f"{pcfg.outer_steps}; make them equal")


def init_protection(sd: SD, pcfg: ProtectConfig, seed: int = 0):
    """θ, its trainable tensors, φ, θ's optimizer and θ's text encoder, before the first outer step.

    Returns:
        (theta, {name: parameter}, phi, optimizer, text_encoder): φ is ``sd.unet`` (only read, never trained), or
        ``None`` for LoRA-θ, whose φ is θ with its adapters switched off (:func:`_phi`); ``text_encoder`` is θ's
        own trainable copy when ``pcfg.train_text_encoder``, else ``sd.text_encoder``.
    """
    theta, trainable = prepare_theta(sd, pcfg, seed)
    if pcfg.gradient_checkpointing:  # θ's own backward passes too (inner_steps=0, the anchor), not only θ''s
        theta.enable_gradient_checkpointing()
    text_encoder = prepare_text_encoder(sd, pcfg, trainable)
    phi = None if pcfg.trainable == "lora" else sd.unet
    unet_params = [p for n, p in trainable.items() if not n.startswith(TE_PREFIX)]
    te_params = [p for n, p in trainable.items() if n.startswith(TE_PREFIX)]
    groups = [{"params": unet_params}]
    if te_params:  # the text encoder's group; with its own constant lr when text_encoder_lr is set
        groups.append({"params": te_params, "lr": pcfg.text_encoder_lr or pcfg.learning_rate,
                       "apdm_text_encoder": True})
    optimizer = S.make_optimizer(pcfg.optimizer, groups, lr=pcfg.learning_rate,
                                 betas=(pcfg.adam_beta1, pcfg.adam_beta2), eps=pcfg.adam_epsilon,
                                 weight_decay=pcfg.weight_decay)
    return theta, trainable, phi, optimizer, text_encoder


def protect(sd: SD, subjects: list[Subject], per_cfg: PersonalizationConfig, pcfg: ProtectConfig, seed: int = 0,
            checkpoint_dir: str | Path | None = None, stop_after: int | None = None
            ) -> tuple[torch.nn.Module, list[dict], torch.nn.Module | None]:
    """Run APDM protection; returns (protected UNet (fp32, adapters merged), per-step logs, protected text encoder
    (fp32) or ``None`` unless ``pcfg.train_text_encoder``).

    Each per-step log holds ``step``, ``lr``, ``subject`` (the index of the subject it protected), ``attacker`` (with
    several), ``seconds`` (the step's wall time, kept across a resume: the sum is the whole protection's time) and
    the step's losses. Logs from a checkpoint of an older apdm may lack ``subject`` and ``seconds``.

    Args:
        sd: the base model; it is not modified.
        subjects: the subjects to protect (see :class:`Subject`).
        per_cfg: the simulated attacker (inner loop), normally DreamBooth; ``pcfg.attacker_mix`` adds others,
            taken in turn (see :func:`attackers`).
        pcfg: protection settings.
        seed: base seed; outer step j's randomness depends only on (seed, j).
        checkpoint_dir: where resumable checkpoints go (every ``pcfg.checkpoint_every`` steps). A checkpoint found
            there (with ``pcfg.resume``) is continued when it was made with the same settings
            (:func:`protection_settings`; ``outer_steps`` may differ: a run can be extended) and refused otherwise.
        stop_after: stop after this many outer steps *of this call* (for tests of interruption).

    Raises:
        CheckpointError: the checkpoint in ``checkpoint_dir`` is corrupt, of another model, of other settings, or
            past ``pcfg.outer_steps``.
    """
    per_cfgs = check_protect_config(per_cfg, pcfg, num_subjects=len(subjects), instance_prompts={
        f"subjects[{i}].instance_prompt": s.instance_prompt for i, s in enumerate(subjects)} or None)
    if pcfg.anchor_weight > 0 and pcfg.inner_steps == 0:  # (said here, once per protection, not in every check)
        LOG.warning("protect.anchor_weight=%g does nothing with protect.inner_steps=0: with no simulated attack θ′ is "
                    "θ, whose prior-preservation term is in the protection loss already", pcfg.anchor_weight)
    for subject in subjects if pcfg.identifiers else []:  # every instance prompt has a word to replace
        for cfg in per_cfgs:
            with_identifier(subject, cfg, pcfg.identifiers[0])
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    settings = protection_settings(sd, subjects, per_cfg, pcfg, seed) if ckpt is not None else None
    resume = ckpt is not None and pcfg.resume and (ckpt / "progress.json").is_file()
    if resume:  # a checkpoint of other settings is refused before any work
        read_progress(ckpt, settings, "protection", "protect.resume=false")
    if distributed.rank_world()[1] > 1:  # every process the same photos, settings and starting point
        distributed.agree({"settings": settings or protection_settings(sd, subjects, per_cfg, pcfg, seed),
                           "resume": resume, "checkpoint": None if ckpt is None else str(ckpt.resolve())},
                          "the protection's photos, settings or checkpoint")
    theta, trainable, phi, optimizer, text_encoder = init_protection(sd, pcfg, seed)
    restart = restart_period(pcfg, len(subjects))  # outer steps: R visits of every (subject, attacker) pair
    carry: dict | None = {} if pcfg.inner_restart_every > 1 and pcfg.inner_steps > 0 else None
    start, history = 0, []
    if resume:
        start, history = load_checkpoint(ckpt, trainable, optimizer, what="protection",  # (settings checked above)
                                         start_over="protect.resume=false")
        if start > pcfg.outer_steps:
            raise CheckpointError(f"{ckpt}: the protection checkpoint is at outer step {start}, past "
                                  f"protect.outer_steps={pcfg.outer_steps}; set protect.outer_steps to {start} or more "
                                  f"to continue it, or {_start_over(ckpt, 'protect.resume=false')}")
        LOG.info("resuming protection from outer step %d/%d (%s)", start, pcfg.outer_steps, ckpt)
        if carry is not None and start % restart:
            LOG.warning("resuming at outer step %d, between two restarts of the simulated attacker (every %d "
                        "steps): it restarts now, so this run will not match an uninterrupted one exactly",
                        start, restart)
    theta.train()
    main = distributed.is_main()  # with several processes, only the main one shows progress and checkpoints
    bar = progress(range(start, pcfg.outer_steps), desc="protecting (L2P)", total=pcfg.outer_steps, initial=start,
                   disable=not main)
    done = 0
    for j in bar:
        lr = learning_rate_at(pcfg, j)
        for group in optimizer.param_groups:
            group["lr"] = pcfg.text_encoder_lr if group.get("apdm_text_encoder") and pcfg.text_encoder_lr else lr
        k = (j // len(subjects)) % len(per_cfgs)  # subjects, then attackers, in turn: every pair comes up
        if carry is not None and j % restart == 0:
            carry.clear()  # every simulated attacker starts again from θ
        t_step = time.perf_counter()
        logs = outer_step(j, theta, trainable, phi, sd, subjects, per_cfgs[k], pcfg, optimizer, seed,
                          carry=carry, carry_key=(j % len(subjects), k), text_encoder=text_encoder)
        # the subject this step protected and its seconds (a resumed run's time sums them: apdm.protect_model.run)
        history.append({"step": j, "lr": lr, "subject": j % len(subjects),
                        **({"attacker": k} if len(per_cfgs) > 1 else {}),
                        "seconds": round(time.perf_counter() - t_step, 3),
                        **{n: round(v, 6) for n, v in logs.items()}})
        bar.set_postfix(protect=f"{logs.get('loss_protect', 0):.4f}", subj=f"{logs.get('mse_subject', 0):.3f}")
        done += 1
        stop = stop_after is not None and done >= stop_after
        # every checkpoint_every steps, and after the last (a kill in the encoder trap that follows does not redo L2P)
        due = pcfg.checkpoint_every > 0 and ((j + 1) % pcfg.checkpoint_every == 0 or j + 1 == pcfg.outer_steps)
        if ckpt is not None and (stop or due):
            if main:
                save_checkpoint(ckpt, j + 1, trainable, optimizer, history, settings=settings)
            distributed.barrier()
        if stop:
            break
    theta.eval().requires_grad_(False)
    if pcfg.trainable == "lora":  # merged in fp32 (one rounding, to the dtype it is saved in, not two)
        torch.nn.Module.to(theta, torch.float32)
        theta.fuse_lora(adapter_names=["apdm"])
        theta.unload_lora()
    if not pcfg.train_text_encoder:
        return theta, history, None
    return theta, history, text_encoder.eval().requires_grad_(False)
