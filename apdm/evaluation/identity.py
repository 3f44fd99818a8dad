"""Subject-identity metrics of generated images: ISM, FDFR, SDS, DINO, CLIP-I, CLIP-T.

The metrics operate on embeddings and detector outputs, so any backend plugs in:

- an **embedder** is a callable ``embed(images) -> (N, D)`` tensor, or ``-> (embeddings (K, D), found (N,) bool)``
  for backends that can fail to find a face (the K embeddings belong to the images where ``found`` is True).
  Provided: :func:`dlib_face_embed` (128-d dlib ResNet, extra ``faces``); the toy world's identity encoder is any
  such callable (tag ``ism@toy-id``).
- a **detector** is a callable ``detect(images) -> (N,)`` probabilities in ``[0, 1]`` or booleans. Provided:
  :func:`dlib_face_detect` (HOG, extra ``faces``), :func:`haar_face_detect` (OpenCV 4.x Haar, extra
  ``metrics``), :func:`mtcnn_face_detect` (facenet-pytorch MTCNN, pulls torchvision, lazy, untested here).

Conventions (Anti-DreamBooth / APDM):

- **ISM**: cosine of each generated embedding with the *mean* reference embedding, averaged over the generated
  images in which a face was found (images without one count toward FDFR and are reported as ``n_no_face``).
  Lower = better protection. apdm L2-normalises the reference embeddings before averaging (``normalize_refs=True``,
  its own choice); Anti-DreamBooth averages the raw embeddings (``normalize_refs=False``).
- **FDFR**: fraction of generated images where the detector finds no face/subject. Higher = better protection.
- **SDS**: mean detector confidence over generated images (detection not enforced). Lower = better protection.
  Detectors that only give yes/no (dlib HOG, Haar) make SDS the detection rate, ``1 - FDFR``.
- **DINO / CLIP-I**: mean cosine over all (generated, reference) pairs of ViT CLS / CLIP image embeddings;
  **CLIP-T**: cosine of each image with its prompt (raw cosine, not torchmetrics' ``100 * max(cos, 0)``).
  Models are loaded from LOCAL paths with transformers; preprocessing is done here in torch (resize shorter side
  bicubic + antialias, center crop, normalise) so neither torchvision nor an image-processor download is needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from apdm.evaluation.metrics import MetricUnavailable, check_images, measure, summarize, to_uint8, unavailable
from apdm.utils import optional_import

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_CACHE: dict = {}


# ------------------------------------------------------------------------------------------ formulas
def ism(gen_embeddings: torch.Tensor, ref_embeddings: torch.Tensor, normalize_refs: bool = True) -> torch.Tensor:
    """Identity score matching: cosine of each generated embedding with the mean reference embedding.

    Args:
        gen_embeddings: ``(N, D)`` embeddings of generated images (only those with a detected face).
        ref_embeddings: ``(M, D)`` embeddings of the subject's clean reference photos, ``M >= 1``.
        normalize_refs: L2-normalise each reference embedding before averaging (apdm's choice, so that no
            reference photo weighs more for a larger embedding norm); ``False`` averages the raw embeddings, which
            is Anti-DreamBooth's ISM and what the toy world's ``identity_similarity`` does.

    Returns:
        ``(N,)`` float32 cosines in ``[-1, 1]``; the mean is ISM (higher = same identity).
    """
    if gen_embeddings.dim() != 2 or ref_embeddings.dim() != 2:
        raise ValueError(f"ism expects (N, D) and (M, D) embeddings, got {tuple(gen_embeddings.shape)} and "
                         f"{tuple(ref_embeddings.shape)}")
    if ref_embeddings.shape[0] == 0:
        raise MetricUnavailable("ISM: no reference embedding (no face found in any reference image)")
    if gen_embeddings.shape[1] != ref_embeddings.shape[1]:
        raise ValueError(f"embedding sizes differ: {gen_embeddings.shape[1]} vs {ref_embeddings.shape[1]}")
    ref = ref_embeddings.detach().double().cpu()
    if normalize_refs:
        ref = F.normalize(ref, dim=1)
    center = ref.mean(dim=0, keepdim=True)
    return F.cosine_similarity(gen_embeddings.detach().double().cpu(), center, dim=1).float()


def _as_scores(detections) -> torch.Tensor:
    d = torch.as_tensor(detections).detach().cpu().flatten()
    return d.double() if d.dtype != torch.bool else d.to(torch.float64)


def fdfr(detections, threshold: float = 0.5) -> torch.Tensor:
    """Face/subject detection failure flags; their mean is FDFR.

    Args:
        detections: ``(N,)`` detector output per generated image: booleans, or probabilities in ``[0, 1]``.
        threshold: a probability below this counts as no detection (ignored for booleans).

    Returns:
        ``(N,)`` float32, 1.0 where nothing was detected.
    """
    d = torch.as_tensor(detections).detach().cpu().flatten()
    found = d if d.dtype == torch.bool else d.double() >= threshold
    return (~found).float()


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a rate ``successes / n`` (default 95 %): how far a pass or failure rate measured
    on n images can be from the true one. Unlike ``p ± z·sqrt(p(1-p)/n)`` it stays in [0, 1] and does not
    collapse to a point at 0 or n successes.

    Returns:
        (low, high), both in [0, 1].
    """
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got {successes} of {n}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def sds(detections) -> torch.Tensor:
    """Subject detection score per image (the detector's confidence); the mean is SDS.

    Returns:
        ``(N,)`` float32 in ``[0, 1]`` (booleans become 0/1).
    """
    return _as_scores(detections).float()


def mean_pairwise_cosine(gen_embeddings: torch.Tensor, ref_embeddings: torch.Tensor) -> torch.Tensor:
    """Per generated item, the mean cosine with every reference item; the overall mean is the all-pairs mean.

    Args:
        gen_embeddings: ``(N, D)``; ref_embeddings: ``(M, D)``.

    Returns:
        ``(N,)`` float32 in ``[-1, 1]``.
    """
    g = F.normalize(gen_embeddings.detach().double().cpu(), dim=1)
    r = F.normalize(ref_embeddings.detach().double().cpu(), dim=1)
    return (g @ r.T).mean(dim=1).float()


# ---------------------------------------------------------------------------------- record helpers
def run_embed(embed: Callable, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Call an embedder of either form (``embed(images) -> (K, D)`` for every image, or ``-> (embeddings of the
    K images with a face, (N,) bool found)``, see the module docstring) on ``images`` (N,3,H,W) in [0,1].

    Returns:
        (embeddings (K, D), found (N,) bool): K = N and every entry True for the first form.
    """
    return embed_output(embed(images))


def embed_output(out) -> tuple[torch.Tensor, torch.Tensor]:
    """An embedder's output of either form as (embeddings (K, D), found (N,) bool) (see :func:`run_embed`)."""
    if isinstance(out, tuple):
        emb, found = out
        return torch.as_tensor(emb), torch.as_tensor(found, dtype=torch.bool)
    out = torch.as_tensor(out)
    return out, torch.ones(out.shape[0], dtype=torch.bool)


def identity_records(generated: torch.Tensor, references: torch.Tensor, embed: Callable | None = None,
                     detect: Callable | None = None, embed_impl: str = "", detect_impl: str = "",
                     threshold: float = 0.5, normalize_refs: bool = True) -> list[dict]:
    """ISM (``ism@embed_impl``), FDFR and SDS (``fdfr@detect_impl``, ``sds@detect_impl``) records.

    Args:
        generated: ``(N, 3, H, W)`` float ``[0, 1]`` images generated by the personalized model.
        references: ``(M, 3, H, W)`` float ``[0, 1]`` clean photos of the subject.
        embed: embedder (see module docstring); ``None`` skips ISM.
        detect: detector; ``None`` skips FDFR/SDS.
        embed_impl, detect_impl: implementation tags (``"dlib-resnet"``, ``"toy-id"``, ``"dlib-hog"``, ...).
        threshold: detection probability threshold for FDFR.

    Returns:
        list of records; the ISM record has ``n`` = generated images with an embedding and ``n_no_face``. An
        embedder that embeds every image (no ``found`` mask, e.g. the toy world's identity encoder) takes the
        detector's verdict instead, when one is given: ISM is then averaged over the images the detector accepts
        (the Anti-DreamBooth convention; ``faces_from`` names the detector) and ``value_all_images`` keeps the mean
        over every image (the toy benchmarks' ISM). An embedder with its own mask (dlib) records
        ``faces_from=embed_impl``: its faces, not the detector's, enter ISM. When the detector cannot run, such an
        ISM is over every image, and its record says so (``faces_from`` None and a ``note``). Every ISM record
        carries ``normalize_refs`` (True: apdm's mean of the unit reference embeddings; False: Anti-DreamBooth's raw
        mean). A missing backend (``MissingDependency``) gives unavailable records.
    """
    check_images(generated, "generated images")
    check_images(references, "reference images")
    recs = []
    det, det_error = None, None
    if detect is not None:
        try:
            det = detect(generated)
        except (MetricUnavailable, ImportError) as exc:
            det_error = str(exc)
    if embed is not None:
        try:
            out = embed(generated)
            ge, gfound = embed_output(out)
            re, rfound = run_embed(embed, references)
        except (MetricUnavailable, ImportError) as exc:  # incl. MissingDependency from a lazy backend
            recs.append(unavailable("ism", embed_impl, str(exc), True))
        else:
            extra: dict = {"normalize_refs": normalize_refs}
            every_error = None
            if isinstance(out, tuple):  # the embedder's own faces enter ISM (FDFR is the detector's)
                extra["faces_from"] = embed_impl
            elif det_error is not None:  # no mask, and the detector failed: every image enters ISM
                extra.update(faces_from=None, note=f"the detector ({detect_impl}) could not run, so ISM is over all "
                                                   f"{generated.shape[0]} generated images, not only those with a "
                                                   "face; compare only with records that say the same")
            elif det is not None:  # no mask of its own: the detector's
                try:
                    every = ism(ge, re, normalize_refs=normalize_refs)
                except MetricUnavailable as exc:  # e.g. no reference embedding: the record says so
                    every, every_error = None, str(exc)
                gfound = fdfr(det, threshold) == 0
                ge = ge[gfound.to(ge.device)]
                extra.update(faces_from=detect_impl, value_all_images=None if every is None else float(every.mean()))
            extra.update({"n_no_face": int((~gfound).sum()), "n_generated": int(generated.shape[0]),
                          "n_references": int(rfound.sum()), "n_references_no_face": int((~rfound).sum())})
            if every_error is not None:
                recs.append(unavailable("ism", embed_impl, every_error, True, **extra))
            elif ge.shape[0] == 0:
                recs.append(unavailable("ism", embed_impl, "no face found in any generated image", True, 0,
                                        **extra))
            else:
                recs.append(measure("ism", embed_impl, True, ism, ge, re, normalize_refs=normalize_refs, extra=extra))
    if det_error is not None:
        recs += [unavailable("fdfr", detect_impl, det_error, False), unavailable("sds", detect_impl, det_error, True)]
    elif det is not None:
        recs.append(summarize("fdfr", detect_impl, fdfr(det, threshold), False, threshold=threshold))
        recs.append(summarize("sds", detect_impl, sds(det), True))
    return recs


# ------------------------------------------------------------------------------- face backends (lazy)
def dlib_modules(purpose: str = "dlib face detection/embedding"):
    """``(dlib, face_recognition_models)`` imported, or :class:`~apdm.utils.MissingDependency` naming the ``faces``
    extra and ``purpose``; loads no weights (a run checks with it before any work)."""
    import warnings

    dlib = optional_import("dlib", "faces", purpose)
    with warnings.catch_warnings():  # face_recognition_models imports the deprecated pkg_resources
        warnings.simplefilter("ignore")
        frm = optional_import("face_recognition_models", "faces", f"dlib's face models ({purpose})")
    return dlib, frm


def _dlib_models():
    if "dlib" not in _CACHE:
        dlib, frm = dlib_modules()
        _CACHE["dlib"] = (dlib, dlib.get_frontal_face_detector(),
                          dlib.shape_predictor(frm.pose_predictor_five_point_model_location()),
                          dlib.face_recognition_model_v1(frm.face_recognition_model_location()))
    return _CACHE["dlib"]


def _dlib_hog():
    if "dlib_hog" not in _CACHE:
        dlib = optional_import("dlib", "faces", "dlib HOG face detection")
        _CACHE["dlib_hog"] = dlib.get_frontal_face_detector()
    return _CACHE["dlib_hog"]


def dlib_face_detect(images: torch.Tensor, upsample: int = 1) -> torch.Tensor:
    """dlib HOG frontal face detector (extra ``faces``; tag ``dlib-hog``).

    HOG finds faces of roughly 80 px, or 40 px with ``upsample=1``; it gives no probability.

    Args:
        images: ``(N, 3, H, W)`` float ``[0, 1]`` (quantised to uint8).
        upsample: image pyramid upsampling steps.

    Returns:
        ``(N,)`` bool, True where at least one face was found.
    """
    det = _dlib_hog()
    arr = to_uint8(images)
    return torch.tensor([len(det(img, upsample)) > 0 for img in arr], dtype=torch.bool)


def dlib_face_embed(images: torch.Tensor, upsample: int = 1, num_jitters: int = 1
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """dlib's 128-d ResNet face embedding of the largest HOG-detected face per image (extra ``faces``;
    tag ``dlib-resnet``). dlib's same-person rule: L2 distance below 0.6.

    Faces are aligned with dlib's 5-point shape predictor. Ties in box area are broken by detector score.

    Args:
        images: ``(N, 3, H, W)`` float ``[0, 1]`` (quantised to uint8).
        upsample: HOG pyramid upsampling steps.
        num_jitters: dlib re-samples the face this many times and averages (1 = no jitter).

    Returns:
        ``(embeddings (K, 128) float32, found (N,) bool)`` with ``K = found.sum()``.
    """
    import numpy as np

    _, det, shape_pred, rec = _dlib_models()
    embs, found = [], []
    for img in to_uint8(images):
        boxes, scores, _ = det.run(img, upsample, 0.0)
        if len(boxes) == 0:
            found.append(False)
            continue
        best = max(range(len(boxes)), key=lambda i: (boxes[i].area(), scores[i]))
        shape = shape_pred(img, boxes[best])
        embs.append(np.asarray(rec.compute_face_descriptor(img, shape, num_jitters), dtype=np.float32))
        found.append(True)
    emb = torch.from_numpy(np.stack(embs)) if embs else torch.empty(0, 128)
    return emb, torch.tensor(found, dtype=torch.bool)


def haar_face_detect(images: torch.Tensor, scale_factor: float = 1.1, min_neighbors: int = 5,
                     min_size: int = 20) -> torch.Tensor:
    """OpenCV Haar cascade frontal face detector (``opencv-python-headless<5``, extra ``metrics``; tag
    ``opencv-haar``). OpenCV 5 no longer ships Haar cascades.

    Returns:
        ``(N,)`` bool, True where at least one face was found.
    """
    cv2 = optional_import("cv2", "metrics", "Haar face detection (opencv-python-headless<5)")
    if "haar" not in _CACHE:
        data = getattr(cv2, "data", None)
        if not hasattr(cv2, "CascadeClassifier") or not getattr(data, "haarcascades", ""):
            raise MetricUnavailable(f"OpenCV {cv2.__version__} has no Haar cascades (install opencv-python-headless<5)")
        path = data.haarcascades + "haarcascade_frontalface_default.xml"
        clf = cv2.CascadeClassifier(path)
        if clf.empty():
            raise MetricUnavailable(f"could not load the Haar cascade {path}")
        _CACHE["haar"] = clf
    clf = _CACHE["haar"]
    out = []
    for img in to_uint8(images):
        gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        faces = clf.detectMultiScale(gray, scaleFactor=scale_factor, minNeighbors=min_neighbors,
                                     minSize=(min_size, min_size))
        out.append(len(faces) > 0)
    return torch.tensor(out, dtype=torch.bool)


def mtcnn_face_detect(images: torch.Tensor, device: str = "cpu") -> torch.Tensor:
    """facenet-pytorch MTCNN face probability of the most confident face (0 where none; tag ``mtcnn``).

    The MTCNN weights ship inside the facenet-pytorch wheel, but the package needs torchvision: install it
    with the torch pin (``pip install torch==<yours> facenet-pytorch``). Not exercised by apdm's tests.

    Returns:
        ``(N,)`` float32 probabilities in ``[0, 1]``.
    """
    fp = optional_import("facenet_pytorch", "mtcnn", "MTCNN face detection")
    key = ("mtcnn", device)
    if key not in _CACHE:
        _CACHE[key] = fp.MTCNN(keep_all=True, device=device)
    mtcnn = _CACHE[key]
    out = []
    for img in to_uint8(images):
        _, probs = mtcnn.detect(img)
        out.append(0.0 if probs is None or len(probs) == 0 or probs[0] is None else float(max(probs)))
    return torch.tensor(out, dtype=torch.float32)


# ------------------------------------------------------------------ DINO / CLIP (transformers, local)
def preprocess(images: torch.Tensor, size: int, resize: int | None = None, mean: Sequence[float] = IMAGENET_MEAN,
               std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Torch-only version of the usual image-processor pipeline.

    Resize the shorter side to ``resize`` (bicubic, antialiased, clamped to ``[0, 1]`` like PIL), center crop
    ``size x size``, normalise with ``mean``/``std``.

    Args:
        images: ``(N, 3, H, W)`` float ``[0, 1]``.
        size: crop size (the model's ``image_size``).
        resize: shorter-side size before cropping; ``None`` = ``size``.

    Returns:
        ``(N, 3, size, size)`` float32, normalised.
    """
    check_images(images)
    resize = size if resize is None else int(resize)
    h, w = images.shape[-2:]
    scale = resize / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = images.float()
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size]
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def _model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    p = next(iter(model.parameters()))
    return p.device, p.dtype


def _batched(fn: Callable, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    outs = [fn(images[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


@torch.no_grad()
def vit_cls_embeddings(model, images: torch.Tensor, size: int | None = None, resize: int | None = None,
                       mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                       batch_size: int = 32) -> torch.Tensor:
    """CLS-token features of a transformers ``ViTModel`` (e.g. ``facebook/dino-vits16``), DINO-style.

    Args:
        model: a ``ViTModel`` (``last_hidden_state[:, 0]`` is used).
        images: ``(N, 3, H, W)`` float ``[0, 1]``.
        size: crop size; ``None`` = ``model.config.image_size`` (224 for dino-vits16).
        resize: shorter side before cropping; ``None`` = ``round(size * 256 / 224)`` (APDM: 256 -> 224).

    Returns:
        ``(N, D)`` float32 on CPU.
    """
    size = int(size or model.config.image_size)
    resize = int(resize or round(size * 256 / 224))
    dev, dt = _model_device_dtype(model)

    def run(x):
        px = preprocess(x, size, resize, mean, std).to(dev, dt)
        return model(pixel_values=px).last_hidden_state[:, 0].float().cpu()

    return _batched(run, images, batch_size)


@torch.no_grad()
def clip_image_embeddings(model, images: torch.Tensor, size: int | None = None, batch_size: int = 32
                          ) -> torch.Tensor:
    """Projected image embeddings of a transformers ``CLIPModel`` (not normalised).

    Preprocessing: shorter side to ``size`` (bicubic), center crop, CLIP mean/std.

    Returns:
        ``(N, projection_dim)`` float32 on CPU.
    """
    size = int(size or model.config.vision_config.image_size)
    dev, dt = _model_device_dtype(model)

    def run(x):
        px = preprocess(x, size, size, CLIP_MEAN, CLIP_STD).to(dev, dt)
        pooled = model.vision_model(pixel_values=px).pooler_output
        return model.visual_projection(pooled).float().cpu()

    return _batched(run, images, batch_size)


@torch.no_grad()
def clip_text_embeddings(model, tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """Projected text embeddings of a transformers ``CLIPModel`` (not normalised).

    Args:
        model: ``CLIPModel``.
        tokenizer: the matching ``CLIPTokenizer`` (padding to max length, truncation).
        texts: T strings.

    Returns:
        ``(T, projection_dim)`` float32 on CPU.
    """
    dev, _ = _model_device_dtype(model)
    max_len = min(int(tokenizer.model_max_length), int(model.config.text_config.max_position_embeddings))
    tok = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    pooled = model.text_model(input_ids=tok["input_ids"].to(dev),
                              attention_mask=tok["attention_mask"].to(dev)).pooler_output
    return model.text_projection(pooled).float().cpu()


def dino(model, generated: torch.Tensor, references: torch.Tensor, **kwargs) -> torch.Tensor:
    """DINO subject similarity (APDM): per generated image, mean cosine of its ViT CLS feature with each
    reference's. Lower = better protection.

    Args:
        model: ``ViTModel`` (e.g. ``load_vit("/path/to/dino-vits16")``).
        generated: ``(N, 3, H, W)``; references: ``(M, 3, H, W)``; float ``[0, 1]``.
        **kwargs: passed to :func:`vit_cls_embeddings`.

    Returns:
        ``(N,)`` float32 in ``[-1, 1]``; the mean is the all-pairs mean.
    """
    return mean_pairwise_cosine(vit_cls_embeddings(model, generated, **kwargs),
                                vit_cls_embeddings(model, references, **kwargs))


def clip_i(model, generated: torch.Tensor, references: torch.Tensor, **kwargs) -> torch.Tensor:
    """CLIP-I: per generated image, mean cosine of its CLIP image embedding with each reference's.

    Returns:
        ``(N,)`` float32 in ``[-1, 1]``.
    """
    return mean_pairwise_cosine(clip_image_embeddings(model, generated, **kwargs),
                                clip_image_embeddings(model, references, **kwargs))


def clip_t(model, tokenizer, images: torch.Tensor, texts: str | Sequence[str], **kwargs) -> torch.Tensor:
    """CLIP-T: cosine between each image's CLIP embedding and its prompt's (raw cosine, 0-1 scale in practice).

    Args:
        model, tokenizer: ``CLIPModel`` and ``CLIPTokenizer``.
        images: ``(N, 3, H, W)`` float ``[0, 1]``.
        texts: one prompt for all images, or N prompts.

    Returns:
        ``(N,)`` float32 in ``[-1, 1]``.
    """
    n = images.shape[0]
    texts = [texts] * n if isinstance(texts, str) else list(texts)
    if len(texts) != n:
        raise ValueError(f"clip_t: {n} images but {len(texts)} prompts")
    img = clip_image_embeddings(model, images, **kwargs)
    uniq = sorted(set(texts))
    txt = clip_text_embeddings(model, tokenizer, uniq)
    idx = torch.tensor([uniq.index(t) for t in texts])
    return F.cosine_similarity(img.double(), txt[idx].double(), dim=1).float()


def load_vit(path: str, device: str | torch.device = "cpu"):
    """A transformers ``ViTModel`` (no pooling layer) from a LOCAL folder, e.g. a saved ``facebook/dino-vits16``.

    Raises:
        MetricUnavailable: the folder cannot be loaded (missing, or not a ViT checkpoint).
    """
    from transformers import ViTModel

    try:
        return ViTModel.from_pretrained(str(path), local_files_only=True, add_pooling_layer=False).to(device).eval()
    except Exception as exc:
        raise MetricUnavailable(f"could not load a ViT model from local path '{path}' "
                                f"({type(exc).__name__}: {exc})") from exc


def load_clip(path: str, device: str | torch.device = "cpu"):
    """``(CLIPModel, CLIPTokenizer)`` from a LOCAL folder (e.g. a saved ``openai/clip-vit-large-patch14``).

    Raises:
        MetricUnavailable: the folder cannot be loaded.
    """
    from transformers import CLIPModel, CLIPTokenizer

    try:
        model = CLIPModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
        tok = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise MetricUnavailable(f"could not load a CLIP model from local path '{path}' "
                                f"({type(exc).__name__}: {exc})") from exc
    return model, tok
