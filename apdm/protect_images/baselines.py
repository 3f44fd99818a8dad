"""Pixel-space image-protection baselines: ASPL, FSMG, AdvDM, the PhotoGuard encoder attack, SDS, Mist, PID, CAAT,
MetaCloak and SimAC.

Every method has the same shape::

    protect(sd, images, *, budget, steps, ..., seed=0, quiet=False) -> protected

with ``images`` float32 ``(N, 3, H, W)`` in ``[0, 1]`` at the model's resolution, ``budget`` an L∞ radius on
``[0, 1]`` (``8/255``...), and the result the same shape/dtype/range, on the input's device, with
``‖protected - images‖∞ ≤ budget`` guaranteed by a final :func:`~apdm.protect_images.budget.project_linf` + clamp
(PGD also projects after every step). All PGD runs through :func:`apdm.protect_images.pgd.pgd_attack`, all
personalization through the shared simulator (:mod:`apdm.personalization.simulator`) and all diffusion math
through :mod:`apdm.core.diffusion`.

Units. Published defaults are given on ``[-1, 1]`` images; a value ``v`` there is ``v/2`` on ``[0, 1]``
(Anti-DreamBooth ``pgd_alpha=5e-3`` -> ``0.0025 = 0.64/255``; PhotoGuard ``step=0.02`` -> ``0.01 = 2.55/255``).
The budget is always the caller's.

Methods (see docs/protect_images.md for sources):

* ``aspl`` — Anti-DreamBooth's Alternating Surrogate and Perturbation Learning (Van Le et al., ICCV 2023,
  Algorithm 2): per outer iteration, a copy θ' of the current surrogate θ is fine-tuned on the *clean* images,
  PGD maximizes θ''s DreamBooth loss w.r.t. the pixels, and θ is fine-tuned on the *perturbed* images.
* ``simac`` — SimAC (Wang et al., CVPR 2024): ASPL with, per photo, the timesteps a greedy search found the attack
  most effective at, and a feature-interference term on the UNet decoder's features.
* ``fsmg`` — Fully-trained Surrogate Model Guidance: PGD against a fixed surrogate fine-tuned on the clean images.
* ``advdm`` — AdvDM / Mist v1 "semantic" mode (Liang et al., ICML 2023): PGD maximizing the frozen model's
  noise-prediction loss, Monte Carlo over ``t`` and ``ε`` (fresh draws every step); no fine-tuning.
* ``photoguard`` — PhotoGuard's encoder attack (Salman et al., ICML 2023): PGD *minimizing*
  ``‖E(x + δ) - z_target‖₂`` with ``z_target`` the latent of a target image (flat gray by default), step size
  decaying linearly to 1/100 of its start as in their notebook.
* ``sds`` — Diff-Protect's score-distillation attack (Xue et al., ICLR 2024): AdvDM's gradient with the UNet's
  Jacobian skipped, ``J_E(x)ᵀ (ε̂ − ε)`` (a forward pass of the UNet and a backward pass of the encoder only), and
  by default *descending* the denoising loss, SDS(−), the variant that paper found most effective; ``direction="+"``
  ascends it, SDS(+).
* ``mist`` — Mist's fused mode (Liang et al., ICML 2023, Mist v1 / Diff-Protect ``mode=mist``): PGD minimizing the
  PhotoGuard-style latent distance to a target image while maximizing AdvDM's denoising loss.
* ``pid`` — Prompt-Independent Defense (Li et al., ICML 2024): PGD pushing the VAE posterior of the photos away
  from that of the clean photos (mean and log-variance, ``add-log``); no UNet, no prompt.
* ``caat`` — Cross-Attention Adversarial Training (Xu et al., CVPR 2024): one loss, one backward pass per step,
  descended by the cross-attention keys and values of a DreamBooth surrogate (all else frozen) and ascended by
  the pixels.
* ``metacloak`` — MetaCloak (Liu et al., CVPR 2024): PGD with EOT (blur + flip) against a pool of DreamBooth
  surrogates taken along training, each advanced a few steps on the protected photos before it is attacked.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch

from apdm.config import PersonalizationConfig, antidreambooth_surrogate
from apdm.core import diffusion as D
from apdm.core.models import SD
from apdm.personalization import simulator as S
from apdm.protect_images.budget import project_linf
from apdm.protect_images.pgd import linear_decay, pgd_attack
from apdm.utils import progress

#: Anti-DreamBooth's PGD step, 5e-3 on [-1,1] = 0.0025 on [0,1] (0.64/255).
ANTIDB_PGD_ALPHA = 5e-3 / 2
#: PhotoGuard encoder attack step, 0.02 on [-1,1] = 0.01 on [0,1] (2.55/255).
PHOTOGUARD_PGD_ALPHA = 0.02 / 2


def antidreambooth_personalization(with_prior_preservation: bool = True, steps: int = 1000) -> PersonalizationConfig:
    """The surrogate DreamBooth of Anti-DreamBooth's scripts (:func:`apdm.config.antidreambooth_surrogate`: lr 5e-7,
    text encoder trained, batch 1, prior 1.0) with ``steps`` and prior preservation as given.

    Used when a baseline is called without a ``personalization`` config. Real-size models only: on tiny/toy
    models pass a config with a learning rate that moves them.
    """
    return dataclasses.replace(antidreambooth_surrogate(), steps=steps,
                               with_prior_preservation=with_prior_preservation)


def _finalize(protected: torch.Tensor, images: torch.Tensor, budget: float) -> torch.Tensor:
    """The hard guarantee every method ends with: project onto the ball around ``images``, clamp to [0,1]."""
    out = project_linf(protected.detach().float().to(images.device), images.detach().float(), budget)
    return out.clamp(0.0, 1.0).to(images.device)


def _check(images: torch.Tensor, budget: float) -> None:
    """Refuse what would silently break the budget guarantee: images not (N,3,H,W) floats in [0,1] (uint8 or
    diffusers' [-1,1] came back clamped, up to 254/255 away from the input), an empty batch, a budget that is not a
    number in [0,1]."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N,3,H,W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floats in [0,1], got {images.dtype} (8-bit photos: divide by 255)")
    if images.shape[0] == 0:
        raise ValueError("images: the batch is empty (N = 0)")
    low, high = float(images.min()), float(images.max())
    if not (0.0 <= low and high <= 1.0):  # (also NaN)
        raise ValueError(f"images must be in [0,1], got values in [{low:.4g}, {high:.4g}] (diffusers' [-1,1]: "
                         "(x + 1) / 2; 0..255: x / 255)")
    if isinstance(budget, (str, bool)) or not isinstance(budget, (int, float)):
        raise TypeError(f"budget must be a number on [0,1], got {budget!r} (apdm.protect_images.budget.parse_budget"
                        "('8/255') gives one)")
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"budget is an L-inf radius on [0,1] images (e.g. 8/255 = {8 / 255:.4f}), got {budget}")


def _pers_loss(state: S.PersonalizationState, n: int, fixed_seed: int | None = None
               ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> personalization loss of state on all n images`` (differentiable w.r.t. x).

    With ``fixed_seed`` the state's generator is reseeded before every call, so each call uses the same
    timesteps, noise and minibatch order (a deterministic objective); otherwise every call draws fresh ones.
    The instance term only, as Anti-DreamBooth's PGD: a surrogate's prior-preservation term does not depend on
    the photos, so it adds nothing to their gradient and would double each step's batch (before 2026-12-07 it
    was computed; no documented number used a surrogate with prior preservation).
    """
    def fn(x: torch.Tensor) -> torch.Tensor:
        if fixed_seed is not None:
            state.generator.manual_seed(fixed_seed)
        return S.loss(state, x, batch_size=n, prior=False)[0]

    return fn


# ============================================================================ ASPL
def protect_aspl(sd: SD, images: torch.Tensor, *, budget: float, steps: int = 50, surrogate_steps: int = 3,
                 pgd_steps: int = 6, pgd_alpha: float = ANTIDB_PGD_ALPHA,
                 personalization: PersonalizationConfig | None = None, class_images: torch.Tensor | None = None,
                 eot_transforms: Sequence[str] | None = None, resample: bool = True, seed: int = 0,
                 quiet: bool = False, history: list[dict] | None = None,
                 objective: Callable[[S.PersonalizationState, int | None], Callable] | None = None,
                 desc: str = "aspl") -> torch.Tensor:
    """Anti-DreamBooth ASPL. Defaults = the official script: 50 × (3 surrogate + 6 PGD), α = 0.64/255.

    Per outer iteration ``k`` (the paper's Algorithm 2, with set A = clean copies of the images)::

        θ' <- copy(θ);  θ' <- surrogate_steps DreamBooth steps on the clean images
        x  <- pgd_steps PGD steps maximizing L_DB(θ', x) (resumed from the current x, ball around the clean images)
        θ  <- surrogate_steps DreamBooth steps on the perturbed x

    Args:
        sd: the model the surrogate starts from (not modified).
        images: (N,3,H,W) float32 in [0,1].
        budget: L∞ radius on [0,1].
        steps: outer iterations.
        surrogate_steps, pgd_steps: inner steps per outer iteration.
        pgd_alpha: PGD step on [0,1].
        personalization: the surrogate's simulator config; must be ``dreambooth`` (ASPL copies the whole
            fine-tuned model each iteration). Default :func:`antidreambooth_personalization`.
        class_images: (M,3,H,W) prior-preservation images (required when the config uses prior preservation).
        eot_transforms: optional EOT inside PGD (see :mod:`apdm.protect_images.pgd`).
        resample: draw fresh timesteps/noise for every PGD step (the paper). ``False`` fixes one draw per outer
            iteration (generator seed ``seed * 1_000_003 + 2k + 2``), making each PGD run a deterministic ascent.
        history: if given, one dict per outer iteration is appended: ``{"iteration", "pgd_loss": [...]}`` (the
            loss before each PGD step).
        objective: ``(surrogate, fixed_seed) -> (x -> scalar)``, what PGD ascends against each surrogate θ'
            (``fixed_seed``: ``None``, or the seed that fixes its draw when ``resample=False``); default the
            surrogate's DreamBooth loss on all the photos. SimAC passes its own (:func:`simac_loss`).
        desc: the progress bar's label.

    Returns:
        (N,3,H,W) float32 in [0,1], ‖out − images‖∞ ≤ budget.
    """
    _check(images, budget)
    cfg = personalization or antidreambooth_personalization(class_images is not None)
    if cfg.method != "dreambooth":
        raise ValueError(f"ASPL alternates full DreamBooth surrogates; personalization.method must be 'dreambooth', "
                         f"got '{cfg.method}' (use fsmg for a fixed LoRA/TI surrogate)")
    clean = images.detach().float().to(sd.device)
    n = clean.shape[0]
    gen = torch.Generator().manual_seed(seed)
    theta = S.setup(sd, cfg, class_images)
    theta.generator.manual_seed(seed)
    x_adv = clean.clone()
    objective = objective or (lambda state, fixed: _pers_loss(state, n, fixed))
    bar = progress(range(steps), desc=desc, disable=quiet)
    try:
        for k in bar:
            surrogate = S.setup(theta.sd, cfg, class_images)  # θ' = copy of θ (fresh optimizer, as each paper step)
            surrogate.generator.manual_seed(seed * 1_000_003 + 2 * k + 1)
            for _ in range(surrogate_steps):
                S.step(surrogate, clean)
            S.finish(surrogate)  # frozen: PGD gradients go to the pixels only
            losses: list[float] = []
            fixed = None if resample else seed * 1_000_003 + 2 * k + 2
            x_adv = pgd_attack(clean, objective(surrogate, fixed), budget, pgd_alpha, pgd_steps, maximize=True,
                               eot_transforms=eot_transforms, generator=gen, x_init=x_adv, history=losses)
            del surrogate
            for _ in range(surrogate_steps):
                S.step(theta, x_adv)
            if history is not None:
                history.append({"iteration": k, "pgd_loss": losses})
            if losses:
                bar.set_postfix(pgd_loss=f"{losses[-1]:.4f}")
    finally:  # θ's shared modules get their requires_grad flags back; its gradients and moments are dropped
        S.finish(theta)
    return _finalize(x_adv, images, budget)


# ============================================================================ FSMG
def train_surrogate(sd: SD, images: torch.Tensor, personalization: PersonalizationConfig,
                    class_images: torch.Tensor | None = None, steps: int | None = None, seed: int = 0,
                    quiet: bool = False) -> S.PersonalizationState:
    """Fine-tune a surrogate (any simulator method) on the clean ``images`` and freeze it (FSMG's θ*)."""
    state = S.setup(sd, personalization, class_images)
    state.generator.manual_seed(seed)
    clean = images.detach().float().to(sd.device)
    n_steps = personalization.steps if steps is None else steps
    for _ in progress(range(n_steps), desc=f"fsmg surrogate ({personalization.method})", disable=quiet):
        S.step(state, clean)
    S.finish(state)
    return state


def protect_fsmg(sd: SD, images: torch.Tensor, *, budget: float, steps: int = 100, pgd_alpha: float = ANTIDB_PGD_ALPHA,
                 surrogate_steps: int | None = None, personalization: PersonalizationConfig | None = None,
                 class_images: torch.Tensor | None = None, surrogate: S.PersonalizationState | None = None,
                 eot_transforms: Sequence[str] | None = None, random_start: bool = False, resample: bool = True,
                 seed: int = 0, quiet: bool = False) -> torch.Tensor:
    """Anti-DreamBooth FSMG: PGD against a fixed surrogate fine-tuned on the clean images.

    Defaults = the official script: a 1000-step DreamBooth surrogate (lr 5e-7), then 100 PGD steps at
    α = 0.64/255. Any simulator method works as the surrogate (``dreambooth``/``lora``/``ti``).

    Args:
        steps: PGD iterations.
        surrogate_steps: fine-tuning steps of the surrogate (default ``personalization.steps``).
        surrogate: an already trained, frozen :class:`~apdm.personalization.simulator.PersonalizationState`
            (from :func:`train_surrogate`) to reuse instead of training one.
        resample: fresh timesteps/noise every PGD step (the paper); ``False`` reuses one draw (the surrogate's
            generator reseeded with ``seed + 1`` before every loss), a deterministic ascent.
        Other arguments as :func:`protect_aspl`.

    Returns:
        (N,3,H,W) float32 in [0,1], ‖out − images‖∞ ≤ budget.
    """
    _check(images, budget)
    clean = images.detach().float().to(sd.device)
    if surrogate is None:
        cfg = personalization or antidreambooth_personalization(class_images is not None)
        surrogate = train_surrogate(sd, clean, cfg, class_images, surrogate_steps, seed, quiet)
    surrogate.generator.manual_seed(seed + 1)
    loss_fn = _pers_loss(surrogate, clean.shape[0], None if resample else seed + 1)
    x_adv = pgd_attack(clean, loss_fn, budget, pgd_alpha, steps, maximize=True, eot_transforms=eot_transforms,
                       generator=torch.Generator().manual_seed(seed), random_start=random_start, quiet=quiet,
                       desc="fsmg pgd")
    return _finalize(x_adv, images, budget)


# ============================================================================ SimAC
def _up_block_features(unet, sink: list[torch.Tensor]) -> list:
    """Forward hooks appending each of ``unet.up_blocks``' outputs (the UNet's decoder) to ``sink``; returns the
    handles (``.remove()`` them)."""
    def hook(_module, _inputs, output):
        sink.append(output if torch.is_tensor(output) else output[0])

    return [block.register_forward_hook(hook) for block in unet.up_blocks]


def simac_loss(state: S.PersonalizationState, clean: torch.Tensor, timesteps: Sequence[torch.Tensor],
               feature_weight: float = 1.0, fixed_seed: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """SimAC's PGD objective against a (frozen) surrogate: ``x -> L_DB + feature_weight · L_FI`` on all N photos.

    * ``L_DB``: the surrogate's denoising loss on the photos under the instance prompt, photo ``i`` at a timestep
      drawn uniformly from ``timesteps[i]`` (its interval from :func:`simac_timesteps`), noise ε fresh per call;
    * ``L_FI``, SimAC's feature interference: the mean squared difference between the UNet decoder's features
      (the output of each of ``unet.up_blocks``) on the photos and on the clean photos at the same t and ε, summed
      over the blocks. It carries a gradient (SimAC's code adds it as a detached float, so it acts there as 0).

    Args:
        state: the surrogate (its ``sd``, ``cfg`` and ``instance_prompt``; its ``generator`` draws t and ε).
        clean: (N,3,H,W) in [0,1], the unprotected photos.
        timesteps: N 1-D integer tensors, the timesteps each photo may be noised at.
        fixed_seed: reseed the generator before every call (one fixed draw), as :func:`_pers_loss`.

    Returns:
        ``x -> scalar`` for x (N,3,H,W) in [0,1], differentiable w.r.t. x.
    """
    sd, cfg, n = state.sd, state.cfg, clean.shape[0]
    if len(timesteps) != n or any(t.numel() == 0 for t in timesteps):
        raise ValueError(f"simac_loss needs one non-empty set of timesteps per photo ({n}), got "
                         f"{[t.numel() for t in timesteps]}")
    with torch.no_grad():
        cond = D.encode_prompt(sd.text_encoder, sd.tokenizer, [state.instance_prompt]).expand(n, -1, -1)
        # the clean photos' posterior, encoded once: each call draws its clean latents from it with the photos' seed
        clean_posterior = D.vae_posterior(sd.vae, clean.to(sd.device)) if feature_weight else None

    def fn(x: torch.Tensor) -> torch.Tensor:
        g = state.generator
        if fixed_seed is not None:
            g.manual_seed(fixed_seed)
        t = torch.stack([ts[torch.randint(ts.numel(), (), generator=g)] for ts in timesteps]).to(sd.device)
        vae_seed = int(torch.randint(2**31, (), generator=g))
        z = D.encode_images(sd.vae, x, cfg.sample_vae_posterior,
                            torch.Generator(device=sd.vae.device).manual_seed(vae_seed)).float()
        noise = torch.randn(z.shape, generator=g).to(z.device)
        feats: list[torch.Tensor] = []
        hooks = _up_block_features(sd.unet, feats) if feature_weight else []
        try:
            value = D.noise_prediction_loss(sd.unet, sd.noise_scheduler, z, cond, noise, t)
            if feature_weight:
                with torch.no_grad():
                    z0 = D.posterior_latents(sd.vae, *clean_posterior, cfg.sample_vae_posterior,
                                             torch.Generator(device=sd.vae.device).manual_seed(vae_seed)).float()
                    D.noise_prediction_loss(sd.unet, sd.noise_scheduler, z0, cond, noise, t)
        finally:
            for h in hooks:
                h.remove()
        if feature_weight:
            k = len(feats) // 2
            value = value + feature_weight * sum(
                torch.nn.functional.mse_loss(a.float(), b.float()) for a, b in zip(feats[:k], feats[k:]))
        return value

    return fn


def simac_timesteps(sd: SD, images: torch.Tensor, prompt: str, *, budget: float, steps: int = 50, probes: int = 5,
                    delta_t: int = 20, pgd_alpha: float = ANTIDB_PGD_ALPHA, seed: int = 0, quiet: bool = True,
                    history: list[dict] | None = None) -> list[torch.Tensor]:
    """SimAC's adaptive greedy time-interval selection: for each photo, the timesteps its attack should use.

    Per photo, starting from all ``T`` training timesteps and an unperturbed photo, each of ``steps`` rounds:

    1. draws ``probes`` distinct timesteps from those still allowed (and one ε per probe);
    2. for each probe t, takes one signed gradient step of the frozen model's denoising loss at (t, ε) from the
       current photo (ascending, projected onto the ball), and measures how much it raised that loss;
    3. keeps the photo of the probe that raised it most (the perturbation grows as the search goes), and removes
       the timesteps within ``delta_t`` of the probe that raised it least from the allowed set.

    A removal that would leave fewer than ``probes`` timesteps is skipped, so every photo keeps some. Defaults =
    their script (50 rounds, 5 probes, ±20). The perturbation found here is dropped; only the sets are kept.

    Args:
        sd: the frozen model (the pretrained weights, before any surrogate training).
        images: (N,3,H,W) in [0,1].
        prompt: the conditioning prompt (the surrogate's instance prompt).
        budget, pgd_alpha: the ball and step of the probes' steps, on [0,1].
        history: if given, one dict per photo and round: ``{"image", "round", "probes", "gains", "removed"}``.

    Returns:
        N sorted 1-D int64 tensors (on CPU) of allowed timesteps.
    """
    _check(images, budget)
    if probes < 1 or delta_t < 0:
        raise ValueError(f"simac_timesteps needs probes ≥ 1 and delta_t ≥ 0, got {probes}, {delta_t}")
    T = sd.noise_scheduler.config.num_train_timesteps
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        cond = D.encode_prompt(sd.text_encoder, sd.tokenizer, [prompt]).expand(probes, -1, -1)

    def losses(batch: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """(k,) denoising loss of each probe photo at its own (t, ε)."""
        z = D.encode_images(sd.vae, batch).float()
        return D.noise_prediction_loss(sd.unet, sd.noise_scheduler, z, cond[:len(t)], noise, t.to(sd.device),
                                       reduction="none")

    out = []
    for i in progress(range(images.shape[0]), desc="simac timesteps", disable=quiet):
        clean = images[i:i + 1].detach().float().to(sd.device)
        x = clean.clone()
        with torch.no_grad():
            latent_shape = D.encode_images(sd.vae, clean).shape[1:]
        allowed = torch.ones(T, dtype=torch.bool)
        for r in range(steps):
            pool = allowed.nonzero().flatten()
            k = min(probes, pool.numel())
            t = pool[torch.randperm(pool.numel(), generator=gen)[:k]]
            noise = torch.randn((k, *latent_shape), generator=gen).to(sd.device)
            xs = x.expand(k, -1, -1, -1).clone().requires_grad_(True)
            before = losses(xs, t, noise)
            grad, = torch.autograd.grad(before.sum(), xs)
            with torch.no_grad():
                stepped = project_linf(xs + pgd_alpha * grad.sign(), clean, budget).clamp(0.0, 1.0)
                gains = (losses(stepped, t, noise) - before).cpu()
            x = stepped[int(gains.argmax())][None].detach()
            worst = int(t[int(gains.argmin())])
            cut = allowed.clone()
            cut[max(0, worst - delta_t):worst + delta_t + 1] = False
            removed = int(cut.sum()) >= probes
            if removed:
                allowed = cut
            if history is not None:
                history.append({"image": i, "round": r, "probes": t.tolist(), "gains": gains.tolist(),
                                "removed": worst if removed else None})
        out.append(allowed.nonzero().flatten())
    return out


def protect_simac(sd: SD, images: torch.Tensor, *, budget: float, steps: int = 50, surrogate_steps: int = 3,
                  pgd_steps: int = 6, pgd_alpha: float = ANTIDB_PGD_ALPHA, select_steps: int = 50,
                  probes: int = 5, delta_t: int = 20, feature_weight: float = 1.0,
                  personalization: PersonalizationConfig | None = None, class_images: torch.Tensor | None = None,
                  eot_transforms: Sequence[str] | None = None, resample: bool = True, seed: int = 0,
                  quiet: bool = False, history: list[dict] | None = None,
                  timesteps: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """SimAC (Wang et al., CVPR 2024): ASPL whose PGD noises each photo only at the timesteps
    :func:`simac_timesteps` selected for it, and ascends the feature interference term too (:func:`simac_loss`).

    Defaults = their script: ASPL's 50 × (3 + 6) at α = 0.64/255, 50 selection rounds of 5 probes removing ±20
    timesteps; their budget ("16" on [-1,1]) is 8/255, the caller's ``budget``. ``feature_weight`` = 1 weighs the
    feature term as the denoising loss (the paper's weight is not in our notes; 0 gives what their code computes).

    Args:
        timesteps: the per-photo timestep sets to use instead of selecting them (e.g. from a previous run).
        history: as :func:`protect_aspl`'s, plus a first entry ``{"timesteps": [set sizes]}``.
        Other arguments as :func:`protect_aspl` and :func:`simac_timesteps`.

    Returns:
        (N,3,H,W) float32 in [0,1], ‖out − images‖∞ ≤ budget.
    """
    _check(images, budget)
    cfg = personalization or antidreambooth_personalization(class_images is not None)
    clean = images.detach().float().to(sd.device)
    if timesteps is None:
        timesteps = simac_timesteps(sd, clean, cfg.instance_prompt, budget=budget, steps=select_steps,
                                    probes=probes, delta_t=delta_t, pgd_alpha=pgd_alpha, seed=seed, quiet=quiet)
    if history is not None:
        history.append({"timesteps": [int(t.numel()) for t in timesteps]})

    def objective(surrogate: S.PersonalizationState, fixed: int | None):
        return simac_loss(surrogate, clean, timesteps, feature_weight, fixed)

    return protect_aspl(sd, images, budget=budget, steps=steps, surrogate_steps=surrogate_steps, pgd_steps=pgd_steps,
                        pgd_alpha=pgd_alpha, personalization=cfg, class_images=class_images,
                        eot_transforms=eot_transforms, resample=resample, seed=seed, quiet=quiet, history=history,
                        objective=objective, desc="simac")


# ============================================================================ AdvDM
def advdm_loss(sd: SD, prompt: str = "a photo", mc_samples: int = 1, seed: int = 0, resample: bool = True
               ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> E_{t,ε} ‖ε̂_θ(z_t, t, c) − ε‖²`` of the frozen model on the latents (posterior mean) of ``x``.

    ``mc_samples`` (t, ε) draws per call, t ~ U{0..T-1}. ``resample=True`` continues one RNG stream (seeded
    with ``seed``) across calls (fresh draws each PGD step); ``False`` restarts it at every call (fixed draws).
    """
    on_latents = _denoising_loss(sd, prompt, mc_samples, seed, resample)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return on_latents(D.encode_images(sd.vae, x).float())

    return fn


def _denoising_loss(sd: SD, prompt: str, mc_samples: int, seed: int, resample: bool
                    ) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`advdm_loss` on latents: ``z (N,4,h,w) -> E_{t,ε} ‖ε̂_θ(z_t, t, c) − ε‖²`` (same draws)."""
    with torch.no_grad():
        cond1 = D.encode_prompt(sd.text_encoder, sd.tokenizer, [prompt])
    stream = torch.Generator().manual_seed(seed)

    def fn(z: torch.Tensor) -> torch.Tensor:
        gen = stream if resample else torch.Generator().manual_seed(seed)
        cond = cond1.expand(z.shape[0], -1, -1)
        losses = [D.noise_prediction_loss(sd.unet, sd.noise_scheduler, z, cond, generator=gen)
                  for _ in range(mc_samples)]
        return torch.stack(losses).mean()

    return fn


def protect_advdm(sd: SD, images: torch.Tensor, *, budget: float, steps: int = 100, pgd_alpha: float = 1 / 255,
                  prompt: str = "a photo", mc_samples: int = 1, eot_transforms: Sequence[str] | None = None,
                  random_start: bool = False, resample: bool = True, seed: int = 0, quiet: bool = False
                  ) -> torch.Tensor:
    """AdvDM / Mist v1 semantic mode: PGD maximizing the frozen model's noise-prediction loss.

    Defaults = Mist v1: 100 steps at α = 1/255 (its ε = 16/255 is the caller's ``budget``). Each step draws fresh
    timesteps ``t ~ U{0..T-1}`` and noise ε (``mc_samples`` draws averaged), the Monte Carlo estimate of
    AdvDM's ∇_x E_t L_DM. The posterior *mean* of the VAE is used (a deterministic encoder makes the sign
    gradient less noisy; the t/ε sampling is the paper's randomness).

    Args:
        prompt: conditioning of the frozen model ("a photo"; pass the class prompt to target a subject class).
        mc_samples: (t, ε) draws averaged per PGD step.
        resample: fresh draws every step (AdvDM); ``False`` reuses the same ``mc_samples`` draws every step
            (``advdm_loss(sd, prompt, mc_samples, seed + 1, resample=False)`` reproduces that objective).
        Other arguments as :func:`protect_aspl`.

    Returns:
        (N,3,H,W) float32 in [0,1], ‖out − images‖∞ ≤ budget.
    """
    _check(images, budget)
    clean = images.detach().float().to(sd.device)
    gen = torch.Generator().manual_seed(seed)
    fn = advdm_loss(sd, prompt, mc_samples, seed + 1, resample)
    x_adv = pgd_attack(clean, fn, budget, pgd_alpha, steps, maximize=True, eot_transforms=eot_transforms,
                       generator=gen, random_start=random_start, quiet=quiet, desc="advdm pgd")
    return _finalize(x_adv, images, budget)


# ============================================================================ PhotoGuard
def gray_target(images: torch.Tensor, value: float = 0.5) -> torch.Tensor:
    """A flat gray target image batch shaped like ``images`` (PhotoGuard's default-style target)."""
    return torch.full_like(images, value)


def target_latents(sd: SD, clean: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Latents (posterior mean, scaled) of the target image(s) ``target`` ((1 or N,3,H,W) in [0,1]; default flat
    gray), expanded to the N images of ``clean``. No grad."""
    target = gray_target(clean[:1]) if target is None else target.detach().float().to(clean.device)
    with torch.no_grad():
        z_target = D.encode_images(sd.vae, target).float()
    return z_target.expand(clean.shape[0], -1, -1, -1) if z_target.shape[0] == 1 else z_target


def encoder_distance(sd: SD, images: torch.Tensor, z_target: torch.Tensor) -> torch.Tensor:
    """Per-image ``‖E(x) − z_target‖₂`` over the latent (VAE posterior mean, scaled latents). Returns (N,)."""
    z = D.encode_images(sd.vae, images).float()
    return (z - z_target.float()).flatten(1).norm(dim=1)


def protect_photoguard(sd: SD, images: torch.Tensor, *, budget: float, steps: int = 1000,
                       pgd_alpha: float = PHOTOGUARD_PGD_ALPHA, target: torch.Tensor | None = None,
                       alpha_decay: bool = True, eot_transforms: Sequence[str] | None = None,
                       random_start: bool = True, seed: int = 0, quiet: bool = False) -> torch.Tensor:
    """PhotoGuard encoder attack: PGD minimizing ``‖E(x + δ) − E(target)‖₂`` (mean over the batch).

    Step settings = their img2img notebook: 1000 iterations, step 0.02 on [-1,1] (0.01 on [0,1]) decaying linearly
    to 1/100 of it, random start in the ball; their ε = 0.06 on [-1,1] (7.65/255) is the caller's ``budget``. That
    notebook pulls towards the zero latent; the target image (flat gray by default) is their target-image
    variant's (reference notes §2.5).

    Args:
        target: (1 or N,3,H,W) target image(s) in [0,1]; default flat gray (0.5).
        alpha_decay: use the linear step decay (``False``: constant ``pgd_alpha``).
        Other arguments as :func:`protect_aspl`.

    Returns:
        (N,3,H,W) float32 in [0,1], ‖out − images‖∞ ≤ budget.
    """
    _check(images, budget)
    clean = images.detach().float().to(sd.device)
    z_target = target_latents(sd, clean, target)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return encoder_distance(sd, x, z_target).mean()

    alpha = linear_decay(pgd_alpha, steps) if alpha_decay else pgd_alpha
    x_adv = pgd_attack(clean, fn, budget, alpha, steps, maximize=False, eot_transforms=eot_transforms,
                       generator=torch.Generator().manual_seed(seed), random_start=random_start, quiet=quiet,
                       desc="photoguard pgd")
    return _finalize(x_adv, images, budget)


# ============================================================================ SDS (Diff-Protect)
def sds_loss(sd: SD, prompt: str = "a photo", seed: int = 0, resample: bool = True
             ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> scalar`` whose *value* is the frozen model's denoising error ``mean ‖ε̂ − ε‖²`` at one (t, ε) draw
    per image and whose *gradient* w.r.t. ``x`` is the SDS gradient ``Σ_i J_E(x_i)ᵀ (ε̂_i − ε_i)``: the UNet is run
    forward only (:func:`apdm.core.diffusion.noise_residual`), the encoder backward (Xue et al. 2024, Eq. 5 with
    weight 1, as their code). ``resample`` as :func:`advdm_loss`; t ~ U{0..T-1}, one draw per image per call."""
    with torch.no_grad():
        cond1 = D.encode_prompt(sd.text_encoder, sd.tokenizer, [prompt])
    stream = torch.Generator().manual_seed(seed)

    def fn(x: torch.Tensor) -> torch.Tensor:
        gen = stream if resample else torch.Generator().manual_seed(seed)
        z = D.encode_images(sd.vae, x).float()
        residual = D.noise_residual(sd.unet, sd.noise_scheduler, z, cond1.expand(z.shape[0], -1, -1),
                                    generator=gen)
        surrogate = (residual * z).sum()  # d/dz = ε̂ − ε, the UNet's Jacobian left out
        return residual.pow(2).mean() + (surrogate - surrogate.detach())

    return fn


def protect_sds(sd: SD, images: torch.Tensor, *, budget: float, steps: int = 100, pgd_alpha: float = 1 / 255,
                direction: str = "-", prompt: str = "a photo", eot_transforms: Sequence[str] | None = None,
                random_start: bool = False, resample: bool = True, seed: int = 0, quiet: bool = False
                ) -> torch.Tensor:
    """Diff-Protect's SDS attack: PGD along the score-distillation gradient of the frozen model's denoising loss.

    Defaults = Diff-Protect's config: 100 steps at α = 1/255 (constant), no random start, prompt "a photo", and
    ``direction="-"``: each step *descends* the loss, SDS(−), which Xue et al. (ICLR 2024) report as the most
    effective of their variants; ``"+"`` ascends it, SDS(+), a cheaper AdvDM. Their ε = 16/255 is the caller's
    ``budget``. A step costs a UNet forward and an encoder backward, about half of AdvDM's.

    Args:
        direction: ``"-"`` (SDS(−)) or ``"+"`` (SDS(+)).
        prompt: conditioning of the frozen model.
        resample: fresh (t, ε) every step (the paper); ``False`` reuses one draw (``sds_loss(sd, prompt, seed + 1,
            resample=False)`` is that objective).
        Other arguments as :func:`protect_aspl`.

    Returns:
        (N,3,H,W) float32 in [0,1], ‖out − images‖∞ ≤ budget.
    """
    _check(images, budget)
    if direction not in METHOD_OPTIONS["sds_direction"][2]:
        raise ValueError(f"direction={direction!r}: '-' descends the denoising loss (SDS(-), the default), '+' "
                         "ascends it (SDS(+))")
    clean = images.detach().float().to(sd.device)
    x_adv = pgd_attack(clean, sds_loss(sd, prompt, seed + 1, resample), budget, pgd_alpha, steps,
                       maximize=direction == "+", eot_transforms=eot_transforms,
                       generator=torch.Generator().manual_seed(seed), random_start=random_start, quiet=quiet,
                       desc=f"sds({direction}) pgd")
    return _finalize(x_adv, images, budget)


# ============================================================================ Mist (fused)
#: Mist's fused weight, 1e4 on a *summed* squared latent distance of one 512-px image (4·64·64 latent elements),
#: as a weight on the *mean* squared distance: the same balance at every resolution.
MIST_SEMANTIC_WEIGHT = 1e4 / (4 * 64 * 64)


def mist_loss(sd: SD, z_target: torch.Tensor, prompt: str = "a photo", semantic_weight: float = MIST_SEMANTIC_WEIGHT,
              seed: int = 0, resample: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> mean_i mean‖E(x_i) − z_target_i‖² − semantic_weight · L_DM(x)``, Mist's fused objective (to be
    minimized). ``z_target`` (N,4,h,w) scaled latents (:func:`target_latents`); ``L_DM`` is :func:`advdm_loss` with
    one (t, ε) draw, ``resample`` as there."""
    semantic = _denoising_loss(sd, prompt, 1, seed, resample)

    def fn(x: torch.Tensor) -> torch.Tensor:
        z = D.encode_images(sd.vae, x).float()
        textural = (z - z_target.float()).pow(2).mean()
        return textural - semantic_weight * semantic(z)

    return fn


def protect_mist(sd: SD, images: torch.Tensor, *, budget: float, steps: int = 100, pgd_alpha: float = 1 / 255,
                 target: torch.Tensor | None = None, semantic_weight: float = MIST_SEMANTIC_WEIGHT,
                 prompt: str = "a photo", eot_transforms: Sequence[str] | None = None, random_start: bool = True,
                 resample: bool = True, seed: int = 0, quiet: bool = False) -> torch.Tensor:
    """Mist (fused mode): PGD minimizing :func:`mist_loss`, pulling the latents towards a target's while raising
    the frozen model's denoising loss.

    Defaults = Mist v1 / Diff-Protect ``mode=mist``: 100 steps at α = 1/255, a random start (their PGD's
    default), prompt "a photo", the fused weight 1e4 (:data:`MIST_SEMANTIC_WEIGHT`). Mist's target is a texture
    image of its own that apdm does not ship; the default here is PhotoGuard's flat gray, and ``target`` takes any
    image. Their ε = 16/255 is the caller's ``budget``.

    Args:
        target: (1 or N,3,H,W) target image(s) in [0,1]; default flat gray (0.5).
        semantic_weight: weight of the denoising loss against the mean squared latent distance.
        Other arguments as :func:`protect_aspl`.

    Returns:
        (N,3,H,W) float32 in [0,1], ‖out − images‖∞ ≤ budget.
    """
    _check(images, budget)
    clean = images.detach().float().to(sd.device)
    fn = mist_loss(sd, target_latents(sd, clean, target), prompt, semantic_weight, seed + 1, resample)
    x_adv = pgd_attack(clean, fn, budget, pgd_alpha, steps, maximize=False, eot_transforms=eot_transforms,
                       generator=torch.Generator().manual_seed(seed), random_start=random_start, quiet=quiet,
                       desc="mist pgd")
    return _finalize(x_adv, images, budget)


# ============================================================================ PID
#: PID's objectives: what of the VAE posterior q(z|x) = N(μ, σ²) the perturbation pushes away from the clean one's.
PID_LOSSES = ("add-log", "mean", "var", "add", "kl")


def pid_loss(sd: SD, clean: torch.Tensor, kind: str = "add-log") -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> distance between q(z|x) and q(z|clean)`` (to be maximized), unscaled posteriors, means over elements:

    * ``add-log`` (PID's recommended): ``mse(log σ²(x), log σ²(clean)) + mse(μ(x), μ(clean))``;
    * ``mean``: ``mse(μ)``; ``var``: ``mse(σ)`` (their "var" compares standard deviations); ``add``: both;
    * ``kl``: ``mean KL(q(z|clean) ‖ q(z|x))`` per element.
    """
    if kind not in PID_LOSSES:
        raise ValueError(f"PID loss '{kind}': choose one of {', '.join(PID_LOSSES)}")
    with torch.no_grad():
        ref = D.posterior(sd.vae, clean)
        mu0, logvar0, std0 = ref.mean.float(), ref.logvar.float(), ref.std.float()

    def fn(x: torch.Tensor) -> torch.Tensor:
        q = D.posterior(sd.vae, x)
        mu, logvar, std = q.mean.float(), q.logvar.float(), q.std.float()
        if kind == "add-log":
            return (logvar - logvar0).pow(2).mean() + (mu - mu0).pow(2).mean()
        if kind == "mean":
            return (mu - mu0).pow(2).mean()
        if kind == "var":
            return (std - std0).pow(2).mean()
        if kind == "add":
            return (mu - mu0).pow(2).mean() + (std - std0).pow(2).mean()
        return (0.5 * (logvar - logvar0) + (std0.pow(2) + (mu0 - mu).pow(2)) / (2 * std.pow(2)) - 0.5).mean()

    return fn


def protect_pid(sd: SD, images: torch.Tensor, *, budget: float, steps: int = 1000, pgd_alpha: float = 1 / 255,
                loss: str = "add-log", eot_transforms: Sequence[str] | None = None, random_start: bool = True,
                seed: int = 0, quiet: bool = False) -> torch.Tensor:
    """PID: PGD maximizing :func:`pid_loss`, the distance of the photos' VAE posterior from the clean photos'.

    Defaults = PID's script: 1000 steps at α = 1/255, a uniform random start in the ball, ``add-log``; their
    ε = 12.75/255 is the caller's ``budget``. It needs only the VAE's encoder (no UNet, no prompt), so it protects
    against any prompt; a step costs an encoder forward and backward, like PhotoGuard's.

    Args:
        loss: one of :data:`PID_LOSSES`.
        Other arguments as :func:`protect_aspl`.

    Returns:
        (N,3,H,W) float32 in [0,1], ‖out − images‖∞ ≤ budget.
    """
    _check(images, budget)
    clean = images.detach().float().to(sd.device)
    x_adv = pgd_attack(clean, pid_loss(sd, clean, loss), budget, pgd_alpha, steps, maximize=True,
                       eot_transforms=eot_transforms, generator=torch.Generator().manual_seed(seed),
                       random_start=random_start, quiet=quiet, desc="pid pgd")
    return _finalize(x_adv, images, budget)


# ============================================================================ CAAT
#: the cross-attention key and value projections CAAT trains: Custom Diffusion's (the simulator's one list).
CAAT_TRAINABLE = list(S.CUSTOM_DIFFUSION_TRAINABLE)


def caat_personalization(steps: int = 250, learning_rate: float = 1e-5,
                         instance_prompt: str = "a photo of a person") -> PersonalizationConfig:
    """CAAT's surrogate: DreamBooth on the cross-attention K/V only (:data:`CAAT_TRAINABLE`), lr 1e-5, random
    horizontal flips, no prior preservation, the text encoder frozen, the instance prompt without an identifier
    ("a photo of a person", as their script: a protector cannot know the attacker's word). The batch is set to all
    the photos by :func:`protect_caat`. Real-size models: on tiny/toy models pass a learning rate that moves them."""
    return PersonalizationConfig(method="dreambooth", instance_prompt=instance_prompt, learning_rate=learning_rate,
                                 steps=steps, unet_trainable=list(CAAT_TRAINABLE), train_text_encoder=False,
                                 with_prior_preservation=False, random_flip=True, max_grad_norm=1.0)


def protect_caat(sd: SD, images: torch.Tensor, *, budget: float, steps: int = 250, pgd_alpha: float = ANTIDB_PGD_ALPHA,
                 personalization: PersonalizationConfig | None = None, class_images: torch.Tensor | None = None,
                 eot_transforms: Sequence[str] | None = None, seed: int = 0, quiet: bool = False,
                 history: list[float] | None = None) -> torch.Tensor:
    """CAAT: adversarial training of the cross-attention against the pixels, one joint step at a time.

    Each step draws (t, ε, flips) once, computes the surrogate's DreamBooth loss on *all* the current protected
    photos, and with one backward pass (:func:`apdm.personalization.simulator.step` with ``pixel_grad``) moves
    the photos one signed step up the loss (projected onto the ball) and the surrogate one AdamW step down it.
    Defaults = their script: 250 steps, α = 5e-3 on [-1,1] (0.64/255), :func:`caat_personalization`; their
    ε = 0.05 on [-1,1] (6.4/255) is the caller's ``budget``.

    Args:
        personalization: the surrogate's simulator config; must be ``dreambooth`` (default
            :func:`caat_personalization`, whose ``unet_trainable`` picks the K/V); its ``batch_size`` is set to
            the number of photos.
        class_images: prior-preservation images, when the config uses prior preservation.
        eot_transforms: optional EOT: each step's loss is taken on the photos through one transform drawn from
            the list (see :mod:`apdm.protect_images.pgd`); the gradient reaches the pixels through it.
        history: if given, each step's surrogate loss is appended.
        Other arguments as :func:`protect_aspl`.

    Returns:
        (N,3,H,W) float32 in [0,1], ‖out − images‖∞ ≤ budget.
    """
    from apdm.protect_images.pgd import resolve_transforms

    _check(images, budget)
    cfg = personalization or caat_personalization(steps)
    if cfg.method != "dreambooth":
        raise ValueError(f"CAAT trains a DreamBooth surrogate's cross-attention; personalization.method must be "
                         f"'dreambooth', got '{cfg.method}'")
    clean = images.detach().float().to(sd.device)
    cfg = dataclasses.replace(cfg, batch_size=clean.shape[0])
    state = S.setup(sd, cfg, class_images)
    state.generator.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    transforms = resolve_transforms(eot_transforms)
    x_adv = clean.clone()
    bar = progress(range(steps), desc="caat", disable=quiet)
    for _ in bar:
        x = x_adv.clone().requires_grad_(True)
        seen = x
        if transforms:
            seen = transforms[int(torch.randint(len(transforms), (), generator=gen))](x, gen)
        value = S.step(state, seen, pixel_grad=True)
        with torch.no_grad():
            x_adv = project_linf(x_adv + pgd_alpha * x.grad.sign(), clean, budget).clamp(0.0, 1.0)
        if history is not None:
            history.append(value)
        bar.set_postfix(loss=f"{value:.4f}")
    S.finish(state)
    del state
    return _finalize(x_adv, images, budget)


# ============================================================================ MetaCloak
#: MetaCloak's PGD step: r/10 with r = 11 on 0–255, i.e. 1.1/255 on [0,1].
METACLOAK_PGD_ALPHA = 1.1 / 255


def _snapshot(state: S.PersonalizationState, device: torch.device | str | None) -> list[torch.Tensor]:
    return [p.detach().to(device or p.device, copy=True) for p in state.params]


def _restore(state: S.PersonalizationState, snapshot: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(state.params, snapshot):
            p.copy_(v)


def metacloak_pool(state: S.PersonalizationState, clean: torch.Tensor, pool_size: int,
                   device: torch.device | str | None = None, quiet: bool = True
                   ) -> list[tuple[list[torch.Tensor], int]]:
    """MetaCloak's surrogate pool: ``state`` (fresh from :func:`~apdm.personalization.simulator.setup`) takes
    ``state.cfg.steps`` (``H``) steps on the ``clean`` photos ((N,3,H,W) in [0,1]) and its trainable weights are
    kept at ``pool_size`` evenly spaced steps ``0, H/(pool_size−1), …, H`` (rounded; duplicates dropped).

    Returns:
        ``[(weights, steps taken), ...]`` in order of steps, the first the untouched weights (step 0); ``weights``
        is one tensor per ``state.params`` entry, on ``device`` (default: the parameter's).
    """
    horizon = max(1, state.cfg.steps)
    at = sorted({round(i * horizon / (pool_size - 1)) for i in range(pool_size)}) if pool_size > 1 else [0]
    pool = [(_snapshot(state, device), 0)]
    for k in progress(range(1, at[-1] + 1), desc="metacloak pool", disable=quiet or at[-1] == 0):
        S.step(state, clean)
        if k in at:
            pool.append((_snapshot(state, device), k))
    return pool


def protect_metacloak(sd: SD, images: torch.Tensor, *, budget: float, steps: int = 2400, pgd_steps: int = 6,
                      advance_steps: int = 2, pool_size: int = 6, pgd_alpha: float = METACLOAK_PGD_ALPHA,
                      personalization: PersonalizationConfig | None = None, class_images: torch.Tensor | None = None,
                      eot_transforms: Sequence[str] | None = None, pool_device: str | None = None,
                      resample: bool = True, seed: int = 0, quiet: bool = False, history: list[dict] | None = None
                      ) -> torch.Tensor:
    """MetaCloak (Liu et al., CVPR 2024): PGD against a pool of surrogates spread along DreamBooth training, each
    advanced a few steps on the perturbed photos before it is attacked, with EOT over blur and flip.

    1. **The pool.** A surrogate is fine-tuned on the clean photos for ``personalization.steps`` steps (the
       attacker's horizon, ``H``); its trainable weights are kept at ``pool_size`` evenly spaced steps
       ``0, H/(pool_size−1), …, H`` (their defaults: 6 states, every 200 of 1000 steps).
    2. **Each of** ``steps`` **iterations** (their code: 4 trials × 6 models × 100 = 2,400):

       * a pool member is drawn at random and loaded into the surrogate (a fresh optimizer);
       * it takes ``advance_steps`` DreamBooth steps on the *current protected* photos (MetaCloak's unrolled
         inner steps, first order: the photos' gradient is taken at the advanced weights);
       * ``pgd_steps`` PGD steps maximize its DreamBooth loss, each through one ``blur+flip`` draw
         (:func:`apdm.protect_images.pgd.eot_blur_flip`, their ``gau`` mode), resumed from the current photos;
       * the advanced weights replace the member; a member that has reached ``H`` steps restarts from the
         pretrained weights, so the pool keeps covering the whole of training, as an attacker's run does.

    Defaults = their scripts: r = 11/255 is the caller's ``budget``, α = 1.1/255, 6 PGD and 2 surrogate steps per
    iteration, 2,400 iterations, a 1000-step DreamBooth surrogate (:func:`antidreambooth_personalization`; they fine-
    tune SD-2.1 at lr 5e-7). That is ≈ 14,400 PGD and ≈ 5,800 surrogate steps, ~48× ASPL's PGD steps (~34× all its steps).

    Args:
        steps: iterations (member draw, ``advance_steps`` surrogate steps, ``pgd_steps`` PGD steps).
        pool_size: surrogate states kept (≥ 1; 1 keeps only the pretrained weights).
        personalization: the surrogate's simulator config (any method; default
            :func:`antidreambooth_personalization`); its ``steps`` is the horizon ``H``.
        class_images: prior-preservation images, when the config uses prior preservation.
        eot_transforms: the EOT of each PGD step; ``None`` = ``["blur+flip"]`` (MetaCloak's), ``[]`` = none.
        pool_device: where the pool's weights are kept (``None`` or ``"model"``: with the model). The pool holds
            ``pool_size`` copies of the trainable weights: for SD DreamBooth, 6 × 3.9 GB in float32; ``"cpu"`` moves
            them off the GPU at the cost of two copies per iteration (exact copies: the output does not change).
        resample: fresh timesteps/noise every PGD step (their code); ``False`` fixes one draw per iteration
            (surrogate generator seed ``seed * 1_000_003 + k + 1``), making each PGD run a deterministic ascent when
            ``eot_transforms=[]``.
        history: if given, one dict per iteration: ``{"iteration", "member", "age", "pgd_loss": [...]}`` (``age``:
            the DreamBooth steps the member had taken when drawn).
        Other arguments as :func:`protect_aspl`.

    Returns:
        (N,3,H,W) float32 in [0,1], ‖out − images‖∞ ≤ budget.
    """
    _check(images, budget)
    if pool_size < 1 or steps < 0 or pgd_steps < 0 or advance_steps < 0:
        raise ValueError(f"MetaCloak needs pool_size ≥ 1 and non-negative step counts, got pool_size={pool_size}, "
                         f"steps={steps}, pgd_steps={pgd_steps}, advance_steps={advance_steps}")
    cfg = personalization or antidreambooth_personalization(class_images is not None)
    eot = ["blur+flip"] if eot_transforms is None else list(eot_transforms)
    clean = images.detach().float().to(sd.device)
    n = clean.shape[0]
    gen = torch.Generator().manual_seed(seed)
    state = S.setup(sd, cfg, class_images)
    state.generator.manual_seed(seed)
    horizon = max(1, cfg.steps)
    pool_device = None if pool_device == "model" else pool_device
    pool = metacloak_pool(state, clean, pool_size, pool_device, quiet)
    initial = pool[0][0]
    x_adv = clean.clone()
    bar = progress(range(steps), desc="metacloak", disable=quiet)
    for k in bar:
        member = int(torch.randint(len(pool), (), generator=gen))
        weights, drawn_at = pool[member]
        _restore(state, weights)
        state.optimizer.state.clear()
        for _ in range(advance_steps):
            S.step(state, x_adv)
        age = drawn_at + advance_steps
        losses: list[float] = []
        fixed = None if resample else seed * 1_000_003 + k + 1
        x_adv = pgd_attack(clean, _pers_loss(state, n, fixed), budget, pgd_alpha, pgd_steps, maximize=True,
                           eot_transforms=eot, eot_samples=1, generator=gen, x_init=x_adv, history=losses)
        pool[member] = (initial, 0) if age >= horizon else (_snapshot(state, pool_device), age)
        if history is not None:
            history.append({"iteration": k, "member": member, "age": drawn_at, "pgd_loss": losses})
        if losses:
            bar.set_postfix(pgd_loss=f"{losses[-1]:.4f}")
    S.finish(state)
    del state, pool
    return _finalize(x_adv, images, budget)


#: option of ``apdm protect-images`` / the bench -> (the method it belongs to, its keyword there, its choices, or
#: ``float`` for a non-negative number).
METHOD_OPTIONS = {
    "sds_direction": ("sds", "direction", ("-", "+")),
    "pid_loss": ("pid", "loss", PID_LOSSES),
    "simac_feature_weight": ("simac", "feature_weight", float),
    "metacloak_pool_device": ("metacloak", "pool_device", ("model", "cpu")),
}


def check_method_option(key: str, value):
    """``value`` as the method takes it (a number parsed from text); a ValueError naming ``key=value`` and the
    choices when it is not one of :data:`METHOD_OPTIONS`'s for ``key`` (checked before a model loads)."""
    choices = METHOD_OPTIONS[key][2]
    if choices is float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if not number >= 0:
            raise ValueError(f"{key}={value!r}: give a non-negative number")
        return number
    if value not in choices:
        raise ValueError(f"{key}={value!r}: choose one of {', '.join(choices)}")
    return value


#: method name -> ``protect(sd, images, *, budget, steps, ..., quiet)``.
METHODS = {
    "aspl": protect_aspl,
    "fsmg": protect_fsmg,
    "advdm": protect_advdm,
    "photoguard": protect_photoguard,
    "sds": protect_sds,
    "mist": protect_mist,
    "pid": protect_pid,
    "caat": protect_caat,
    "metacloak": protect_metacloak,
    "simac": protect_simac,
}

#: what ``steps`` counts for each method, and its published default (for help texts and the runner).
STEPS_MEANING = {
    "aspl": ("outer iterations of (surrogate_steps + pgd_steps)", 50),
    "fsmg": ("PGD iterations against the fixed surrogate", 100),
    "advdm": ("PGD iterations", 100),
    "photoguard": ("PGD iterations", 1000),
    "sds": ("PGD iterations", 100),
    "mist": ("PGD iterations", 100),
    "pid": ("PGD iterations", 1000),
    "caat": ("joint steps (one surrogate step and one PGD step each)", 250),
    "metacloak": ("iterations of (advance_steps surrogate + pgd_steps PGD) on a pool member", 2400),
    "simac": ("outer iterations of ASPL (surrogate_steps + pgd_steps), after the timestep selection", 50),
}

__all__ = ["METHODS", "STEPS_MEANING", "protect_aspl", "protect_fsmg", "protect_advdm", "protect_photoguard",
           "protect_sds", "protect_mist", "protect_pid", "protect_caat", "caat_personalization", "train_surrogate",
           "advdm_loss", "sds_loss", "mist_loss", "pid_loss", "encoder_distance", "gray_target", "target_latents",
           "antidreambooth_personalization", "ANTIDB_PGD_ALPHA", "PHOTOGUARD_PGD_ALPHA", "MIST_SEMANTIC_WEIGHT",
           "PID_LOSSES", "CAAT_TRAINABLE", "METHOD_OPTIONS", "check_method_option", "protect_metacloak",
           "metacloak_pool", "METACLOAK_PGD_ALPHA", "protect_simac", "simac_timesteps", "simac_loss"]
