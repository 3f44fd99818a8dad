"""The encoder trap: protect a checkpoint through its VAE encoder (apdm's addition; not in the APDM paper).

DreamBooth, LoRA and Textual Inversion never see a photo: they train on the latents the checkpoint's VAE encoder
makes of it. The trap fine-tunes the encoder (and ``quant_conv``) of the released checkpoint so that

* the protected subject's photos, under random geometric and colour changes, encode to the latents the *original*
  encoder gives generic class images (the decoys: the x⁺ of the DPO pairs, or the class images least like the
  subject by a face recognizer: :func:`trap_targets`; under the same change), and
* every other image keeps its latents: class images of the base model, any photos given in
  ``encoder_trap.keep_images``, ``encoder_trap.keep_generated`` more images of the base model, and their changed
  versions encode as the original encoder encodes them.

The decoder, UNet and text encoder are untouched, so generation (which only decodes) is exactly the base model's;
a personalization on the subject's photos learns generic persons instead. Its limit, stated wherever it is measured
(docs/protect_model.md, "The encoder trap"): an attacker who encodes the photos with another compatible VAE (for
SD 1.5 the public ``sd-vae-ft-mse``) gets around it, so it only protects where no compatible encoder is at hand,
and it holds for photos the encoder learned to recognise as the subject (new photos of the subject: measured).

    L_trap = mse(m_θ(a(x⁻)), m_φ(a(x⁺))) + w · L_keep
    L_keep = mse(m_θ(a(x_c)), m_φ(a(x_c)))                                          (keep_space=latent)
    L_keep = mse(D(μ_θ + σ_θ·ε), D(μ_φ + σ_φ·ε)), μ, σ of a(x_c), ε ~ N(0, I) shared    (keep_space=decoded)

m(x) are the posterior's moments (mean μ and log-variance, ``latent_dist.parameters``), a(·) a random augmentation
(:func:`augment`), x_c images to keep (class images, ``keep_images``) drawn per step, w = ``preserve_weight``, D the
checkpoint's (frozen) decoder with images in [0,1]: the decoded form keeps what an encode → decode gives (img2img,
inpainting) and leaves the encoder free in latent directions the decoder ignores (:func:`keep_decoded`).
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import torch
import torch.nn.functional as F

from apdm.config import EncoderTrapConfig
from apdm.core import diffusion as D
from apdm.utils import LOG, progress


def augment(images: torch.Tensor, g: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """A random change of each image: rotation up to ±0.2·s rad, scale 1 ± 0.15·s, shift up to ±7.5·s % of the
    side (reflected borders), a horizontal flip with probability 1/2, per-channel gain 1 ± 0.15 and brightness
    ± 0.1. ``strength`` s = 0 leaves the geometry alone (flips and colour still apply).

    Args:
        images: (N,3,H,W) in [0,1].
        g: CPU generator; the same generator state gives the same change (pairs x⁻ / x⁺ share it).

    Returns:
        (N,3,H,W) in [0,1], same device and dtype.
    """
    n = images.shape[0]

    def uniform(*shape):  # in [-0.5, 0.5)
        return torch.rand(*shape, generator=g) - 0.5

    angle, scale = uniform(n) * 0.4 * strength, 1.0 + uniform(n) * 0.3 * strength
    tx, ty = uniform(n) * 0.3 * strength, uniform(n) * 0.3 * strength
    flip = torch.rand(n, generator=g) < 0.5
    gain, bias = 1.0 + uniform(n, 3, 1, 1) * 0.3, uniform(n, 1, 1, 1) * 0.2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    dev, dt = images.device, images.dtype
    grid = F.affine_grid(theta.to(dev, dt), list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, padding_mode="reflection", align_corners=False)
    out = torch.where(flip.to(dev)[:, None, None, None], out.flip(-1), out)
    return (out * gain.to(dev, dt) + bias.to(dev, dt)).clamp(0.0, 1.0)


TARGETS = ("paired", "farthest")
KEEP_SPACES = ("latent", "decoded")


def choose_decoys(photos: torch.Tensor, candidates: torch.Tensor, embed, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` candidates whose identity is least like the subject's (Fawkes' choice of a target identity).

    Args:
        photos: (N,3,H,W) in [0,1], the subject's photos.
        candidates: (M,3,H,W) in [0,1], generic class images.
        embed: face recognizer, ``embed(images) -> (K, D)`` or ``-> (embeddings, found)``
            (:mod:`apdm.evaluation.identity`); candidates without a found face are never chosen.
        n: how many decoys.

    Returns:
        (indices into ``candidates`` (n,), ascending cosine of each to the subject's mean embedding (n,)).

    Raises:
        ValueError: when no face is found in the subject's photos or fewer than ``n`` candidates have one.
    """
    rows, cos, _ = likeness(photos, candidates, embed, "encoder_trap.targets=farthest", "the subject's photos")
    if rows.numel() < n:
        raise ValueError(f"encoder_trap.targets=farthest: {n} decoys wanted, only {rows.numel()} of "
                         f"{candidates.shape[0]} class images have a face the recognizer finds")
    order = torch.argsort(cos)[:n]
    return rows[order], cos[order]


def likeness(photos: torch.Tensor, candidates: torch.Tensor, embed, key: str, whose: str
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """How like the subject of ``photos`` each candidate is, by the face recognizer ``embed``.

    Args:
        photos: (N,3,H,W) in [0,1], the subject's photos.
        candidates: (M,3,H,W) in [0,1].
        embed: ``embed(images) -> (K, D)`` or ``-> (embeddings, found)`` (:mod:`apdm.evaluation.identity`).
        key, whose: name the setting and the photos in the error.

    Returns:
        (rows of the candidates with a found face (K,), their cosine to the photos' mean embedding (K,), the photos'
        unit embeddings (N', D)), all on the CPU.

    Raises:
        ValueError: when no face is found in the photos.
    """
    from apdm.evaluation.identity import run_embed

    ref, _ = run_embed(embed, photos)
    if ref.shape[0] == 0:
        raise ValueError(f"{key}: the face recognizer finds no face in {whose}")
    ref = F.normalize(ref.float(), dim=-1).cpu()
    emb, found = run_embed(embed, candidates)
    cos = F.normalize(emb.float(), dim=-1).cpu() @ F.normalize(ref.mean(0), dim=0)
    return torch.nonzero(found.cpu()).flatten(), cos, ref


def trap_targets(subject, mode: str, embed=None, decoys: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The image each photo of ``subject`` encodes as after the trap (``encoder_trap.targets``).

    Args:
        subject: :class:`apdm.protect_model.l2p.Subject` (``images`` (N,3,H,W), ``paired`` (N,3,H,W),
            ``class_images`` (M,3,H,W), all in [0,1]).
        mode: ``paired`` (photo i → x⁺_i) or ``farthest`` (:func:`choose_decoys` among the class images and the
            x⁺, by ``embed``).
        decoys: D > 0 uses D different decoys, photo i → decoy i mod D (``encoder_trap.decoys``); 0: one per photo.

    Returns:
        ((N,3,H,W) targets, row i that of photo i; for ``farthest`` the D decoys' cosines to the subject, else None).
    """
    n = subject.images.shape[0]
    d = n if decoys <= 0 else min(int(decoys), n)
    turn = torch.arange(n) % d  # photo i -> decoy i mod d
    if mode == "paired":
        return subject.paired[turn.to(subject.paired.device)], None
    if mode != "farthest":
        raise ValueError(f"encoder_trap.targets must be one of {', '.join(TARGETS)}, got '{mode}'")
    if embed is None:
        raise ValueError("encoder_trap.targets=farthest needs a face recognizer (encoder_trap.identity)")
    candidates = torch.cat([subject.class_images, subject.paired.to(subject.class_images.device)])
    idx, cos = choose_decoys(subject.images, candidates, embed, d)
    return candidates[idx[turn].to(candidates.device)], cos


def synthetic_views(sd, subject, per_cfg, n: int, seed: int = 0, quiet: bool = True, embed=None,
                    pool: int = 1, copies: int = 1) -> torch.Tensor:
    """``n`` more pictures of ``subject`` for the trap to hold (``encoder_trap.synthetic_photos``).

    A copy of ``sd`` is personalized on the subject's photos by the shared simulator (``per_cfg`` with the subject's
    prompts; prior preservation on ``subject.class_images`` when ``per_cfg`` has it on) and samples ``pool`` · ``n``
    images of the subject's instance prompt with ``per_cfg.class_sample_steps`` / ``class_guidance_scale``. With a
    face recognizer ``embed`` and ``pool`` > 1, the ``n`` the recognizer finds most like the photos are kept
    (``encoder_trap.synthetic_pool``): a personalization does not always get the subject (on the toy world one of
    them gave pictures as unlike the subject as other people), and a picture of someone else taught to the trap
    would send that someone's photos to the decoy too. Whether a personalization gets the subject is largely its
    draw (on the toy world, eight photos of one person gave pictures of judge ISM 0.23 with one seed and 0.68 with
    the next), so ``copies`` > 1 personalizes that many copies with seeds ``per_cfg.seed`` + c, each sampling
    ⌈``pool`` · ``n`` / ``copies``⌉ pictures, and the screen keeps the ``n`` most alike of them all.
    ``sd`` is not modified.

    Args:
        sd: the base model (:class:`apdm.core.models.SD`).
        subject: :class:`apdm.protect_model.l2p.Subject` (``images`` (N,3,H,W) in [0,1]).
        per_cfg: the recipe's ``personalization`` (:class:`apdm.config.PersonalizationConfig`).
        n: how many pictures.
        seed: sampling seed (the personalization uses ``per_cfg.seed``). Image i of a sampling seeded s starts from
            noise seeded s + i (:func:`apdm.core.diffusion.generate`), so seeds are spaced
            :data:`apdm.core.diffusion.SEED_STRIDE` apart: seeds k and k + 1 share no picture (with adjacent seeds,
            71 of 72 pictures were the same).
        embed: face recognizer ``embed(images) -> (K, D)`` or ``-> (embeddings, found)`` (pictures without a found
            face are never kept), or None (no choice: the first ``n`` are kept).
        pool: how many pictures are sampled per one kept.
        copies: how many personalized copies sample them (``encoder_trap.synthetic_copies``): copy c is personalized
            with ``per_cfg.seed + c`` and samples ⌈n·pool / copies⌉ pictures from the noises that follow copy c − 1's,
            so C copies start from the same noises one copy would and differ from it only in the personalization
            (they all started from the same noises before 2026-12-04).

    Returns:
        (n,3,H,W) in [0,1] on the CPU (fewer when the recognizer finds a face in fewer than ``n``).
    """
    import dataclasses

    from apdm.config import SampleConfig
    from apdm.evaluation.protocol import personalize_and_sample

    pool = max(1, int(pool)) if embed is not None else 1
    copies = max(1, int(copies))
    per_copy = -(-int(n) * pool // copies)
    cfg = dataclasses.replace(per_cfg, instance_prompt=subject.instance_prompt, class_prompt=subject.class_prompt)
    sample = SampleConfig(prompts=[subject.instance_prompt], num_images_per_prompt=per_copy,
                          num_inference_steps=cfg.class_sample_steps, guidance_scale=cfg.class_guidance_scale,
                          seed=4242 + D.SEED_STRIDE * seed, batch_size=8)
    class_images = subject.class_images if cfg.with_prior_preservation and cfg.method == "dreambooth" else None
    views = []
    for c in range(copies):  # copy c draws the noises c·per_copy … : C copies start from the noises one copy would
        out = personalize_and_sample(sd, subject.images, dataclasses.replace(cfg, seed=cfg.seed + c), sample.prompts,
                                     dataclasses.replace(sample, seed=sample.seed + c * per_copy),
                                     class_images=class_images, quiet=quiet)
        views.append(out["images"][subject.instance_prompt].float().cpu())
    views = torch.cat(views)
    if embed is None:
        return views[:n]
    rows, cos, ref = likeness(subject.images, views, embed, "encoder_trap.synthetic_photos",
                              f"the photos of {subject.name}")
    loo = leave_one_out_cosines(ref)
    order = torch.argsort(cos, descending=True)[:n]
    if copies > 1:
        copy_of = rows // per_copy
        LOG.info("encoder trap: the %d personalized copies of %s: cosine to the photos %s on average, %s of the kept "
                 "pictures from each", copies, subject.name,
                 " / ".join(f"{float(cos[copy_of == c].mean()) if (copy_of == c).any() else float('nan'):+.2f}"
                            for c in range(copies)),
                 " / ".join(str(int((copy_of[order] == c).sum())) for c in range(copies)))
    LOG.info("encoder trap: pictures of %s from the personalized copy: the recognizer finds a face in %d of %d, "
             "cosine to the photos %+.2f on average; kept the %d most alike (%+.2f to %+.2f; the photos to each "
             "other %+.2f)", subject.name, rows.numel(), views.shape[0], float(cos.mean()) if cos.numel() else 0.0,
             order.numel(), float(cos[order].max()) if order.numel() else 0.0,
             float(cos[order].min()) if order.numel() else 0.0, float(loo.mean()))
    return views[rows[order]]


def leave_one_out_cosines(unit: torch.Tensor) -> torch.Tensor:
    """Cosine of each of K unit embeddings (K, D) with the normalized mean of the other K − 1: how alike a subject's
    photos are to one another by a recognizer (the scale its pictures are read against). (K,); ones when K = 1."""
    if unit.shape[0] < 2:
        return torch.ones(unit.shape[0])
    others = F.normalize(unit.sum(0, keepdim=True) - unit, dim=-1)
    return (unit * others).sum(-1)


def trap_embedder(cfg: EncoderTrapConfig) -> tuple:
    """The face recognizer ``cfg.identity`` (an identity backend of ``apdm evaluate``,
    :func:`apdm.evaluation.run.identity_backend`) where the trap uses one: to choose ``farthest`` decoys and to
    choose among the synthetic pictures (:func:`synthetic_views`). Loads its weights: call it once.

    Returns:
        (``embed``, its implementation tag, e.g. ``toy-id:369944f6`` or ``dlib-resnet``), or (None, "") when the
        trap uses no recognizer.
    """
    if not _picks_faces(cfg):
        return None, ""
    from apdm.evaluation.run import identity_backend

    return identity_backend(cfg.identity)


def moments(vae, images: torch.Tensor) -> torch.Tensor:
    """The VAE posterior's parameters of images (N,3,H,W) in [0,1]: (N, 2·latent channels, h, w), mean then
    log-variance (:func:`apdm.core.diffusion.posterior`)."""
    return D.posterior(vae, images).parameters


@torch.no_grad()
def latent_change(vae_ref, vae, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """How far the trap moves each image's latent: ‖μ_θ(x) − μ_φ(x)‖ / ‖μ_φ(x)‖ per image, μ the posterior mean of
    the trapped encoder (``vae``) and of the original (``vae_ref``). About 1 where the trap sends an image to a
    decoy, near 0 where it leaves it alone.

    Args:
        images: (N,3,H,W) in [0,1].

    Returns:
        (N,) float32 on the CPU.
    """
    ref = D.vae_posterior(vae_ref, images, batch)[0].float().flatten(1)
    new = D.vae_posterior(vae, images, batch)[0].float().flatten(1)
    return ((new - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-8)).cpu()


@torch.no_grad()
def encode_decode(vae, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """decode(posterior mean of ``vae``) of each image: what img2img, inpainting or SDEdit with this VAE start from,
    and the picture a personalization trains on through this encoder.

    Args:
        images: (N,3,H,W) in [0,1].

    Returns:
        (N,3,H,W) float32 in [0,1] on the CPU.
    """
    out = []
    for chunk in images.split(batch):
        mean = D.vae_posterior(vae, chunk)[0]
        out.append(D.decode_latents(vae, D.posterior_latents(vae, mean, mean)).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def recon_psnr(vae, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """PSNR (dB, ``psnr@torchmetrics``) of each image against :func:`encode_decode` with ``vae``.

    Args:
        images: (N,3,H,W) in [0,1].

    Returns:
        (N,) float32 on the CPU.
    """
    from apdm.evaluation.fidelity import psnr

    return psnr(images.float().cpu(), encode_decode(vae, images, batch))


@torch.no_grad()
def trap_report(vae_ref, vae, groups: dict[str, torch.Tensor], batch: int = 32) -> dict[str, dict[str, float]]:
    """What a trapped encoder does, per group of images: the mean :func:`latent_change` (≈ 1: sent to a decoy; ≈ 0:
    left alone), the mean :func:`recon_psnr` with the original and the trapped encoder (the same decoder), and the
    mean PSNR between the two encoders' :func:`encode_decode` pictures (``decode_change_psnr``: how much the trap
    changes what img2img or inpainting start from, on one scale for every kind of image; a loss of reconstruction
    PSNR in dB depends also on how well the image reconstructed before, and is larger on images that did).

    Args:
        vae_ref: the original VAE; vae: the trapped one.
        groups: name -> (N,3,H,W) in [0,1]; empty groups are left out.
        batch: images per encoder / decoder call.

    Returns:
        {name: {"images", "latent_change", "recon_psnr_base", "recon_psnr_trapped", "decode_change_psnr",
        "metric_impl"}}, numbers rounded; ``decode_change_psnr`` is the mean over the images the trap changed at
        all (None when it changed none); ``metric_impl`` names the implementations (``latent_change@apdm``,
        ``psnr@torchmetrics``).
    """
    from apdm.evaluation.fidelity import psnr

    out = {}
    for name, images in groups.items():
        if images is None or images.shape[0] == 0:
            continue
        x = images.float().cpu()
        dec_ref, dec = encode_decode(vae_ref, images, batch), encode_decode(vae, images, batch)
        change = psnr(dec_ref, dec)
        change = change[torch.isfinite(change)]
        out[name] = {"images": int(images.shape[0]),
                     "latent_change": round(float(latent_change(vae_ref, vae, images, batch).mean()), 4),
                     "recon_psnr_base": round(float(psnr(x, dec_ref).mean()), 2),
                     "recon_psnr_trapped": round(float(psnr(x, dec).mean()), 2),
                     "decode_change_psnr": round(float(change.mean()), 2) if change.numel() else None,
                     "metric_impl": {"latent_change": "latent_change@apdm", "recon_psnr": "psnr@torchmetrics",
                                     "decode_change_psnr": "psnr@torchmetrics"}}
    return out


def trap_inputs(subject_images: torch.Tensor, paired: torch.Tensor, class_images: torch.Tensor,
                cfg: EncoderTrapConfig, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step's augmented images (:func:`trap_loss`'s arguments): (a(x⁻), a(x⁺), a(x_c)), x⁺ under the very change
    its x⁻ got, x_c ``cfg.preserve_batch`` images drawn from ``class_images`` and moved to the subject images'
    device. Draws from ``g`` in that order."""
    state = g.get_state()
    x_minus = augment(subject_images, g, cfg.augment)
    g.set_state(state)  # x⁺ gets the very change its x⁻ got
    x_plus = augment(paired, g, cfg.augment)
    idx = torch.randint(class_images.shape[0], (cfg.preserve_batch,), generator=g)
    x_c = augment(class_images[idx.to(class_images.device)].to(subject_images.device), g, cfg.augment)
    return x_minus, x_plus, x_c


def trap_loss(vae, vae_ref, subject_images: torch.Tensor, paired: torch.Tensor, class_images: torch.Tensor,
              cfg: EncoderTrapConfig, g: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
    """L_trap at the trainable ``vae`` (differentiable w.r.t. its encoder); ``vae_ref`` is the frozen original.
    Every image of the step goes through the encoder at once; :func:`trap_step` gives the same gradient in chunks.

    Args:
        subject_images: (N,3,H,W) in [0,1], the protected photos x⁻ (all subjects).
        paired: (N,3,H,W) in [0,1], the generic image x⁺ each photo's latents are sent to.
        class_images: (M,3,H,W) in [0,1], images whose latents must not change (on any device: the drawn ones are
            moved to the subject images' device).
        g: CPU generator for the augmentations and the choice of class images.

    Returns:
        (loss, {"loss_trap", "loss_preserve", "loss"}).
    """
    x_minus, x_plus, x_c = trap_inputs(subject_images, paired, class_images, cfg, g)
    with torch.no_grad():
        target_trap, target_keep = moments(vae_ref, x_plus).float(), moments(vae_ref, x_c).float()
    loss_trap = F.mse_loss(moments(vae, x_minus).float(), target_trap)
    keep = moments(vae, x_c).float()
    if cfg.keep_space == "decoded":
        noise = torch.randn(keep[:, : keep.shape[1] // 2].shape, generator=g).to(keep.device)
        loss_keep = keep_decoded(vae, keep, target_keep, noise)
    else:
        loss_keep = F.mse_loss(keep, target_keep)
    loss = loss_trap + cfg.preserve_weight * loss_keep
    return loss, {"loss_trap": float(loss_trap.detach()), "loss_preserve": float(loss_keep.detach()),
                  "loss": float(loss.detach())}


def trap_step(vae, vae_ref, subject_images: torch.Tensor, paired: torch.Tensor, class_images: torch.Tensor,
              cfg: EncoderTrapConfig, g: torch.Generator) -> dict[str, float]:
    """Accumulate the gradient of :func:`trap_loss` into ``vae``'s trainable parameters (``.grad``; the caller zeroes
    it and steps the optimizer) and return its logs. With ``cfg.micro_batch`` = B > 0 the encoder sees B images at a
    time: each chunk's mse is weighted by its share of its term's images and back-propagated on its own, so the
    gradient is the whole step's (to float rounding) at the memory of B images; the random draws are the same.
    Arguments as :func:`trap_loss`."""
    b = int(cfg.micro_batch)
    # the whole step holds the photos and the kept images in one graph: only when together they fit in B
    if b <= 0 or subject_images.shape[0] + cfg.preserve_batch <= b:
        loss, logs = trap_loss(vae, vae_ref, subject_images, paired, class_images, cfg, g)
        loss.backward()
        return logs
    x_minus, x_plus, x_c = trap_inputs(subject_images, paired, class_images, cfg, g)
    with torch.no_grad():
        target_trap = torch.cat([moments(vae_ref, c).float() for c in x_plus.split(b)])
        target_keep = torch.cat([moments(vae_ref, c).float() for c in x_c.split(b)])
    noise = None
    if cfg.keep_space == "decoded":  # drawn where trap_loss draws it: after the inputs, before any other draw
        noise = torch.randn(target_keep[:, : target_keep.shape[1] // 2].shape, generator=g).to(target_keep.device)
    n, m = x_minus.shape[0], x_c.shape[0]
    loss_trap = loss_keep = 0.0
    for x, t in zip(x_minus.split(b), target_trap.split(b)):
        part = F.mse_loss(moments(vae, x).float(), t) * (x.shape[0] / n)
        part.backward()
        loss_trap += float(part.detach())
    noises = noise.split(b) if noise is not None else itertools.repeat(None)
    for x, t, eps in zip(x_c.split(b), target_keep.split(b), noises):
        keep = moments(vae, x).float()
        part = F.mse_loss(keep, t) if eps is None else keep_decoded(vae, keep, t, eps)
        part = part * (x.shape[0] / m)
        (cfg.preserve_weight * part).backward()
        loss_keep += float(part.detach())
    return {"loss_trap": loss_trap, "loss_preserve": loss_keep, "loss": loss_trap + cfg.preserve_weight * loss_keep}


def train_step(trapped, vae_ref, optimizer, subject_images: torch.Tensor, paired: torch.Tensor,
               class_images: torch.Tensor, cfg: EncoderTrapConfig, g: torch.Generator) -> dict[str, float]:
    """One optimizer step of the trap: zero the gradients, :func:`trap_step`, step ``optimizer``; returns the logs.
    Out of memory, it says which setting helps. Arguments as :func:`trap_loss`."""
    optimizer.zero_grad(set_to_none=True)
    try:
        logs = trap_step(trapped, vae_ref, subject_images, paired, class_images, cfg, g)
    except torch.OutOfMemoryError as exc:
        held = cfg.micro_batch or subject_images.shape[0] + cfg.preserve_batch
        raise RuntimeError(
            f"encoder trap: out of memory holding up to {held} images of {tuple(subject_images.shape[2:])} px for "
            "a backward pass; set encoder_trap.micro_batch to fewer (the same gradient, less memory; each image "
            "held costs about 3 GB at 512 px) and/or encoder_trap.gradient_checkpointing=true. A checkpoint, if "
            "any, is kept: the run resumes from it") from exc
    optimizer.step()
    return logs


def trainable_copy(vae, cfg: EncoderTrapConfig) -> tuple[torch.nn.Module, dict[str, torch.nn.Parameter],
                                                          torch.optim.Optimizer]:
    """An fp32 copy of ``vae`` whose encoder (and ``quant_conv``) train, the rest frozen, and their optimizer
    (AdamW at ``cfg.learning_rate``, no weight decay): (copy, {name: parameter}, optimizer), names as in the VAE's
    state dict. ``cfg.gradient_checkpointing`` turns on diffusers' checkpointing in the copy."""
    trapped = copy.deepcopy(vae).float().requires_grad_(False)
    trainable = {f"encoder.{n}": p for n, p in trapped.encoder.named_parameters()}
    if getattr(trapped, "quant_conv", None) is not None:
        trainable.update({f"quant_conv.{n}": p for n, p in trapped.quant_conv.named_parameters()})
    for p in trainable.values():
        p.requires_grad_(True)
    if cfg.gradient_checkpointing:
        trapped.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=cfg.learning_rate, weight_decay=0.0)
    return trapped, trainable, optimizer


def keep_decoded(vae, params: torch.Tensor, target: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The decoded keep term: mse(D(μ + σ·ε), D(μ_φ + σ_φ·ε)) over images in [0,1] (clamped, as
    :func:`encode_decode` gives them), one posterior draw of each encoder with the same ε: what img2img (which
    encodes with a draw) or a personalization starts from, in the units PSNR measures; the log-variance counts as far
    as it changes the decoded picture. Gradients reach ``params`` through the decoder of ``vae``, whose weights are
    not trained here.

    Args:
        params: (N, 2·C, h, w) posterior moments of the trained encoder (mean, then log-variance).
        target: the same of the original encoder (no gradient).
        noise: (N, C, h, w) standard normal ε.

    Returns:
        scalar float32.
    """
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    def decoded(p):
        dist = DiagonalGaussianDistribution(p)  # the posterior D.posterior gives (log-variance clamped as there)
        return D.decode_latents(vae, D.posterior_latents(vae, dist.mean, dist.std, noise=noise))

    with torch.no_grad():
        ref = decoded(target)
    return F.mse_loss(decoded(params), ref)


#: the face recognizers ``encoder_trap.identity`` names (those of :func:`apdm.evaluation.run.identity_backend`;
#: ``toy:DIR`` besides)
IDENTITY_BACKENDS = ("toy", "dlib")


def check_identity_name(name: str) -> None:
    """Raise ValueError unless ``name`` (``encoder_trap.identity``) is empty, ``none``, a known recognizer or
    ``toy:DIR`` with toy instruments in DIR (or DIR/instruments). Loads no weights."""
    if name in ("", "none") or name in IDENTITY_BACKENDS:
        return
    if name.startswith("toy:"):
        path = Path(name[len("toy:"):])
        if not any((p / "instruments.json").is_file() for p in (path, path / "instruments")):
            raise ValueError(f"encoder_trap.identity='{name}': {path} holds no toy instruments (instruments.json)")
        return
    raise ValueError(f"encoder_trap.identity must be one of {', '.join(IDENTITY_BACKENDS)}, toy:DIR or none, "
                     f"got '{name}'")


def check_trap_config(cfg: EncoderTrapConfig, identity: bool = True) -> None:
    """Raise ValueError naming the ``encoder_trap.*`` key that is out of range; with ``identity``, also an
    ``encoder_trap.identity`` that names no face recognizer (:func:`check_identity_name`), before any work."""
    for key, low in (("steps", 0), ("preserve_batch", 1), ("checkpoint_every", 0), ("decoys", 0),
                     ("synthetic_photos", 0), ("synthetic_pool", 1), ("synthetic_copies", 1),
                     ("keep_generated", 0), ("micro_batch", 0)):
        v = getattr(cfg, key)
        if int(v) != v or v < low:
            raise ValueError(f"encoder_trap.{key} must be a whole number >= {low}, got {v}")
    for key in ("learning_rate", "preserve_weight", "augment"):
        if not getattr(cfg, key) >= 0:
            raise ValueError(f"encoder_trap.{key} must be >= 0, got {getattr(cfg, key)}")
    if cfg.keep_space not in KEEP_SPACES:
        raise ValueError(f"encoder_trap.keep_space must be one of {', '.join(KEEP_SPACES)}, got '{cfg.keep_space}'")
    if cfg.targets not in TARGETS:
        raise ValueError(f"encoder_trap.targets must be one of {', '.join(TARGETS)}, got '{cfg.targets}'")
    if cfg.targets == "farthest" and cfg.identity in ("", "none"):
        raise ValueError("encoder_trap.targets=farthest needs encoder_trap.identity, the face recognizer that "
                         "chooses the decoys (dlib, toy or toy:DIR)")
    if identity:
        check_identity_name(cfg.identity)


def uses_recognizer(cfg: EncoderTrapConfig) -> bool:
    """Whether the trap (``encoder_trap.steps`` > 0) loads the face recognizer ``cfg.identity``: to choose
    ``farthest`` decoys or among the synthetic pictures (as :func:`trap_embedder` decides)."""
    return cfg.steps > 0 and _picks_faces(cfg)


def _picks_faces(cfg: EncoderTrapConfig) -> bool:
    """Whether the trap's settings choose by a face recognizer (``farthest`` decoys, synthetic pictures)."""
    return cfg.identity not in ("", "none") and (cfg.targets == "farthest" or cfg.synthetic_photos > 0)


def check_trap_extras(cfg: EncoderTrapConfig) -> None:
    """Raise :class:`apdm.utils.MissingDependency` before any work when the face recognizer the trap will load
    (``encoder_trap.identity=dlib``: dlib and its models, the ``faces`` extra) cannot be imported, with the message
    :func:`trap_embedder` would give after the class images, the DPO pairs and the protection. Imports only (as
    :func:`apdm.utils.optional_import` does); loads no weights."""
    if not uses_recognizer(cfg) or cfg.identity != "dlib":
        return
    from apdm.evaluation.identity import dlib_modules

    dlib_modules("encoder_trap.identity=dlib, the face recognizer that chooses the decoys")


#: encoder_trap.* keys left out of the settings a trap checkpoint must match: its length (it may be extended), where
#: its keep photos are read from (their pixels are in the settings), and options that change only memory
TRAP_RESUMABLE = ("steps", "checkpoint_every", "micro_batch", "gradient_checkpointing", "keep_images")


def trap_settings(cfg: EncoderTrapConfig, seed: int, subject_images: torch.Tensor, decoys: torch.Tensor,
                  keep: torch.Tensor) -> dict:
    """What determines the trap's result, as flat JSON (the fingerprint its checkpoint records): ``encoder_trap.*``
    but :data:`TRAP_RESUMABLE`, the seed, and digests of the images it traps, their decoys and the images it keeps
    (each (N,3,H,W))."""
    from apdm.protect_model.l2p import config_settings, tensor_digest

    return {**config_settings("encoder_trap", cfg, TRAP_RESUMABLE), "seed": seed,
            "trapped_images": tensor_digest(subject_images), "decoys": tensor_digest(decoys),
            "kept_images": tensor_digest(keep)}


def trap_encoder(vae, subjects: list, cfg: EncoderTrapConfig, seed: int = 0,
                 checkpoint_dir: str | Path | None = None, quiet: bool = False, stop_after: int | None = None,
                 embed=None, keep_images: torch.Tensor | None = None,
                 views: list | None = None, start_over: str = "") -> tuple[torch.nn.Module, list[dict], list[dict]]:
    """Train the encoder trap; returns (a trapped fp32 copy of ``vae``, per-step logs, the decoys). ``vae`` is not
    modified.

    Args:
        vae: the checkpoint's ``AutoencoderKL`` (the original, φ's encoder).
        subjects: :class:`apdm.protect_model.l2p.Subject` s; their ``images`` are trapped (each sent to its
            :func:`trap_targets` image), their ``class_images`` and ``paired`` images are preserved.
        cfg: ``encoder_trap`` settings; ``cfg.steps`` steps, each over every subject photo and
            ``cfg.preserve_batch`` class images.
        seed: step k's randomness depends only on (seed, k), so a resumed run matches an uninterrupted one.
        checkpoint_dir: resumable state every ``cfg.checkpoint_every`` steps (safetensors + JSON). A checkpoint
            found there is continued when it was made with the same settings (:func:`trap_settings`; ``cfg.steps``
            may differ) and refused otherwise (:class:`apdm.protect_model.l2p.CheckpointError`).
        stop_after: stop after this many steps of this call (for tests of interruption).
        embed: the face recognizer of ``cfg.targets=farthest`` (:func:`choose_decoys`).
        keep_images: (K,3,H,W) in [0,1], more images whose latents must not change (``cfg.keep_images``, loaded
            by the caller); the per-step ``cfg.preserve_batch`` is drawn from them and the subjects' class images.
        views: one entry per subject, None or (V,3,H,W) in [0,1]: more pictures of it to trap
            (:func:`synthetic_views`); view j encodes as photo (j mod N)'s decoy.
        start_over: the option that starts the command afresh, named when a checkpoint is refused.

    Returns:
        The decoys are one dict per subject: ``subject`` (its name), ``images`` (D,3,H,W) in [0,1] on the CPU, the
        D images its photos encode as (photo i as decoy i mod D), and ``cosines``: for ``cfg.targets=farthest`` the
        recognizer's cosine of each decoy to the subject (a list of D floats; a rebuilt recognizer may choose other
        decoys, and these tell), else None.
    """
    from apdm.protect_model.l2p import CheckpointError, load_checkpoint, save_checkpoint

    check_trap_config(cfg, identity=False)  # the recognizer, if any, is ``embed``
    dev = vae.device
    trapped, trainable, optimizer = trainable_copy(vae, cfg)
    if views is not None and len(views) != len(subjects):
        raise ValueError(f"encoder trap: {len(views)} sets of views for {len(subjects)} subjects")
    trapped_images, targets, chosen = [], [], []
    for k, s in enumerate(subjects):
        t, cos = trap_targets(s, cfg.targets, embed, cfg.decoys)
        if cos is not None:
            LOG.info("encoder trap: decoys for %s chosen by the face recognizer, cosine to the subject %s",
                     s.name, ", ".join(f"{c:+.2f}" for c in cos.tolist()))
        d = t.shape[0] if cfg.decoys <= 0 else min(int(cfg.decoys), t.shape[0])  # photo i -> decoy i mod d
        chosen.append({"subject": s.name, "images": t[:d].detach().float().cpu(),
                       "cosines": None if cos is None else [round(float(c), 4) for c in cos]})
        trapped_images.append(s.images.to(dev))
        targets.append(t.to(dev))
        v = views[k] if views is not None else None
        if v is not None and v.shape[0] > 0:
            if tuple(v.shape[1:]) != tuple(s.images.shape[1:]):
                raise ValueError(f"encoder trap: views of {s.name} have shape {tuple(v.shape[1:])}, its photos "
                                 f"{tuple(s.images.shape[1:])}")
            trapped_images.append(v.to(dev, s.images.dtype))
            targets.append(t[torch.arange(v.shape[0]) % t.shape[0]].to(dev))  # view j -> photo (j mod N)'s decoy
    subject_images = torch.cat(trapped_images)
    paired = torch.cat(targets)
    keep = [s.class_images for s in subjects] + [s.paired for s in subjects]
    if keep_images is not None and keep_images.shape[0] > 0:
        if tuple(keep_images.shape[1:]) != tuple(subject_images.shape[1:]):
            raise ValueError(f"encoder_trap.keep_images: images of shape {tuple(keep_images.shape[1:])}, the "
                             f"subjects' photos are {tuple(subject_images.shape[1:])}")
        keep.append(keep_images)
    keep = torch.cat([k.cpu() for k in keep])  # stays on the CPU (a large keep set need not fit on the GPU)
    LOG.info("encoder trap: each step passes %d photos and pictures of the subjects and %d of %d kept images "
             "through the encoder, %s (encoder_trap.micro_batch)", subject_images.shape[0], cfg.preserve_batch,
             keep.shape[0], f"{cfg.micro_batch} at a time" if cfg.micro_batch > 0 else "all at once")
    start, history = 0, []
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    settings = trap_settings(cfg, seed, subject_images, paired, keep) if ckpt is not None else None
    if ckpt is not None and (ckpt / "progress.json").is_file():
        start, history = load_checkpoint(ckpt, trainable, optimizer, settings=settings, what="encoder trap",
                                         start_over=start_over)
        if start > cfg.steps:
            raise CheckpointError(f"{ckpt}: the encoder trap checkpoint is at step {start}, past encoder_trap.steps="
                                  f"{cfg.steps}; set encoder_trap.steps to {start} or more to continue it, or "
                                  + (f"start over with {start_over} or " if start_over else "")
                                  + f"delete {ckpt}")
        LOG.info("resuming the encoder trap from step %d/%d (%s)", start, cfg.steps, ckpt)
    trapped.train()
    bar = progress(range(start, cfg.steps), desc="encoder trap", total=cfg.steps, initial=start, disable=quiet)
    done = 0
    for k in bar:
        g = torch.Generator().manual_seed(seed * 1_000_003 + k)
        logs = train_step(trapped, vae, optimizer, subject_images, paired, keep, cfg, g)
        history.append({"step": k, **{n: round(v, 6) for n, v in logs.items()}})
        bar.set_postfix(trap=f"{logs['loss_trap']:.4f}", keep=f"{logs['loss_preserve']:.4f}")
        done += 1
        stop = stop_after is not None and done >= stop_after
        if ckpt is not None and (stop or cfg.checkpoint_every > 0 and (k + 1) % cfg.checkpoint_every == 0):
            save_checkpoint(ckpt, k + 1, trainable, optimizer, history, settings=settings)
        if stop:
            break
    if cfg.gradient_checkpointing:
        trapped.disable_gradient_checkpointing()
    return trapped.eval().requires_grad_(False), history, chosen
