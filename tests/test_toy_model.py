"""The toy world's model: SD-format round trip, resumable training, held-out identities unseen in pretraining."""

import torch

from apdm.toy import draw
from apdm.toy.model import ToyModelConfig, ToyTrainConfig, build_components, encode_dataset, save_toy_model, train_diffusion
from apdm.toy.world import heldout_subjects, pretraining_set

SMALL = ToyModelConfig(vae_channels=[16, 16], unet_channels=[32, 64], attention_head_dim=8, text_hidden=32,
                       text_layers=1, text_heads=2)


def _small(seed=0):
    return build_components(SMALL, draw.vocabulary(), seed)


def test_saved_toy_model_loads_in_plain_diffusers(tmp_path):
    from diffusers import StableDiffusionPipeline

    from apdm.core.models import load_sd

    vae, te, tok, unet, sched = _small()
    save_toy_model(vae, te, tok, unet, sched, tmp_path / "m")
    # weights are stored in fp16 (small enough to commit); on CPU load them as fp32
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "m"), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    img = pipe(["a photo of a person with red hair"], num_inference_steps=2, height=64, width=64,
               output_type="np").images
    assert img.shape == (1, 64, 64, 3)
    sd = load_sd(str(tmp_path / "m"), device="cpu")  # fp16 on disk -> fp32 on CPU
    assert sd.unet.dtype == torch.float32 and sd.resolution == 64
    assert len(tok.tokenize("a photo of sks person")) == 5  # whole-word tokens, sks included
    # transformers 4's CLIPTokenizer reads vocab.json + merges.txt, which transformers 5 no longer writes itself
    assert {"vocab.json", "merges.txt"} <= {f.name for f in (tmp_path / "m" / "tokenizer").iterdir()}
    import os

    mask = os.umask(0)
    os.umask(mask)  # safetensors writes 0600; the model folder's files get what open() gives
    assert (tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask


def test_unet_training_resumes_exactly(tmp_path):
    images, captions = pretraining_set(4, 2, size=64)
    tcfg = ToyTrainConfig(unet_batch=4, warmup=1)
    vae, te, tok, unet, sched = _small()
    mean, std = encode_dataset(vae, images)
    # uninterrupted run of 4 steps, leaving a checkpoint at step 2
    ema_a, hist_a = train_diffusion(unet, te, tok, sched, mean, std, captions, tcfg, steps=4,
                                    checkpoint_dir=tmp_path / "ck", checkpoint_every=2)
    # a fresh process would start from the step-2 checkpoint with freshly built modules
    vae2, te2, tok2, unet2, sched2 = _small()
    ema_b, hist_b = train_diffusion(unet2, te2, tok2, sched2, mean, std, captions, tcfg, steps=4,
                                    checkpoint_dir=tmp_path / "ck", checkpoint_every=2)
    assert hist_b == hist_a
    for (n, a), (_, b) in zip(ema_a.named_parameters(), ema_b.named_parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=n)


def test_heldout_subjects_never_in_pretraining():
    split = draw.split()
    assert not set(split["pretrain"]) & set(split["heldout"])
    subj = heldout_subjects(3, num_images=2, num_references=2)
    assert all(s.index in split["heldout"] for s in subj)
    assert subj[0].images.shape == (2, 3, 64, 64) and subj[0].references.shape == (2, 3, 64, 64)
    assert not torch.equal(subj[0].images[0], subj[0].references[0])


ASSET_MODEL = __import__("pathlib").Path(__file__).resolve().parents[1] / "assets" / "toy" / "model"


@__import__("pytest").mark.skipif(not (ASSET_MODEL / "model_index.json").is_file(), reason="toy model not committed")
def test_committed_toy_model_round_trips_and_inverts():
    """The committed toy model loads in plain diffusers, and on this *trained* (smooth) denoiser DDIM inversion
    followed by DDIM sampling reconstructs the latents of a drawn image."""
    from diffusers import StableDiffusionPipeline

    from apdm.core import diffusion as D
    from apdm.core.models import load_sd

    pipe = StableDiffusionPipeline.from_pretrained(str(ASSET_MODEL), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe(["a photo of a person"], num_inference_steps=2, height=64, width=64,
                output_type="np").images.shape == (1, 64, 64, 3)
    sd = load_sd(str(ASSET_MODEL), device="cpu")
    images = draw.to_tensor(draw.render_dataset("person", draw.split()["heldout"][:2], 1, seed=3)[0])
    z0 = D.encode_images(sd.vae, images)
    cond = D.encode_prompt(sd.text_encoder, sd.tokenizer, [""] * 2)
    with torch.no_grad():
        zT = D.ddim_invert(sd.unet, sd.noise_scheduler, z0, cond, num_steps=50)
        back = D.ddim_sample(sd.unet, sd.noise_scheduler, zT, cond, num_steps=50)
    rel = ((back - z0).norm() / z0.norm()).item()
    assert rel < 0.15, rel
    assert ((zT - z0).norm() / z0.norm()).item() > 0.5  # it did travel to noise and back


def test_a_cache_without_rho_still_finds_the_shipped_one(tmp_path, monkeypatch):
    """`apdm toy build` writes a model and instruments to the cache but no ρ: the demo and the bench must then
    use the shipped ρ, not report none (as they did)."""
    import json

    from apdm.toy import world

    monkeypatch.setenv("APDM_CACHE", str(tmp_path))
    assert world.toy_root() == world.REPO_ASSETS and world.rho_path() == world.REPO_ASSETS / "rho"
    (tmp_path / "toy" / "model").mkdir(parents=True)
    (tmp_path / "toy" / "model" / "model_index.json").write_text("{}")
    # a finished build (every stage recorded done, instruments present): only then is the cache the toy world
    (tmp_path / "toy" / "build_state.json").write_text(json.dumps({"settings": {"stages": [{}]}, "done": [{}]}))
    (tmp_path / "toy" / "instruments").mkdir()
    (tmp_path / "toy" / "instruments" / "instruments.json").write_text("{}")
    (tmp_path / "toy" / "instruments" / "encoder.safetensors").write_bytes(b"")
    assert world.toy_root() == tmp_path / "toy"
    assert world.rho_path() == world.REPO_ASSETS / "rho"
    (tmp_path / "toy" / "rho").mkdir()
    (tmp_path / "toy" / "rho" / "rho.json").write_text("{}")
    assert world.rho_path() == tmp_path / "toy" / "rho"  # a ρ built next to the cached model wins


def test_build_tokenizer_leaves_no_temporary_folder(tmp_path, monkeypatch):
    """Without out_dir the vocabulary files go to a temporary folder that is removed; the tokenizer still works
    and round-trips through save_pretrained (every tiny pipeline and toy build calls this)."""
    import tempfile

    from transformers import CLIPTokenizer

    from apdm.core.tokenizer import build_tokenizer

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    tok = build_tokenizer(["zebra"])
    assert list((tmp_path / "tmp").iterdir()) == []
    ids = tok("a photo of sks zebra").input_ids
    assert len(ids) == 7  # five whole-word tokens between the start and end tokens
    tok.save_pretrained(tmp_path / "saved")
    assert CLIPTokenizer.from_pretrained(tmp_path / "saved")("a photo of sks zebra").input_ids == ids


def _tiny_build(out, **kw):
    from apdm.toy.world import ToyBuildConfig

    stage1 = ToyTrainConfig(num_identities=3, images_per_identity=2, vae_steps=2, vae_batch=4, unet_steps=3,
                            unet_batch=4, warmup=1)
    stage2 = ToyTrainConfig(num_identities=3, images_per_identity=2, unet_steps=2, unet_batch=4, warmup=1,
                            unet_lr=2e-4, seed=1)
    args = dict(model=SMALL, train=stage1, more_stages=[stage2], output_dir=str(out), skip_instruments=True,
                quiet=True)
    args.update(kw)
    return ToyBuildConfig(**args)


def _unet(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model" / "unet" / "diffusion_pytorch_model.safetensors"))


def test_toy_build_runs_its_stages_and_resumes_after_a_kill(tmp_path, monkeypatch):
    """One `apdm toy build` runs stage 1 and then continues it with stage 2 (the committed world's two stages);
    the result equals the two-command form (stage 1, then a build with train.init_from). A build killed in
    stage 2 resumes there without redoing stage 1 and ends with the same weights; other settings start over."""
    import dataclasses

    import pytest

    from apdm.toy import model as toy_model
    from apdm.toy import world

    cfg = _tiny_build(tmp_path / "a")
    world.build(cfg)
    full = _unet(tmp_path / "a")
    # the two-command form
    world.build(_tiny_build(tmp_path / "s1", more_stages=[]))
    stage1 = _unet(tmp_path / "s1")
    world.build(_tiny_build(tmp_path / "s2", more_stages=[], train=dataclasses.replace(
        cfg.more_stages[0], init_from=str(tmp_path / "s1" / "model"))))
    assert any(not torch.equal(full[k], stage1[k]) for k in full)  # stage 2 changed the UNet
    for k in full:
        torch.testing.assert_close(full[k], _unet(tmp_path / "s2")[k], atol=0, rtol=0, msg=k)

    calls = []
    real = toy_model.pretrain

    def fake_pretrain(kill_in_stage2):
        def f(out_dir, mcfg, tcfg, fp16=True, **kw):
            calls.append(tcfg.init_from)
            if kill_in_stage2 and tcfg.init_from:
                raise KeyboardInterrupt
            return real(out_dir, mcfg, tcfg, fp16, **kw)
        return f

    monkeypatch.setattr(toy_model, "pretrain", fake_pretrain(kill_in_stage2=True))
    with pytest.raises(KeyboardInterrupt):
        world.build(_tiny_build(tmp_path / "b"))
    assert calls == ["", str(tmp_path / "b" / "model")]

    monkeypatch.setattr(toy_model, "pretrain", fake_pretrain(kill_in_stage2=False))
    calls.clear()
    report = world.build(_tiny_build(tmp_path / "b"))
    assert calls == [str(tmp_path / "b" / "model")]  # stage 1 was not redone
    assert len(report["model_stages"]) == 2
    for k in full:
        torch.testing.assert_close(full[k], _unet(tmp_path / "b")[k], atol=0, rtol=0, msg=k)
    calls.clear()
    world.build(_tiny_build(tmp_path / "b"))
    assert calls == []  # everything done: nothing to train
    monkeypatch.setattr(toy_model, "pretrain", fake_pretrain(kill_in_stage2=True))
    changed = _tiny_build(tmp_path / "b")
    changed.more_stages[0].unet_steps = 3
    with pytest.raises(KeyboardInterrupt):
        world.build(changed)
    assert calls == ["", str(tmp_path / "b" / "model")]  # other settings: from the start
    with pytest.raises(ValueError, match="more_stages: stage 2 has init_from"):
        world.build(_tiny_build(tmp_path / "c", more_stages=[dataclasses.replace(cfg.more_stages[0],
                                                                                 init_from="x")]))
