"""Latent Diffusion Unlearning (LDU): a learned, trajectory-shifted latent perturbation.

Devulapally, Agarwal, Gokhale, Lokhande, "Latent Diffusion Unlearning: Protecting Against Unauthorized
Personalization Through Trajectory Shifted Perturbations", ACM MM 2025 (arXiv 2510.03089). Built from the
paper; the public code (``naresh-ub/unlearnable_samples``) does not run as released and was not used.

Pipeline for one image ``x0`` (float32 (3,H,W) in [0,1]) — the paper's "Design 1"::

    z0    = E(x0)                                   # VAE posterior mean, scaled latents (N,C,h,w)
    zT    = DDIM-invert(z0 | "")                    # unconditional inversion (frozen UNet), no grad
    z̄T    = ρ(zT) = zT + r_ρ(zT)                    # the small trainable U-Net, residual form
    z̄0    = DDIM-denoise_k(z̄T | prompt)             # k (=4) deterministic DDIM steps, differentiable
    x̄     = D(z̄0)                                   # VAE decode to [0,1], differentiable
    out   = x0 + (x̄ − x̂)   ("delta", default)      # x̂ = D(DDIM-denoise_k(zT)): the same path without ρ
          | x̄              ("decode", the paper's literal output)
    out   = clamp(Proj_{‖·−x0‖∞≤δ}(out), 0, 1)      # at protection time ALWAYS (hard guarantee)

Training (:func:`train_perturber`, the paper's eq. 11, minimized over ρ only)::

    L = λ · [ mean(relu(|out − x0| − δ)) / δ  (+ mean_i relu(rms_i / rms_min − 1)) ]  −  L_personalize(out)

(the PSNR-floor term in parentheses only with ``min_psnr``, an apdm addition; rms_i is image i's RMS
perturbation). ``L_personalize`` is the shared simulator's loss (:func:`apdm.personalization.simulator.loss`) of a
frozen, pre-trained personalization anchor: a Textual Inversion token τ_i per identity by default (paper
App. A3.0.1), with *token shuffling* (App. A3.2: with probability ``shuffle_prob`` the identity's images are
scored with another identity's token τ_j, j ≠ i); DreamBooth or LoRA anchors (one fine-tuned model per identity,
shuffled the same way) as options. λ starts at ``lambda_init`` and grows by ``lambda_step`` after every step whose
output violates the budget (or the PSNR floor) (the linear schedule "until the imperceptibility constraint is
achieved", after Bertsekas). Gradients reach ρ through the loss's VAE encoder, the decoder and all k denoising
steps (gradient checkpointing on the UNet calls).

Where this differs from the paper, and why (also in docs/protect_images.md):

1. **Few-step denoiser.** The paper uses a separately trained shortcut model (Frans et al. 2024) with k = 4; none
   is released for SD, so the base model itself runs a k-step DDIM grid (:func:`apdm.core.diffusion.ddim_sample`),
   and the inversion ends at the top level of that grid (e.g. t = 751 for k = 4 with diffusers' "leading"
   spacing), so inversion and denoising are the same ODE discretisation. ``inversion_steps`` may be a finer grid
   that contains that level (e.g. 40 for k = 4).
2. **Residual ρ.** The paper writes ``z̄T = UNET(zT)``, noting ρ = identity gives the plain reconstruction; we
   parameterise ``ρ(z) = z + r(z)`` with a near-zero last layer so training starts at that identity.
3. **"delta" output (default).** The VAE + k-step round trip of a real SD model does not reproduce x0 (its error
   is often larger than a 10/255 budget), so a literal decode, hard-projected, would mostly be clipped
   reconstruction error. We transfer only the change that ρ causes, ``x0 + (x̄ − x̂)``; ρ = identity then returns
   x0 exactly. ``output_mode="decode"`` is the paper's literal output.
4. **Budget term.** Eq. 11 uses ``λ(‖x̄ − x0‖ − δ)`` with an unspecified norm. The L∞ norm's gradient touches one
   pixel per image, so we penalise the per-pixel excess over δ (zero exactly when ‖·‖∞ ≤ δ); and the hard
   projection is always applied when protecting, so the budget is a guarantee, not a soft target.
5. **Loss on images.** Eq. 10 scores the latent z̄0 directly; we score the decoded image with the simulator's
   loss (re-encoded by the VAE, as a real attacker would), projected onto the budget and into [0, 1] as it is
   published (since 2026-12-07; the raw output before), optionally through training augmentations (``eot``).
6. Denoising is unconditional by default (``prompt=""``, same as the inversion, for a faithful round trip); the
   paper conditions it on a prompt c, available through ``prompt``.

Versus the public code's defects (reference notes §3.3): we do invert (no ``add_noise`` at t = 999), ρ has ~155K
parameters with in/out channels = ``unet.config.in_channels`` (not a 3.5·10⁷-parameter net with a channel
mismatch), gradients do flow through the denoiser (no ``no_grad``), the denoiser is text-conditioned (empty or
``prompt``), latents are unscaled before decoding (by the core), and the budget is an L∞ constraint plus a hard
projection (not an MSE hinge).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from apdm.config import PersonalizationConfig
from apdm.core import diffusion as D
from apdm.core.models import SD
from apdm.personalization import simulator as S
from apdm.protect_images.budget import format_budget, project_linf
from apdm.utils import LOG, atomic_write_bytes, atomic_write_json, progress

RHO_FORMAT = "apdm-ldu-rho-v1"
RHO_WEIGHTS = "rho.safetensors"
RHO_CONFIG = "rho.json"

#: sampling settings used when ρ carries none (the paper's k = 4; see module docstring).
#: ``inversion_steps=None`` means "the denoising grid" (same discretisation both ways).
DEFAULT_SAMPLING = {"denoise_steps": 4, "inversion_steps": None, "prompt": "", "output_mode": "delta"}
OUTPUT_MODES = ("delta", "decode")


# ============================================================================ the perturbation network ρ
class RhoUNet(nn.Module):
    """ρ: a one-level U-Net on latents, ``ρ(z) = z + r(z)``; ≈155K parameters at ``width=32``, ``channels=4``.

    Layers (3x3 convolutions unless noted, LeakyReLU(0.2))::

        e = act(conv_w→w(act(conv_c→w(z))))                    # full resolution features (skip)
        m = act(conv_w→2w, stride 2 (e))                        # half resolution
        m = m + act(conv_2w→2w(act(conv_2w→2w(m))))            # bottleneck with a residual
        u = act(convT_2w→w, 4x4, stride 2 (m))                  # back to full resolution
        r = conv_w→c(act(conv_2w→w([u, e])))                    # skip connection by concatenation

    The last convolution starts near zero (N(0, out_init_std²), zero bias), so ρ starts as (almost) the
    identity and every layer still receives gradient from the first step. Odd latent sizes are padded
    (replicate) and cropped back.

    Args:
        channels: latent channels in and out (``sd.unet.config.in_channels``).
        width: base feature width.
        out_init_std: standard deviation of the last layer's initial weights.

    Shapes: (N, channels, h, w) float32 -> same.
    """

    def __init__(self, channels: int = 4, width: int = 32, out_init_std: float = 1e-3):
        super().__init__()
        c, w = int(channels), int(width)
        self.channels, self.width = c, w
        self.conv_in = nn.Conv2d(c, w, 3, padding=1)
        self.conv_enc = nn.Conv2d(w, w, 3, padding=1)
        self.down = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)
        self.mid1 = nn.Conv2d(2 * w, 2 * w, 3, padding=1)
        self.mid2 = nn.Conv2d(2 * w, 2 * w, 3, padding=1)
        self.up = nn.ConvTranspose2d(2 * w, w, 4, stride=2, padding=1)
        self.conv_dec = nn.Conv2d(2 * w, w, 3, padding=1)
        self.conv_out = nn.Conv2d(w, c, 3, padding=1)
        self.act = nn.LeakyReLU(0.2)
        nn.init.normal_(self.conv_out.weight, std=out_init_std)
        nn.init.zeros_(self.conv_out.bias)
        #: sampling settings ρ was trained with (keys of :data:`DEFAULT_SAMPLING`); saved with the weights.
        self.sampling: dict = dict(DEFAULT_SAMPLING)
        #: training record (budget, steps, anchors, base model ...); saved with the weights.
        self.training_info: dict = {}

    def arch(self) -> dict:
        """The constructor arguments (what :func:`load_rho` needs to rebuild the module)."""
        return {"channels": self.channels, "width": self.width}

    def residual(self, z: torch.Tensor) -> torch.Tensor:
        """``r(z)``: the perturbation added to ``z``. (N,C,h,w) -> same."""
        h, w = z.shape[-2:]
        x = F.pad(z, (0, w % 2, 0, h % 2), mode="replicate") if (h % 2 or w % 2) else z
        e = self.act(self.conv_enc(self.act(self.conv_in(x))))
        m = self.act(self.down(e))
        m = m + self.act(self.mid2(self.act(self.mid1(m))))
        u = self.act(self.up(m))
        r = self.conv_out(self.act(self.conv_dec(torch.cat([u, e], dim=1))))
        return r[..., :h, :w]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.residual(z)


def build_rho(channels: int = 4, width: int = 32, seed: int = 0) -> RhoUNet:
    """A freshly initialised ρ (deterministic for a given ``seed``), fp32 on CPU."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return RhoUNet(channels, width)
    finally:
        torch.random.set_rng_state(gen_state)


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters."""
    return sum(p.numel() for p in module.parameters())


# ============================================================================ the latent path
def _check_sampling(sampling: Mapping) -> dict:
    given = {k: v for k, v in sampling.items() if v is not None}
    s = dict(DEFAULT_SAMPLING)
    s.update(given)
    unknown = set(s) - set(DEFAULT_SAMPLING)
    if unknown:
        raise ValueError(f"unknown LDU sampling setting(s) {sorted(unknown)}; known: {sorted(DEFAULT_SAMPLING)}")
    if s["output_mode"] not in OUTPUT_MODES:
        raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got '{s['output_mode']}'")
    if "inversion_steps" not in given:
        s["inversion_steps"] = s["denoise_steps"]
    return s


def inversion_end_step(noise_scheduler, inversion_steps: int, denoise_steps: int) -> int:
    """How many levels of the ``inversion_steps`` grid reach the top level of the ``denoise_steps`` grid.

    Raises:
        ValueError: when the inversion grid does not contain that level (choose a grid whose spacing divides
            the denoising grid's, e.g. 4, 8, 20, 40 or 200 for k = 4 on a 1000-step schedule).
    """
    top = D.ddim_timesteps(noise_scheduler, denoise_steps)[0]
    ascending = D.ddim_timesteps(noise_scheduler, inversion_steps)[::-1]
    if top not in ascending:
        raise ValueError(f"inversion grid of {inversion_steps} steps does not contain t={top}, the first level of the "
                         f"{denoise_steps}-step denoising grid; use a multiple grid (e.g. {denoise_steps}, "
                         f"{denoise_steps * 10})")
    return ascending.index(top) + 1


@torch.no_grad()
def prepare(sd: SD, images: torch.Tensor, sampling: Mapping | None = None) -> dict[str, torch.Tensor]:
    """Everything about ``images`` that does not depend on ρ (computed once, without gradients).

    Args:
        images: (N,3,H,W) float32 in [0,1].
        sampling: keys of :data:`DEFAULT_SAMPLING` (missing ones take the defaults).

    Returns:
        dict with ``images`` (N,3,H,W) on the model device, ``z_T`` (N,C,h,w) float32 inverted latents,
        ``cond`` (N,L,D) denoising conditioning and, for ``delta`` output, ``x_ref`` (N,3,H,W) — the decoded
        k-step reconstruction of ``z_T`` without ρ.
    """
    s = _check_sampling(sampling or {})
    x0 = images.detach().float().to(sd.device)
    n = x0.shape[0]
    z0 = D.encode_images(sd.vae, x0).float()
    uncond = D.encode_prompt(sd.text_encoder, sd.tokenizer, [""]).expand(n, -1, -1)
    end = inversion_end_step(sd.noise_scheduler, s["inversion_steps"], s["denoise_steps"])
    z_T = D.ddim_invert(sd.unet, sd.noise_scheduler, z0, uncond, num_steps=s["inversion_steps"], end_step=end)
    cond = uncond if s["prompt"] == "" else \
        D.encode_prompt(sd.text_encoder, sd.tokenizer, [s["prompt"]]).expand(n, -1, -1)
    out = {"images": x0, "z_T": z_T.float(), "cond": cond}
    if s["output_mode"] == "delta":
        out["x_ref"] = denoise_decode(sd, z_T, cond, s["denoise_steps"])
    return out


def denoise_decode(sd: SD, z_T: torch.Tensor, cond: torch.Tensor, denoise_steps: int,
                   checkpoint: bool = False) -> torch.Tensor:
    """k-step DDIM denoise of (N,C,h,w) latents + VAE decode -> (N,3,H,W) float32 in [0,1].

    Differentiable w.r.t. ``z_T`` under grad mode (``checkpoint`` recomputes each UNet call in backward).
    """
    z0 = D.ddim_sample(sd.unet, sd.noise_scheduler, z_T, cond, num_steps=denoise_steps, checkpoint=checkpoint)
    return D.decode_latents(sd.vae, z0)


def perturb(sd: SD, rho: RhoUNet, prepared: Mapping[str, torch.Tensor], sampling: Mapping | None = None,
            checkpoint: bool = False) -> torch.Tensor:
    """The unprojected protected images for prepared inputs (differentiable w.r.t. ρ's parameters).

    Args:
        prepared: output of :func:`prepare` (possibly indexed to a sub-batch).
        sampling: must match the settings ``prepared`` was built with.

    Returns:
        (N,3,H,W) float32; ``x0 + (x̄ − x_ref)`` for ``delta`` output (may leave [0,1] before projection) or the
        decoded ``x̄`` for ``decode`` output.
    """
    s = _check_sampling(sampling or {})
    z_T = prepared["z_T"]
    z_bar = rho(z_T.to(next(rho.parameters()).device).float())
    x_bar = denoise_decode(sd, z_bar, prepared["cond"], s["denoise_steps"], checkpoint=checkpoint)
    if s["output_mode"] == "delta":
        return prepared["images"] + (x_bar - prepared["x_ref"])
    return x_bar


def _index(prepared: Mapping[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[idx.to(v.device)] for k, v in prepared.items()}


# ============================================================================ protection
@torch.no_grad()
def apply(sd: SD, rho: RhoUNet, images: torch.Tensor, budget: float, *, batch_size: int = 8, quiet: bool = False,
          **sampling) -> torch.Tensor:
    """Protect images with a trained ρ: one inversion + ρ + k-step denoise pass per image, then the hard budget.

    Args:
        sd: the model ρ was trained with (its UNet/VAE run the inversion and denoising).
        rho: trained :class:`RhoUNet` (its ``sampling`` settings are used; keyword overrides win).
        images: (N,3,H,W) float32 in [0,1] at a resolution the VAE accepts (multiple of 8).
        budget: L∞ radius on [0,1]; the result always satisfies ``‖out − images‖∞ ≤ budget``.
        batch_size: images per forward pass.
        sampling: overrides of ``denoise_steps``, ``inversion_steps``, ``prompt``, ``output_mode``.

    Returns:
        (N,3,H,W) float32 in [0,1] on ``images.device``.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N,3,H,W), got {tuple(images.shape)}")
    f = sd.vae_scale_factor
    if images.shape[-2] % f or images.shape[-1] % f:
        raise ValueError(f"images must have sides that are multiples of {f} (the VAE's pixels per latent cell), got "
                         f"{images.shape[-2]}x{images.shape[-1]}; resize them first (apdm protect-images does)")
    s = _check_sampling({**rho.sampling, **sampling})
    rho.eval()
    out = []
    for start in progress(range(0, images.shape[0], batch_size), desc="ldu protect", disable=quiet):
        chunk = images[start:start + batch_size].detach().float()
        prepared = prepare(sd, chunk, s)
        x = perturb(sd, rho, prepared, s)
        x = project_linf(x, prepared["images"], budget).clamp(0.0, 1.0)
        out.append(x.to(images.device))
    return torch.cat(out)


# ============================================================================ personalization anchors
def default_personalization() -> PersonalizationConfig:
    """The paper's anchor: Textual Inversion, lr 5e-4, 1500 steps, batch 1 (App. A3, §4.3)."""
    return PersonalizationConfig(method="ti", learning_rate=5e-4, steps=1500, batch_size=1,
                                 with_prior_preservation=False, adam_weight_decay=0.0)


def _anchor_key(sd: SD, images: torch.Tensor, personalization: PersonalizationConfig, n_steps: int, seed: int,
                index: int) -> str:
    """What the anchor of identity ``index`` (photos ``images``) depends on: the model, its images, the anchor
    config, steps and seed (its generator is seeded from ``seed`` and ``index``)."""
    import dataclasses
    import hashlib

    h = hashlib.sha256(f"{sd.fingerprint()}|{n_steps}|{seed}|{index}|".encode())
    h.update(json.dumps(dataclasses.asdict(personalization), sort_keys=True, default=str).encode())
    h.update(images.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def train_anchors(sd: SD, identities: Sequence[torch.Tensor], personalization: PersonalizationConfig,
                  class_images: torch.Tensor | None = None, steps: int | None = None, seed: int = 0,
                  quiet: bool = False, cache_dir: str | Path | None = None) -> dict:
    """Pre-train one frozen personalization anchor per identity on its clean images (paper App. A3.0.1).

    Textual Inversion: one token embedding τ_i per identity, learned on a fresh copy of the text encoder each
    (one copy alive at a time), then held by one frozen state whose token row is swapped per use.
    DreamBooth/LoRA: one fine-tuned model per identity (memory grows with the number of identities).

    Args:
        cache_dir: TI only: each finished τ_i is saved there (``anchor-<key>.safetensors``, the key hashing the
            model, the identity's images, the config, steps and seed) and reused by a later call, so a killed
            ρ training does not train its anchors again. Each anchor has its own seed, so a reused one equals a
            retrained one.

    Returns:
        ``{"kind": "ti", "state": state, "embeddings": [τ_i (D,)]}`` or ``{"kind": "model", "states": [...]}``.
    """
    n_steps = personalization.steps if steps is None else steps
    method = personalization.method
    if method == "ti":
        from safetensors.torch import load_file
        from safetensors.torch import save as save_safetensors

        embeddings = []
        for i, imgs in enumerate(identities):
            cached = (Path(cache_dir) / f"anchor-{_anchor_key(sd, imgs, personalization, n_steps, seed, i)}"
                      ".safetensors") if cache_dir else None
            if cached is not None and cached.is_file():
                embeddings.append(load_file(str(cached))["embedding"].to(sd.device))
                LOG.info("ti anchor %d/%d: reused %s", i + 1, len(identities), cached)
                continue
            st = S.setup(sd, personalization)
            st.generator.manual_seed(seed * 7919 + i)
            for _ in progress(range(n_steps), desc=f"ti anchor {i + 1}/{len(identities)}", disable=quiet):
                S.step(st, imgs)
            embeddings.append(st.sd.text_encoder.get_input_embeddings().weight[st.ti_token_id].detach().clone())
            del st
            if cached is not None:
                atomic_write_bytes(cached, save_safetensors({"embedding": embeddings[-1].cpu().contiguous()}))
        state = S.setup(sd, personalization)
        S.finish(state)
        # The anchor's token row is swapped per identity. Leaving the embedding matrix requiring grad makes the
        # simulator re-encode the prompt on every call (it caches prompts only for frozen text encoders);
        # nothing ever steps it.
        state.sd.text_encoder.get_input_embeddings().weight.requires_grad_(True)
        return {"kind": "ti", "state": state, "embeddings": embeddings}
    states = []
    for i, imgs in enumerate(identities):
        st = S.setup(sd, personalization, class_images)
        st.generator.manual_seed(seed * 7919 + i)
        for _ in progress(range(n_steps), desc=f"{method} anchor {i + 1}/{len(identities)}", disable=quiet):
            S.step(st, imgs)
        S.finish(st)
        states.append(st)
    return {"kind": "model", "states": states}


def _anchor(anchors: dict, j: int) -> S.PersonalizationState:
    """The frozen personalization state of identity j (TI: writes τ_j into the token row)."""
    if anchors["kind"] == "ti":
        state = anchors["state"]
        emb = state.sd.text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            emb[state.ti_token_id] = anchors["embeddings"][j].to(emb.dtype)
        emb.grad = None
        return state
    return anchors["states"][j]


# ============================================================================ training
def train_perturber(sd: SD, images_by_identity: Mapping[str, torch.Tensor] | Sequence[torch.Tensor], *,
                    budget: float = 10 / 255, steps: int = 2000, learning_rate: float = 1e-4, batch_size: int = 4,
                    personalization: PersonalizationConfig | None = None, anchor_steps: int | None = None,
                    anchors: dict | None = None, class_images: torch.Tensor | None = None, shuffle_prob: float = 0.5,
                    lambda_init: float = 1.0, lambda_step: float = 0.01, min_psnr: float | None = None,
                    denoise_steps: int = 4, inversion_steps: int | None = None, prompt: str = "",
                    output_mode: str = "delta", width: int = 32, rho: RhoUNet | None = None, resample: bool = True,
                    seed: int = 0, quiet: bool = False, history: list[dict] | None = None,
                    checkpoint_dir: str | Path | None = None, checkpoint_every: int = 0,
                    stop_after: int | None = None, eot: Sequence[str] = (), timing: dict | None = None) -> RhoUNet:
    """Train ρ to maximize a frozen personalization loss under the image budget (paper eq. 11).

    Args:
        sd: frozen base model (not modified).
        images_by_identity: {name: (N_i,3,H,W) float32 [0,1]} or a list of such tensors, one per identity.
        budget: δ, L∞ radius on [0,1] (paper: 10/255).
        steps: optimizer steps of ρ (identity ``step mod K``, round robin).
        learning_rate: Adam learning rate of ρ.
        batch_size: images of one identity per step (capped by N_i).
        personalization: anchor config (default :func:`default_personalization`, TI).
        anchor_steps: anchor pre-training steps (default ``personalization.steps``).
        anchors: pre-trained anchors from :func:`train_anchors` (skips pre-training).
        class_images: prior-preservation images for DreamBooth/LoRA anchors.
        shuffle_prob: probability of scoring identity i with another identity's anchor (token shuffling).
        lambda_init, lambda_step: the linear λ schedule (λ += lambda_step after each step that violates a
            constraint: the L∞ budget, and the PSNR floor when ``min_psnr`` is set).
        min_psnr: optional PSNR floor in dB (e.g. 41), a second imperceptibility constraint next to the L∞ budget:
            the penalty gains ``mean_i relu(rms_i / rms_min − 1)`` with ``rms_i`` the RMS of image i's
            perturbation and ``rms_min = 10^(−min_psnr/20)`` (PSNR on [0,1] images). Not in the paper, whose ρ
            spends the whole L∞ budget everywhere it can; see docs/protect_images.md.
        denoise_steps: k of the few-step denoiser (paper: 4).
        inversion_steps: inversion grid (default ``denoise_steps``; see :func:`inversion_end_step`).
        prompt: conditioning of the k-step denoiser ("" = unconditional).
        output_mode: ``delta`` (default) or ``decode`` (see module docstring).
        width: ρ's base width (32 -> ≈155K parameters).
        rho: continue training this ρ instead of a fresh one.
        resample: fresh personalization-loss draws (t, ε) every step (normal training). ``False`` reseeds the
            anchor's generator with ``seed + 1`` before every loss, a deterministic objective (debugging, tests).
        history: if given, one dict per step is appended (loss, l_pers, penalty, linf, lambda, identity, anchor).
        checkpoint_dir: resumable state: TI anchors as they finish in ``anchors/`` (:func:`train_anchors`'
            ``cache_dir``), and every ``checkpoint_every`` steps ρ, Adam's moments, λ, the random generators and
            the history in ``rho/``. A call finding a checkpoint there continues from it and ends with the same ρ
            as an uninterrupted run, if it was made with the same settings (:func:`training_settings`; ``steps``
            may differ: a training can be extended); one of other settings is refused before the anchors train
            (:class:`apdm.protect_model.l2p.CheckpointError`, as is a corrupt one).
        stop_after: stop (after checkpointing) once this many steps ran in this call: a simulated kill, for tests.
        eot: names of :data:`apdm.protect_images.pgd.EOT_TRANSFORMS` (e.g. ``["blur+flip"]``, the paper's
            "Gaussian filtering ... horizontal flipping" during training); each step scores the published image
            through one of them, drawn at random (none by default).
        timing: if given, filled with ``resumed_at`` (the step a checkpoint resumed from, 0 for a fresh training)
            and ``seconds_before``: the seconds the earlier sessions of a resumed training spent until its
            checkpoint (each checkpoint records the time spent since the training began, this call's anchors and
            inversions included), 0.0 for a fresh training, None when the checkpoint was written before apdm
            recorded it.

    The personalization loss scores the image as it is published: ρ's output projected onto the L∞ ball and into
    [0, 1] (before 2026-12-07 the raw output, which could earn loss from pixels the projection removes); the budget
    penalty acts on the raw output.

    Returns:
        the trained ρ (eval mode, on the model device) with ``sampling`` and ``training_info`` filled in.
    """
    from apdm.protect_images.pgd import resolve_transforms

    t_call = time.perf_counter()
    transforms = resolve_transforms(list(eot))
    if isinstance(images_by_identity, Mapping):
        names = list(images_by_identity)
        identities = [images_by_identity[k] for k in names]
    else:
        identities = list(images_by_identity)
        names = [f"identity_{i}" for i in range(len(identities))]
    if not identities:
        raise ValueError("train_perturber needs at least one identity's images")
    sampling = _check_sampling({"denoise_steps": denoise_steps, "inversion_steps": inversion_steps,
                                "prompt": prompt, "output_mode": output_mode})
    identities = [x.detach().float().to(sd.device) for x in identities]
    pcfg = personalization or default_personalization()
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    settings = None
    if ckpt is not None:
        settings = training_settings(sd, names, identities, pcfg, budget=budget, learning_rate=learning_rate,
                                     batch_size=batch_size, anchor_steps=anchor_steps, anchors=anchors,
                                     class_images=class_images, shuffle_prob=shuffle_prob, lambda_init=lambda_init,
                                     lambda_step=lambda_step, min_psnr=min_psnr, sampling=sampling, width=width,
                                     rho=rho, resample=resample, seed=seed, eot=eot)
        if (ckpt / "rho" / "progress.json").is_file():  # a checkpoint of other settings: refused before the anchors
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            from apdm.protect_model.l2p import CheckpointError, read_progress

            at = read_progress(ckpt / "rho", settings, "ρ training", "resume=false")["next_step"]
            if at > steps:  # (also checked, as before, when it loads: said here, before the anchors train)
                raise CheckpointError(f"{ckpt}: the ρ training checkpoint is at step {at}, past steps={steps}; set "
                                      f"steps to {at} or more to continue it, or start over with resume=false")
            try:  # ρ's tensors are small: a truncated file is named now, not after the anchors
                load_file(str(ckpt / "rho" / "state.safetensors"))
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{ckpt / 'rho' / 'state.safetensors'}: the ρ training checkpoint's tensors "
                                      f"cannot be read, the file is corrupt or missing ({type(exc).__name__}: "
                                      f"{exc}); start over with resume=false") from None
    if anchors is None:
        anchors = train_anchors(sd, identities, pcfg, class_images, anchor_steps, seed, quiet,
                                cache_dir=ckpt / "anchors" if ckpt is not None else None)

    prepared = [_prepare_batched(sd, x, sampling, batch_size, quiet) for x in identities]

    if rho is None:
        rho = build_rho(sd.unet.config.in_channels, width, seed)
    rho.to(sd.device).float().train()
    rho.sampling = dict(sampling)
    optimizer = torch.optim.Adam(rho.parameters(), lr=learning_rate)
    gen = torch.Generator().manual_seed(seed)
    lam = float(lambda_init)
    k_ids = len(identities)
    anchor_gens = ([anchors["state"].generator] if anchors["kind"] == "ti"
                   else [st.generator for st in anchors["states"]])
    trainable = dict(rho.named_parameters())
    start, past = 0, []
    seconds_before: float | None = 0.0  # the time earlier sessions spent until the checkpoint resumed from
    if ckpt is not None and (ckpt / "rho" / "progress.json").is_file():
        from apdm.protect_model.l2p import CheckpointError, load_checkpoint

        extra: dict = {}
        start, past = load_checkpoint(ckpt / "rho", trainable, optimizer, extra, what="ρ training",
                                      start_over="resume=false")  # (its settings were checked before the anchors)
        # all that checkpoints recorded of their settings before they recorded them
        if extra.get("identities") != names or extra.get("budget") != budget or extra.get("seed") != seed:
            raise CheckpointError(f"{ckpt}: a checkpoint of another ρ training (identities, budget or seed "
                                  "differ); start over with resume=false or train into another folder")
        if start > steps:
            raise CheckpointError(f"{ckpt}: the ρ training checkpoint is at step {start}, past steps={steps}; set "
                                  f"steps to {start} or more to continue it, or start over with resume=false")
        missing = [k for k in ["lambda", "tensors"] if k not in extra] + [
            k for k in ["generator", *(f"anchor_generator_{i}" for i in range(len(anchor_gens)))]
            if k not in extra.get("tensors", {})]
        if missing:
            raise CheckpointError(f"{ckpt / 'rho'}: the ρ training checkpoint lacks {', '.join(missing)} (corrupt or "
                                  "of another ρ training); start over with resume=false")
        lam = float(extra["lambda"])
        seconds_before = extra.get("seconds")  # None: a checkpoint from before apdm recorded it
        seconds_before = float(seconds_before) if isinstance(seconds_before, (int, float)) else None
        gen.set_state(extra["tensors"]["generator"])
        for k, g in enumerate(anchor_gens):
            g.set_state(extra["tensors"][f"anchor_generator_{k}"])
        LOG.info("resuming the ρ training from step %d/%d (%s)", start, steps, ckpt)
    if timing is not None:
        timing.update(resumed_at=start, seconds_before=seconds_before)
    records = list(past)  # every step's record, the resumed ones first (checkpointed; handed to ``history``)
    if k_ids == 1 and shuffle_prob > 0:
        LOG.warning("token shuffling (shuffle_prob=%g) needs two identities or more: with one (%s) every step scores "
                    "its own token, and rho.json records shuffle_prob 0", shuffle_prob, names[0])
    bar = progress(range(start, steps), desc="ldu train", total=steps, initial=start, disable=quiet)
    for step in bar:
        i = step % k_ids
        n_i = identities[i].shape[0]
        idx = torch.randperm(n_i, generator=gen)[:batch_size].sort().values
        j = i
        if k_ids > 1 and float(torch.rand((), generator=gen)) < shuffle_prob:
            j = int(torch.randint(k_ids - 1, (), generator=gen))
            j = j + 1 if j >= i else j
        anchor = _anchor(anchors, j)
        batch = _index(prepared[i], idx)
        out = perturb(sd, rho, batch, sampling, checkpoint=True)
        if not resample:
            anchor.generator.manual_seed(seed + 1)
        scored = project_linf(out, batch["images"], budget).clamp(0.0, 1.0)  # what gets published
        if transforms:  # one of the training augmentations, drawn per step
            scored = transforms[int(torch.randint(len(transforms), (), generator=gen))](scored, gen)
        l_pers, _ = S.loss(anchor, scored, batch_size=len(idx))
        diff = out - batch["images"]
        penalty = F.relu(diff.abs() - budget).mean() / max(budget, 1e-12)
        rms = diff.flatten(1).pow(2).mean(1).sqrt()  # (B,) per-image RMS perturbation on [0,1]
        psnr_low = False
        if min_psnr is not None:
            rms_min = 10.0 ** (-min_psnr / 20.0)
            penalty = penalty + F.relu(rms / rms_min - 1.0).mean()
            psnr_low = bool((rms.detach() > rms_min).any())
        total = lam * penalty - l_pers
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        linf = float(diff.detach().abs().amax())
        min_psnr_step = float(-20.0 * torch.log10(rms.detach().max().clamp_min(1e-12)))
        record = {"step": step, "loss": float(total.detach()), "l_pers": float(l_pers.detach()),
                  "penalty": float(penalty.detach()), "linf": linf, "psnr_min": round(min_psnr_step, 3),
                  "lambda": lam, "identity": names[i], "anchor": names[j]}
        records.append(record)
        if linf > budget or psnr_low:
            lam += lambda_step
        if step % 10 == 0:
            bar.set_postfix(l_pers=f"{record['l_pers']:.4f}", linf=f"{linf * 255:.1f}/255",
                            psnr=f"{min_psnr_step:.1f}", lam=f"{lam:.2f}")
        stop = stop_after is not None and step + 1 - start >= stop_after
        if ckpt is not None and (stop or checkpoint_every > 0 and (step + 1) % checkpoint_every == 0):
            from apdm.protect_model.l2p import save_checkpoint

            spent = None if seconds_before is None else seconds_before + time.perf_counter() - t_call
            save_checkpoint(ckpt / "rho", step + 1, trainable, optimizer, records,
                            extra={"lambda": lam, "identities": names, "budget": budget, "seed": seed,
                                   "seconds": spent},
                            extra_tensors={"generator": gen.get_state(),
                                           **{f"anchor_generator_{k}": g.get_state()
                                              for k, g in enumerate(anchor_gens)}},
                            settings=settings)
        if stop:
            break
    if history is not None:
        history.extend(records)
    rho.eval()
    rho.training_info = {
        "budget": budget, "steps": steps, "learning_rate": learning_rate, "batch_size": batch_size,
        "identities": names, "personalization_method": pcfg.method, "anchor_steps": anchor_steps or pcfg.steps,
        "shuffle_prob": shuffle_prob if k_ids > 1 else 0.0,  # one identity: no other token to shuffle to
        "lambda_init": lambda_init, "lambda_step": lambda_step, "lambda_final": lam,
        "min_psnr": min_psnr,
        "base_model": sd.source, "base_model_fingerprint": sd.fingerprint(),
        "base_model_dtype": str(sd.dtype).replace("torch.", ""), "seed": seed,
        # how the loss saw ρ's output: as published (projected, clamped; since 2026-12-07), through these augmentations
        "scored": "published", "eot": list(eot),
    }
    LOG.debug("ldu: trained rho for %d steps, final lambda %.3f", steps, lam)
    return rho


#: personalization.* keys left out of a ρ training's settings (they change no number)
PERSONALIZATION_RESUMABLE = ("class_data_dir", "gradient_checkpointing")


def training_settings(sd: SD, names: list[str], identities: Sequence[torch.Tensor], pcfg: PersonalizationConfig, *,
                      budget: float, learning_rate: float, batch_size: int, anchor_steps: int | None,
                      anchors: dict | None, class_images: torch.Tensor | None, shuffle_prob: float, lambda_init: float,
                      lambda_step: float, min_psnr: float | None, sampling: Mapping, width: int, rho: RhoUNet | None,
                      resample: bool, seed: int, eot: Sequence[str] = ()) -> dict:
    """What determines a ρ training's result, as flat JSON keyed like ``apdm train-perturber``'s config (the
    fingerprint its checkpoint records and a resumed training must match): the model (:meth:`SD.fingerprint`,
    dtype), the identities' names and photos (digests of each (N_i,3,H,W) tensor), the class images, every
    argument of :func:`train_perturber` that changes the numbers, and ``personalization.*`` (the anchors) but
    :data:`PERSONALIZATION_RESUMABLE`. Left out: ``steps`` (a training may be extended), checkpointing, ``quiet``."""
    from apdm.protect_model.l2p import config_settings, tensor_digest

    out = {"model": sd.fingerprint(), "model.dtype": str(sd.dtype).replace("torch.", ""), "identities": list(names),
           **{f"photos.{n}": tensor_digest(x) for n, x in zip(names, identities)},
           "class_images": None if class_images is None else tensor_digest(class_images),
           "budget": budget, "learning_rate": learning_rate, "batch_size": batch_size, "shuffle_prob": shuffle_prob,
           "lambda_init": lambda_init, "lambda_step": lambda_step, "min_psnr": min_psnr, "width": width,
           **{k: sampling[k] for k in sorted(sampling)}, "resample": resample, "seed": seed,
           "anchors": "given" if anchors is not None else "trained",
           "anchor_steps": None if anchors is not None else (pcfg.steps if anchor_steps is None else anchor_steps),
           "rho": "fresh" if rho is None else "given", "eot": list(eot), "scored": "published"}
    out.update(config_settings("personalization", pcfg, PERSONALIZATION_RESUMABLE))
    return json.loads(json.dumps(out))


def _prepare_batched(sd: SD, images: torch.Tensor, sampling: Mapping, batch_size: int, quiet: bool) -> dict:
    parts = [prepare(sd, images[s:s + batch_size], sampling)
             for s in progress(range(0, images.shape[0], batch_size), desc="ldu invert", disable=quiet)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def check_rho_fits(rho: RhoUNet, sd: SD, budget: float, where: str | Path = "ρ") -> str | None:
    """Say when ``rho`` was trained for another base model or another budget than it is about to protect with: one
    ``LOG.warning`` naming both (returned too; None when it fits). The model is compared by :meth:`SD.fingerprint`
    (recorded in ``training_info`` since 2026-12-07); a ρ saved before that is checked for its budget only, and an
    info line says its model cannot be checked.

    Raises:
        ValueError: ρ's latent channels are not the model's (it cannot run on this model's latents at all)."""
    latent = int(sd.unet.config.in_channels)
    if rho.channels != latent:
        raise ValueError(f"{where}: this ρ maps {rho.channels}-channel latents, and {sd.source}'s have {latent}: it was "
                         f"trained for another model; train one for this model with `apdm train-perturber`")
    info = rho.training_info or {}
    problems = []
    recorded = info.get("base_model_fingerprint")
    if recorded:
        now = sd.fingerprint()
        if recorded != now:
            dtype, this = info.get("base_model_dtype"), str(sd.dtype).replace("torch.", "")  # as training records it
            precision = (f"; it was trained in {dtype} and this run is in {this}, and the same weights at another "
                         f"precision fingerprint differently" if dtype and dtype != this else "")
            problems.append(f"for another model ({info.get('base_model', '?')}, fingerprint {recorded}; this run's "
                            f"{sd.source} is {now}{precision})")
    else:
        LOG.info("%s: this ρ records no base-model fingerprint (saved before apdm recorded it; trained on %s): that "
                 "it was trained for this run's model (%s) cannot be checked", where,
                 info.get("base_model", "an unrecorded model"), sd.source)
    trained = info.get("budget")
    if isinstance(trained, (int, float)) and abs(float(trained) - float(budget)) > 1e-9:
        problems.append(f"at budget {format_budget(trained)} (this run's is {format_budget(budget)})")
    if not problems:
        return None
    message = (f"{where}: this ρ was trained {' and '.join(problems)}; a ρ protects as measured only with the model "
               f"and budget it was trained for (train one for them with `apdm train-perturber`)")
    LOG.warning("%s", message)
    return message


# ============================================================================ saving / loading
def save_rho(rho: RhoUNet, folder: str | Path) -> Path:
    """Write ``rho.safetensors`` (weights) and ``rho.json`` (architecture, sampling, training record) atomically."""
    from safetensors.torch import save

    folder = Path(folder)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in rho.state_dict().items()}
    atomic_write_bytes(folder / RHO_WEIGHTS, save(tensors, metadata={"format": RHO_FORMAT}))
    atomic_write_json(folder / RHO_CONFIG, {
        "format": RHO_FORMAT, "arch": rho.arch(), "parameters": count_parameters(rho),
        "sampling": rho.sampling, "training": rho.training_info,
    })
    return folder


def rho_folder(path: str | Path) -> Path:
    """The folder ``rho_path`` names: ``toy`` is the toy world's ρ (:func:`apdm.toy.world.rho_path`: a build's in
    the cache, else the one shipped in ``assets/toy/rho``), found from any folder as ``model.path=toy`` finds the toy
    model; any other path is taken with ``~`` expanded.

    Raises:
        FileNotFoundError: the folder does not exist or is a file (``toy``: no toy ρ is there).
    """
    text = str(path).strip()
    if text == "toy" and (Path("toy") / RHO_CONFIG).is_file():  # a ρ the user trained into ./toy stays theirs
        LOG.warning("rho_path=toy: using the folder ./toy here (it holds a ρ), not the toy world's; give the toy "
                    "world's by its path (assets/toy/rho) if you meant that")
        return Path("toy").absolute()  # resolving it again (loading, hashing) says this once, not once a call
    if text == "toy":
        from apdm.toy.world import rho_path

        found = rho_path()
        if found is None:
            raise FileNotFoundError("rho_path=toy: no toy-world ρ found (apdm ships one in assets/toy/rho; train one "
                                    "with recipes/toy-train-perturber.yaml)")
        return found
    folder = Path(text).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"rho_path {path}: {folder} does not exist (give the folder `apdm train-perturber` "
                                f"wrote, or rho_path=toy for the toy world's ρ)")
    if not folder.is_dir():
        raise FileNotFoundError(f"rho_path {path}: {folder} is a file, not a folder (give the folder `apdm "
                                f"train-perturber` wrote, holding {RHO_CONFIG} and {RHO_WEIGHTS})")
    return folder


def load_rho(folder: str | Path, device: str | torch.device = "cpu") -> RhoUNet:
    """Load a ρ saved by :func:`save_rho` (safetensors + JSON only; nothing is unpickled) from ``folder``, as
    :func:`rho_folder` resolves it (``toy`` is the toy world's)."""
    from safetensors.torch import load_file

    folder = rho_folder(folder)
    cfg_path, w_path = folder / RHO_CONFIG, folder / RHO_WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise FileNotFoundError(f"{folder}: expected {RHO_CONFIG} and {RHO_WEIGHTS} (an apdm LDU perturber)")
    meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    if meta.get("format") != RHO_FORMAT:
        raise ValueError(f"{cfg_path}: format '{meta.get('format')}' is not {RHO_FORMAT}")
    rho = RhoUNet(**meta["arch"])
    rho.load_state_dict(load_file(str(w_path)), strict=True)
    rho.sampling = _check_sampling(meta.get("sampling") or {})
    rho.training_info = meta.get("training") or {}
    return rho.to(device).eval()
