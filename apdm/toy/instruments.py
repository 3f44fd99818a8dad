"""Measuring instruments of the toy world: identity encoder, subject detector, FID/KID feature extractor.

They stand in for the face-recognition (ISM), face-detection (FDFR / SDS) and Inception (FID / KID) networks
of real evaluations, and are trained on the generator's ground truth (:mod:`apdm.toy.draw`) on identities
**outside the world's held-out split** (:func:`training_identities`), so held-out subjects are as new to them
as to the toy diffusion model. Training takes ~6 min on one busy CPU core (``num_threads=1``; on a shared
2-core machine two threads can be several times slower).

* :class:`IdentityEncoder` — image -> L2-normalised embedding ``(N, D)`` plus one classification head per
  attribute. Trained with attribute cross-entropy + a supervised-contrastive identity loss (batches of P
  identities x K photos), with blur / noise / VAE-like softening augmentation, so cosine similarity has a
  wide range (same identity ~0.9, different identities ~0) and tolerates generated-image softness.
  Scores: :func:`identity_similarity` (ISM analog, ``ism@toy-id``) and :func:`attribute_match`
  (``attr_match@toy-attr``).
* :class:`SubjectDetector` — image -> logits over ``("none", *classes)``; :func:`detector_scores` gives
  ``P(valid subject of class c)``. Failure rate at 0.5 = FDFR analog (``fdfr@toy-det``), mean score = SDS
  analog (``sds@toy-det``). Negatives: :func:`apdm.toy.draw.render_negatives` and the other class.
* :class:`FeatureExtractor` — ``(N, 3, H, W)`` -> ``(N, F)``: the encoder's penultimate features (identity /
  attributes) concatenated with the detector's (well-formedness); no extra training. Works as
  ``torchmetrics`` ``FrechetInceptionDistance(feature=fx)`` / ``KernelInceptionDistance(feature=fx)``:
  torchmetrics passes the images it is given **unchanged** to a custom module (its ``normalize`` flag only
  converts for the built-in Inception), so give it float ``[0, 1]`` images; the module also accepts uint8
  ``[0, 255]`` (divided by 255). It exposes ``num_features`` and stays in eval mode.

All modules accept float ``(N, 3, H, W)`` in ``[0, 1]`` (any H, W: resized to 64) or uint8 ``[0, 255]``.
Weights are safetensors (never pickles) plus ``instruments.json`` (architecture, attribute lists, training
report); :func:`train_instruments` writes them, :func:`load_instruments` reads them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from apdm.toy import draw as D
from apdm.utils import LOG, atomic_dir, atomic_write_json, progress

IMAGE_SIZE = 64
CONFIG_NAME = "instruments.json"
ENCODER_FILE = "encoder.safetensors"
DETECTOR_FILE = "detector.safetensors"
FORMAT_VERSION = 1

#: implementation tags for metric names ("name@impl")
IMPL_ID = "toy-id"
IMPL_ATTR = "toy-attr"
IMPL_DET = "toy-det"
IMPL_FEATURES = "toy-features"

DEFAULT_ENCODER = {"widths": [32, 64, 96, 96], "hidden": 128, "embed_dim": 64}
DEFAULT_DETECTOR = {"widths": [16, 32, 64, 64], "hidden": 64}


# ------------------------------------------------------------------------------------------ modules
def _prepare(x: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """uint8 [0,255] or float [0,1] (N,3,H,W) -> float32 (N,3,size,size) in [0,1]."""
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    else:
        x = x.float()
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=max(x.shape[-2:]) > size)  # a tall photo shrinks too (was: width only)
    return x


def _conv(cin: int, cout: int, stride: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class _Trunk(nn.Module):
    """Conv stack on 64x64 input: four stride-2 convs (64->32->16->8->4; the first 5x5, the rest 3x3, any
    further ones stride 1), flattened to ``(N, widths[-1] * 16)``.

    Flattening the 4x4 map (instead of global pooling) keeps where things are (eyes vs mouth vs hair), which
    the attribute heads need; shift nuisance is at most a fraction of one cell.
    """

    def __init__(self, widths: Sequence[int]):
        super().__init__()
        strides = ([2, 2, 2, 2] + [1] * len(widths))[: len(widths)]
        layers, cin = [], 3
        for i, (w, s) in enumerate(zip(widths, strides)):
            layers.append(_conv(cin, w, s, 5 if i == 0 else 3))
            cin = w
        self.body = nn.Sequential(*layers)
        side = IMAGE_SIZE // math.prod(strides)
        self.out_dim = cin * side * side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (_prepare(x) - 0.5) / 0.25
        return self.body(x).flatten(1)


class IdentityEncoder(nn.Module):
    """Identity embedding + attribute heads.

    ``forward(images)``: images ``(N, 3, H, W)`` float ``[0, 1]`` (or uint8) -> L2-normalised embedding
    ``(N, embed_dim)`` float32.
    """

    def __init__(self, attributes: dict[str, dict[str, list[str]]], widths=DEFAULT_ENCODER["widths"],
                 hidden: int = DEFAULT_ENCODER["hidden"], embed_dim: int = DEFAULT_ENCODER["embed_dim"]):
        super().__init__()
        self.attributes = {c: {k: list(v) for k, v in a.items()} for c, a in attributes.items()}
        self.classes = list(self.attributes)
        self.trunk = _Trunk(widths)
        self.fc = nn.Sequential(nn.Linear(self.trunk.out_dim, hidden), nn.ReLU(inplace=True))
        self.embed = nn.Linear(hidden, embed_dim)
        self.class_head = nn.Linear(hidden, len(self.classes))
        self.heads = nn.ModuleDict({f"{c}__{k}": nn.Linear(hidden, len(v))
                                    for c, a in self.attributes.items() for k, v in a.items()})
        self.hidden = hidden

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(N, hidden)`` (non-negative)."""
        return self.fc(self.trunk(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embed(self.features(x)), dim=-1)

    def all_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"embedding": (N,D), "class": (N,C) logits, "<cls>__<attr>": (N,V) logits}``."""
        h = self.features(x)
        out = {"embedding": F.normalize(self.embed(h), dim=-1), "class": self.class_head(h)}
        out.update({k: head(h) for k, head in self.heads.items()})
        return out


class SubjectDetector(nn.Module):
    """``forward(images)`` -> logits ``(N, 1 + len(classes))`` over ``("none", *classes)``."""

    def __init__(self, classes: Sequence[str], widths=DEFAULT_DETECTOR["widths"],
                 hidden: int = DEFAULT_DETECTOR["hidden"]):
        super().__init__()
        self.classes = list(classes)
        self.trunk = _Trunk(widths)
        self.fc = nn.Sequential(nn.Linear(self.trunk.out_dim, hidden), nn.ReLU(inplace=True))
        self.head = nn.Linear(hidden, 1 + len(self.classes))
        self.hidden = hidden

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(N, hidden)``."""
        return self.fc(self.trunk(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class FeatureExtractor(nn.Module):
    """FID/KID features of the toy world: ``[encoder.features / s_enc, detector.features / s_det]``.

    ``forward(images)``: ``(N, 3, H, W)`` float ``[0, 1]`` or uint8 ``[0, 255]`` -> float32
    ``(N, num_features)``. Always in eval mode (``train()`` is a no-op), no gradients.

    ``scale = (s_enc, s_det)`` are the root-mean-square feature values on drawn subjects, fixed at training
    time (``instruments.json`` ``feature_scale``), so both parts weigh alike and features are O(1) like
    standardised data (KID's polynomial kernel is sensitive to the feature scale).
    """

    def __init__(self, encoder: IdentityEncoder, detector: SubjectDetector,
                 scale: Sequence[float] = (1.0, 1.0)):
        super().__init__()
        self.encoder = encoder
        self.detector = detector
        self.num_features = encoder.hidden + detector.hidden
        self.scale = (float(scale[0]), float(scale[1]))
        super().train(False)

    def train(self, mode: bool = True):  # frozen feature network, like torchmetrics' Inception
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _prepare(x.to(next(self.encoder.parameters()).device))
        return torch.cat([self.encoder.features(x) / self.scale[0], self.detector.features(x) / self.scale[1]],
                         dim=1)


def feature_scale(encoder: IdentityEncoder, detector: SubjectDetector, classes: Sequence[str] = D.CLASSES,
                  seed: int = 0, n: int = 256) -> list[float]:
    """RMS of encoder and detector penultimate features on ``n`` drawn subjects per class (training ids)."""
    x = torch.cat([_u8_to_tensor(D.render_dataset(c, training_identities(c, n, seed + 5), 1, seed=seed + 77)[0])
                   for c in classes])
    fe = _batched(encoder, x, fn=encoder.features)
    fd = _batched(detector, x, fn=detector.features)
    return [round(float(fe.pow(2).mean().sqrt()), 6), round(float(fd.pow(2).mean().sqrt()), 6)]


@dataclass
class Instruments:
    """The three toy-world instruments and their config (see :func:`load_instruments`)."""

    encoder: IdentityEncoder
    detector: SubjectDetector
    features: FeatureExtractor
    config: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ scoring
def _batched(module: nn.Module, images: torch.Tensor, batch_size: int = 256, fn=None) -> torch.Tensor:
    """``fn`` (default ``module``) over ``images`` in batches, in eval mode, on the module's device; the result
    is on the images' device."""
    was = module.training
    module.eval()
    fn = fn or module
    device = next(module.parameters()).device
    try:
        with torch.no_grad():
            outs = [fn(images[i:i + batch_size].to(device)).to(images.device)
                    for i in range(0, images.shape[0], batch_size)]
    finally:
        module.train(was)
    return torch.cat(outs) if outs else torch.empty(0)


def embed(encoder: IdentityEncoder, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Embeddings ``(N, D)`` float32 of images ``(N, 3, H, W)`` in ``[0, 1]``."""
    return _batched(encoder, images, batch_size)


def identity_similarity(encoder: IdentityEncoder, generated: torch.Tensor, references: torch.Tensor,
                        batch_size: int = 256) -> torch.Tensor:
    """ISM analog (``ism@toy-id``): cosine of each generated embedding with the mean reference embedding.

    Args:
        encoder: trained :class:`IdentityEncoder`.
        generated: ``(N, 3, H, W)`` float32 in ``[0, 1]``.
        references: ``(M, 3, H, W)`` float32 in ``[0, 1]``, photos of the subject.

    Returns:
        ``(N,)`` float32 cosines in ``[-1, 1]``.
    """
    g = embed(encoder, generated, batch_size)
    r = embed(encoder, references, batch_size).mean(dim=0, keepdim=True)
    return F.cosine_similarity(g, r, dim=1)


def predict_attributes(encoder: IdentityEncoder, images: torch.Tensor, cls: str,
                       batch_size: int = 256) -> list[dict]:
    """Predicted attribute dict (with ``"class": cls``) for each image ``(N, 3, H, W)`` in ``[0, 1]``."""
    names = list(encoder.attributes[cls])
    idx = _batched(encoder, images, batch_size, fn=lambda x: torch.stack(
        [encoder.heads[f"{cls}__{k}"](encoder.features(x)).argmax(1) for k in names], dim=1))
    return [{"class": cls, **{k: encoder.attributes[cls][k][int(v)] for k, v in zip(names, row)}}
            for row in idx.tolist()]


def attribute_match(encoder: IdentityEncoder, images: torch.Tensor, identity: dict,
                    batch_size: int = 256) -> torch.Tensor:
    """Interpretable ISM analog (``attr_match@toy-attr``): fraction of predicted attributes equal to the subject's.

    Args:
        encoder: trained :class:`IdentityEncoder`.
        images: ``(N, 3, H, W)`` float32 in ``[0, 1]``.
        identity: the subject's identity dict (:func:`apdm.toy.draw.identity_from_index`).

    Returns:
        ``(N,)`` float32 in ``[0, 1]``; chance level is ``mean(1 / n_values)`` (0.26 for persons, 0.34 for dogs).
    """
    cls = identity["class"]
    names = list(encoder.attributes[cls])
    target = torch.tensor([encoder.attributes[cls][k].index(identity[k]) for k in names])
    pred = _batched(encoder, images, batch_size, fn=lambda x: torch.stack(
        [encoder.heads[f"{cls}__{k}"](encoder.features(x)).argmax(1) for k in names], dim=1))
    return (pred == target).float().mean(dim=1)


def detector_scores(detector: SubjectDetector, images: torch.Tensor, cls: str = "person",
                    batch_size: int = 256) -> torch.Tensor:
    """``P(valid subject of class cls)`` for each image.

    Args:
        detector: trained :class:`SubjectDetector`.
        images: ``(N, 3, H, W)`` float32 in ``[0, 1]``.
        cls: class name.

    Returns:
        ``(N,)`` float32 in ``[0, 1]``. ``(scores < 0.5).float().mean()`` is the FDFR analog
        (``fdfr@toy-det``), ``scores.mean()`` the SDS analog (``sds@toy-det``).
    """
    k = 1 + detector.classes.index(cls)
    return _batched(detector, images, batch_size, fn=lambda x: detector(x).softmax(dim=1)[:, k])


# ------------------------------------------------------------------------------------------ augmentation
def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return x
    r = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    C = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(C, 1, 1, 1), groups=C)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(C, 1, 1, 1), groups=C)


def degrade(x: torch.Tensor, sigma: float = 1.0, noise: float = 0.03, seed: int = 0) -> torch.Tensor:
    """Mild degradation used to test robustness: Gaussian blur ``sigma`` px + Gaussian noise (std ``noise``)."""
    g = torch.Generator().manual_seed(seed)
    return (_gaussian_blur(x, sigma) + noise * torch.randn(x.shape, generator=g)).clamp(0, 1)


def _augment(x: torch.Tensor, g: torch.Generator, max_blur: float = 1.2) -> torch.Tensor:
    """Training augmentation for (N,3,64,64) [0,1]: flip, small affine, colour jitter, blur, softening, noise."""
    N = x.shape[0]
    flip = torch.rand(N, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    ang = (torch.rand(N, generator=g) - 0.5) * math.radians(10)
    sc = 1.0 + (torch.rand(N, generator=g) - 0.5) * 0.1
    tr = (torch.rand(N, 2, generator=g) - 0.5) * 0.1
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin, tr[:, 0]], 1), torch.stack([sin, cos, tr[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    bright = 1.0 + (torch.rand(N, 1, 1, 1, generator=g) - 0.5) * 0.2
    contrast = 1.0 + (torch.rand(N, 1, 1, 1, generator=g) - 0.5) * 0.2
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean * bright
    # blur in groups (one sigma per quarter of the batch) and VAE-like 2x softening
    perm = torch.randperm(N, generator=g)
    q = max(1, N // 4)
    for gi, sigma in enumerate([0.0, 0.4 * max_blur, 0.7 * max_blur, max_blur]):
        sel = perm[gi * q:(gi + 1) * q] if gi < 3 else perm[3 * q:]
        if sigma > 0 and sel.numel():
            x[sel] = _gaussian_blur(x[sel], sigma)
    soft = torch.rand(N, generator=g) < 0.2
    if soft.any():
        xs = x[soft]
        x[soft] = F.interpolate(F.avg_pool2d(xs, 2), scale_factor=2, mode="bilinear", align_corners=False)
    noise_std = torch.rand(N, 1, 1, 1, generator=g) * 0.04 * (torch.rand(N, 1, 1, 1, generator=g) < 0.6)
    x = x + noise_std * torch.randn(x.shape, generator=g)
    return x.clamp(0, 1)


# ------------------------------------------------------------------------------------------ metrics helpers
def roc_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC of scores ``pos`` (label 1) vs ``neg`` (label 0) = Mann-Whitney U / (n_pos n_neg), ties halved."""
    from scipy.stats import rankdata

    pos, neg = np.asarray(pos, np.float64).ravel(), np.asarray(neg, np.float64).ravel()
    ranks = rankdata(np.concatenate([pos, neg]))
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def _supcon(z: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, "L_out") of normalised embeddings ``z`` (N,D)."""
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool)
    sim = (z @ z.T / tau).masked_fill(eye, -1e9)
    logprob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    has = pos.any(1)
    loss = -(logprob * pos).sum(1) / pos.sum(1).clamp(min=1)
    return loss[has].mean()


def _u8_to_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float().div_(255.0)


# ------------------------------------------------------------------------------------------ training
_FULL = {
    "encoder": {"ids": {"person": 4800, "dog": 2400}, "photos": 2, "epochs": 7, "ids_per_batch": 32,
                "lr": 3e-3, "tau": 0.1, "supcon_weight": 0.5},
    "detector": {"per_class": 3000, "negatives": 6000, "epochs": 8, "batch": 128, "lr": 3e-3},
    "eval": {"ids": 200, "photos": 4, "det_ids": 400, "negatives": 1000},
}
_QUICK = {
    "encoder": {"ids": {"person": 240, "dog": 120}, "photos": 2, "epochs": 10, "ids_per_batch": 32,
                "lr": 4e-3, "tau": 0.1, "supcon_weight": 0.5},
    "detector": {"per_class": 200, "negatives": 300, "epochs": 6, "batch": 64, "lr": 4e-3},
    "eval": {"ids": 40, "photos": 3, "det_ids": 100, "negatives": 200},
}


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """Temporarily set torch's intra-op threads (``None``: leave as is)."""
    if not n:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _world_split(world_size: int, heldout_fraction: float, split_seed: int) -> dict[str, list[int]]:
    return D.split(world_size, heldout_fraction, split_seed)


def training_identities(cls: str, n: int, seed: int = 0, world_size: int = D.WORLD_SIZE,
                        heldout_fraction: float = D.HELDOUT_FRACTION, split_seed: int = D.SPLIT_SEED) -> list[int]:
    """``n`` identity indices of ``cls`` for training instruments: random, never a held-out identity.

    They are drawn from every identity of the class except the world's held-out ones (so they include
    pretraining identities and identities beyond the world). Many distinct identities with few photos each
    keep the attribute heads from memorising identities instead of learning the attributes.
    """
    held = np.asarray(_world_split(world_size, heldout_fraction, split_seed)["heldout"], np.int64)
    perm = np.random.default_rng([seed, 31, D.CLASSES.index(cls)]).permutation(D.num_identities(cls))
    pool = perm[~np.isin(perm, held)]
    if n > pool.size:
        raise ValueError(f"asked for {n} training identities of '{cls}', only {pool.size} are not held out")
    return [int(i) for i in pool[:n]]


def train_identity_encoder(classes: Sequence[str] = D.CLASSES, ids: dict[str, int] | None = None,
                           photos: int = 2, epochs: int = 7, ids_per_batch: int = 32, lr: float = 3e-3,
                           tau: float = 0.1, supcon_weight: float = 0.5, seed: int = 0,
                           world_size: int = D.WORLD_SIZE, heldout_fraction: float = D.HELDOUT_FRACTION,
                           split_seed: int = D.SPLIT_SEED, arch: dict | None = None,
                           quiet: bool = False) -> tuple[IdentityEncoder, dict]:
    """Train an :class:`IdentityEncoder` on non-held-out identities of ``classes``.

    Args:
        classes: toy classes to cover.
        ids: identities per class (:func:`training_identities`: never held-out ones).
        photos: photos per identity (K of the P x K batches).
        epochs, ids_per_batch, lr: optimisation (AdamW, one-cycle schedule).
        tau, supcon_weight: temperature and weight of the supervised-contrastive identity loss.
        seed: data and init seed.
        world_size, heldout_fraction, split_seed: the world split (held-out identities are never used).
        arch: ``{"widths", "hidden", "embed_dim"}`` overrides of :data:`DEFAULT_ENCODER`.
        quiet: hide the progress bar.

    Returns:
        ``(encoder, info)`` with ``info = {"train_images", "train_seconds", "final_loss"}``.
    """
    t0 = time.time()
    torch.manual_seed(seed)
    ids = ids or _FULL["encoder"]["ids"]
    arch = {**DEFAULT_ENCODER, **(arch or {})}
    enc = IdentityEncoder({c: D.ATTRIBUTES[c] for c in classes}, **arch)
    xs, id_labels, attr_labels, cls_labels = [], [], [], []
    heads = list(enc.heads)
    offset = 0
    for ci, cls in enumerate(classes):
        chosen = training_identities(cls, ids[cls], seed, world_size, heldout_fraction, split_seed)
        imgs, iid, _ = D.render_dataset(cls, chosen, photos, seed=seed * 7919 + 11, detail="class")
        xs.append(imgs)
        remap = {v: k for k, v in enumerate(chosen)}
        id_labels.append(np.array([remap[int(i)] + offset for i in iid]))
        offset += len(chosen)
        lab = np.full((len(iid), len(heads)), -100, np.int64)
        for j, idx in enumerate(chosen):
            ident = D.identity_from_index(cls, idx)
            row = [D.ATTRIBUTES[cls][h.split("__")[1]].index(ident[h.split("__")[1]])
                   if h.startswith(cls + "__") else -100 for h in heads]
            lab[j * photos:(j + 1) * photos] = row
        attr_labels.append(lab)
        cls_labels.append(np.full(len(iid), ci))
    X = _u8_to_tensor(np.concatenate(xs))
    Y_id = torch.from_numpy(np.concatenate(id_labels))
    Y_attr = torch.from_numpy(np.concatenate(attr_labels))
    Y_cls = torch.from_numpy(np.concatenate(cls_labels))
    n_ids = int(Y_id.max()) + 1
    # P x K batches: all photos of ids_per_batch identities
    sorted_idx = torch.argsort(Y_id, stable=True)
    by_id = list(torch.split(sorted_idx, torch.bincount(Y_id, minlength=n_ids).tolist()))
    steps_per_epoch = math.ceil(n_ids / ids_per_batch)
    opt = torch.optim.AdamW(enc.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                pct_start=0.15)
    g = torch.Generator().manual_seed(seed + 1)
    enc.train()
    bar = progress(total=epochs * steps_per_epoch, desc="toy identity encoder",
                   **({"disable": True} if quiet else {}))
    loss_hist = []
    for _epoch in range(epochs):
        order = torch.randperm(n_ids, generator=g)
        for s in range(steps_per_epoch):
            chosen = order[s * ids_per_batch:(s + 1) * ids_per_batch]
            idx = torch.cat([by_id[int(i)] for i in chosen])
            x = _augment(X[idx], g)
            out = enc.all_outputs(x)
            ya = Y_attr[idx]
            l_attr = sum(F.cross_entropy(out[h], ya[:, k], ignore_index=-100)
                         for k, h in enumerate(heads) if (ya[:, k] >= 0).any()) / max(1, len(heads) / len(classes))
            l_cls = F.cross_entropy(out["class"], Y_cls[idx])
            l_con = _supcon(out["embedding"], Y_id[idx], tau)
            loss = l_attr + 0.2 * l_cls + supcon_weight * l_con
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_hist.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(loss_hist[-20:]):.3f}", attr=f"{l_attr.item():.3f}",
                            con=f"{l_con.item():.3f}")
    bar.close()
    enc.eval()
    return enc, {"train_images": int(X.shape[0]), "train_seconds": round(time.time() - t0, 1),
                 "first_loss": round(float(np.mean(loss_hist[:10])), 4),
                 "final_loss": round(float(np.mean(loss_hist[-20:])), 4)}


def _detector_data(classes: Sequence[str], identity_lists: dict[str, list[int]], photos: int, negatives: int,
                   seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    xs, ys, kinds = [], [], []
    for ci, cls in enumerate(classes):
        imgs, _, _ = D.render_dataset(cls, identity_lists[cls], photos, seed=seed, detail="class")
        xs.append(imgs)
        ys.append(np.full(len(imgs), 1 + ci))
        kinds += [cls] * len(imgs)
    neg, nk = D.render_negatives(negatives, seed=seed)
    xs.append(neg)
    ys.append(np.zeros(len(neg), np.int64))
    kinds += nk
    return _u8_to_tensor(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)).long(), kinds


def train_detector(classes: Sequence[str] = D.CLASSES, per_class: int = 3000, negatives: int = 4500,
                   epochs: int = 6, batch: int = 128, lr: float = 3e-3, seed: int = 0,
                   world_size: int = D.WORLD_SIZE, heldout_fraction: float = D.HELDOUT_FRACTION,
                   split_seed: int = D.SPLIT_SEED, arch: dict | None = None, vae=None, vae_fraction: float = 0.5,
                   quiet: bool = False) -> tuple[SubjectDetector, dict]:
    """Train a :class:`SubjectDetector` on pretraining-identity photos vs non-subject images.

    Every generated image passes the model's VAE decoder, so a detector trained only on crisp drawings rejects
    valid subjects for the VAE's softening alone. With ``vae`` given, a ``vae_fraction`` of each batch (positives
    and negatives alike, so the round trip itself is no cue) is replaced by its VAE reconstruction.

    Args:
        classes: toy classes (output order ``("none", *classes)``).
        per_class: positive photos per class (one photo per identity, :func:`training_identities`).
        negatives: non-subject images (:func:`apdm.toy.draw.render_negatives`, all kinds round-robin).
        epochs, batch, lr: optimisation (AdamW, one-cycle).
        seed: data and init seed.
        world_size, heldout_fraction, split_seed: the world split (no held-out identity among the positives; a
            few negatives start from a held-out identity's drawing, docs/toy_world.md says how many).
        arch: ``{"widths", "hidden"}`` overrides of :data:`DEFAULT_DETECTOR`.
        vae: the world's ``AutoencoderKL`` (``None``: no round-trip augmentation).
        vae_fraction: share of each batch taken from the VAE reconstructions.
        quiet: hide the progress bar.

    Returns:
        ``(detector, info)``.
    """
    t0 = time.time()
    torch.manual_seed(seed + 2)
    arch = {**DEFAULT_DETECTOR, **(arch or {})}
    lists = {c: training_identities(c, per_class, seed + 1, world_size, heldout_fraction, split_seed)
             for c in classes}
    X, Y, _ = _detector_data(classes, lists, 1, negatives, seed=seed * 7919 + 23)
    Xr = vae_round_trip(vae, X, quiet=quiet) if vae is not None else None
    det = SubjectDetector(classes, **arch)
    n = X.shape[0]
    steps_per_epoch = math.ceil(n / batch)
    opt = torch.optim.AdamW(det.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                pct_start=0.15)
    g = torch.Generator().manual_seed(seed + 3)
    det.train()
    bar = progress(total=epochs * steps_per_epoch, desc="toy subject detector",
                   **({"disable": True} if quiet else {}))
    loss_hist = []
    for _epoch in range(epochs):
        order = torch.randperm(n, generator=g)
        for s in range(steps_per_epoch):
            idx = order[s * batch:(s + 1) * batch]
            x = X[idx]
            if Xr is not None:
                use = (torch.rand(len(idx), generator=g) < vae_fraction)[:, None, None, None]
                x = torch.where(use, Xr[idx], x)
            x = _augment(x, g, max_blur=1.0)
            loss = F.cross_entropy(det(x), Y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_hist.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(loss_hist[-20:]):.3f}")
    bar.close()
    det.eval()
    return det, {"train_images": int(n), "train_seconds": round(time.time() - t0, 1),
                 "vae_round_trip_fraction": vae_fraction if vae is not None else 0.0,
                 "first_loss": round(float(np.mean(loss_hist[:10])), 4),
                 "final_loss": round(float(np.mean(loss_hist[-20:])), 4)}


def vae_round_trip(vae, images: torch.Tensor, batch_size: int = 256, quiet: bool = True) -> torch.Tensor:
    """``decode(encode(images))`` (posterior mean) of ``(N, 3, H, W)`` float in [0, 1]: same shape and range, on
    the CPU in float32 (the VAE may sit on any device and dtype)."""
    from apdm.core.diffusion import decode_latents, encode_images

    out = []
    p = next(vae.parameters())
    with torch.no_grad():
        for i in progress(range(0, len(images), batch_size), desc="VAE round trip",
                          **({"disable": True} if quiet else {})):
            x = images[i:i + batch_size].to(device=p.device, dtype=p.dtype)
            out.append(decode_latents(vae, encode_images(vae, x)).float().cpu())
    return torch.cat(out)


# ------------------------------------------------------------------------------------------ evaluation
def evaluate_identity_encoder(encoder: IdentityEncoder, cls: str, identity_indices: Sequence[int],
                              photos: int = 4, seed: int = 12345) -> dict:
    """Verification and attribute metrics on (held-out) identities of ``cls``.

    Every pair of photos is a trial (same identity = positive). Also reports the ISM protocol (each photo vs
    the mean embedding of the *other* photos of its identity, and vs the mean of another identity), the
    same under mild degradation (blur 1 px + noise 0.03), attribute accuracies and attribute match.

    Returns:
        dict of floats with ``name@toy-id`` / ``name@toy-attr`` keys.
    """
    imgs, ids, _ = D.render_dataset(cls, identity_indices, photos, seed=seed, detail="class")
    x = _u8_to_tensor(imgs)
    out: dict = {}
    for tag, xx in (("", x), ("_degraded", degrade(x, 1.0, 0.03, seed))):
        z = embed(encoder, xx)
        cos = (z @ z.T).numpy()
        same = ids[:, None] == ids[None, :]
        iu = np.triu_indices(len(ids), k=1)
        s, dmask = cos[iu], same[iu]
        out[f"verification_auc{tag}@{IMPL_ID}"] = roc_auc(s[dmask], s[~dmask])
        out[f"same_cos{tag}@{IMPL_ID}"] = float(s[dmask].mean())
        out[f"diff_cos{tag}@{IMPL_ID}"] = float(s[~dmask].mean())
        # ISM protocol: leave-one-out mean of the subject's other photos vs another identity's photos
        uniq = np.unique(ids)
        ism_same, ism_diff = [], []
        for k, i in enumerate(uniq):
            m = ids == i
            other = ids == uniq[(k + 1) % len(uniq)]
            zo = F.normalize(z[torch.from_numpy(other)].mean(0), dim=0)
            for j in np.nonzero(m)[0]:
                rest = m.copy()
                rest[j] = False
                zr = F.normalize(z[torch.from_numpy(rest)].mean(0), dim=0)
                ism_same.append(float(z[j] @ zr))
                ism_diff.append(float(z[j] @ zo))
        out[f"ism_same{tag}@{IMPL_ID}"] = float(np.mean(ism_same))
        out[f"ism_diff{tag}@{IMPL_ID}"] = float(np.mean(ism_diff))
        out[f"ism_auc{tag}@{IMPL_ID}"] = roc_auc(np.array(ism_same), np.array(ism_diff))
        preds = predict_attributes(encoder, xx, cls)
        truth = [D.identity_from_index(cls, int(i)) for i in ids]
        accs = {k: float(np.mean([p[k] == t[k] for p, t in zip(preds, truth)])) for k in encoder.attributes[cls]}
        out[f"attr_match{tag}@{IMPL_ATTR}"] = float(np.mean(list(accs.values())))
        if not tag:
            out[f"attribute_accuracy@{IMPL_ATTR}"] = {k: round(v, 4) for k, v in accs.items()}
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def evaluate_detector(detector: SubjectDetector, identity_lists: dict[str, list[int]], negatives: int = 1000,
                      seed: int = 12345, vae=None) -> dict:
    """Held-out accuracy of the detector.

    Args:
        detector: trained detector.
        identity_lists: ``{cls: identity indices}`` (one photo each) — use held-out identities.
        negatives: number of non-subject images (all kinds, new seed).
        seed: photo / negative seed.
        vae: the world's ``AutoencoderKL``; adds ``detect_rate_<cls>_vae`` and ``false_accept_<cls>_vae`` on
            VAE round trips of the same images (every generation passes that decoder).

    Returns:
        ``accuracy@toy-det`` (3-way argmax), per class ``detect_rate_<cls>`` (score >= 0.5 on its photos,
        = 1 - FDFR), ``detect_rate_<cls>_degraded``, ``false_accept_<cls>`` (score >= 0.5 on negatives and
        the other class), ``sds_<cls>`` (mean score on its photos), and per negative kind the rejection rate.
    """
    X, Y, kinds = _detector_data(detector.classes, identity_lists, 1, negatives, seed)
    logits = _batched(detector, X)
    prob = logits.softmax(1)
    out: dict = {f"accuracy@{IMPL_DET}": float((logits.argmax(1) == Y).float().mean())}
    Xd = degrade(X, 1.0, 0.03, seed)
    prob_d = _batched(detector, Xd).softmax(1)
    prob_v = _batched(detector, vae_round_trip(vae, X)).softmax(1) if vae is not None else None
    for ci, cls in enumerate(detector.classes):
        pos = Y == 1 + ci
        out[f"detect_rate_{cls}@{IMPL_DET}"] = float((prob[pos, 1 + ci] >= 0.5).float().mean())
        out[f"detect_rate_{cls}_degraded@{IMPL_DET}"] = float((prob_d[pos, 1 + ci] >= 0.5).float().mean())
        if prob_v is not None:
            out[f"detect_rate_{cls}_vae@{IMPL_DET}"] = float((prob_v[pos, 1 + ci] >= 0.5).float().mean())
            out[f"false_accept_{cls}_vae@{IMPL_DET}"] = float((prob_v[~pos, 1 + ci] >= 0.5).float().mean())
        out[f"false_accept_{cls}@{IMPL_DET}"] = float((prob[~pos, 1 + ci] >= 0.5).float().mean())
        out[f"sds_{cls}@{IMPL_DET}"] = float(prob[pos, 1 + ci].mean())
    neg_scores = 1 - prob[:, 0]
    rej = {}
    for kind in D.NEGATIVE_KINDS:
        m = torch.tensor([k == kind for k in kinds])
        if m.any():
            rej[kind] = round(float((neg_scores[m] < 0.5).float().mean()), 4)
    out[f"negative_rejection@{IMPL_DET}"] = rej
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


# ------------------------------------------------------------------------------------------ save / load
def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}


def save_instruments(inst: Instruments, out_dir: str | Path) -> Path:
    """Write ``encoder.safetensors``, ``detector.safetensors`` and ``instruments.json`` to ``out_dir`` atomically."""
    from safetensors.torch import save_file

    with atomic_dir(out_dir) as tmp:
        save_file(_state(inst.encoder), str(tmp / ENCODER_FILE), metadata={"format": "pt"})
        save_file(_state(inst.detector), str(tmp / DETECTOR_FILE), metadata={"format": "pt"})
        atomic_write_json(tmp / CONFIG_NAME, inst.config)
        for f in (ENCODER_FILE, DETECTOR_FILE, CONFIG_NAME):  # temp files are private; assets are shared
            os.chmod(tmp / f, 0o644)
        os.chmod(tmp, 0o755)
    return Path(out_dir)


def build_instruments(config: dict) -> Instruments:
    """Untrained instruments with the architecture described by ``config`` (as in ``instruments.json``)."""
    enc = IdentityEncoder(config["attributes"], **config["encoder"])
    det = SubjectDetector(config["classes"], **config["detector"])
    enc.eval()
    det.eval()
    return Instruments(enc, det, FeatureExtractor(enc, det, config.get("feature_scale", (1.0, 1.0))), config)


def load_instruments(path: str | Path, device: str | torch.device = "cpu") -> Instruments:
    """Load instruments saved by :func:`train_instruments` / :func:`save_instruments` (safetensors only).

    Args:
        path: folder holding ``instruments.json`` and the two ``.safetensors`` files.
        device: where to put the modules.

    Returns:
        :class:`Instruments` in eval mode; ``config["fingerprint"]`` hashes the two weight files.
    """
    from safetensors.torch import load as load_safetensors

    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}; train the instruments with "
                                f"apdm.toy.instruments.train_instruments(out_dir)")
    try:
        config = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e}); rebuild the instruments (apdm toy build)") from e
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{cfg_file} has format_version {config['format_version']}, newer than this apdm")
    inst = build_instruments(config)
    h = hashlib.sha256()
    for name, module in ((ENCODER_FILE, inst.encoder), (DETECTOR_FILE, inst.detector)):
        data = (path / name).read_bytes()  # read once: hashed, then parsed as safetensors (never a pickle)
        h.update(data)
        try:  # SafetensorError is no OSError/ValueError: a truncated file gave a traceback naming no file
            state = load_safetensors(data)
        except Exception as e:  # (safetensors raises its own error type)
            raise ValueError(f"{path / name}: not a readable safetensors file (truncated or not safetensors: {e}); "
                             "rebuild the instruments (apdm toy build)") from e
        module.load_state_dict(state)
    inst.config["fingerprint"] = h.hexdigest()[:16]  # recorded by the benchmarks next to the model's
    for m in (inst.encoder, inst.detector, inst.features):
        m.to(device).eval()
    return inst


def train_instruments(out_dir: str | Path | None = None, seed: int = 0, quick: bool = False,
                      classes: Sequence[str] = D.CLASSES, world_size: int = D.WORLD_SIZE,
                      heldout_fraction: float = D.HELDOUT_FRACTION, split_seed: int = D.SPLIT_SEED,
                      num_threads: int | None = None, vae=None,
                      quiet: bool = False) -> tuple[Instruments, dict]:
    """Train all instruments, evaluate them on held-out identities and (optionally) save them.

    Args:
        out_dir: folder to write (replaced atomically); ``None`` to skip saving.
        seed: training seed.
        quick: tiny settings (a few hundred images; for tests, ~tens of seconds).
        classes: toy classes.
        world_size, heldout_fraction, split_seed: the world split; evaluation uses held-out identities.
        num_threads: torch intra-op threads while training (``None``: unchanged). On a shared 2-core machine
            ``1`` is often *faster* than 2 (no oversubscription).
        vae: the world model's ``AutoencoderKL``: the detector also learns from VAE round trips
            (:func:`train_detector`) and its report gains ``*_vae`` rates. ``None``: drawn images only.
        quiet: hide progress bars.

    Returns:
        ``(instruments, report)``; the report is also stored in ``instruments.json`` under ``"report"``.
    """
    with _torch_threads(num_threads):
        return _train_instruments(out_dir, seed, quick, classes, world_size, heldout_fraction, split_seed, vae,
                                  quiet)


def _train_instruments(out_dir, seed, quick, classes, world_size, heldout_fraction, split_seed, vae, quiet):
    s = _QUICK if quick else _FULL
    common = dict(seed=seed, world_size=world_size, heldout_fraction=heldout_fraction, split_seed=split_seed,
                  quiet=quiet)
    enc_kw = dict(s["encoder"])
    enc_kw["ids"] = {c: enc_kw["ids"][c] for c in classes}
    enc, enc_info = train_identity_encoder(classes, **enc_kw, **common)
    det, det_info = train_detector(classes, **s["detector"], vae=vae, **common)
    held = _world_split(world_size, heldout_fraction, split_seed)["heldout"]
    n_eval = min(s["eval"]["ids"], len(held))
    t0 = time.time()
    report = {"encoder_training": enc_info, "detector_training": det_info, "held_out_identities": n_eval}
    for cls in classes:
        report[f"encoder_{cls}"] = evaluate_identity_encoder(enc, cls, held[:n_eval], s["eval"]["photos"],
                                                             seed=seed + 12345)
    report["detector"] = evaluate_detector(det, {c: held[: s["eval"]["det_ids"]] for c in classes},
                                           s["eval"]["negatives"], seed=seed + 12345, vae=vae)
    report["eval_seconds"] = round(time.time() - t0, 1)
    config = {
        "format_version": FORMAT_VERSION,
        "image_size": IMAGE_SIZE,
        "classes": list(classes),
        "attributes": {c: D.ATTRIBUTES[c] for c in classes},
        "encoder": {**DEFAULT_ENCODER},
        "detector": {**DEFAULT_DETECTOR},
        "world": {"world_size": world_size, "heldout_fraction": heldout_fraction, "split_seed": split_seed},
        "training": {"seed": seed, "quick": quick, **{k: v for k, v in s.items()},
                     "detector_vae_round_trip": det_info["vae_round_trip_fraction"]},
        "feature_dim": DEFAULT_ENCODER["hidden"] + DEFAULT_DETECTOR["hidden"],
        "feature_scale": feature_scale(enc, det, classes, seed),
        "report": report,
    }
    inst = Instruments(enc, det, FeatureExtractor(enc, det, config["feature_scale"]), config)
    if out_dir is not None:
        save_instruments(inst, out_dir)
        LOG.info("toy instruments saved to %s", out_dir)
    return inst, report
