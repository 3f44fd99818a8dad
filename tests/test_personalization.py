"""The shared personalization simulator on the tiny pipeline: loss goes down, exactly the right parameters
change, the caller's model is untouched, and saved outputs reload in plain diffusers."""

import pytest
import torch

from apdm.config import PersonalizationConfig
from apdm.core import diffusion as D
from apdm.personalization import simulator as S
from helpers import fixed_personalization_loss


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _changed(before, module):
    return {n for n, p in module.named_parameters() if n in before and not torch.equal(before[n], p.detach())}


@pytest.fixture
def class_images():
    return torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(7))


def _train(state, images, steps):
    for _ in range(steps):
        S.step(state, images)


def test_dreambooth_lowers_loss_changes_unet_only(tiny_sd, rand_images, class_images):
    unet0, te0, vae0 = _snapshot(tiny_sd.unet), _snapshot(tiny_sd.text_encoder), _snapshot(tiny_sd.vae)
    cfg = PersonalizationConfig(method="dreambooth", learning_rate=1e-3, batch_size=4, steps=15, max_grad_norm=0,
                                adam_weight_decay=0.0, sample_vae_posterior=False)
    state = S.setup(tiny_sd, cfg, class_images)
    before = fixed_personalization_loss(state, rand_images)
    _train(state, rand_images, cfg.steps)
    after = fixed_personalization_loss(state, rand_images)
    assert after < 0.8 * before, (before, after)
    assert len(_changed(unet0, state.sd.unet)) == len(unet0)  # every UNet tensor learned
    assert not _changed(te0, state.sd.text_encoder) and not _changed(vae0, state.sd.vae)
    # the caller's model is untouched
    assert not _changed(unet0, tiny_sd.unet)


def test_dreambooth_with_text_encoder(tiny_sd, rand_images, class_images):
    te0 = _snapshot(tiny_sd.text_encoder)
    cfg = PersonalizationConfig(method="dreambooth", learning_rate=1e-3, train_text_encoder=True, steps=3)
    state = S.setup(tiny_sd, cfg, class_images)
    _train(state, rand_images, 3)
    assert _changed(te0, state.sd.text_encoder)
    assert not _changed(te0, tiny_sd.text_encoder)



def test_dreambooth_unet_trainable_trains_only_the_named_parameters(tiny_sd, rand_images):
    """``unet_trainable`` (Custom Diffusion's / CAAT's cross-attention K/V): exactly those tensors learn."""
    unet0 = _snapshot(tiny_sd.unet)
    cfg = PersonalizationConfig(method="dreambooth", learning_rate=1e-3, batch_size=4, with_prior_preservation=False,
                                unet_trainable=["attn2.to_k", "attn2.to_v"])
    state = S.setup(tiny_sd, cfg)
    _train(state, rand_images, 2)
    kv = {n for n in unet0 if "attn2.to_k" in n or "attn2.to_v" in n}
    assert kv and _changed(unet0, state.sd.unet) == kv
    assert {id(p) for p in state.params} == {id(p) for n, p in state.sd.unet.named_parameters() if n in kv}
    with pytest.raises(ValueError, match="no UNet parameter name contains"):
        S.setup(tiny_sd, PersonalizationConfig(method="dreambooth", with_prior_preservation=False,
                                               unet_trainable=["attn9.to_z"]))


def test_step_with_pixel_grad_gives_the_images_the_loss_gradient(tiny_sd, rand_images):
    """CAAT's joint step: the step's one backward pass gives the images the gradient of that step's loss (same
    draw), and the model still takes its step."""
    cfg = PersonalizationConfig(method="dreambooth", learning_rate=1e-3, batch_size=4, with_prior_preservation=False,
                                random_flip=True, unet_trainable=["attn2.to_k", "attn2.to_v"])
    reference = S.setup(tiny_sd, cfg)
    reference.generator.manual_seed(11)
    x_ref = rand_images.clone().requires_grad_(True)
    expected, = torch.autograd.grad(S.loss(reference, x_ref)[0], x_ref)
    state = S.setup(tiny_sd, cfg)
    state.generator.manual_seed(11)
    unet0 = _snapshot(state.sd.unet)
    x = rand_images.clone().requires_grad_(True)
    S.step(state, x, pixel_grad=True)
    torch.testing.assert_close(x.grad, expected)
    assert _changed(unet0, state.sd.unet)
    y = rand_images.clone().requires_grad_(True)  # without pixel_grad the images get no gradient
    S.step(state, y)
    assert y.grad is None

def test_prior_preservation_requires_class_images(tiny_sd):
    with pytest.raises(ValueError, match="class images"):
        S.setup(tiny_sd, PersonalizationConfig(method="dreambooth"))


def test_lora_trains_only_adapters(tiny_sd, rand_images):
    unet0 = _snapshot(tiny_sd.unet)
    cfg = PersonalizationConfig(method="lora", learning_rate=1e-2, batch_size=4, with_prior_preservation=False,
                                max_grad_norm=0, adam_weight_decay=0.0, sample_vae_posterior=False)
    state = S.setup(tiny_sd, cfg)
    lora0 = {n: p.detach().clone() for n, p in state.sd.unet.named_parameters() if "lora_" in n}
    assert lora0, "no LoRA parameters were added"
    before = fixed_personalization_loss(state, rand_images)
    _train(state, rand_images, 15)
    after = fixed_personalization_loss(state, rand_images)
    assert after < before
    changed = _changed(lora0, state.sd.unet)
    lora_b = {n for n in lora0 if "lora_B" in n}
    assert lora_b <= changed  # every LoRA B matrix moved off its init
    base_names = {n for n, _ in state.sd.unet.named_parameters() if "lora_" not in n}
    base_now = {n.replace(".base_layer", ""): p for n, p in state.sd.unet.named_parameters() if n in base_names}
    assert all(torch.equal(unet0[n], base_now[n]) for n in unet0)  # frozen base bit-identical
    assert not any("lora_" in n for n, _ in tiny_sd.unet.named_parameters())  # caller's UNet has no adapter


def test_lora_alpha_survives_save_and_reload(tiny_sd, rand_images, tmp_path):
    """The scaling alpha/rank (here 16/4) is saved with the weights: apdm's loader and plain diffusers rebuild the
    in-memory UNet (before, diffusers fell back to alpha = rank: 0.37 apart)."""
    cfg = PersonalizationConfig(method="lora", learning_rate=1e-2, steps=2, lora_rank=4, lora_alpha=16.0,
                                with_prior_preservation=False)
    state = S.setup(tiny_sd, cfg)
    _train(state, rand_images, 2)
    S.finish(state)
    out = S.save(state, tmp_path / "lora", quiet=True)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    cond = D.encode_prompt(tiny_sd.text_encoder, tiny_sd.tokenizer, ["a photo of sks person"])
    pipe = tiny_sd.clone().pipeline()  # plain diffusers, on a copy of the base UNet
    pipe.load_lora_weights(str(out / "lora"))
    with torch.no_grad():
        expected = state.sd.unet(x, t, cond).sample
        assert (expected - tiny_sd.unet(x, t, cond).sample).abs().max() > 1e-2  # the LoRA changed the model
        torch.testing.assert_close(S.load_personalized(tiny_sd, out).unet(x, t, cond).sample, expected,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pipe.unet(x, t, cond).sample, expected, atol=1e-5, rtol=1e-5)
    assert S.lora_metadata(state.sd.unet)["lora_alpha"] == 16.0 and S.lora_metadata(state.sd.unet)["r"] == 4


def test_lora_with_train_text_encoder_is_named(tiny_sd):
    """LoRA adapts only the UNet: train_text_encoder=true is ignored, and check_personalization says so (naming both
    keys) instead of leaving it silent; the text encoder indeed stays the base model's."""
    cfg = PersonalizationConfig(method="lora", train_text_encoder=True, with_prior_preservation=False)
    said = S.check_method_options(cfg, "personalizations[1]")
    assert len(said) == 1 and "personalizations[1].train_text_encoder=true is ignored" in said[0]
    assert "personalizations[1].method=lora" in said[0]
    assert S.check_method_options(PersonalizationConfig(method="dreambooth", train_text_encoder=True)) == []
    state = S.setup(tiny_sd, cfg)
    assert not any(p.requires_grad for p in state.sd.text_encoder.parameters())


def test_ti_trains_only_the_new_row(tiny_sd, rand_images):
    unet0 = _snapshot(tiny_sd.unet)
    n_vocab = len(tiny_sd.tokenizer)
    cfg = PersonalizationConfig(method="ti", learning_rate=5e-2, batch_size=4, max_grad_norm=0)
    state = S.setup(tiny_sd, cfg)
    assert state.instance_prompt == "a photo of <sks> person"
    emb0 = state.sd.text_encoder.get_input_embeddings().weight.detach().clone()
    te_other0 = {n: p.detach().clone() for n, p in state.sd.text_encoder.named_parameters()
                 if "token_embedding" not in n}
    before = fixed_personalization_loss(state, rand_images)
    _train(state, rand_images, 15)
    after = fixed_personalization_loss(state, rand_images)
    assert after < before
    emb = state.sd.text_encoder.get_input_embeddings().weight.detach()
    rows_changed = (emb != emb0).any(dim=1).nonzero().flatten().tolist()
    assert rows_changed == [state.ti_token_id]
    assert not _changed(te_other0, state.sd.text_encoder)
    assert not _changed(unet0, state.sd.unet)
    assert len(tiny_sd.tokenizer) == n_vocab  # the caller's tokenizer did not gain the token


def test_custom_diffusion_trains_the_cross_attention_kv_and_the_new_row_only(tiny_sd, rand_images, class_images):
    """Custom Diffusion: the loss falls; of the UNet only attn2.to_k/to_v move, of the text encoder only the new
    token's row (at text_encoder_lr); prompts name the token; the caller's model is untouched."""
    unet0, te0 = _snapshot(tiny_sd.unet), _snapshot(tiny_sd.text_encoder)
    cfg = PersonalizationConfig(method="custom_diffusion", learning_rate=1e-2, text_encoder_lr=5e-2, batch_size=4,
                                max_grad_norm=0, adam_weight_decay=0.0, sample_vae_posterior=False)
    state = S.setup(tiny_sd, cfg, class_images)
    assert state.instance_prompt == "a photo of <sks> person"
    assert S.prompt_for(state, "a photo of sks person on a beach") == "a photo of <sks> person on a beach"
    assert [g["lr"] for g in state.optimizer.param_groups] == [5e-2, 1e-2]
    emb0 = state.sd.text_encoder.get_input_embeddings().weight.detach().clone()
    before = fixed_personalization_loss(state, rand_images)
    _train(state, rand_images, 15)
    after = fixed_personalization_loss(state, rand_images)
    assert after < before
    kv = {n for n in unet0 if "attn2.to_k" in n or "attn2.to_v" in n}
    assert kv and _changed(unet0, state.sd.unet) == kv
    emb = state.sd.text_encoder.get_input_embeddings().weight.detach()
    assert (emb != emb0).any(dim=1).nonzero().flatten().tolist() == [state.ti_token_id]
    assert not _changed({n: p for n, p in te0.items() if "token_embedding" not in n}, state.sd.text_encoder)
    assert not _changed(unet0, tiny_sd.unet) and not _changed(te0, tiny_sd.text_encoder)
    with pytest.raises(ValueError, match="no UNet parameter name contains"):
        S.setup(tiny_sd, PersonalizationConfig(method="custom_diffusion", unet_trainable=["attn9.to_z"]), class_images)


@pytest.mark.parametrize("method", ["dreambooth", "lora", "ti", "custom_diffusion"])
def test_finish_frees_gradients_and_optimizer_moments(tiny_sd, rand_images, class_images, method):
    """A finished attacker keeps only its weights: no gradients, no AdamW moments (ASPL's PGD and sampling after
    an attack would otherwise carry ~3× the trainable weights), and nothing that could train any more."""
    cfg = PersonalizationConfig(method=method, learning_rate=1e-2, with_prior_preservation=method == "dreambooth")
    state = S.setup(tiny_sd, cfg, class_images)
    _train(state, rand_images, 2)
    assert state.optimizer.state and any(p.grad is not None for p in state.params)  # what a live state holds
    S.finish(state)
    assert not state.optimizer.state and all(p.grad is None for p in state.params)
    assert not any(p.requires_grad for m in (state.sd.unet, state.sd.text_encoder) for p in m.parameters())


def test_loss_is_differentiable_wrt_images(tiny_sd, rand_images, class_images):
    """Pixel attacks (ASPL/FSMG) take the gradient of the personalization loss w.r.t. the images."""
    state = S.setup(tiny_sd, PersonalizationConfig(method="dreambooth"), class_images)
    x = rand_images.clone().requires_grad_(True)
    total, logs = S.loss(state, x, batch_size=4)
    total.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert set(logs) == {"loss_instance", "loss_prior"}


def test_saved_outputs_reload_in_plain_diffusers(tiny_sd, rand_images, class_images, tmp_path):
    from diffusers import StableDiffusionPipeline

    from apdm.core.models import save_sd

    base_dir = save_sd(tiny_sd, tmp_path / "base")
    for method in ("dreambooth", "lora", "ti", "custom_diffusion"):
        cfg = PersonalizationConfig(method=method, learning_rate=1e-2, steps=2,
                                    with_prior_preservation=method == "dreambooth")
        state = S.setup(tiny_sd, cfg, class_images)
        _train(state, rand_images, 2)
        S.finish(state)
        out = S.save(state, tmp_path / method)
        prompt = S.prompt_for(state, "a photo of sks person")
        # plain diffusers: DreamBooth is a full pipeline; LoRA / TI load onto the base model
        if method == "dreambooth":
            pipe = StableDiffusionPipeline.from_pretrained(str(out / "model"))
        else:
            pipe = StableDiffusionPipeline.from_pretrained(str(base_dir))
            if method == "lora":
                pipe.load_lora_weights(str(out / "lora"))
            else:
                pipe.load_textual_inversion(str(out / method), token="<sks>")
            if method == "custom_diffusion":
                from safetensors.torch import load_file

                kv = load_file(str(out / method / "unet_kv.safetensors"))
                assert kv and all("attn2.to_k" in n or "attn2.to_v" in n for n in kv)
                assert not pipe.unet.load_state_dict(kv, strict=False).unexpected_keys
        pipe.set_progress_bar_config(disable=True)
        img = pipe([prompt], num_inference_steps=2, height=64, width=64, output_type="np").images
        assert img.shape == (1, 64, 64, 3)
        # apdm's own loader gives back the same model as the in-memory one
        expected = D.generate(state.sd, [prompt], 1, 3, seed=0, quiet=True)
        again = D.generate(S.load_personalized(tiny_sd, out), [prompt], 1, 3, seed=0, quiet=True)
        torch.testing.assert_close(again, expected, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("random_flip", [False, True])
def test_cached_posteriors_give_the_per_minibatch_latents(tiny_sd, rand_images, class_images, random_flip):
    """Steps draw their VAE posterior samples from posteriors encoded once (the images do not change between
    steps); the loss must equal the one of encoding each minibatch afresh (the uncached path pixel attacks take),
    for the same draws, and new images must be re-encoded, not served from the cache."""
    cfg = PersonalizationConfig(method="dreambooth", batch_size=3, random_flip=random_flip)
    cached, fresh = S.setup(tiny_sd, cfg, class_images), S.setup(tiny_sd, cfg, class_images)
    other = torch.rand(rand_images.shape, generator=torch.Generator().manual_seed(11))
    for images in (rand_images, rand_images, other):
        with torch.no_grad():
            a, _ = S.loss(cached, images)
            b, _ = S.loss(fresh, images.clone().requires_grad_(True))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(cached._cached_posteriors["instance"][0], other)


def test_posterior_latents_equal_encode_images(tiny_sd, rand_images):
    """One posterior, many draws: the same numbers as encoding with the same generator."""
    mean, std = D.vae_posterior(tiny_sd.vae, rand_images, batch=2)
    for sample in (False, True):
        a = D.posterior_latents(tiny_sd.vae, mean, std, sample, torch.Generator().manual_seed(3))
        b = D.encode_images(tiny_sd.vae, rand_images, sample, torch.Generator().manual_seed(3))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_lora_init_depends_on_the_seed_only(tiny_sd):
    """The adapters' random init must not depend on what consumed the global RNG before (benchmark jobs run in
    any order, in any process), and must leave the caller's global RNG state as it was."""
    def adapters(cfg):
        state = S.setup(tiny_sd, cfg)
        return torch.cat([p.detach().flatten() for n, p in state.sd.unet.named_parameters() if "lora_A" in n])

    cfg = PersonalizationConfig(method="lora", with_prior_preservation=False)
    torch.manual_seed(1)
    a = adapters(cfg)
    torch.rand(1000)
    before = torch.random.get_rng_state()
    b = adapters(cfg)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(a, b)
    assert not torch.equal(a, adapters(PersonalizationConfig(method="lora", with_prior_preservation=False, seed=1)))


def test_class_images_of_a_model_changed_only_in_its_cross_attention_are_its_own(tmp_path):
    """The class-image cache was keyed on a sample of the UNet's weights: a protected model whose protection changed
    only the cross-attention (protect.trainable=attn2) or the text encoder reused the unprotected model's cached
    class images, and the benchmark's attack on it trained with the wrong prior."""
    from apdm.config import PersonalizationConfig
    from apdm.core.models import tiny_sd
    from apdm.personalization.simulator import class_images_for

    cfg = PersonalizationConfig(num_class_images=1, class_sample_steps=1, class_data_dir=str(tmp_path))
    base, cross, text = tiny_sd(seed=0), tiny_sd(seed=0), tiny_sd(seed=0)
    with torch.no_grad():
        for n, p in cross.unet.named_parameters():
            if "attn2" in n:
                p.add_(0.05)
        for p in text.text_encoder.parameters():
            p.add_(0.01)
    assert cross.fingerprint() == base.fingerprint()  # the sampled weights miss attn2: the old key collided
    for sd in (base, cross, text):
        class_images_for(sd, cfg, quiet=True)
    assert len(list(tmp_path.iterdir())) == 3  # one cache folder per model
    assert class_images_for(tiny_sd(seed=0), cfg, quiet=True).shape == (1, 3, 64, 64)  # the same model: cached
    assert len(list(tmp_path.iterdir())) == 3
