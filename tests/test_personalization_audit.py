"""Regression tests for audited faults of the personalization simulator, ``apdm personalize`` and the evaluation
protocol: another training resolution with prior preservation, the fp16 loss scale in a pixel gradient, the
personalize seed, an empty TI initializer, class-image seeds, quiet training, and the caller's shared modules."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch
from PIL import Image

from apdm.config import ModelConfig, PersonalizationConfig, PersonalizeRunConfig, SampleConfig
from apdm.core import diffusion as D
from apdm.personalization import simulator as S


def _photos(folder, n: int = 2, size: int = 100):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (size, size), (40 * i, 120, 200)).save(folder / f"{i}.png")
    return folder


def _run_cfg(tmp_path, name: str, **kw) -> PersonalizeRunConfig:
    per = kw.pop("personalization", PersonalizationConfig(steps=1, num_class_images=1, class_sample_steps=1,
                                                          class_data_dir=str(tmp_path / "cls")))
    return PersonalizeRunConfig(model=ModelConfig(path="tiny", device="cpu"), instance_data=str(tmp_path / "img"),
                                output_dir=str(tmp_path / name), quiet=True, personalization=per,
                                sample=SampleConfig(num_images_per_prompt=1, num_inference_steps=1), **kw)


# ---------------------------------------------------------------- 1: a resolution other than the model's
def test_resolution_other_than_native_with_prior_preservation(tiny_sd, tmp_path):
    """Instance photos, class images and samples all at ``resolution`` (128 on the 64-pixel tiny model): the run
    trains (it crashed at the first step on latents of two sizes); protocol.personalize_and_sample too."""
    from apdm.evaluation.protocol import personalize_and_sample
    from apdm.personalization.run import run

    _photos(tmp_path / "img")
    summary = run(_run_cfg(tmp_path, "out", resolution=128))
    assert summary["steps"] == 1
    pngs = sorted((tmp_path / "cls").glob("*/*.png"))
    assert len(pngs) == 1 and Image.open(pngs[0]).size == (128, 128)
    assert Image.open(tmp_path / "out" / "samples" / "00_000.png").size == (128, 128)
    # class_images_for: at the size asked, under another key than the native size's
    cfg = PersonalizationConfig(num_class_images=1, class_sample_steps=1, class_data_dir=str(tmp_path / "cls2"))
    assert S.class_images_for(tiny_sd, cfg, quiet=True, size=128).shape == (1, 3, 128, 128)
    assert S.class_images_for(tiny_sd, cfg, quiet=True).shape == (1, 3, 64, 64)
    assert len(list((tmp_path / "cls2").iterdir())) == 2
    # the protocol (apdm evaluate): class images at the training images' size, samples too
    out = personalize_and_sample(tiny_sd, torch.rand(2, 3, 128, 128), dataclasses.replace(cfg, steps=1),
                                 ["a photo of sks person"], SampleConfig(num_images_per_prompt=1, num_inference_steps=1))
    assert out["state"].class_images.shape[-2:] == (128, 128)
    assert out["images"]["a photo of sks person"].shape == (1, 3, 128, 128)


# ---------------------------------------------------------------- 2: the fp16 loss scale in the pixel gradient
def test_pixel_grad_with_grad_scaler_is_unscaled(tiny_sd):
    """step(pixel_grad=True) with a GradScaler (built on CUDA for fp16; the CPU one runs the same code): the images'
    gradient is the one without the scaler (it was ×65,536), a gradient the leaf held is kept, and an overflow
    leaves zeros there (and the model's step skipped)."""
    imgs = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    cfg = PersonalizationConfig(method="dreambooth", with_prior_preservation=False, batch_size=2,
                                unet_trainable=["attn2.to_k", "attn2.to_v"], learning_rate=1e-3)
    grads = []
    for scaler in (None, torch.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu")):
        st = S.setup(tiny_sd, cfg)
        st.scaler = scaler
        x = imgs.clone().requires_grad_(True)
        if len(grads) == 2:
            x.grad = torch.ones_like(x)  # held before the step: left alone
        S.step(st, x, pixel_grad=True)
        grads.append(x.grad.clone())
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-9)
    torch.testing.assert_close(grads[2] - 1, grads[0], rtol=1e-3, atol=1e-6)
    st = S.setup(tiny_sd, cfg)
    st.scaler = torch.amp.GradScaler("cpu", init_scale=float("inf"))  # every scaled gradient overflows
    before = [p.detach().clone() for p in st.params]
    x = imgs.clone().requires_grad_(True)
    S.step(st, x, pixel_grad=True)
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert all(torch.equal(a, b) for a, b in zip(before, st.params))


# ---------------------------------------------------------------- 3: apdm personalize seed=N
def test_personalize_seed_is_the_attackers(tmp_path, apdm_log):
    """``seed`` of apdm personalize reaches the attacker (as apdm evaluate's does): two seeds, two loss curves;
    a personalization.seed it replaces is named in a warning."""
    from apdm.personalization.run import run

    _photos(tmp_path / "img", size=64)
    per = PersonalizationConfig(method="lora", steps=2, with_prior_preservation=False)
    runs = [run(_run_cfg(tmp_path, f"out{s}", seed=s, personalization=per)) for s in (0, 5)]
    assert runs[0]["loss_history"] != runs[1]["loss_history"]
    assert [r["seed"] for r in runs] == [0, 5]
    assert "replaced" not in apdm_log()
    again = run(_run_cfg(tmp_path, "out3", seed=5, personalization=dataclasses.replace(per, seed=3)))
    assert again["loss_history"] == runs[1]["loss_history"]
    assert "personalization.seed=3 is replaced by seed=5" in apdm_log()
    assert json.loads((tmp_path / "out3" / "summary.json").read_text())["seed"] == 5


# ---------------------------------------------------------------- 4: an empty TI initializer
@pytest.mark.parametrize("method", ["ti", "custom_diffusion"])
def test_empty_ti_initializer_token_is_refused(tiny_sd, method):
    """An initializer that encodes to no token gave the new token a NaN embedding (the mean of none): refused by
    check_personalization (empty or blank) and by setup (no token), naming the key."""
    for token in ("", "  "):
        cfg = PersonalizationConfig(method=method, ti_initializer_token=token, with_prior_preservation=False)
        with pytest.raises(ValueError, match="personalization.ti_initializer_token"):
            S.check_personalization(cfg)
        with pytest.raises(ValueError, match="personalization.ti_initializer_token"):
            S.setup(tiny_sd, cfg)
    # an option the method does not use is not checked
    S.check_personalization(PersonalizationConfig(method="lora", ti_initializer_token=""))
    st = S.setup(tiny_sd, PersonalizationConfig(method=method, with_prior_preservation=False))
    assert torch.isfinite(st.sd.text_encoder.get_input_embeddings().weight[st.ti_token_id]).all()


# ---------------------------------------------------------------- 5: class-image seeds
def test_class_image_seeds_and_the_offset_of_another_set(tiny_sd, tmp_path):
    """Class image i of attacker seed s is drawn from 10,000 + s + i (kept: every documented result reproduces with
    it), cached under the key of before; ``seed_offset`` draws another set of the same seed (protect-model's x⁺),
    keyed as its old ``cfg.seed`` = offset; seeds SEED_STRIDE apart share no image."""
    kw = {"num_class_images": 4, "class_sample_steps": 1, "class_data_dir": str(tmp_path)}
    cfg0 = PersonalizationConfig(seed=0, **kw)
    a = S.class_images_for(tiny_sd, cfg0, quiet=True)
    ref = D.generate(tiny_sd, [cfg0.class_prompt], 4, 1, cfg0.class_guidance_scale, seed=10_000, quiet=True)
    torch.testing.assert_close(a, ref, rtol=0, atol=0.5 / 255 + 1e-6)  # (read back from 8-bit files)
    settings = f"{cfg0.class_prompt}|1|{cfg0.class_guidance_scale}|0"
    key = f"{tiny_sd.weights_digest()}-{hashlib.sha256(settings.encode()).hexdigest()[:10]}"
    assert len(list((tmp_path / key).glob("*.png"))) == 4
    far = S.class_images_for(tiny_sd, dataclasses.replace(cfg0, seed=D.SEED_STRIDE), quiet=True)
    assert not any(torch.equal(x, y) for x in a for y in far)
    next_seed = S.class_images_for(tiny_sd, dataclasses.replace(cfg0, seed=1), quiet=True)
    assert torch.equal(next_seed[:3], a[1:])  # consecutive seeds share all but one (documented; results reproduce)
    one = dataclasses.replace(cfg0, num_class_images=1)
    c = S.class_images_for(tiny_sd, one, quiet=True, seed_offset=7777)
    ref = D.generate(tiny_sd, [cfg0.class_prompt], 1, 1, cfg0.class_guidance_scale, seed=17_777, quiet=True)
    torch.testing.assert_close(c, ref, rtol=0, atol=0.5 / 255 + 1e-6)
    settings = f"{cfg0.class_prompt}|1|{cfg0.class_guidance_scale}|7777"
    assert (tmp_path / f"{tiny_sd.weights_digest()}-{hashlib.sha256(settings.encode()).hexdigest()[:10]}").is_dir()


# ---------------------------------------------------------------- 6: quiet training
def test_train_quiet_hides_the_bar(tiny_sd, rand_images, capfd):
    """train(quiet=True) shows no progress bar even when bars are on; personalize_and_sample(quiet=True) neither."""
    from apdm.evaluation.protocol import personalize_and_sample
    from apdm.utils import progress_enabled, set_progress

    was = progress_enabled()
    set_progress(True)
    try:
        cfg = PersonalizationConfig(method="lora", steps=2, with_prior_preservation=False)
        S.train(S.setup(tiny_sd, cfg), rand_images)
        assert "personalizing (lora)" in capfd.readouterr().err  # (bars are on)
        S.train(S.setup(tiny_sd, cfg), rand_images, quiet=True)
        assert "personalizing" not in capfd.readouterr().err
        personalize_and_sample(tiny_sd, rand_images, cfg, ["a photo of sks person"],
                               SampleConfig(num_images_per_prompt=1, num_inference_steps=1), quiet=True)
        assert capfd.readouterr().err == ""
    finally:
        set_progress(was)


# ---------------------------------------------------------------- 7: the caller's shared modules
@pytest.mark.parametrize("method,part", [("ti", "unet"), ("lora", "text_encoder"), ("dreambooth", "text_encoder")])
def test_train_and_finish_leave_the_callers_shared_modules_as_they_were(tiny_sd, rand_images, method, part):
    """A module the state shares with the caller (TI: the UNet; LoRA and DreamBooth without the text encoder: the
    text encoder; the VAE) keeps its mode and requires_grad flags and gets no gradient; the state's own copies
    end in eval mode without gradients, as before."""
    sd = tiny_sd.clone(unet=True, text_encoder=True)  # modules of the test's own, to mark trainable
    mods = {name: getattr(sd, name) for name in (part, "vae")}
    for m in mods.values():
        m.train().requires_grad_(True)
        next(m.parameters()).requires_grad_(False)  # mixed flags
    flags = {name: [p.requires_grad for p in m.parameters()] for name, m in mods.items()}
    st = S.setup(sd, PersonalizationConfig(method=method, with_prior_preservation=False, steps=1))
    assert getattr(st.sd, part) is mods[part]
    S.step(st, rand_images)
    S.finish(st)
    for name, m in mods.items():
        assert m.training, name
        assert [p.requires_grad for p in m.parameters()] == flags[name], name
        assert all(p.grad is None for p in m.parameters()), name
    for name in st.owned:
        own = getattr(st.sd, name)
        assert not own.training and not any(p.requires_grad for p in own.parameters())
    assert part not in st.owned


# ================================================================ second audit: identifiers, ranges, ignored options
class _ModelLoaded(Exception):
    """Raised by a stand-in for load_sd: the run got past every check that needs no model."""


def _no_model(*args, **kwargs):
    raise _ModelLoaded()


# ---------------------------------------------------------------- identifier next to punctuation
def test_identifier_next_to_punctuation_becomes_the_learned_token(tiny_sd):
    """TI and Custom Diffusion put their token in place of the identifier word wherever it stands as a word:
    next to a comma or a question mark (the prompt was left as it was, and ti_prompt raised), before a tab; not
    inside a longer word (sksx) or an already-made <sks>, and not in another case (as before)."""
    cfg = PersonalizationConfig(method="ti")
    cases = {"a photo of sks, smiling": "a photo of <sks>, smiling", "is it sks?": "is it <sks>?",
             "sks\tperson": "<sks>\tperson", "(sks) on a beach": "(<sks>) on a beach",
             "a photo of sks person": "a photo of <sks> person",
             "a photo of sksx person": "a photo of sksx person", "a photo of <sks> person": "a photo of <sks> person",
             "a photo of SKS person": "a photo of SKS person"}
    for prompt, expected in cases.items():
        assert S.prompt_for(cfg, prompt) == expected, prompt
    assert S.prompt_for(PersonalizationConfig(method="custom_diffusion"), "is it sks?") == "is it <sks>?"
    assert S.prompt_for(PersonalizationConfig(method="lora"), "is it sks?") == "is it sks?"
    assert S.ti_prompt("a photo of sks, smiling", cfg) == "a photo of <sks>, smiling"
    assert S.swap_identifier("sks, sks.", "sks", "zwx") == "zwx, zwx."
    with pytest.raises(ValueError, match="does not contain the identifier word 'sks'"):
        S.swap_identifier("a photo of sksx person", "sks", "zwx")
    # setup: the instance prompt the token trains with holds the token, for a capitalised identifier too
    for ident in ("sks", "Sks"):
        per = PersonalizationConfig(method="ti", identifier=ident, instance_prompt=f"a photo of {ident}, smiling")
        state = S.setup(tiny_sd, per)
        assert state.instance_prompt == f"a photo of <{ident}>, smiling"
        assert state.ti_token_id in D.tokenize(state.sd.tokenizer, [state.instance_prompt])[0].tolist()


# ---------------------------------------------------------------- settings that failed late or did nothing
@pytest.mark.parametrize("kw", [
    {"adam_beta1": 1.5}, {"adam_beta2": 1.0}, {"adam_beta1": -0.1}, {"adam_epsilon": -1.0},
    {"adam_weight_decay": -1.0}, {"adam_weight_decay": float("nan")},
    {"method": "lora", "lora_alpha": 0.0}, {"method": "lora", "lora_alpha": -4.0},
    {"prior_loss_weight": -1.0}, {"prior_loss_weight": float("nan")},
    {"max_grad_norm": -1.0}, {"max_grad_norm": float("nan")},
])
def test_out_of_range_settings_are_refused_before_any_work(kw):
    """Adam settings torch refuses only when the optimizer is made (after the model loaded and the class images
    were drawn), a LoRA alpha of 0 (an adapter that changes nothing) or below (its sign flipped), a negative or NaN
    prior loss weight and a negative or NaN max_grad_norm (clipping silently off) stop check_personalization,
    naming the key and the value."""
    name = next(k for k in kw if k != "method")
    with pytest.raises(ValueError, match=rf"personalizations\[1\]\.{name}={kw[name]}"):
        S.check_personalization(PersonalizationConfig(**kw), "personalizations[1]")


def test_edge_values_that_stay_valid():
    """Guard (passed before the fix): max_grad_norm=0 (no clipping), zero weight decay, epsilon and prior weight,
    beta 0, and a lora_alpha the method does not use are accepted; so is every shipped recipe's attacker."""
    S.check_personalization(PersonalizationConfig(max_grad_norm=0.0, adam_weight_decay=0.0, adam_epsilon=0.0,
                                                  prior_loss_weight=0.0, adam_beta1=0.0, lora_alpha=0.0))
    S.check_personalization(PersonalizationConfig(method="lora", lora_alpha=0.5))


@pytest.mark.parametrize("method", ["ti", "custom_diffusion"])
def test_token_method_needs_the_identifier_in_its_instance_prompt(method):
    """A method that learns a token refuses, before any work, an instance prompt without the identifier word (it
    passed check_personalization and failed in setup, after the class images), naming the prompt's key; prompts
    given by their own keys (apdm evaluate's subjects) are checked instead of the config's own."""
    cfg = PersonalizationConfig(method=method, instance_prompt="a photo of zwx person")
    with pytest.raises(ValueError, match=r"personalization\.instance_prompt='a photo of zwx person' does not contain "
                                         r"the identifier word personalization\.identifier='sks'"):
        S.check_personalization(cfg)
    S.check_personalization(dataclasses.replace(cfg, instance_prompt="a photo of sks, smiling"))
    with pytest.raises(ValueError, match=r"subjects\[1\]\.instance_prompt='zwx' does not contain"):
        S.check_personalization(cfg, "personalizations[0]", {"subjects[0].instance_prompt": "a sks dog",
                                                            "subjects[1].instance_prompt": "zwx"})
    S.check_personalization(cfg, "personalizations[0]", {"subjects[0].instance_prompt": "a sks dog"})
    S.check_personalization(dataclasses.replace(cfg, method="dreambooth"))  # no token: no identifier needed


def test_evaluate_checks_each_subjects_prompt_before_the_model_loads(tmp_path, monkeypatch):
    """apdm evaluate with personalizations=[lora, ti] and a subject whose prompt lacks the identifier: refused
    before the model loads (the LoRA cell ran and was cached, then the TI cell stopped the run), naming the
    subject's prompt; with the identifier in it the run gets as far as loading the model."""
    from apdm.config import EvalSubjectConfig, EvaluateRunConfig
    from apdm.evaluation.run import run

    monkeypatch.setattr("apdm.core.models.load_sd", _no_model)
    clean = _photos(tmp_path / "clean", size=64)
    pers = [PersonalizationConfig(method="lora", steps=1, with_prior_preservation=False),
            PersonalizationConfig(method="ti", steps=1)]

    def cfg(prompt: str) -> EvaluateRunConfig:
        return EvaluateRunConfig(model=ModelConfig(path="tiny", device="cpu"), output_dir=str(tmp_path / "out"),
                                 quiet=True, scenarios=["all_clean"], attacks=["none"], personalizations=pers,
                                 subjects=[EvalSubjectConfig(name="al", clean_data=str(clean), instance_prompt=prompt)])

    with pytest.raises(ValueError, match=r"subjects\[0\]\.instance_prompt='a photo of zwx person' does not contain "
                                         r"the identifier word personalizations\[1\]\.identifier='sks'"):
        run(cfg("a photo of zwx person"))
    with pytest.raises(_ModelLoaded):
        run(cfg("a photo of sks, smiling"))


# ---------------------------------------------------------------- options a method ignores
@pytest.mark.parametrize("method, kw", [
    ("lora", {"unet_trainable": ["attn2.to_k"]}), ("lora", {"text_encoder_lr": 1.0}),
    ("ti", {"text_encoder_lr": 1.0}), ("ti", {"train_text_encoder": True}), ("ti", {"unet_trainable": ["attn2.to_k"]}),
    ("custom_diffusion", {"train_text_encoder": True}), ("dreambooth", {"text_encoder_lr": 1.0}),
])
def test_an_option_the_method_ignores_is_named(method, kw, apdm_log):
    """Each option the method leaves unused (the trained weights are bit-identical without it) is named in a
    warning, as lora+train_text_encoder was: the key, its value and the method."""
    name = next(iter(kw))
    said = S.check_method_options(PersonalizationConfig(method=method, **kw), "personalizations[2]")
    assert len(said) == 1 and f"personalizations[2].{name}=" in said[0] and "is ignored" in said[0]
    assert f"personalizations[2].method={method}" in said[0]
    S.check_personalization(PersonalizationConfig(method=method, **kw))
    assert f"personalization.{name}=" in apdm_log()


def test_options_the_method_uses_are_not_named():
    """Guard (passed before the fix): no warning where the method uses the option (Custom Diffusion's token rate
    and K/V choice, DreamBooth's text-encoder rate and UNet subset) or where it is at its default."""
    for method, kw in [("custom_diffusion", {"text_encoder_lr": 1.0, "unet_trainable": ["attn2.to_q"]}),
                       ("dreambooth", {"train_text_encoder": True, "text_encoder_lr": 1.0}),
                       ("dreambooth", {"unet_trainable": ["attn2.to_k"]}), ("lora", {}), ("ti", {})]:
        assert S.check_method_options(PersonalizationConfig(method=method, **kw)) == [], (method, kw)


def test_text_encoder_lr_is_really_unused_by_ti(tiny_sd, rand_images):
    """Guard of the warning's truth (passed before the fix): TI's token trains at learning_rate whatever
    text_encoder_lr says."""
    base = PersonalizationConfig(method="ti", learning_rate=1e-2, steps=2, with_prior_preservation=False)
    rows = []
    for cfg in (base, dataclasses.replace(base, text_encoder_lr=1.0)):
        state = S.setup(tiny_sd, cfg)
        S.train(state, rand_images, quiet=True)
        rows.append(state.params[0][state.ti_token_id].detach().clone())
    assert torch.equal(rows[0], rows[1])


# ---------------------------------------------------------------- apdm personalize's resolution
def test_personalize_refuses_a_resolution_the_model_cannot_take(tmp_path, monkeypatch):
    """resolution<0 stops before the model loads; a side that is not a multiple of the VAE's 8 pixels per latent
    cell (60: the samples came out 56 pixels) or too small for the UNet (12, 16: torch's group-norm message at the
    first step) stops right after it loads, before any class image is drawn; each message names resolution=."""
    from apdm.core import models as M
    from apdm.personalization.run import run

    _photos(tmp_path / "img")
    real_load = M.load_sd
    monkeypatch.setattr(M, "load_sd", _no_model)
    with pytest.raises(ValueError, match=r"resolution=-8: must be 0"):
        run(_run_cfg(tmp_path, "neg", resolution=-8))
    monkeypatch.setattr(M, "load_sd", real_load)
    for res in (12, 16, 60):
        with pytest.raises(ValueError, match=rf"resolution={res}: this model takes image sides that are multiples of "
                                             r"8 .* from 24 up, e.g. 24, 32 or 64"):
            run(_run_cfg(tmp_path, f"r{res}", resolution=res))
    assert not (tmp_path / "cls").exists()
    from apdm.personalization.run import check_size

    sd = M.tiny_sd(seed=0)
    for ok in (24, 40, 64, 128):  # sides that train and sample (the smallest checked by hand)
        check_size(sd, ok)
