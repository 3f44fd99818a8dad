"""The encoder trap: the augmentation pairs x⁻ and x⁺, training moves the subject's latents towards the generic
images' and not the others', only the encoder changes, exact resume, the CLI writes it, the bench carries it."""

import copy
import dataclasses
import importlib.util
import json
import re

import pytest
import torch

from apdm.config import EncoderTrapConfig
from apdm.core import diffusion as D
from apdm.protect_model import encoder_trap as T
from apdm.protect_model import l2p


def _subject():
    g = torch.Generator().manual_seed(0)
    return l2p.Subject(name="s", images=torch.rand(2, 3, 64, 64, generator=g),
                       paired=torch.rand(2, 3, 64, 64, generator=g), class_images=torch.rand(4, 3, 64, 64, generator=g),
                       instance_prompt="a photo of sks person", class_prompt="a photo of a person")


def test_augment_is_reproducible_and_in_range():
    x = torch.rand(3, 3, 17, 23)
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    a = T.augment(x, g)
    g.set_state(state)
    torch.testing.assert_close(T.augment(x, g), a, atol=0, rtol=0)  # x⁻ and x⁺ get the same change
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert not torch.allclose(a, x, atol=1e-2)
    assert not torch.allclose(T.augment(x, g), a, atol=1e-2)  # the next draw is another change


def test_augment_geometry_strength_zero_is_flip_and_colour_only():
    """With strength 0 the only geometric change is the flip: each output is gain·x + bias of x or of x flipped."""
    x = torch.rand(4, 3, 16, 16) * 0.5 + 0.25  # no clamping at these values
    y = T.augment(x, torch.Generator().manual_seed(2), strength=0.0)
    for i in range(4):
        fits = []
        for src in (x[i], x[i].flip(-1)):
            a = torch.stack([src.reshape(3, -1), torch.ones(3, 256)], -1)  # per channel: y = gain·x + bias
            sol = torch.linalg.lstsq(a, y[i].reshape(3, -1, 1)).solution
            fits.append(float((a @ sol - y[i].reshape(3, -1, 1)).abs().max()))
        assert min(fits) < 1e-4, fits


def test_trap_moves_the_subject_latents_and_keeps_the_rest(tiny_sd):
    subj = _subject()
    vae0 = copy.deepcopy(tiny_sd.vae)
    cfg = EncoderTrapConfig(steps=30, learning_rate=2e-3, augment=0.0, preserve_batch=4)
    trapped, hist, _ = T.trap_encoder(tiny_sd.vae, [subj], cfg, quiet=True)
    for (n, a), (_, b) in zip(tiny_sd.vae.named_parameters(), vae0.named_parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=n)  # the base VAE is untouched
    changed = {n.split(".")[0] for n, p in trapped.named_parameters()
               if not torch.equal(p, dict(vae0.named_parameters())[n])}
    assert changed == {"encoder", "quant_conv"}  # the decoder (and post_quant_conv) generate exactly as before
    first = sum(h["loss_trap"] for h in hist[:5]) / 5
    last = sum(h["loss_trap"] for h in hist[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    with torch.no_grad():
        def dist(vae, x, target):
            return float((D.vae_posterior(vae, x)[0] - target).pow(2).mean())

        to_paired = D.vae_posterior(vae0, subj.paired)[0]
        assert dist(trapped, subj.images, to_paired) < 0.5 * dist(vae0, subj.images, to_paired)
        keep = D.vae_posterior(vae0, subj.class_images)[0]
        moved_subject = dist(trapped, subj.images, D.vae_posterior(vae0, subj.images)[0])
        assert dist(trapped, subj.class_images, keep) < 0.2 * moved_subject
        # latent_change: ‖μ_θ − μ_φ‖ / ‖μ_φ‖ per image, large on the trapped photos, small on the kept ones
        change = T.latent_change(vae0, trapped, torch.cat([subj.images, subj.class_images]), batch=3)
        mu0 = D.vae_posterior(vae0, subj.images)[0].float().flatten(1)
        mu1 = D.vae_posterior(trapped, subj.images)[0].float().flatten(1)
        torch.testing.assert_close(change[:2], (mu1 - mu0).norm(dim=1) / mu0.norm(dim=1), rtol=1e-4, atol=1e-6)
        assert change.shape == (6,) and change[2:].max() < 0.5 * change[:2].min(), change
        assert float(T.latent_change(vae0, vae0, subj.images).abs().max()) == 0.0


def _colour_embed(images):
    """A stand-in face recognizer for the decoy choice: an image's mean colour, centred (3-d)."""
    return images.mean((2, 3)) - 0.5


def test_choose_decoys_takes_the_least_alike_by_the_recognizer():
    photos = torch.zeros(2, 3, 4, 4)
    photos[:, 0] = 1.0  # red
    colours = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1]], dtype=torch.float32)
    candidates = colours[:, :, None, None].expand(5, 3, 4, 4).clone()
    idx, cos = T.choose_decoys(photos, candidates, _colour_embed, 2)
    ref = torch.nn.functional.normalize(_colour_embed(photos)[0], dim=0)
    expect = torch.nn.functional.normalize(_colour_embed(candidates), dim=-1) @ ref
    assert idx.tolist() == torch.argsort(expect)[:2].tolist() and set(idx.tolist()) == {1, 4}  # green, cyan
    torch.testing.assert_close(cos, expect[idx])
    assert bool(cos[0] <= cos[1])

    def found_some(images):  # a recognizer that finds no face in cyan images
        e = _colour_embed(images)
        found = ~((images[:, 1].mean((1, 2)) > 0.5) & (images[:, 2].mean((1, 2)) > 0.5))
        return e[found], found

    idx, _ = T.choose_decoys(photos, candidates, found_some, 2)
    assert 4 not in idx.tolist() and 1 in idx.tolist()
    with pytest.raises(ValueError, match="only 4 of 5"):
        T.choose_decoys(photos, candidates, found_some, 5)
    with pytest.raises(ValueError, match="no face in the subject's photos"):
        T.choose_decoys(candidates[4:], candidates, found_some, 1)


def _real_faces(px: int = 128, n: int = 40):
    """Real photos for the recognizer path, from scikit-image's bundled data (nothing downloaded): four views of its
    astronaut's face (crops, a mirror image; (4,3,px,px)), then ``n`` faces of ``lfw_subset`` (LFW, 25x25 grey) and
    ``n`` of its non-faces, scaled to px ((2n,3,px,px)); all in [0,1]."""
    skd = pytest.importorskip("skimage.data")
    try:
        lfw = torch.from_numpy(skd.lfw_subset()).float()  # rows 0-99 faces, 100-199 non-faces
    except (OSError, ValueError) as exc:  # an install without the bundled file
        pytest.skip(f"skimage.data.lfw_subset unavailable: {exc}")
    a = torch.from_numpy(skd.astronaut()).permute(2, 0, 1).float().div(255)[None]

    def size(t, mode="bilinear"):
        return torch.nn.functional.interpolate(t, size=(px, px), mode=mode, antialias=mode == "bilinear").clamp(0, 1)

    face = a[..., :256, 64:320]
    photos = torch.cat([size(face), size(face.flip(-1)), size(a[..., 10:250, 80:320]), size(a[..., :288, 48:336])])
    return photos, size(torch.cat([lfw[:n], lfw[100:100 + n]])[:, None].repeat(1, 3, 1, 1), "bicubic")


@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("dlib", "face_recognition_models")),
                    reason="extra 'faces' not installed")
def test_decoys_on_real_faces_with_dlib():
    """``encoder_trap.identity=dlib`` (the recognizer offered for real photos) through the trap's own path: it finds
    the person and the candidate faces, never chooses a non-face, and its cosine ranking picks the candidates dlib's
    own rule (L2 distance, same person below 0.6) puts farthest from the person. dlib's cosines are compressed
    (strangers +0.7 to +0.9 here; the toy recognizer's decoys sit near -0.5): only their order means anything."""
    from apdm.evaluation.run import identity_backend

    backend, tag = identity_backend("dlib")
    assert tag == "dlib-resnet"
    seen = {}

    def embed(images):  # each image set embedded once (the trap's calls and the checks below share it)
        key = (images.data_ptr(), tuple(images.shape))
        if key not in seen:
            seen[key] = (*backend(images), images)  # the images held, so their memory is not reused under the key
        return seen[key][:2]

    photos, candidates = _real_faces()
    rows, _, ref = T.likeness(photos, candidates, embed, "encoder_trap.targets=farthest", "the photos")
    assert ref.shape[0] == 4 and int((rows < 40).sum()) >= 34 and int((rows >= 40).sum()) == 0
    idx, cos = T.choose_decoys(photos, candidates, embed, 3)
    assert bool((idx < 40).all()) and bool(cos.diff().ge(0).all())
    e_photos, e_cand = embed(photos)[0], embed(candidates)[0]
    assert float(torch.pdist(e_photos).max()) < 0.6  # the four views: one person by dlib's rule
    far = (e_cand - e_photos.mean(0)).norm(dim=1)
    # the cosine's three are among dlib's five farthest of the ~36 found (the 3rd and 4th lie 1e-4 apart)
    assert set(idx.tolist()) <= set(rows[torch.argsort(far, descending=True)[:5]].tolist())
    chosen = e_cand[[rows.tolist().index(k) for k in idx.tolist()]]
    assert float(torch.cdist(chosen, e_photos).min()) > 0.6  # strangers by dlib's rule


def test_trap_targets_modes_and_their_check():
    subj = _subject()
    paired, none = T.trap_targets(subj, "paired")
    assert torch.equal(paired, subj.paired) and none is None
    targets, cos = T.trap_targets(subj, "farthest", _colour_embed)
    pool = torch.cat([subj.class_images, subj.paired])
    assert targets.shape == subj.images.shape and cos.shape == (2,)
    assert all(any(torch.equal(t, c) for c in pool) for t in targets)  # each decoy is one of the class images
    assert not torch.equal(targets[0], targets[1])
    # decoys=1: every photo encodes as the one decoy least like the subject (paired: x⁺_0)
    one, cos1 = T.trap_targets(subj, "farthest", _colour_embed, decoys=1)
    assert cos1.shape == (1,) and torch.equal(one[0], targets[0]) and torch.equal(one[1], targets[0])
    first, _ = T.trap_targets(subj, "paired", decoys=1)
    assert torch.equal(first, subj.paired[[0, 0]])
    with pytest.raises(ValueError, match="encoder_trap.decoys"):
        T.check_trap_config(EncoderTrapConfig(decoys=-1))
    with pytest.raises(ValueError, match="needs a face recognizer"):
        T.trap_targets(subj, "farthest")
    with pytest.raises(ValueError, match="encoder_trap.targets"):
        T.trap_targets(subj, "blend")
    with pytest.raises(ValueError, match="encoder_trap.targets"):
        T.check_trap_config(EncoderTrapConfig(targets="blend"))
    with pytest.raises(ValueError, match="encoder_trap.identity"):
        T.check_trap_config(EncoderTrapConfig(targets="farthest"))


def test_identity_backend_from_a_folder_without_instruments_is_refused(tmp_path):
    from apdm.evaluation.run import identity_backend

    with pytest.raises(ValueError, match="holds no toy instruments"):
        identity_backend(f"toy:{tmp_path}")


def test_trap_with_farthest_decoys_sends_the_photos_to_them(tiny_sd):
    subj = _subject()
    cfg = EncoderTrapConfig(steps=30, learning_rate=2e-3, augment=0.0, preserve_batch=4, targets="farthest",
                            identity="colour")
    decoys, cos = T.trap_targets(subj, "farthest", _colour_embed)
    trapped, _, chosen = T.trap_encoder(tiny_sd.vae, [subj], cfg, quiet=True, embed=_colour_embed)
    # it returns the choice it trained with: one decoy per photo here, their cosines to the subject
    assert len(chosen) == 1 and chosen[0]["subject"] == subj.name
    assert torch.equal(chosen[0]["images"], decoys.cpu()) and chosen[0]["cosines"] == pytest.approx(cos.tolist(),
                                                                                                    abs=1e-4)
    one = T.trap_encoder(tiny_sd.vae, [subj], dataclasses.replace(cfg, steps=1, decoys=1), quiet=True,
                         embed=_colour_embed)[2][0]
    assert torch.equal(one["images"], decoys[:1].cpu()) and one["cosines"] == pytest.approx(cos[:1].tolist(), abs=1e-4)
    paired = T.trap_encoder(tiny_sd.vae, [subj], dataclasses.replace(cfg, steps=1, targets="paired"), quiet=True)[2]
    assert torch.equal(paired[0]["images"], subj.paired.cpu()) and paired[0]["cosines"] is None
    with torch.no_grad():
        target = D.vae_posterior(tiny_sd.vae, decoys)[0]
        before = D.vae_posterior(tiny_sd.vae, subj.images)[0]
        after = D.vae_posterior(trapped, subj.images)[0]
    assert (after - target).pow(2).mean() < 0.5 * (before - target).pow(2).mean()


def test_trap_resume_after_interruption_is_exact(tiny_sd, tmp_path):
    subj = [_subject()]
    cfg = EncoderTrapConfig(steps=4, learning_rate=1e-3, preserve_batch=2, checkpoint_every=1)
    full, _, _ = T.trap_encoder(tiny_sd.vae, subj, cfg, seed=3, checkpoint_dir=tmp_path / "a", quiet=True)
    T.trap_encoder(tiny_sd.vae, subj, cfg, seed=3, checkpoint_dir=tmp_path / "b", quiet=True, stop_after=2)
    # a trap of other settings or other images is refused, naming what differs (before, it was resumed)
    for other, kw, differ in [(cfg, {"seed": 4}, "seed: 3 there, 4 now"),
                              (dataclasses.replace(cfg, preserve_weight=2.0), {},
                               "encoder_trap.preserve_weight: 1.0 there, 2.0 now"),
                              (cfg, {"keep_images": torch.rand(2, 3, 64, 64)}, "kept_images: ")]:
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'b'}: a checkpoint of another encoder trap, made "
                                                       f"with other settings ({differ}")):
            T.trap_encoder(tiny_sd.vae, subj, other, **{"seed": 3, **kw}, checkpoint_dir=tmp_path / "b", quiet=True)
    resumed, hist, _ = T.trap_encoder(tiny_sd.vae, subj, cfg, seed=3, checkpoint_dir=tmp_path / "b", quiet=True)
    assert [h["step"] for h in hist] == [0, 1, 2, 3]
    for (n, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=n)


def test_decoded_keep_term_against_its_formula_and_its_training(tiny_sd):
    """keep_space=decoded: mse of the decoded posterior draws (same ε) in [0,1]; zero at the original encoder; its
    gradient reaches mean and log-variance, not the decoder; a trap trained with it still moves the subject's
    latents and changes the encoder only."""
    vae = tiny_sd.vae
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        target = T.moments(vae, x).float()
    params = target + 0.05 * torch.randn(target.shape, generator=torch.Generator().manual_seed(6))
    c = target.shape[1] // 2
    eps = torch.randn(target[:, :c].shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        def dec(p):  # posterior_latents scales, decode_latents unscales: the decoder sees the draw itself
            return ((vae.decode(p[:, :c] + (0.5 * p[:, c:]).exp() * eps).sample + 1) / 2).clamp(0, 1)

        want = (dec(params) - dec(target)).pow(2).mean()
        torch.testing.assert_close(T.keep_decoded(vae, params, target, eps), want, rtol=1e-5, atol=1e-8)
        assert float(T.keep_decoded(vae, target, target, eps)) == 0.0
        logvar_only = torch.cat([target[:, :c], target[:, c:] + 1.0], 1)  # a wider posterior alone changes the draw
        assert float(T.keep_decoded(vae, logvar_only, target, eps)) > 0.0
    leaf = params.clone().requires_grad_(True)
    T.keep_decoded(vae, leaf, target, eps).backward()
    assert float(leaf.grad[:, :c].abs().sum()) > 0 and float(leaf.grad[:, c:].abs().sum()) > 0  # both parts pull
    assert all(p.grad is None for p in vae.parameters())  # the frozen decoder gets no gradient
    cfg = EncoderTrapConfig(steps=30, learning_rate=2e-3, augment=0.0, preserve_batch=4, keep_space="decoded")
    subj = _subject()
    out, hist, _ = T.trap_encoder(vae, [subj], cfg, quiet=True)
    before = dict(vae.named_parameters())
    changed = {n.split(".")[0] for n, p in out.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"encoder", "quant_conv"}
    assert sum(h["loss_trap"] for h in hist[-5:]) < 0.5 * sum(h["loss_trap"] for h in hist[:5])
    change = T.latent_change(vae, out, torch.cat([subj.images, subj.class_images]))
    assert change[2:].max() < change[:2].min(), change


@pytest.mark.parametrize("keep_space,checkpointing", [("latent", False), ("decoded", True)])
def test_micro_batched_step_has_the_whole_steps_gradient(tiny_sd, keep_space, checkpointing):
    """encoder_trap.micro_batch: the encoder sees at most B images per call, the gradient and the logged losses are
    the whole step's (uneven chunks included), and the draws are the same (so is a trained trap, to rounding);
    gradient checkpointing changes nothing but memory."""
    g0 = torch.Generator().manual_seed(11)
    photos, paired = torch.rand(5, 3, 64, 64, generator=g0), torch.rand(5, 3, 64, 64, generator=g0)
    keep = torch.rand(6, 3, 64, 64, generator=g0)
    whole = EncoderTrapConfig(preserve_batch=3, keep_space=keep_space, preserve_weight=2.0)
    micro = dataclasses.replace(whole, micro_batch=2, gradient_checkpointing=checkpointing)
    grads, logs, sizes = [], [], []
    for cfg in (whole, micro):
        trapped, trainable, _ = T.trainable_copy(tiny_sd.vae, cfg)
        hook = trapped.encoder.register_forward_hook(
            lambda m, i, o, b=cfg.micro_batch: sizes.append((b, i[0].shape[0])))
        logs.append(T.trap_step(trapped, tiny_sd.vae, photos, paired, keep, cfg, torch.Generator().manual_seed(4)))
        hook.remove()
        grads.append({n: p.grad.clone() for n, p in trainable.items()})
    assert max(n for b, n in sizes if b == 2) == 2 and max(n for b, n in sizes if b == 0) == 5
    assert logs[0].keys() == logs[1].keys()
    for k in logs[0]:
        assert logs[1][k] == pytest.approx(logs[0][k], rel=1e-5), k
    assert sum(float(g.abs().sum()) for g in grads[0].values()) > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-7, msg=n)
    subj = [_subject()]
    runs = [T.trap_encoder(tiny_sd.vae, subj, dataclasses.replace(c, steps=3, learning_rate=1e-3), quiet=True)
            for c in (whole, dataclasses.replace(micro, micro_batch=1))]
    assert not runs[1][0].encoder.gradient_checkpointing  # off again in the returned VAE
    assert [h["loss"] for h in runs[1][1]] == pytest.approx([h["loss"] for h in runs[0][1]], rel=1e-4)
    # compared through what the encoders do, not weight by weight: Adam turns the rounding noise of a gradient that
    # is zero in exact arithmetic (a bias ahead of a GroupNorm) into a step of ±lr
    x = torch.cat([subj[0].images, subj[0].class_images])
    with torch.no_grad():
        base, a, b = (T.moments(v, x) for v in (tiny_sd.vae, runs[0][0], runs[1][0]))
    assert float((a - base).abs().max()) > 0.1  # the three steps moved the latents
    torch.testing.assert_close(b, a, rtol=0, atol=5e-4)


def test_trap_out_of_memory_names_the_setting_that_helps(tiny_sd, monkeypatch):
    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    monkeypatch.setattr(T, "trap_step", no_memory)
    with pytest.raises(RuntimeError, match=r"up to 6 images of \(64, 64\) px.*encoder_trap.micro_batch"):
        T.trap_encoder(tiny_sd.vae, [_subject()], EncoderTrapConfig(steps=2, preserve_batch=4), quiet=True)


@pytest.mark.parametrize("key,value", [("steps", -1), ("preserve_batch", 0), ("learning_rate", -1.0),
                                       ("augment", float("nan")), ("synthetic_photos", -1), ("synthetic_pool", 0),
                                       ("keep_space", "pixels"), ("micro_batch", -1)])
def test_trap_config_is_checked(key, value):
    with pytest.raises(ValueError, match=f"encoder_trap.{key}"):
        T.check_trap_config(EncoderTrapConfig(**{key: value}))


def test_cli_unknown_face_recognizer_is_refused_before_any_work(tmp_path, apdm_log):
    """Before, a misspelt encoder_trap.identity was refused only after the whole L2P protection."""
    from helpers import tiny_protect_model_args

    from apdm.cli import main

    args = ["protect-model", *tiny_protect_model_args(tmp_path), "encoder_trap.steps=1", "encoder_trap.targets=farthest"]
    for name, message in [("facenet", "encoder_trap.identity must be one of toy, dlib, toy:DIR or none, got 'facenet'"),
                          (f"toy:{tmp_path}", (f"encoder_trap.identity='toy:{tmp_path}': {tmp_path} holds no toy "
                                               "instruments (instruments.json)"))]:
        assert main([*args, f"encoder_trap.identity={name}"]) == 1
        assert message in apdm_log()
        assert not (tmp_path / "out").exists() and not (tmp_path / "cls").exists()  # no model, no class images
    T.check_trap_config(EncoderTrapConfig(identity="toy"))  # names only: no weights loaded
    T.check_trap_config(EncoderTrapConfig(identity="dlib"))


def test_cli_protect_model_writes_the_trapped_encoder(tmp_path):
    from diffusers import AutoencoderKL

    from helpers import tiny_protect_model_args

    from apdm.cli import main
    from apdm.core.models import load_sd

    assert main(["protect-model", *tiny_protect_model_args(tmp_path), "protect.outer_steps=0",
                 "encoder_trap.steps=3", "encoder_trap.learning_rate=1e-3",  # the trap alone (its recipe),
                 "encoder_trap.micro_batch=1", "encoder_trap.gradient_checkpointing=true"]) == 0  # as at 512 px
    saved = AutoencoderKL.from_pretrained(str(tmp_path / "out" / "model" / "vae"))
    base = load_sd("tiny", device="cpu").vae
    assert not torch.equal(saved.encoder.conv_in.weight, base.encoder.conv_in.weight)
    for (n, a), (_, b) in zip(saved.decoder.named_parameters(), base.decoder.named_parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=n)
    card = (tmp_path / "out" / "model" / "README.md").read_text()
    assert "Encoder trap" in card and "no APDM steps" in card
    log = json.loads((tmp_path / "out" / "protect_log.json").read_text())
    assert log["encoder_trap_check"]["protected_photos"]["latent_change"] > 0  # the checks ran, one image a call
    unet, base_unet = load_sd(str(tmp_path / "out" / "model"), device="cpu").unet, load_sd("tiny", device="cpu").unet
    assert all(torch.equal(a, b) for a, b in zip(unet.parameters(), base_unet.parameters()))
    assert not (tmp_path / "out" / "checkpoint").exists()


def test_bench_carries_a_trapped_vae(tiny_sd):
    from apdm.bench import jobs

    vae = copy.deepcopy(tiny_sd.vae)
    with torch.no_grad():
        vae.encoder.conv_in.weight.add_(0.5)
    spec = jobs.remember_model(tiny_sd)
    sd = jobs.model(spec, jobs.unet_state(tiny_sd.unet, vae=vae))
    torch.testing.assert_close(sd.vae.encoder.conv_in.weight, vae.encoder.conv_in.weight, atol=0, rtol=0)
    assert jobs.model(spec, jobs.unet_state(tiny_sd.unet)).vae is tiny_sd.vae


def _stripes(n: int) -> torch.Tensor:
    """(n,3,64,64) images unlike the random class images of :func:`_subject`: smooth stripes of one colour each."""
    x = torch.linspace(0, 6.28, 64)
    wave = 0.5 + 0.4 * torch.sin(x[None, :] * (1 + torch.arange(n)[:, None]))  # (n, 64)
    colour = torch.tensor([[0.9, 0.2, 0.1], [0.1, 0.8, 0.3], [0.2, 0.3, 0.9], [0.8, 0.8, 0.1]])[torch.arange(n) % 4]
    return (wave[:, None, None, :] * colour[:, :, None, None]).expand(n, 3, 64, 64).contiguous()


def test_keep_images_are_kept_and_checked(tiny_sd):
    subj, keep = _subject(), _stripes(4)
    cfg = EncoderTrapConfig(steps=30, learning_rate=2e-3, augment=0.0, preserve_batch=4)
    without, _, _ = T.trap_encoder(tiny_sd.vae, [subj], cfg, quiet=True)
    with_keep, hist, _ = T.trap_encoder(tiny_sd.vae, [subj], cfg, quiet=True, keep_images=keep)
    moved_without = T.latent_change(tiny_sd.vae, without, keep)
    moved_with = T.latent_change(tiny_sd.vae, with_keep, keep)
    assert float(moved_with.mean()) < 0.7 * float(moved_without.mean()), (moved_with, moved_without)
    assert hist[-1]["loss_trap"] < hist[0]["loss_trap"]  # and the subject is still trapped
    with pytest.raises(ValueError, match="keep_images.*32, 32"):
        T.trap_encoder(tiny_sd.vae, [subj], cfg, quiet=True, keep_images=torch.rand(2, 3, 32, 32))


def test_generated_keep_images_are_other_images_of_the_class_prompt(tiny_sd, tmp_path):
    from apdm.config import PersonalizationConfig
    from apdm.protect_model.run import generated_keep_images, protection_images

    per = PersonalizationConfig(class_sample_steps=2, class_data_dir=str(tmp_path / "cls"))
    class_images, paired = protection_images(tiny_sd, per, "a photo of a person", 3, 2, quiet=True)
    gen = generated_keep_images(tiny_sd, per, ["a photo of a person", "a photo of a person"], 3, quiet=True)
    assert gen.shape == (3, 3, 64, 64) and 0 <= float(gen.min()) and float(gen.max()) <= 1  # one set per prompt
    # from another seed: neither the class images (L2P's and the copy's prior images) nor the x⁺ images
    for other in (class_images, paired):
        assert float((gen[:, None] - other[None]).abs().flatten(2).mean(-1).min()) > 1e-3
    again = generated_keep_images(tiny_sd, per, ["a photo of a person"], 3, quiet=True)
    assert torch.equal(gen, again)  # cached and read back, as the class images are
    two = generated_keep_images(tiny_sd, per, ["a photo of a person", "a photo of a dog"], 2, quiet=True)
    assert two.shape[0] == 4 and torch.equal(two[:2], gen[:2]) and not torch.equal(two[2:], gen[:2])
    assert generated_keep_images(tiny_sd, per, ["a photo of a person"], 0) is None


def test_cli_keep_images_are_read_before_the_protection(tmp_path, monkeypatch):
    import logging

    from PIL import Image

    from helpers import tiny_protect_model_args

    from apdm.cli import main
    from apdm.protect_model.run import load_keep_images
    from apdm.utils import LOG

    keep = tmp_path / "keep"
    (keep / "sub").mkdir(parents=True)
    Image.new("RGB", (80, 64), (10, 200, 30)).save(keep / "sub" / "a.png")  # a collection's sub-folders count
    (keep / "b.png").write_bytes(b"not an image")
    images, skipped = load_keep_images(str(keep), 64, quiet=True)
    assert images.shape == (1, 3, 64, 64) and abs(float(images[0, 1].mean()) - 200 / 255) < 1e-3
    assert [s["path"] for s in skipped] == [str(keep / "b.png")]
    assert load_keep_images("", 64) == (None, [])
    args = ["protect-model", *tiny_protect_model_args(tmp_path), "protect.outer_steps=0", "encoder_trap.steps=2"]
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # the apdm logger does not propagate to pytest's capture
    LOG.addHandler(handler)
    try:
        assert main([*args, f"encoder_trap.keep_images={keep / 'b.png'}"]) == 1
    finally:
        LOG.removeHandler(handler)
    text = "\n".join(r.getMessage() for r in records)
    assert "keep_images: no usable images in " + str(keep / "b.png") in text
    assert f"skipped {keep / 'b.png'}: not an image" in text  # the file and its problem are named
    assert not (tmp_path / "out" / "model").exists()  # refused before anything was trained
    seen = []  # what the trap was given to keep (the real trap runs; this only records its argument)
    real_trap = T.trap_encoder
    monkeypatch.setattr(T, "trap_encoder", lambda *a, **k: seen.append(k["keep_images"]) or real_trap(*a, **k))
    assert main([*args, f"encoder_trap.keep_images={keep}", "encoder_trap.keep_generated=2"]) == 0
    card = (tmp_path / "out" / "model" / "README.md").read_text()
    assert "a set of other photos was kept" in card and "| the keep_images photos | 1 |" in card
    assert "2 more class-prompt images of the base model were kept" in card
    assert "| the generated images it keeps | 2 |" in card
    assert "| decoded picture changed at (PSNR) |" in card
    check = json.loads((tmp_path / "out" / "protect_log.json").read_text())["encoder_trap_check"]
    assert {k: v["images"] for k, v in check.items()} == {"protected_photos": 2, "class_images": 2, "keep_images": 1,
                                                          "keep_generated": 2}
    assert len(seen) == 1 and seen[0].shape == (3, 3, 64, 64)  # the photo, then the two generated images
    assert abs(float(seen[0][0, 1].mean()) - 200 / 255) < 1e-3
    assert all(v["latent_change"] > 0 for v in check.values())  # two trap steps moved the encoder
    assert all(v["decode_change_psnr"] is not None and v["decode_change_psnr"] > 0 for v in check.values())


def test_trap_report_against_its_formulas(tiny_sd):
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    moved = copy.deepcopy(tiny_sd.vae)
    with torch.no_grad():
        moved.encoder.conv_in.weight.mul_(1.5)
    rep = T.trap_report(tiny_sd.vae, moved, {"x": x, "none": x[:0]})
    assert set(rep) == {"x"} and rep["x"]["images"] == 3
    assert rep["x"]["metric_impl"] == {"latent_change": "latent_change@apdm", "recon_psnr": "psnr@torchmetrics",
                                       "decode_change_psnr": "psnr@torchmetrics"}
    with torch.no_grad():
        mean = D.vae_posterior(moved, x)[0]
        out = D.decode_latents(moved, D.posterior_latents(moved, mean, mean))
        mean0 = D.vae_posterior(tiny_sd.vae, x)[0]
        out0 = D.decode_latents(tiny_sd.vae, D.posterior_latents(tiny_sd.vae, mean0, mean0))
    want = (10 * torch.log10(1.0 / (x - out).pow(2).mean((1, 2, 3)))).mean()
    assert rep["x"]["recon_psnr_trapped"] == pytest.approx(float(want), abs=0.01)
    # the change itself: PSNR between the original and the trapped encoder's decoded pictures
    change = (10 * torch.log10(1.0 / (out0 - out).pow(2).mean((1, 2, 3)))).mean()
    assert rep["x"]["decode_change_psnr"] == pytest.approx(float(change), abs=0.01)
    torch.testing.assert_close(T.recon_psnr(moved, x, batch=2), T.recon_psnr(moved, x), rtol=1e-5, atol=1e-4)
    assert rep["x"]["latent_change"] == pytest.approx(float(T.latent_change(tiny_sd.vae, moved, x).mean()), abs=1e-4)
    same = T.trap_report(tiny_sd.vae, tiny_sd.vae, {"x": x})["x"]
    assert same["latent_change"] == 0.0 and same["recon_psnr_base"] == same["recon_psnr_trapped"]
    assert same["decode_change_psnr"] is None  # nothing changed: no PSNR to average (never inf in the JSON)
    assert rep["x"]["latent_change"] > 0.05 and rep["x"]["recon_psnr_trapped"] != same["recon_psnr_trapped"]
    # the bench's flat keys carry the same numbers, per group
    from apdm.bench.protect_model import _trap_changes

    flat = _trap_changes(tiny_sd, moved, {"x": x, "kept": x[:0]})
    assert flat == {"trap_latent_change_x": rep["x"]["latent_change"],
                    "trap_recon_psnr_drop_x": round(rep["x"]["recon_psnr_base"] - rep["x"]["recon_psnr_trapped"], 2),
                    "trap_decode_change_psnr_x": rep["x"]["decode_change_psnr"]}
    assert _trap_changes(tiny_sd, tiny_sd.vae, {"x": x}) == {"trap_latent_change_x": 0.0, "trap_recon_psnr_drop_x": 0.0,
                                                              "trap_decode_change_psnr_x": None}


def test_views_are_trapped_to_their_photos_decoys(tiny_sd):
    """encoder_trap.synthetic_photos: view j of a subject encodes as photo (j mod N)'s decoy after the trap."""
    subj, views = _subject(), _stripes(4)
    cfg = EncoderTrapConfig(steps=30, learning_rate=2e-3, augment=0.0, preserve_batch=4)
    without, _, _ = T.trap_encoder(tiny_sd.vae, [subj], cfg, quiet=True)
    with_views, _, _ = T.trap_encoder(tiny_sd.vae, [subj], cfg, quiet=True, views=[views])
    with torch.no_grad():
        target = D.vae_posterior(tiny_sd.vae, subj.paired[torch.arange(4) % 2])[0]  # views 0, 2 -> x⁺_0; 1, 3 -> x⁺_1

        def dist(vae):
            return float((D.vae_posterior(vae, views)[0] - target).pow(2).mean())

        assert dist(with_views) < 0.5 * dist(tiny_sd.vae), (dist(with_views), dist(tiny_sd.vae))
        assert dist(with_views) < 0.5 * dist(without), (dist(with_views), dist(without))
    with pytest.raises(ValueError, match="views of s have shape"):
        T.trap_encoder(tiny_sd.vae, [subj], cfg, quiet=True, views=[torch.rand(2, 3, 32, 32)])
    with pytest.raises(ValueError, match="2 sets of views for 1 subjects"):
        T.trap_encoder(tiny_sd.vae, [subj], cfg, quiet=True, views=[views, views])


def test_synthetic_views_come_from_a_personalized_copy(tiny_sd):
    from apdm.config import PersonalizationConfig

    subj = _subject()
    per = PersonalizationConfig(steps=3, learning_rate=1e-2, batch_size=2, with_prior_preservation=True,
                                num_class_images=4, class_sample_steps=2, class_guidance_scale=3.0)
    before = [p.clone() for p in tiny_sd.unet.parameters()]
    views = T.synthetic_views(tiny_sd, subj, per, 3, seed=1)
    assert views.shape == (3, 3, 64, 64) and views.min() >= 0 and views.max() <= 1 and views.device.type == "cpu"
    assert all(torch.equal(a, b) for a, b in zip(before, tiny_sd.unet.parameters()))  # the base model is untouched
    torch.testing.assert_close(T.synthetic_views(tiny_sd, subj, per, 3, seed=1), views, atol=0, rtol=0)
    base = D.generate(tiny_sd, [subj.instance_prompt], 3, 2, 3.0, seed=1 + 4242, quiet=True)
    assert float((base - views).abs().mean()) > 1e-3  # the same sampling on the base model gives other pictures


def test_cli_synthetic_photos_are_trapped_and_reported(tmp_path):
    from helpers import tiny_protect_model_args

    from apdm.cli import main

    args = ["protect-model", *tiny_protect_model_args(tmp_path), "protect.outer_steps=0", "encoder_trap.steps=2",
            "encoder_trap.synthetic_photos=3", "personalization.steps=2", "personalization.batch_size=1"]
    assert main(args) == 0
    check = json.loads((tmp_path / "out" / "protect_log.json").read_text())["encoder_trap_check"]
    assert check["synthetic_views"]["images"] == 3 and check["synthetic_views"]["latent_change"] > 0
    card = (tmp_path / "out" / "model" / "README.md").read_text()
    assert "3 pictures of each subject sampled from a copy" in card and "| the synthetic pictures | 3 |" in card
    assert not (tmp_path / "out" / "checkpoint").exists()


def test_bench_protect_job_traps_synthetic_views(tiny_sd):
    from apdm.bench import jobs
    from apdm.bench.protect_model import _protect_job
    from apdm.config import PersonalizationConfig, ProtectConfig

    per = PersonalizationConfig(steps=2, learning_rate=1e-2, batch_size=2, num_class_images=4, class_sample_steps=2,
                                class_guidance_scale=3.0)
    tcfg = EncoderTrapConfig(steps=2, learning_rate=1e-3, preserve_batch=2, synthetic_photos=2, checkpoint_every=0)
    state, _, _, _, trap_hist, _, views, decoy_cos = _protect_job(jobs.remember_model(tiny_sd), _subject(), per,
                                                                  ProtectConfig(outer_steps=0, checkpoint_every=0),
                                                                  tcfg)
    assert views.shape == (2, 3, 64, 64) and len(trap_hist) == 2
    assert decoy_cos is None  # targets=paired: no recognizer chose anything
    trapped = jobs.model(jobs.remember_model(tiny_sd), state).vae
    assert not torch.equal(trapped.encoder.conv_in.weight, tiny_sd.vae.encoder.conv_in.weight)
    # protect_seed: the same seed is the same protection, another seed another draw (pictures and trap)
    again = _protect_job(jobs.remember_model(tiny_sd), _subject(), per, ProtectConfig(outer_steps=0,
                                                                                       checkpoint_every=0), tcfg)
    other = _protect_job(jobs.remember_model(tiny_sd), _subject(), per, ProtectConfig(outer_steps=0,
                                                                                       checkpoint_every=0), tcfg,
                         seed=1)
    torch.testing.assert_close(again[6], views, atol=0, rtol=0)
    # no picture in common (image i of a sampling starts from noise seeded s + i: adjacent seeds must not overlap)
    apart = (other[6][:, None] - views[None]).abs().flatten(2).amax(-1)
    assert apart.min() > 1e-3, apart
    w = "vae.encoder.conv_in.weight" if "vae.encoder.conv_in.weight" in state else None
    assert w is not None, sorted(state)[:5]
    torch.testing.assert_close(again[0][w], state[w], atol=0, rtol=0)
    assert not torch.equal(other[0][w], state[w])


def test_bench_protect_job_records_the_decoys_the_recognizer_chose(tiny_sd):
    """``decoy_cosines`` in the bench JSON: the recognizer's cosine of each chosen decoy to the subject, the lowest
    D of all the candidates (class images and x⁺), so a rebuilt recognizer's choice can be compared."""
    from apdm.bench import jobs
    from apdm.bench.protect_model import _protect_job
    from apdm.config import PersonalizationConfig, ProtectConfig
    from apdm.evaluation.run import identity_backend

    per = PersonalizationConfig(steps=2, learning_rate=1e-2, batch_size=2, num_class_images=4, class_sample_steps=2,
                                class_guidance_scale=3.0)
    subj = _subject()
    embed = identity_backend("toy")[0]
    _, every, _ = T.likeness(subj.images, torch.cat([subj.class_images, subj.paired]), embed, "test", "photos")
    for d in (1, 2):
        tcfg = EncoderTrapConfig(steps=1, learning_rate=1e-3, preserve_batch=2, targets="farthest", identity="toy",
                                 decoys=d, checkpoint_every=0)
        got = _protect_job(jobs.remember_model(tiny_sd), subj, per, ProtectConfig(outer_steps=0, checkpoint_every=0),
                           tcfg)[7]
        assert len(got) == d, got
        torch.testing.assert_close(torch.tensor(got), torch.sort(every).values[:d], atol=1e-4, rtol=0)


def test_synthetic_views_keep_those_the_recognizer_finds_most_alike(tiny_sd):
    import torch.nn.functional as F

    from apdm.config import PersonalizationConfig

    subj = _subject()
    per = PersonalizationConfig(steps=2, learning_rate=1e-2, batch_size=2, num_class_images=4, class_sample_steps=2,
                                class_guidance_scale=3.0)
    every = T.synthetic_views(tiny_sd, subj, per, 6, seed=2)  # what a pool of 3 x 2 samples
    ref = F.normalize(F.normalize(_colour_embed(subj.images), dim=-1).mean(0), dim=0)
    cos = F.normalize(_colour_embed(every), dim=-1) @ ref
    kept = T.synthetic_views(tiny_sd, subj, per, 2, seed=2, embed=_colour_embed, pool=3)
    torch.testing.assert_close(kept, every[torch.argsort(cos, descending=True)[:2]], atol=0, rtol=0)

    def no_face_in_the_best(images):  # a recognizer that finds no face in the most alike picture
        e = _colour_embed(images)
        found = (F.normalize(e, dim=-1) @ ref) < cos.max() - 1e-6 if images.shape[0] == 6 else torch.ones(
            images.shape[0], dtype=torch.bool)
        return e[found], found

    kept = T.synthetic_views(tiny_sd, subj, per, 2, seed=2, embed=no_face_in_the_best, pool=3)
    torch.testing.assert_close(kept, every[torch.argsort(cos, descending=True)[1:3]], atol=0, rtol=0)


def test_synthetic_views_from_several_copies_are_screened_together(tiny_sd):
    """encoder_trap.synthetic_copies: C copies personalized with seeds seed + c share the P·N samples; the screen
    keeps the N most alike of them all."""
    import dataclasses

    import torch.nn.functional as F

    from apdm.config import PersonalizationConfig

    subj = _subject()
    per = PersonalizationConfig(steps=2, learning_rate=1e-2, batch_size=2, num_class_images=4, class_sample_steps=2,
                                class_guidance_scale=3.0, seed=5)
    # 2 kept, pool 3, 2 copies: each copy samples 3, copy 1 from the noises after copy 0's (one copy's 6 noises)
    each = [T.synthetic_views(tiny_sd, subj, dataclasses.replace(per, seed=5 + c), 3 * (c + 1), seed=2)[3 * c:]
            for c in range(2)]
    assert float((each[0] - each[1]).abs().mean()) > 1e-3  # the copies differ
    same_noise = T.synthetic_views(tiny_sd, subj, dataclasses.replace(per, seed=6), 3, seed=2)
    assert float((same_noise - each[1]).abs().amax()) > 1e-3  # copy 1 does not restart from copy 0's noises
    every = torch.cat(each)
    ref = F.normalize(F.normalize(_colour_embed(subj.images), dim=-1).mean(0), dim=0)
    cos = F.normalize(_colour_embed(every), dim=-1) @ ref
    kept = T.synthetic_views(tiny_sd, subj, per, 2, seed=2, embed=_colour_embed, pool=3, copies=2)
    torch.testing.assert_close(kept, every[torch.argsort(cos, descending=True)[:2]], atol=0, rtol=0)
    unscreened = T.synthetic_views(tiny_sd, subj, per, 3, seed=2, copies=2)  # ⌈3 / 2⌉ = 2 from each, first 3 kept
    copy1 = same_noise[2:]  # copy 1 alone, its noise 2 of 0..3
    torch.testing.assert_close(unscreened, torch.cat([each[0][:2], copy1]), atol=1e-4, rtol=0)  # batch of 2 vs 3
    with pytest.raises(ValueError, match="synthetic_copies"):
        T.check_trap_config(EncoderTrapConfig(synthetic_copies=0))


def test_leave_one_out_cosines_against_their_formula():
    import torch.nn.functional as F

    unit = F.normalize(torch.randn(5, 7, generator=torch.Generator().manual_seed(4)), dim=-1)
    expected = torch.stack([unit[i] @ F.normalize(torch.cat([unit[:i], unit[i + 1:]]).mean(0), dim=0)
                            for i in range(5)])
    torch.testing.assert_close(T.leave_one_out_cosines(unit), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(T.leave_one_out_cosines(unit[:1]), torch.ones(1))


def test_cli_writes_the_decoys_the_recognizer_chose(tmp_path, capfd):
    """protect_log.json and the model card record the decoys' cosines and recognizer; the decoy images are written
    beside the model (outside model/) and are among the candidates: the class images and the DPO pairs' x⁺. With
    quiet=true no progress bar is drawn, the text encoder's save included."""
    from helpers import tiny_protect_model_args

    from apdm.cli import main
    from apdm.core.images import load_image

    args = ["protect-model", *tiny_protect_model_args(tmp_path), "protect.outer_steps=0", "encoder_trap.steps=1",
            "encoder_trap.targets=farthest", "encoder_trap.identity=toy", "encoder_trap.decoys=1"]
    assert main(args) == 0
    assert "Writing model shards" not in capfd.readouterr().err
    out = tmp_path / "out"
    rows = json.loads((out / "protect_log.json").read_text())["encoder_trap_decoys"]
    assert len(rows) == 1 and rows[0]["files"] == ["subject0_decoy0.png"] and rows[0]["recognizer"] == "toy-id"
    assert len(rows[0]["cosines"]) == 1 and -1.0 <= rows[0]["cosines"][0] <= 1.0
    decoy = load_image(out / "encoder_trap_decoys" / "subject0_decoy0.png").pixels
    pool = [load_image(p).pixels for p in sorted((tmp_path / "cls").rglob("*.png"))]
    assert pool and any(p.shape == decoy.shape and float((p - decoy).abs().max()) <= 1 / 255 for p in pool)
    card = (out / "model" / "README.md").read_text()
    assert "The face recognizer `toy-id` chose the decoys" in card
    assert f"subject 0: {rows[0]['cosines'][0]:+.2f}" in card
    assert not list((out / "model").rglob("*.png"))  # the decoys are not published with the checkpoint


def test_held_back_check_measures_reach_and_warns(tiny_sd):
    """subjects[].check_data: near copies of the trained photos are reached (no warning); the kept class images,
    which the trap holds in place, are not, and the warning names the subject."""
    import logging

    from apdm.protect_model.run import HELD_BACK_WARN, check_held_back
    from apdm.utils import LOG

    subj = _subject()
    cfg = EncoderTrapConfig(steps=30, learning_rate=2e-3, augment=0.0, preserve_batch=4)
    trapped, _, _ = T.trap_encoder(tiny_sd.vae, [subj], cfg, quiet=True)
    near = (subj.images + 0.03 * torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))).clamp(0, 1)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    LOG.addHandler(handler)
    try:
        rows = check_held_back(tiny_sd.vae, trapped, [subj, subj, subj], [near, None, subj.class_images])
    finally:
        LOG.removeHandler(handler)
    assert [r["index"] for r in rows] == [0, 2] and [r["images"] for r in rows] == [2, 4]
    seen = float(T.latent_change(tiny_sd.vae, trapped, subj.images).mean())
    assert rows[0]["latent_change_trained"] == pytest.approx(seen, abs=1e-4) and seen > 0.3
    assert rows[1]["latent_change"] == pytest.approx(
        float(T.latent_change(tiny_sd.vae, trapped, subj.class_images).mean()), abs=1e-4)
    assert rows[0]["reach"] == pytest.approx(rows[0]["latent_change"] / seen, abs=2e-3)
    assert rows[0]["reach"] > 0.9 and rows[1]["reach"] < HELD_BACK_WARN  # near copies moved, kept images held
    warned = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "subject 2 (s): photos it never saw moved only" in warned[0]


def test_cli_held_back_photos_are_checked_not_trained(tmp_path):
    """The held-back photos change nothing the trap learns; they are reported per subject (JSON and card), a bad
    file among them is skipped and named, and a held-back file that is also a training photo is refused."""
    import logging

    from PIL import Image
    from safetensors.torch import load_file

    from helpers import tiny_protect_model_args

    from apdm.cli import main
    from apdm.utils import LOG

    held = tmp_path / "held"
    held.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (30 + 60 * i, 140, 190)).save(held / f"h{i}.png")
    (held / "bad.png").write_bytes(b"not an image")
    base = [*tiny_protect_model_args(tmp_path), "protect.outer_steps=0", "encoder_trap.steps=2"]
    subject = tmp_path / "subject"
    assert main(["protect-model", *base]) == 0
    vae = tmp_path / "out" / "model" / "vae" / "diffusion_pytorch_model.safetensors"
    without = load_file(vae)
    args = ["protect-model", *base, f"subjects=[{{instance_data: {subject}, check_data: {held}}}]"]
    assert main(args) == 0
    with_held = load_file(vae)
    assert all(torch.equal(without[k], with_held[k]) for k in without)  # never trained on
    log = json.loads((tmp_path / "out" / "protect_log.json").read_text())
    (row,) = log["encoder_trap_held_back"]
    assert row["images"] == 2 and row["index"] == 0 and 0 < row["latent_change"]
    assert row["latent_change_trained"] == log["encoder_trap_check"]["protected_photos"]["latent_change"]
    assert [s["path"] for s in log["skipped_inputs"]] == [str(held / "bad.png")]
    card = (tmp_path / "out" / "model" / "README.md").read_text()
    assert f"subject 0: 2 photos, latent change {row['latent_change']:.2f} against" in card
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    LOG.addHandler(handler)
    try:
        overlap = f"subjects=[{{instance_data: {subject}, check_data: {subject / '1.png'}}}]"
        assert main(["protect-model", *base, "output_dir=" + str(tmp_path / "out2"), overlap]) == 1
    finally:
        LOG.removeHandler(handler)
    text = "\n".join(r.getMessage() for r in records)
    assert f"subjects[0].check_data: {(subject / '1.png').resolve()} also in its instance_data" in text
    assert not (tmp_path / "out2" / "model").exists()


def test_trap_reach_script_against_scipy(tmp_path):
    """docs/results/checks/trap_reach.py, which calibrates the held-back warning: its rank correlation equals
    scipy's, each trap counts once (its LoRA / TI variants share the trap and the DreamBooth result), and the
    threshold counts are right on a hand-made sweep."""
    from pathlib import Path

    stats = pytest.importorskip("scipy.stats")
    path = Path(__file__).resolve().parents[1] / "docs" / "results" / "checks" / "trap_reach.py"
    spec = importlib.util.spec_from_file_location("trap_reach", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    x, y = [0.3, 0.9, 0.9, 0.1, 0.5, 0.7], [0.2, 1.1, 0.8, 0.5, 0.4, 1.0]
    assert mod.ranks(x) == list(stats.rankdata(x) - 1)  # ties share their mean rank
    assert mod.pearson(mod.ranks(x), mod.ranks(y)) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    assert mod.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    for i, (fresh, ratio) in enumerate([(0.5, 0.4), (0.95, 1.2), (0.7, 0.9), (1.0, 1.1)]):
        row = {"trap_latent_change_fresh_photos": fresh, "trap_latent_change_photos": 1.0, "protection_ratio": ratio,
               "attack_seeds": 8}
        (tmp_path / f"t{i}_attack_seeds8_fresh_photos.json").write_text(json.dumps(row))
        if i == 1:  # the same trap attacked by LoRA: counted once
            (tmp_path / f"t{i}_attack_seeds8_fresh_photos_lora.json").write_text(json.dumps(row))
    (tmp_path / "x_attack_seeds1_fresh_photos.json").write_text(json.dumps(row | {"attack_seeds": 1}))  # too few runs
    rows = mod.traps(str(tmp_path))
    assert sorted(r["reach"] for r in rows) == [0.5, 0.7, 0.95, 1.0]
    out = mod.summarize(rows)
    assert out["met_goal"] == 3 and out["spearman_reach"] == 0.8  # one swapped pair among four: 1 − 6·2 / 60
    at = {t["threshold"]: t for t in out["thresholds"]}[0.75]
    assert (at["above"], at["above_met_goal"], at["below"], at["below_met_goal"]) == (2, 2, 2, 1)
    assert mod.main(["--sweep", str(tmp_path), "--out", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["all"]["traps"] == 4


def test_micro_batch_bounds_the_images_held_for_one_backward(tiny_sd, monkeypatch):
    """micro_batch=B took the whole-step path whenever the photos and the kept images each fit in B, holding both in
    one graph: up to 2B images (48 GB instead of 24 at 512 px with B=8). Now the whole step is taken only when
    together they fit."""
    g0 = torch.Generator().manual_seed(1)
    photos, paired = torch.rand(4, 3, 64, 64, generator=g0), torch.rand(4, 3, 64, 64, generator=g0)
    keep = torch.rand(6, 3, 64, 64, generator=g0)
    whole_steps = []
    real = T.trap_loss
    monkeypatch.setattr(T, "trap_loss", lambda *a, **k: whole_steps.append(1) or real(*a, **k))
    for b, whole in ((4, False), (8, True), (0, True)):
        cfg = EncoderTrapConfig(preserve_batch=4, micro_batch=b)
        trapped, _, _ = T.trainable_copy(tiny_sd.vae, cfg)
        whole_steps.clear()
        T.trap_step(trapped, tiny_sd.vae, photos, paired, keep, cfg, torch.Generator().manual_seed(4))
        assert bool(whole_steps) == whole, b


def test_a_trap_that_did_not_take_reports_no_reach_and_warns(tiny_sd, apdm_log):
    """reach = held-back / trained latent change: a trap that moved nothing read 100 % (0.00 / 0.00) and passed the
    check; now the reach is None with a warning that the trap did not take, and so is a trap whose kept images
    moved with the photos (not specific to the subject)."""
    import copy

    from apdm.protect_model.run import check_held_back, log_trap_report

    subj = _subject()
    untouched = copy.deepcopy(tiny_sd.vae)
    (row,) = check_held_back(tiny_sd.vae, untouched, [subj], [subj.images.flip(-1)])
    assert row["reach"] is None and row["latent_change_trained"] == 0.0
    assert "its own trained photos moved only 0.00" in apdm_log()
    log_trap_report(tiny_sd.vae, untouched, [subj], None)
    assert "the protected photos moved only 0.00" in apdm_log()
    scrambled = copy.deepcopy(tiny_sd.vae)  # every image moves about as much: not a trap of this subject
    with torch.no_grad():
        for p in scrambled.encoder.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    log_trap_report(tiny_sd.vae, scrambled, [subj], None)
    assert "the class images it keeps moved" in apdm_log()


def test_synthetic_pictures_are_made_again_for_other_photos(tiny_sd, tmp_path, monkeypatch):
    """A resumed run reads the pictures it made before instead of personalizing again; but the cache was keyed on
    their count only: after the photos changed (another person in the folder, subjects reordered) a resumed run
    trapped the first person's pictures as the second's."""
    from apdm.config import ProtectModelRunConfig
    from apdm.protect_model.run import trap_views

    made = []

    def fake_views(sd, s, per, n, **kw):
        made.append(float(s.images.mean()))
        return s.images[:1].repeat(n, 1, 1, 1)

    monkeypatch.setattr(T, "synthetic_views", fake_views)
    cfg = ProtectModelRunConfig()
    cfg.encoder_trap.synthetic_photos = 2
    alice, bob = _subject(), _subject()
    bob.images = 1 - bob.images
    first = trap_views(tiny_sd, [alice], cfg, tmp_path)
    assert trap_views(tiny_sd, [alice], cfg, tmp_path)[0].equal(first[0]) and len(made) == 1  # cached
    second = trap_views(tiny_sd, [bob], cfg, tmp_path)
    assert len(made) == 2 and second[0].equal(bob.images[:1].repeat(2, 1, 1, 1))  # bob's own, not alice's
    cfg.encoder_trap.synthetic_photos = 0
    assert trap_views(tiny_sd, [alice], cfg, tmp_path) is None


def test_cli_keep_set_holding_a_subjects_photo_is_refused(tmp_path, apdm_log):
    """encoder_trap.keep_images that contains a protected photo (here the subject's folder itself) asked the trap to
    move and to keep the same photo, silently; now it is refused before the protection, naming the subject."""
    import shutil

    from helpers import tiny_protect_model_args

    from apdm.cli import main

    base = tiny_protect_model_args(tmp_path)
    keep = tmp_path / "keep"
    shutil.copytree(tmp_path / "subject", keep)
    (keep / "1.png").rename(keep / "someone-else.png")  # a copy under another name counts too
    assert main(["protect-model", *base, "protect.outer_steps=0", "encoder_trap.steps=2",
                 f"encoder_trap.keep_images={keep}"]) == 1
    assert "encoder_trap.keep_images holds 2 of subject 0's (subject) photos" in apdm_log()
    assert not (tmp_path / "out" / "model").exists()
    # not the tiny model's 64 px: refused up front, before any class image
    assert main(["protect-model", *base, "resolution=128", f"personalization.class_data_dir={tmp_path / 'c2'}"]) == 1
    assert "resolution=128: protect-model works at the model's own resolution (64 px" in apdm_log()
    assert not (tmp_path / "out" / "model").exists() and not (tmp_path / "c2").exists()


def test_load_subjects_reads_the_base_models_weights_once(tiny_sd, tmp_path, monkeypatch):
    """weights_digest reads every weight (GBs on SD): protect-model asks for it once for all subjects' class and
    paired images, not twice per subject; the images are those of the per-set digest."""
    from PIL import Image

    from apdm.config import ProtectModelRunConfig, SubjectConfig
    from apdm.protect_model.run import load_subjects, protection_images

    folders = []
    for k in range(3):
        d = tmp_path / f"s{k}"
        d.mkdir()
        Image.new("RGB", (64, 64), (60 * k, 100, 30)).save(d / "a.png")
        folders.append(d)
    cfg = ProtectModelRunConfig(subjects=[SubjectConfig(instance_data=str(d)) for d in folders])
    cfg.protect.num_class_images = 2
    cfg.personalization.class_sample_steps = 2
    cfg.personalization.class_data_dir = str(tmp_path / "cls")
    calls = []
    real = type(tiny_sd).weights_digest
    monkeypatch.setattr(type(tiny_sd), "weights_digest", lambda self: calls.append(1) or real(self))
    subjects, skipped = load_subjects(tiny_sd, cfg, quiet=True)
    assert len(subjects) == 3 and not skipped and len(calls) == 1
    class_images, paired = protection_images(tiny_sd, cfg.personalization, subjects[0].class_prompt, 2, 1, quiet=True)
    assert len(calls) == 2  # one more, for both sets
    assert torch.equal(class_images, subjects[0].class_images) and torch.equal(paired, subjects[0].paired)
