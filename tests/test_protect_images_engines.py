"""Image-protection engines on the tiny pipeline: PGD arithmetic, the budget guarantee of every method, each
attack moving its own objective the intended way, and LDU's ρ (size, gradient path, training, save/load)."""

import dataclasses
import json

import pytest
import torch

from apdm.config import PersonalizationConfig
from apdm.core import diffusion as D
from apdm.evaluation.fidelity import psnr
from apdm.personalization import simulator as S
from apdm.protect_images import baselines as B
from apdm.protect_images import ldu
from apdm.protect_images.pgd import EOT_TRANSFORMS, eot_jpeg, gaussian_blur, linear_decay, pgd_attack

BUDGET = 8 / 255
TOL = 1e-6


def _db_cfg(**kw):
    base = dict(method="dreambooth", learning_rate=1e-3, batch_size=2, with_prior_preservation=False,
                max_grad_norm=0, adam_weight_decay=0.0, sample_vae_posterior=False, steps=3)
    base.update(kw)
    return PersonalizationConfig(**base)


def _ti_cfg(**kw):
    base = dict(method="ti", learning_rate=5e-2, batch_size=2, with_prior_preservation=False, max_grad_norm=0,
                adam_weight_decay=0.0, sample_vae_posterior=False, steps=3)
    base.update(kw)
    return PersonalizationConfig(**base)


def _assert_budget(out, images, budget=BUDGET):
    assert out.shape == images.shape and out.dtype == torch.float32
    assert float((out - images).abs().max()) <= budget + TOL
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


# ============================================================================ PGD
def test_pgd_linear_loss_reaches_the_ball_corner():
    """For L(x) = <w, x>, PGD with enough steps ends exactly at clamp(x ± ε·sign(w)) (the analytic optimum)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g)
    w = torch.randn(2, 3, 16, 16, generator=g)
    eps = 6 / 255
    up = pgd_attack(x, lambda z: (w * z).sum(), eps, eps / 3, 5, maximize=True)
    down = pgd_attack(x, lambda z: (w * z).sum(), eps, eps / 3, 5, maximize=False)
    torch.testing.assert_close(up, (x + eps * w.sign()).clamp(0, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(down, (x - eps * w.sign()).clamp(0, 1), atol=1e-6, rtol=0)
    # a random start stays in the ball, and zero steps return the projected start
    start = pgd_attack(x, lambda z: (w * z).sum(), eps, eps, 0, random_start=True, generator=g)
    _assert_budget(start, x, eps)
    assert not torch.equal(start, x)


def test_pgd_resumes_from_x_init_and_projects_it():
    x = torch.full((1, 3, 8, 8), 0.5)
    far = x + 0.3
    out = pgd_attack(x, lambda z: z.sum(), 4 / 255, 1 / 255, 0, x_init=far)
    torch.testing.assert_close(out, x + 4 / 255)


def test_linear_decay_schedule():
    s = linear_decay(0.01, 100)
    assert s(0) == pytest.approx(0.01) and s(100) == pytest.approx(1e-4) and s(50) == pytest.approx(0.00505)


def test_eot_transforms_shapes_and_gradients():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g, requires_grad=True)
    for name, fn in EOT_TRANSFORMS.items():
        y = fn(x, g)
        assert y.shape == x.shape, name
        grad, = torch.autograd.grad(y.sum(), x)
        assert float(grad.abs().sum()) > 0, name
    # blur keeps a constant image constant (normalized kernel, reflect padding)
    flat = torch.full((1, 3, 16, 16), 0.3)
    torch.testing.assert_close(gaussian_blur(flat, 7, 1.5), flat)
    # JPEG: forward is a real (lossy) JPEG, backward the identity (straight-through)
    w = torch.randn(x.shape, generator=g)
    y = eot_jpeg(x, g)
    assert float((y - x).detach().abs().max()) > 1 / 255
    grad, = torch.autograd.grad((w * y).sum(), x)
    torch.testing.assert_close(grad, w)


def test_pgd_with_eot_keeps_budget_and_ascends():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g)
    w = torch.randn(2, 3, 32, 32, generator=g)

    def loss(z):
        return (w * z).sum()

    out = pgd_attack(x, loss, BUDGET, 2 / 255, 4, eot_transforms=["flip", "blur", "resize", "jpeg"], generator=g)
    _assert_budget(out, x)
    assert loss(out) > loss(x)


# ============================================================================ every method keeps the budget
def _run_method(name, sd, images):
    if name == "aspl":
        return B.protect_aspl(sd, images, budget=BUDGET, steps=1, surrogate_steps=1, pgd_steps=2,
                              pgd_alpha=2 / 255, personalization=_db_cfg(), quiet=True)
    if name == "fsmg":
        return B.protect_fsmg(sd, images, budget=BUDGET, steps=3, pgd_alpha=2 / 255, surrogate_steps=1,
                              personalization=_ti_cfg(), random_start=True, quiet=True)
    if name == "advdm":
        return B.protect_advdm(sd, images, budget=BUDGET, steps=3, pgd_alpha=2 / 255, random_start=True, quiet=True)
    if name == "photoguard":
        return B.protect_photoguard(sd, images, budget=BUDGET, steps=3, quiet=True)
    if name == "sds":
        return B.protect_sds(sd, images, budget=BUDGET, steps=3, pgd_alpha=2 / 255, quiet=True)
    if name == "mist":
        return B.protect_mist(sd, images, budget=BUDGET, steps=3, pgd_alpha=2 / 255, quiet=True)
    if name == "pid":
        return B.protect_pid(sd, images, budget=BUDGET, steps=3, quiet=True)
    if name == "caat":
        return B.protect_caat(sd, images, budget=BUDGET, steps=3, pgd_alpha=2 / 255,
                              personalization=B.caat_personalization(learning_rate=1e-3), quiet=True)
    if name == "simac":
        return B.protect_simac(sd, images, budget=BUDGET, steps=1, surrogate_steps=1, pgd_steps=2, select_steps=3,
                               pgd_alpha=2 / 255, personalization=_db_cfg(), quiet=True)
    if name == "metacloak":  # its default EOT (blur+flip) on
        return B.protect_metacloak(sd, images, budget=BUDGET, steps=2, pgd_steps=2, advance_steps=1, pool_size=2,
                                   pgd_alpha=2 / 255, personalization=_db_cfg(steps=2), quiet=True)
    if name == "ldu":
        rho = ldu.build_rho(sd.unet.config.in_channels, 32, seed=3)
        with torch.no_grad():  # a large random ρ, so the raw output exceeds the budget and projection must act
            rho.conv_out.weight.normal_(0, 0.5)
        return ldu.apply(sd, rho, images, BUDGET, denoise_steps=2, quiet=True)
    raise AssertionError(name)


@pytest.mark.parametrize("name", [*B.METHODS, "ldu"])
def test_budget_guarantee(tiny_sd, name):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    images[0, :, :8] = 0.0  # saturated regions: the [0,1] clamp must hold together with the ball
    images[1, :, -8:] = 1.0
    out = _run_method(name, tiny_sd, images)
    _assert_budget(out, images)
    assert float((out - images).abs().max()) > 0.5 / 255, "the method did not perturb at all"


def test_methods_dict_is_literal_and_uniform():
    import inspect

    assert set(B.METHODS) == {"aspl", "fsmg", "advdm", "photoguard", "sds", "mist", "pid", "caat", "metacloak",
                              "simac"}
    assert set(B.METHODS) == set(B.STEPS_MEANING)
    for fn in B.METHODS.values():
        params = inspect.signature(fn).parameters
        for p in ("budget", "steps", "quiet", "seed"):
            assert params[p].kind is inspect.Parameter.KEYWORD_ONLY


def test_aspl_rejects_non_dreambooth(tiny_sd, rand_images):
    with pytest.raises(ValueError, match="dreambooth"):
        B.protect_aspl(tiny_sd, rand_images, budget=BUDGET, steps=1, personalization=_ti_cfg(), quiet=True)


# ============================================================================ each attack moves its objective
# On the random-weight tiny model a single (t, ε) draw's gradient is almost uncorrelated with the expected loss's,
# so the checks below run the attacks with ``resample=False`` (one fixed draw) and recompute that exact objective
# independently on the clean and the protected images.
def test_fsmg_raises_surrogate_loss_on_fixed_draws(tiny_sd, rand_images):
    surrogate = B.train_surrogate(tiny_sd, rand_images, _db_cfg(batch_size=4), steps=2, quiet=True)
    out = B.protect_fsmg(tiny_sd, rand_images, budget=BUDGET, steps=4, pgd_alpha=2 / 255, surrogate=surrogate,
                         resample=False, seed=3, quiet=True)
    _assert_budget(out, rand_images)
    judge = B._pers_loss(surrogate, 4, fixed_seed=3 + 1)  # the draw FSMG used (documented: seed + 1)
    with torch.no_grad():
        before, after = judge(rand_images).item(), judge(out).item()
    assert after > before + 1e-4, (before, after)


def test_aspl_ascends_each_surrogate_loss(tiny_sd, rand_images):
    history = []
    out = B.protect_aspl(tiny_sd, rand_images, budget=BUDGET, steps=2, surrogate_steps=1, pgd_steps=3,
                         pgd_alpha=2 / 255, personalization=_db_cfg(batch_size=4), resample=False, quiet=True,
                         history=history)
    _assert_budget(out, rand_images)
    assert [h["iteration"] for h in history] == [0, 1]
    for h in history:  # loss before step 1 vs after 2 PGD steps, same surrogate and draw
        assert len(h["pgd_loss"]) == 3 and h["pgd_loss"][-1] > h["pgd_loss"][0], h


def test_advdm_raises_frozen_denoising_loss_on_fixed_draws(tiny_sd, rand_images):
    out = B.protect_advdm(tiny_sd, rand_images, budget=BUDGET, steps=4, pgd_alpha=2 / 255, mc_samples=2,
                          resample=False, seed=5, quiet=True)
    judge = B.advdm_loss(tiny_sd, "a photo", mc_samples=2, seed=5 + 1, resample=False)
    with torch.no_grad():
        before, after = judge(rand_images).item(), judge(out).item()
    assert after > before + 1e-4, (before, after)
    # resampling (the paper's setting) still runs and keeps the budget
    _assert_budget(B.protect_advdm(tiny_sd, rand_images, budget=BUDGET, steps=2, quiet=True), rand_images)


def test_photoguard_pulls_latent_to_target(tiny_sd, rand_images):
    with torch.no_grad():
        z_target = D.encode_images(tiny_sd.vae, B.gray_target(rand_images[:1])).expand(len(rand_images), -1, -1, -1)
        before = B.encoder_distance(tiny_sd, rand_images, z_target)
    out = B.protect_photoguard(tiny_sd, rand_images, budget=BUDGET, steps=8, random_start=False, quiet=True)
    with torch.no_grad():
        after = B.encoder_distance(tiny_sd, out, z_target)
    assert bool((after < before).all()), (before, after)


@pytest.mark.parametrize("direction", ["-", "+"])
def test_sds_step_moves_the_latent_along_minus_or_plus_the_residual(tiny_sd, rand_images, direction):
    """One SDS step changes the photo's latent z by Δz with ⟨ε̂ − ε, Δz⟩ < 0 for SDS(−) and > 0 for SDS(+): the
    encoder's first-order response to x ∓ α·sign(J_Eᵀ(ε̂ − ε)), at the draw the step used."""
    out = B.protect_sds(tiny_sd, rand_images, budget=BUDGET, steps=1, pgd_alpha=0.5 / 255, direction=direction,
                        resample=False, seed=2, quiet=True)
    _assert_budget(out, rand_images, BUDGET)
    with torch.no_grad():
        z0, z1 = D.encode_images(tiny_sd.vae, rand_images), D.encode_images(tiny_sd.vae, out)
        cond = D.encode_prompt(tiny_sd.text_encoder, tiny_sd.tokenizer, ["a photo"]).expand(4, -1, -1)
    residual = D.noise_residual(tiny_sd.unet, tiny_sd.noise_scheduler, z0, cond,
                                generator=torch.Generator().manual_seed(2 + 1))  # the draw (documented: seed + 1)
    inner = float((residual * (z1 - z0)).sum())
    assert (inner < 0) if direction == "-" else (inner > 0), inner
    # the loss's value is the denoising error at that draw, its gradient the SDS gradient J_Eᵀ(ε̂ − ε)
    x = rand_images.clone().requires_grad_(True)
    value = B.sds_loss(tiny_sd, seed=3, resample=False)(x)
    torch.testing.assert_close(value.detach(), residual.pow(2).mean())
    g, = torch.autograd.grad(value, x)
    x2 = rand_images.clone().requires_grad_(True)
    g_ref, = torch.autograd.grad((residual * D.encode_images(tiny_sd.vae, x2).float()).sum(), x2)
    torch.testing.assert_close(g, g_ref)
    with pytest.raises(ValueError, match="direction"):
        B.protect_sds(tiny_sd, rand_images, budget=BUDGET, steps=1, direction="down", quiet=True)


def test_mist_lowers_its_fused_objective_and_weighs_both_terms(tiny_sd, rand_images):
    out = B.protect_mist(tiny_sd, rand_images, budget=BUDGET, steps=4, pgd_alpha=2 / 255, random_start=False,
                         resample=False, seed=1, quiet=True)
    _assert_budget(out, rand_images)
    z_target = B.target_latents(tiny_sd, rand_images)
    judge = B.mist_loss(tiny_sd, z_target, seed=1 + 1, resample=False)  # the draw the attack used
    with torch.no_grad():
        before, after = judge(rand_images).item(), judge(out).item()
        assert after < before - 1e-4, (before, after)
        # with weight 0 it is the mean squared latent distance to the target (PhotoGuard's term, squared)
        textural = B.mist_loss(tiny_sd, z_target, semantic_weight=0.0, seed=2, resample=False)(rand_images)
        dist = B.encoder_distance(tiny_sd, rand_images, z_target)
        torch.testing.assert_close(textural, (dist ** 2).mean() / z_target[0].numel())
        # and the semantic term is AdvDM's loss on the same draw
        both = B.mist_loss(tiny_sd, z_target, semantic_weight=2.0, seed=2, resample=False)(rand_images)
        advdm = B.advdm_loss(tiny_sd, seed=2, resample=False)(rand_images)
        torch.testing.assert_close(both, textural - 2.0 * advdm)
    assert B.MIST_SEMANTIC_WEIGHT == pytest.approx(1e4 / 16384)


def test_pid_pushes_the_posterior_further_than_a_random_start(tiny_sd, rand_images):
    random_only = B.protect_pid(tiny_sd, rand_images, budget=BUDGET, steps=0, seed=4, quiet=True)
    out = B.protect_pid(tiny_sd, rand_images, budget=BUDGET, steps=6, seed=4, quiet=True)
    _assert_budget(out, rand_images)
    judge = B.pid_loss(tiny_sd, rand_images)
    with torch.no_grad():
        assert judge(rand_images).item() == 0.0
        assert judge(out).item() > 1.5 * judge(random_only).item(), (judge(out).item(), judge(random_only).item())
        # the KL variant against torch's Gaussian KL(q(z|clean) || q(z|x))
        q0, q = D.posterior(tiny_sd.vae, rand_images), D.posterior(tiny_sd.vae, out)
        kl = torch.distributions.kl_divergence(torch.distributions.Normal(q0.mean, q0.std),
                                               torch.distributions.Normal(q.mean, q.std)).mean()
        torch.testing.assert_close(B.pid_loss(tiny_sd, rand_images, "kl")(out), kl, atol=1e-5, rtol=1e-4)
        var = B.pid_loss(tiny_sd, rand_images, "var")(out)
        torch.testing.assert_close(var, (q.std - q0.std).pow(2).mean())
    with pytest.raises(ValueError, match="add-log"):
        B.pid_loss(tiny_sd, rand_images, "logvar")


def test_caat_ascends_the_loss_its_surrogate_descends(tiny_sd, rand_images):
    """CAAT's first step moves the photos up the surrogate's loss at that step's draw (the simulator's tests check
    that only the K/V learn); the step's loss is recorded; EOT runs through the same step."""
    cfg = B.caat_personalization(learning_rate=1e-3)
    history = []
    out = B.protect_caat(tiny_sd, rand_images, budget=BUDGET, steps=1, pgd_alpha=1 / 255, personalization=cfg,
                         seed=3, quiet=True, history=history)
    _assert_budget(out, rand_images)
    assert len(history) == 1
    judge = S.setup(tiny_sd, dataclasses.replace(cfg, batch_size=4))  # the surrogate before its step, same draw
    with torch.no_grad():
        judge.generator.manual_seed(3)
        before = S.loss(judge, rand_images)[0].item()
        judge.generator.manual_seed(3)
        after = S.loss(judge, out)[0].item()
    assert before == pytest.approx(history[0], rel=1e-5)
    assert after > before, (before, after)
    assert len(B.protect_caat(tiny_sd, rand_images, budget=BUDGET, steps=2, personalization=cfg, quiet=True,
                              eot_transforms=["flip", "blur"])) == 4
    with pytest.raises(ValueError, match="dreambooth"):
        B.protect_caat(tiny_sd, rand_images, budget=BUDGET, steps=1, personalization=_ti_cfg(), quiet=True)

def test_simac_greedy_selection_removes_the_least_useful_timesteps(tiny_sd, rand_images):
    """Each round keeps the probe that raised its loss most (it did raise it) and removes ±delta_t around the one
    that raised it least; later probes come only from what is left, and every photo keeps ≥ probes timesteps."""
    T = tiny_sd.noise_scheduler.config.num_train_timesteps
    history = []
    sets = B.simac_timesteps(tiny_sd, rand_images[:2], "a photo of sks person", budget=BUDGET, steps=40, probes=5,
                             delta_t=20, pgd_alpha=2 / 255, history=history)
    assert len(sets) == 2 and len(history) == 80
    for i, allowed in enumerate(sets):
        left = set(range(T))
        for h in (h for h in history if h["image"] == i):
            assert set(h["probes"]) <= left and len(set(h["probes"])) == 5
            assert max(h["gains"]) > 0, h  # one signed step up the gradient raised that probe's loss
            if h["removed"] is not None:
                assert h["removed"] == h["probes"][h["gains"].index(min(h["gains"]))]
                left -= set(range(h["removed"] - 20, h["removed"] + 21))
        assert set(allowed.tolist()) == left and 5 <= len(left) < T - 41
    assert [t.numel() for t in B.simac_timesteps(tiny_sd, rand_images[:1], "a photo", budget=BUDGET, steps=0)] == [T]


def test_simac_loss_noises_each_photo_in_its_set_and_adds_a_live_feature_term(tiny_sd, rand_images):
    """Photo i is noised only at timesteps of its set; the feature term is 0 at the clean photos, positive elsewhere,
    and carries a gradient (SimAC's code adds it detached)."""
    state = S.setup(tiny_sd, _db_cfg(batch_size=4))
    S.finish(state)
    sets = [torch.tensor([900, 901]), torch.tensor([5]), torch.tensor([400, 600]), torch.tensor([999])]
    seen = []
    handle = state.sd.unet.register_forward_pre_hook(lambda _m, args: seen.append(args[1].tolist()))
    try:
        with_features, without = (B.simac_loss(state, rand_images, sets, w, fixed_seed=7) for w in (1.0, 0.0))
        x = (rand_images + BUDGET * torch.randn_like(rand_images).sign()).clamp(0, 1).requires_grad_(True)
        assert with_features(rand_images).item() == pytest.approx(without(rand_images).item(), rel=1e-6)
        term = with_features(x) - without(x)
        grad, = torch.autograd.grad(term, x)
    finally:
        handle.remove()
    assert term.item() > 0 and grad.abs().sum() > 0
    for ts in seen:
        assert all(t in s.tolist() for t, s in zip(ts, sets)), ts
    with pytest.raises(ValueError, match="one non-empty set"):
        B.simac_loss(state, rand_images, sets[:3])


def test_metacloak_pool_spans_the_surrogates_training(tiny_sd, rand_images):
    """The pool holds the weights at steps 0, H/2 and H of one DreamBooth run on the clean photos: the first equal
    to the model's, the last to the run's end, the middle one different from both; pool_size=1 trains nothing."""
    cfg = _db_cfg(steps=4, batch_size=4)
    state = S.setup(tiny_sd, cfg)
    state.generator.manual_seed(0)
    pool = B.metacloak_pool(state, rand_images, 3)
    assert [age for _, age in pool] == [0, 2, 4]
    original = [p.detach() for p in tiny_sd.unet.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(pool[0][0], original))
    assert all(torch.equal(a, b.detach()) for a, b in zip(pool[2][0], state.params))
    for other in (pool[0][0], pool[2][0]):
        assert max(float((a - b).abs().max()) for a, b in zip(pool[1][0], other)) > 1e-6
    single = S.setup(tiny_sd, cfg)
    assert [age for _, age in B.metacloak_pool(single, rand_images, 1)] == [0] and single.global_step == 0


def test_metacloak_ascends_each_advanced_member_and_restarts_trained_ones(tiny_sd, rand_images):
    """Every iteration's PGD ascends the loss of the member it drew (one fixed draw, no EOT); a member drawn at
    age a comes back at a + advance_steps, or at 0 (the pretrained weights) once that reaches the horizon."""
    history = []
    out = B.protect_metacloak(tiny_sd, rand_images, budget=BUDGET, steps=8, pgd_steps=3, advance_steps=2,
                              pool_size=3, pgd_alpha=2 / 255, personalization=_db_cfg(steps=4, batch_size=4),
                              eot_transforms=[], resample=False, seed=1, quiet=True, history=history)
    _assert_budget(out, rand_images)
    ages = [0, 2, 4]
    for h in history:
        assert h["age"] == ages[h["member"]], (h, ages)
        ages[h["member"]] = h["age"] + 2 if h["age"] + 2 < 4 else 0
        assert len(h["pgd_loss"]) == 3 and h["pgd_loss"][-1] > h["pgd_loss"][0], h
    assert len(history) == 8 and any(h["age"] == 4 for h in history), history  # a restart was exercised
    with pytest.raises(ValueError, match="pool_size"):
        B.protect_metacloak(tiny_sd, rand_images, budget=BUDGET, steps=1, pool_size=0, personalization=_db_cfg())


# ============================================================================ LDU
def test_rho_parameter_count():
    rho = ldu.build_rho(4, 32)
    n = ldu.count_parameters(rho)
    assert 100_000 <= n <= 200_000
    assert n == 155_204  # the layer formula in RhoUNet's docstring
    z = torch.randn(1, 4, 9, 7)  # odd latent sizes work
    assert rho(z).shape == z.shape


def test_inversion_grid_must_contain_denoising_top_level(tiny_sd):
    sched = tiny_sd.noise_scheduler
    assert ldu.inversion_end_step(sched, 4, 4) == 4
    assert D.ddim_timesteps(sched, 40)[::-1][ldu.inversion_end_step(sched, 40, 4) - 1] == D.ddim_timesteps(sched, 4)[0]
    with pytest.raises(ValueError, match="does not contain"):
        ldu.inversion_end_step(sched, 50, 4)


def test_identity_rho_returns_the_original_in_delta_mode(tiny_sd, rand_images):
    rho = ldu.build_rho(4, 32)
    with torch.no_grad():
        rho.conv_out.weight.zero_()
    out = ldu.apply(tiny_sd, rho, rand_images, 1.0, denoise_steps=2, quiet=True)
    torch.testing.assert_close(out, rand_images, atol=1e-6, rtol=0)
    # the paper's literal decode is a reconstruction, far from x0 for the random tiny model
    dec = ldu.apply(tiny_sd, rho, rand_images, 1.0, denoise_steps=2, output_mode="decode", quiet=True)
    assert float((dec - rand_images).abs().mean()) > 0.05


def test_gradient_reaches_every_rho_tensor_through_denoiser(tiny_sd, rand_images):
    sampling = {"denoise_steps": 2}
    prepared = ldu.prepare(tiny_sd, rand_images[:2], sampling)
    rho = ldu.build_rho(4, 32)
    state = S.setup(tiny_sd, _ti_cfg())
    out = ldu.perturb(tiny_sd, rho, prepared, sampling, checkpoint=True)
    loss, _ = S.loss(state, out, batch_size=2)
    loss.backward()
    for name, p in rho.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    # and a training step moves every tensor of ρ
    fresh = ldu.build_rho(4, 32, seed=0)
    trained = ldu.train_perturber(tiny_sd, [rand_images[:2]], steps=1, batch_size=2, learning_rate=1e-3,
                                  personalization=_ti_cfg(), anchor_steps=1, denoise_steps=2, seed=0, quiet=True)
    before = dict(fresh.named_parameters())
    for name, p in trained.named_parameters():
        assert not torch.equal(p.detach().cpu(), before[name].detach()), name


def test_ldu_training_raises_personalization_loss(tiny_sd):
    g = torch.Generator().manual_seed(2)
    ids = {"a": torch.rand(3, 3, 64, 64, generator=g), "b": torch.rand(3, 3, 64, 64, generator=g)}
    cfg = _ti_cfg()
    anchors = ldu.train_anchors(tiny_sd, list(ids.values()), cfg, steps=2, quiet=True)
    history = []
    budget = 16 / 255
    # resample=False: the anchor scores every step on one fixed (t, ε) draw (seed + 1), see the attack tests
    rho = ldu.train_perturber(tiny_sd, ids, budget=budget, steps=10, batch_size=3, learning_rate=1e-3,
                              anchors=anchors, personalization=cfg, denoise_steps=2, shuffle_prob=0.5,
                              lambda_init=1.0, lambda_step=0.05, resample=False, seed=2, quiet=True, history=history)
    assert len(history) == 10 and {h["identity"] for h in history} == {"a", "b"}
    assert any(h["anchor"] != h["identity"] for h in history), "token shuffling never happened"
    # λ grows exactly by lambda_step after each step that violates the budget (and some step did)
    assert any(h["linf"] > budget for h in history)
    for h0, h1 in zip(history, history[1:]):
        assert h1["lambda"] == pytest.approx(h0["lambda"] + (0.05 if h0["linf"] > budget else 0.0))
    x = ids["a"]
    protected = ldu.apply(tiny_sd, rho, x, budget, quiet=True)
    _assert_budget(protected, x, budget)
    state = ldu._anchor(anchors, 0)  # identity a's token

    def judge(images):
        state.generator.manual_seed(2 + 1)
        with torch.no_grad():
            return S.loss(state, images, batch_size=3)[0].item()

    before, after = judge(x), judge(protected)
    assert after > before + 1e-3, (before, after)


def test_ldu_training_resumes_exactly_after_a_kill(tiny_sd, tmp_path, monkeypatch):
    """A ρ training killed after 3 of 6 steps resumes from its checkpoint to the same ρ, history and λ as an
    uninterrupted run (resample=True: the anchor's and the step's random draws are restored); finished TI anchors
    are reused, not trained again."""
    g = torch.Generator().manual_seed(4)
    ids = {"a": torch.rand(2, 3, 64, 64, generator=g), "b": torch.rand(2, 3, 64, 64, generator=g)}
    kw = {"budget": 8 / 255, "steps": 6, "batch_size": 2, "learning_rate": 1e-3, "personalization": _ti_cfg(),
          "anchor_steps": 2, "denoise_steps": 2, "lambda_step": 0.05, "seed": 5, "quiet": True}
    h_whole = []
    rho_whole = ldu.train_perturber(tiny_sd, ids, history=h_whole, **kw)
    ckpt = tmp_path / "ckpt"
    ldu.train_perturber(tiny_sd, ids, checkpoint_dir=ckpt, checkpoint_every=2, stop_after=3, **kw)
    assert json.loads((ckpt / "rho" / "progress.json").read_text())["next_step"] == 3
    assert len(list((ckpt / "anchors").glob("anchor-*.safetensors"))) == 2
    setups = []
    real_setup = ldu.S.setup
    monkeypatch.setattr(ldu.S, "setup", lambda *a, **k: setups.append(1) or real_setup(*a, **k))
    # other settings are refused before the anchors (before, a new lr was ignored: Adam kept the checkpoint's
    # while rho.json recorded the new one)
    for change, differ in [({"learning_rate": 2e-3}, "learning_rate: 0.001 there, 0.002 now"),
                           ({"denoise_steps": 1}, "denoise_steps: 2 there, 1 now"),
                           ({"personalization": _ti_cfg(learning_rate=0.1)},
                            "personalization.learning_rate: 0.05 there, 0.1 now")]:
        with pytest.raises(ValueError) as err:
            ldu.train_perturber(tiny_sd, ids, checkpoint_dir=ckpt, **{**kw, **change})
        assert str(err.value).startswith(f"{ckpt / 'rho'}: a checkpoint of another ρ training, made with other "
                                         f"settings ({differ}")
        assert str(err.value).endswith(f"start over with resume=false or delete {ckpt / 'rho'}")
    assert not setups
    h_resumed = []
    rho_resumed = ldu.train_perturber(tiny_sd, ids, checkpoint_dir=ckpt, checkpoint_every=2, history=h_resumed, **kw)
    assert len(setups) == 1  # the frozen TI state only: both anchors came from the checkpoint
    assert [h["loss"] for h in h_resumed] == [h["loss"] for h in h_whole] and len(h_resumed) == 6
    assert [h["lambda"] for h in h_resumed] == [h["lambda"] for h in h_whole]
    for (name, p), q in zip(rho_whole.named_parameters(), rho_resumed.parameters()):
        assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="a checkpoint of another ρ training"):
        ldu.train_perturber(tiny_sd, ids, checkpoint_dir=ckpt, **{**kw, "seed": 6})


def _identity_folders(root, names, n=2):
    """``root/<name>`` with ``n`` small PNG photos each (64x64, one colour per folder)."""
    from PIL import Image

    for k, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (64, 64), (60 * k % 256, 30 * i, 200)).save(root / name / f"{i}.png")


def _train_perturber_args(data, out):
    return ["train-perturber", "model.path=tiny", "model.device=cpu", f"data={data}", f"output_dir={out}", "steps=1",
            "batch_size=1", "denoise_steps=1", "anchor_steps=1", "quiet=true"]


@pytest.mark.parametrize("override,message", [
    ("steps=0", "steps must be a whole number >= 1, got 0"),
    ("batch_size=0", "batch_size must be a whole number >= 1, got 0"),
    ("anchor_steps=-1", "anchor_steps must be a whole number >= 0, got -1"),
    ("denoise_steps=0", "denoise_steps must be a whole number >= 1, got 0"),
    ("learning_rate=0", "learning_rate must be > 0, got 0.0"),
    ("shuffle_prob=1.5", "shuffle_prob must be in [0, 1], got 1.5")])
def test_train_perturber_refuses_out_of_range_settings_before_any_work(tmp_path, apdm_log, override, message):
    """Before, steps=0 saved an untrained ρ with exit 0 and a zero batch failed inside the training."""
    from apdm.cli import main

    _identity_folders(tmp_path / "data", ["id-a"])
    assert main([*_train_perturber_args(tmp_path / "data", tmp_path / "rho"), override]) == 1
    assert message in apdm_log()
    assert not (tmp_path / "rho").exists()


def test_train_perturber_skips_folders_without_photos_and_its_own_output(tmp_path, apdm_log):
    """An empty sub-folder, a folder of other files, a hidden folder and the output folder (inside the data folder)
    are not identities (before, each stopped the run, and a run writing into its data folder could never run again);
    with no identity left it stops, naming what it skipped."""
    from apdm.cli import main

    data = tmp_path / "ids"
    _identity_folders(data, ["id-a", "id-b", ".ipynb_checkpoints"])
    (data / "id-empty").mkdir()
    (data / "notes").mkdir()
    (data / "notes" / "readme.txt").write_text("not a photo")
    args = _train_perturber_args(data, data / "rho")
    for _ in range(2):  # the second run finds its own output folder among the sub-folders
        assert main(args) == 0
        err = apdm_log()
        assert f"skipped {data / 'id-empty'}: no photos in it" in err and f"skipped {data / 'notes'}" in err
        assert json.loads((data / "rho" / "train_log.json").read_text())["identities"] == ["id-a", "id-b"]
    (tmp_path / "none" / "empty").mkdir(parents=True)
    assert main(_train_perturber_args(tmp_path / "none", tmp_path / "out")) == 1
    assert "expected one sub-folder of photos per identity, found none with photos (skipped: empty)" in apdm_log()


def test_ldu_psnr_floor_is_a_second_constraint(tiny_sd):
    """min_psnr adds a penalty that keeps the perturbation's RMS lower, and λ also grows on PSNR violations."""
    g = torch.Generator().manual_seed(3)
    ids = [torch.rand(2, 3, 64, 64, generator=g)]
    cfg = _ti_cfg()
    anchors = ldu.train_anchors(tiny_sd, ids, cfg, steps=1, quiet=True)
    budget, floor = 32 / 255, 45.0
    runs = {}
    for min_psnr in (None, floor):
        history = []
        rho = ldu.train_perturber(tiny_sd, ids, budget=budget, steps=8, batch_size=2, learning_rate=3e-3,
                                  anchors=anchors, personalization=cfg, denoise_steps=2, lambda_step=0.05,
                                  min_psnr=min_psnr, resample=False, seed=3, quiet=True, history=history)
        out = ldu.apply(tiny_sd, rho, ids[0], budget, quiet=True)
        runs[min_psnr] = (history, float(psnr(ids[0], out).min()))
    history, psnr_floor = runs[floor]
    assert any(h["psnr_min"] < floor for h in history)
    for h0, h1 in zip(history, history[1:]):  # λ grows after every step that violates either constraint
        violated = h0["linf"] > budget or h0["psnr_min"] < floor
        assert h1["lambda"] == pytest.approx(h0["lambda"] + (0.05 if violated else 0.0))
    assert psnr_floor > runs[None][1] + 1.0, (psnr_floor, runs[None][1])
    assert rho.training_info["min_psnr"] == floor


def test_rho_save_load_roundtrip(tiny_sd, rand_images, tmp_path):
    rho = ldu.build_rho(4, 32, seed=4)
    with torch.no_grad():
        rho.conv_out.weight.normal_(0, 0.05)
    rho.sampling = ldu._check_sampling({"denoise_steps": 2})
    rho.training_info = {"budget": BUDGET}
    ldu.save_rho(rho, tmp_path / "rho")
    meta = json.loads((tmp_path / "rho" / ldu.RHO_CONFIG).read_text())
    assert meta["parameters"] == ldu.count_parameters(rho) and meta["sampling"]["denoise_steps"] == 2
    assert sorted(p.name for p in (tmp_path / "rho").iterdir()) == [ldu.RHO_CONFIG, ldu.RHO_WEIGHTS]
    loaded = ldu.load_rho(tmp_path / "rho")
    assert loaded.sampling == rho.sampling
    a = ldu.apply(tiny_sd, rho, rand_images[:2], BUDGET, quiet=True)
    b = ldu.apply(tiny_sd, loaded, rand_images[:2], BUDGET, quiet=True)
    assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError):
        ldu.load_rho(tmp_path / "missing")


def test_ldu_training_scores_the_published_image_through_its_augmentations(tiny_sd, monkeypatch):
    """ρ's personalization loss scored its raw output, which could leave the budget (and [0, 1]) by far and earn loss
    from pixels the projection then removes; it now scores the image as published: within the budget, in [0, 1].
    ``eot`` (the paper's training blur + flip) puts one augmentation between them each step."""
    g = torch.Generator().manual_seed(2)
    ids = {"a": torch.rand(3, 3, 64, 64, generator=g)}
    cfg = _ti_cfg()
    anchors = ldu.train_anchors(tiny_sd, list(ids.values()), cfg, steps=1, quiet=True)
    budget = 4 / 255
    scored, real = [], S.loss
    monkeypatch.setattr(S, "loss", lambda state, images, **kw: scored.append(images.detach().clone())
                        or real(state, images, **kw))
    history: list[dict] = []
    kw = {"budget": budget, "steps": 4, "batch_size": 3, "learning_rate": 5e-2, "anchors": anchors,
          "personalization": cfg, "denoise_steps": 2, "seed": 2, "quiet": True}
    ldu.train_perturber(tiny_sd, ids, history=history, **kw)
    assert any(h["linf"] > budget + 1 / 255 for h in history)  # the raw output did leave the budget
    for s in scored:
        assert float((s - ids["a"]).abs().max()) <= budget + 1e-6 and 0 <= float(s.min()) <= float(s.max()) <= 1
    plain = list(scored)
    scored.clear()
    rho = ldu.train_perturber(tiny_sd, ids, eot=["flip"], **kw)
    assert (rho.training_info["scored"], rho.training_info["eot"]) == ("published", ["flip"])  # saved with ρ
    # each image flips with probability 1/2: until the first flip the two trainings are the same, and then a
    # flipped copy of the plain training's image was scored
    pairs = [(a, b) for s, p in zip(scored, plain) for a, b in zip(s, p)]
    assert any(torch.equal(a, b.flip(-1)) and not torch.equal(a, b) for a, b in pairs)
    with pytest.raises(ValueError, match="unknown EOT transform 'spin'"):
        ldu.train_perturber(tiny_sd, ids, eot=["spin"], **kw)
