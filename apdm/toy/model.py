"""The toy world's text-to-image model: a real Stable-Diffusion-format latent diffusion model, CPU-sized.

Components are the real diffusers/transformers classes (``AutoencoderKL``, ``CLIPTextModel`` +
``CLIPTokenizer``, ``UNet2DConditionModel``, ``DDPMScheduler``), so the saved folder loads with
``StableDiffusionPipeline.from_pretrained`` and every apdm engine runs on it unchanged. Pretraining is our own
recipe (``recipes/toy-build.yaml``) on images drawn by :mod:`apdm.toy.draw`:

1. train the VAE (L1 + MSE reconstruction + a small KL term) and set ``scaling_factor = 1/std(latents)``;
2. encode the whole dataset once (posterior mean and std kept, a fresh sample drawn each step);
3. train UNet and text encoder jointly with the noise-prediction loss of :mod:`apdm.core.diffusion`, captions
   of varying detail, 10 % caption dropout (for classifier-free guidance) and an EMA of the UNet.

Nothing here is used by the protection engines: they only ever see the saved diffusers folder.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from apdm.utils import LOG, progress


@dataclass
class ToyModelConfig:
    """Sizes of the toy model (defaults: the committed model; tests use smaller ones)."""

    image_size: int = 64
    vae_channels: list[int] = field(default_factory=lambda: [16, 32, 64])  # 3 levels -> x4 latents
    latent_channels: int = 4
    unet_channels: list[int] = field(default_factory=lambda: [64, 128, 128])
    unet_layers_per_block: int = 1
    attention_head_dim: int = 32
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_text_length: int = 40
    beta_schedule: str = "squaredcos_cap_v2"


@dataclass
class ToyTrainConfig:
    """Pretraining schedule of the toy model."""

    #: pretraining identities per class, at most all 3,686 (4,096 less the 410 held out; the committed model
    #: used all of them, its recipe then saying 4000, which was silently capped)
    num_identities: int = 3686
    images_per_identity: int = 3
    vae_steps: int = 1200
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 2500
    unet_batch: int = 32
    unet_lr: float = 4e-4
    text_lr: float = 2e-4
    warmup: int = 100
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    seed: int = 0
    #: continue from an existing toy model folder (stage 2 of a build): its VAE, text encoder and UNet are loaded,
    #: the VAE is kept as is (so the latent space does not change) and ``unet_steps`` more UNet steps are run.
    init_from: str = ""


def build_components(mcfg: ToyModelConfig, vocabulary: list[str], seed: int = 0):
    """Fresh (random) toy components: (vae, text_encoder, tokenizer, unet, scheduler)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from apdm.core.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(vocabulary, model_max_length=mcfg.max_text_length)
    levels = len(mcfg.vae_channels)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=mcfg.latent_channels, block_out_channels=mcfg.vae_channels,
        layers_per_block=1, norm_num_groups=16, down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels, sample_size=mcfg.image_size,
    )
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=mcfg.text_hidden, intermediate_size=mcfg.text_hidden * 4,
        num_hidden_layers=mcfg.text_layers, num_attention_heads=mcfg.text_heads,
        max_position_embeddings=mcfg.max_text_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    n = len(mcfg.unet_channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)
    up = ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(
        sample_size=mcfg.image_size // 2 ** (levels - 1), in_channels=mcfg.latent_channels,
        out_channels=mcfg.latent_channels, block_out_channels=tuple(mcfg.unet_channels),
        layers_per_block=mcfg.unet_layers_per_block, down_block_types=down, up_block_types=up,
        cross_attention_dim=mcfg.text_hidden, attention_head_dim=mcfg.attention_head_dim,
        norm_num_groups=min(32, mcfg.unet_channels[0]),
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule=mcfg.beta_schedule, clip_sample=False,
                              prediction_type="epsilon", steps_offset=1)
    return vae, text_encoder, tokenizer, unet, scheduler


def check_model_config(mcfg: ToyModelConfig) -> None:
    """Raise ValueError naming the ``model.*`` key when the toy model settings make no working model.

    Checked before the (long) drawing: the components are built and one image goes through the VAE, the text
    encoder and the UNet (a few seconds at the committed size), so a size the architecture cannot take fails here
    and not after the drawing with a traceback from inside diffusers.
    """
    from apdm.toy import draw

    for key in ("vae_channels", "unet_channels"):
        chans = getattr(mcfg, key)
        if not chans or not all(isinstance(c, int) and c >= 1 for c in chans):
            raise ValueError(f"model.{key} must be a non-empty list of whole numbers >= 1, got {chans}")
    for key in ("image_size", "latent_channels", "unet_layers_per_block", "attention_head_dim", "text_hidden",
                "text_layers", "text_heads", "max_text_length"):
        if not (isinstance(getattr(mcfg, key), int) and getattr(mcfg, key) >= 1):
            raise ValueError(f"model.{key} must be a whole number >= 1, got {getattr(mcfg, key)!r}")
    down = 2 ** (len(mcfg.vae_channels) - 1)
    if mcfg.image_size % down:
        raise ValueError(f"model.image_size={mcfg.image_size} must be a multiple of {down} (the VAE halves the size "
                         f"{len(mcfg.vae_channels) - 1} times: one fewer than the {len(mcfg.vae_channels)} "
                         "model.vae_channels levels), or the decoded images come out smaller than the drawings")
    if mcfg.max_text_length < 8:  # BOS + "a photo of sks person" + EOS needs 7
        raise ValueError(f"model.max_text_length={mcfg.max_text_length} cuts even 'a photo of sks person'; "
                         "use at least 8 (the committed model: 40)")
    try:
        vae, text_encoder, tokenizer, unet, _ = build_components(mcfg, draw.vocabulary(), 0)
        with torch.no_grad():
            z = vae.encode(torch.zeros(1, 3, mcfg.image_size, mcfg.image_size)).latent_dist.mean
            from apdm.core import diffusion as D

            unet(z, torch.tensor([1]), encoder_hidden_states=D.encode_prompt(text_encoder, tokenizer, ["a person"]))
    except Exception as e:  # diffusers, transformers or torch say why, in their own words
        raise ValueError(f"the toy model settings (model.*) make no working model: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from e


def check_train_config(tcfg: ToyTrainConfig, name: str = "train") -> None:
    """Raise ValueError naming ``<name>.<key>`` for a pretraining setting out of its range (learning rates > 0,
    weights >= 0, probabilities and decays in [0, 1])."""
    for key in ("vae_lr", "unet_lr", "text_lr"):
        v = getattr(tcfg, key)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name}.{key} must be a number > 0, got {v!r}")
    v = tcfg.vae_kl_weight
    if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
        raise ValueError(f"{name}.vae_kl_weight must be a number >= 0, got {v!r}")
    if not (isinstance(tcfg.warmup, int) and tcfg.warmup >= 0):
        raise ValueError(f"{name}.warmup must be a whole number >= 0, got {tcfg.warmup!r}")
    if not (isinstance(tcfg.caption_dropout, (int, float)) and 0 <= tcfg.caption_dropout <= 1):
        raise ValueError(f"{name}.caption_dropout is a probability in [0, 1], got {tcfg.caption_dropout!r}")
    if not (isinstance(tcfg.ema_decay, (int, float)) and 0 <= tcfg.ema_decay < 1):
        raise ValueError(f"{name}.ema_decay must be in [0, 1) (1 would keep the random initial UNet), "
                         f"got {tcfg.ema_decay!r}")


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))) * 0.9 + 0.1
    return f


def _optimizer_step(loss: torch.Tensor, opt, sched, params) -> float:
    """One training step of the toy recipes: backward, gradient norm clipped to 1, optimizer and schedule step.
    Returns the loss as a float."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    return loss.item()


def train_vae(vae, images: torch.Tensor, tcfg: ToyTrainConfig, steps: int | None = None) -> list[float]:
    """Train the VAE on images (N,3,H,W) in [0,1]; sets ``scaling_factor``; returns the loss history."""
    steps = tcfg.vae_steps if steps is None else steps
    g = torch.Generator().manual_seed(tcfg.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=tcfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(min(50, steps // 10 + 1), steps))
    vae.train().requires_grad_(True)
    history = []
    bar = progress(range(steps), desc="toy: training VAE")
    for i in bar:
        x = images[torch.randint(len(images), (tcfg.vae_batch,), generator=g)] * 2 - 1
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample(generator=g)).sample
        kl = dist.kl().mean() / x[0].numel()
        loss = (recon - x).abs().mean() + F.mse_loss(recon, x) + tcfg.vae_kl_weight * kl * x[0].numel()
        history.append(_optimizer_step(loss, opt, sched, vae.parameters()))
        if i % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        sample = images[torch.randperm(len(images), generator=g)[:512]] * 2 - 1
        std = torch.cat([vae.encode(b).latent_dist.mean for b in sample.split(64)]).std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    LOG.info("VAE trained: final loss %.4f, latent std %.3f -> scaling_factor %.3f", history[-1], std, 1 / std)
    return history


@torch.no_grad()
def encode_dataset(vae, images: torch.Tensor, batch: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image, already multiplied by ``scaling_factor``: 2 x (N,C,h,w)."""
    means, stds = [], []
    s = vae.config.scaling_factor
    for b in progress(images.split(batch), desc="toy: encoding dataset"):
        d = vae.encode(b * 2 - 1).latent_dist
        means.append(d.mean * s)
        stds.append(d.std * s)
    return torch.cat(means), torch.cat(stds)


def _save_train_state(path: Path, modules: dict, opt, sched, g: torch.Generator, step: int, history: list,
                      settings: dict | None = None) -> None:
    """Checkpoint of a training stage: module/optimizer tensors as safetensors, the rest as JSON (atomic).
    ``settings``: what the training ran with, kept in ``state.json`` (:func:`train_state_settings`) so that a
    resume can tell whether the checkpoint belongs to its settings."""
    import json

    from safetensors.torch import save_file

    from apdm.utils import atomic_dir

    tensors = {f"{k}/{n}": t.detach().contiguous() for k, m in modules.items() for n, t in m.state_dict().items()}
    osd = opt.state_dict()
    for idx, st in osd["state"].items():
        for k, v in st.items():
            tensors[f"opt/{idx}/{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    tensors["rng"] = g.get_state()
    with atomic_dir(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, "history": history,
                                                    "param_groups": osd["param_groups"],
                                                    "sched": sched.state_dict(), "settings": settings}))


def train_state_settings(path: Path) -> dict | None:
    """The ``settings`` a checkpoint of :func:`_save_train_state` was saved with (None: it records none)."""
    import json

    try:
        return json.loads((Path(path) / "state.json").read_text()).get("settings")
    except (OSError, ValueError, AttributeError) as exc:
        raise ValueError(f"{Path(path) / 'state.json'}: unreadable training checkpoint ({exc}); delete {path} to "
                         "start over") from None


def _load_train_state(path: Path, modules: dict, opt, sched, g: torch.Generator) -> tuple[int, list]:
    import json

    from safetensors.torch import load_file

    meta = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "state.safetensors"))
    for k, m in modules.items():
        m.load_state_dict({n[len(k) + 1:]: t for n, t in tensors.items() if n.startswith(f"{k}/")})
    state: dict = {}
    for key, t in tensors.items():
        if key.startswith("opt/"):
            _, idx, name = key.split("/")
            state.setdefault(int(idx), {})[name] = t
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    sched.load_state_dict(meta["sched"])
    g.set_state(tensors["rng"])
    return int(meta["step"]), list(meta["history"])


def train_diffusion(unet, text_encoder, tokenizer, scheduler, latent_mean: torch.Tensor, latent_std: torch.Tensor,
                    captions: list[list[str]], tcfg: ToyTrainConfig, steps: int | None = None,
                    checkpoint_dir: str | Path | None = None, checkpoint_every: int = 250):
    """Train UNet + text encoder jointly; returns (ema_unet, history).

    Args:
        latent_mean, latent_std: (N,C,h,w) scaled posterior parameters from :func:`encode_dataset`.
        captions: for each image, a list of caption variants (one is drawn per step).
        checkpoint_dir: if given, a resumable checkpoint is written there every ``checkpoint_every`` steps and
            training resumes from it when it exists (a killed build continues where it stopped).
    """
    from apdm.core import diffusion as D

    steps = tcfg.unet_steps if steps is None else steps
    g = torch.Generator().manual_seed(tcfg.seed + 1)
    unet.train().requires_grad_(True)
    text_encoder.train().requires_grad_(True)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW([
        {"params": unet.parameters(), "lr": tcfg.unet_lr},
        {"params": text_encoder.parameters(), "lr": tcfg.text_lr},
    ], weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(tcfg.warmup, steps))
    history: list[float] = []
    start = 0
    modules = {"unet": unet, "ema": ema, "text_encoder": text_encoder}
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    if ckpt is not None and (ckpt / "state.json").is_file():
        start, history = _load_train_state(ckpt, modules, opt, sched, g)
        LOG.info("resuming UNet training at step %d/%d from %s", start, steps, ckpt)
    bar = progress(range(start, steps), desc="toy: training UNet + text encoder", total=steps - start)
    for i in bar:
        idx = torch.randint(len(latent_mean), (tcfg.unet_batch,), generator=g)
        latents = latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=g)
        drop = torch.rand(len(idx), generator=g) < tcfg.caption_dropout
        texts = []
        for j, k in enumerate(idx.tolist()):
            options = captions[k]
            texts.append("" if drop[j] else options[int(torch.randint(len(options), (1,), generator=g))])
        cond = D.encode_prompt(text_encoder, tokenizer, texts)
        loss = D.noise_prediction_loss(unet, scheduler, latents, cond, generator=g)
        history.append(_optimizer_step(loss, opt, sched, list(unet.parameters()) + list(text_encoder.parameters())))
        decay = min(tcfg.ema_decay, (1 + i) / (10 + i))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        if i % 20 == 0:
            bar.set_postfix(loss=f"{sum(history[-20:]) / len(history[-20:]):.4f}")
        if ckpt is not None and (i + 1) % checkpoint_every == 0 and i + 1 < steps:
            _save_train_state(ckpt, modules, opt, sched, g, i + 1, history)
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    return ema, history


def save_toy_model(vae, text_encoder, tokenizer, unet, scheduler, out_dir: str | Path, fp16: bool = True,
                   extra_json: dict[str, dict] | None = None) -> Path:
    """Save as a diffusers folder (safetensors; fp16 weights when ``fp16`` to keep the committed copy small).
    ``extra_json``: file name -> object, written into the folder as JSON in the same atomic step."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from apdm.core.models import save_slow_vocabulary
    from apdm.utils import atomic_dir

    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae), text_encoder=copy.deepcopy(text_encoder), tokenizer=tokenizer,
        unet=copy.deepcopy(unet), scheduler=DDIMScheduler.from_config(scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    if fp16:
        pipe.to(torch.float16)
    with atomic_dir(out_dir) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        save_slow_vocabulary(tokenizer, tmp / "tokenizer")  # so transformers 4 reads it too
        for cfg_file in tmp.glob("*/config.json"):  # a model continued from a stage-1 folder records its path
            cfg = json.loads(cfg_file.read_text())
            if cfg.pop("_name_or_path", None) is not None:
                cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
    return Path(out_dir)


def check_init_from(path: str | Path) -> Path:
    """``init_from`` as a Path; raises FileNotFoundError naming it when it is no diffusers model folder."""
    path = Path(path).expanduser()
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"init_from: {path} is not a diffusers model folder (no model_index.json)")
    return path


def _load_stage(path: str | Path, mcfg: ToyModelConfig):
    """(vae, text_encoder, unet) of an existing toy model folder, in float32, checked against ``mcfg``.
    Safetensors weights only (a pickled ``*.bin`` is refused, never unpickled)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    path = check_init_from(path)
    parts = []
    for name, cls in (("vae", AutoencoderKL), ("text_encoder", CLIPTextModel), ("unet", UNet2DConditionModel)):
        try:
            parts.append(cls.from_pretrained(str(path / name), torch_dtype=torch.float32, use_safetensors=True))
        except (OSError, ValueError) as exc:  # missing folder or no safetensors weights (e.g. only a pickle)
            raise FileNotFoundError(f"init_from: {path / name} holds no loadable safetensors weights "
                                    f"(pickled weights are never loaded): {exc}") from None
    vae, text_encoder, unet = parts
    if list(unet.config.block_out_channels) != list(mcfg.unet_channels):
        raise ValueError(f"init_from: {path} has UNet channels {list(unet.config.block_out_channels)}, the recipe "
                         f"says {list(mcfg.unet_channels)}")
    return vae.eval().requires_grad_(False), text_encoder, unet


def work_dir(out_dir: str | Path) -> Path:
    """Where :func:`pretrain` keeps a stage's resumable outputs (trained VAE, UNet checkpoint) until it is done."""
    return Path(out_dir).with_name(Path(out_dir).name + ".build")


#: written into a build's model folder together with the model (one atomic step), removed once
#: ``build_state.json`` records the stage: a build killed in between finds the finished stage there
STAGE_MARKER = "build_stage.json"


def pretrain(out_dir: str | Path, mcfg: ToyModelConfig, tcfg: ToyTrainConfig, fp16: bool = True,
             stage_record: dict | None = None) -> dict:
    """Draw the dataset, train VAE then UNet + text encoder, save the model. Returns a report dict.

    Args:
        stage_record: if given, saved with the model as ``<out_dir>/build_stage.json`` (:data:`STAGE_MARKER`),
            with the report added under ``"report"``, in the same atomic step as the model.
    """
    from apdm.toy import draw
    from apdm.toy.world import pretraining_set
    from apdm.utils import atomic_dir

    if tcfg.init_from:  # before the (long) drawing
        check_init_from(tcfg.init_from)
    t0 = time.perf_counter()
    images, captions = pretraining_set(tcfg.num_identities, tcfg.images_per_identity, tcfg.seed, mcfg.image_size)
    t_draw = time.perf_counter() - t0
    LOG.info("drew %d pretraining images in %.1fs", len(images), t_draw)
    vae, text_encoder, tokenizer, unet, scheduler = build_components(mcfg, draw.vocabulary(), tcfg.seed)
    work = work_dir(out_dir)
    t1 = time.perf_counter()
    if tcfg.init_from:
        vae, text_encoder, unet = _load_stage(tcfg.init_from, mcfg)
        vae_hist = []
        LOG.info("continuing from %s: VAE kept, %d more UNet steps", tcfg.init_from, tcfg.unet_steps)
    elif (work / "vae" / "config.json").is_file() and (work / "vae" / "diffusion_pytorch_model.safetensors").is_file():
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(str(work / "vae"), use_safetensors=True).eval().requires_grad_(False)
        vae_hist = []
        LOG.info("reusing the VAE trained earlier (%s)", work / "vae")
    else:
        vae_hist = train_vae(vae, images, tcfg)
        with atomic_dir(work / "vae") as tmp:  # whole or not at all: a kill mid-save leaves no half a VAE
            vae.save_pretrained(str(tmp), safe_serialization=True)
    t_vae = time.perf_counter() - t1
    mean, std = encode_dataset(vae, images)
    t2 = time.perf_counter()
    ema, unet_hist = train_diffusion(unet, text_encoder, tokenizer, scheduler, mean, std, captions, tcfg,
                                     checkpoint_dir=work / "unet_checkpoint")
    t_unet = time.perf_counter() - t2
    report = {
        "num_images": len(images), "seconds_draw": round(t_draw, 1), "seconds_vae": round(t_vae, 1),
        "seconds_unet": round(t_unet, 1),
        "vae_loss_final": sum(vae_hist[-50:]) / len(vae_hist[-50:]) if vae_hist else None,  # None: VAE reused
        "unet_loss_final": sum(unet_hist[-100:]) / len(unet_hist[-100:]),
        "params_unet": sum(p.numel() for p in unet.parameters()),
        "params_vae": sum(p.numel() for p in vae.parameters()),
        "params_text_encoder": sum(p.numel() for p in text_encoder.parameters()),
    }
    extra = None if stage_record is None else {STAGE_MARKER: {**stage_record, "report": report}}
    save_toy_model(vae, text_encoder, tokenizer, ema, scheduler, out_dir, fp16=fp16, extra_json=extra)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return report
