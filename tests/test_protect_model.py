"""APDM protection: the DPO loss against hand computation, its gradient direction, L2P steps, exact resume."""

import dataclasses
import math
import re

import pytest
import torch

from apdm.config import PersonalizationConfig, ProtectConfig
from apdm.protect_model import l2p
from apdm.protect_model.losses import dpo_loss, naive_loss


def test_dpo_elementwise_hand_computed():
    # one sample, two elements
    etw = torch.tensor([[1.0, 2.0]]); erw = torch.tensor([[0.5, 2.5]])
    etl = torch.tensor([[3.0, 1.0]]); erl = torch.tensor([[1.0, 1.5]])
    # d = (etw - erw) - (etl - erl) = [0.5 - 2.0, -0.5 - (-0.5)] = [-1.5, 0.0]
    expect = (-math.log(1 / (1 + math.exp(-1.5))) - math.log(0.5)) / 2  # -log σ(-β d) with β=1
    assert dpo_loss(etw, erw, etl, erl, beta=1.0) == pytest.approx(expect, rel=1e-6)
    # β scales d
    expect_b = (-math.log(1 / (1 + math.exp(-3.0))) - math.log(0.5)) / 2
    assert dpo_loss(etw, erw, etl, erl, beta=2.0) == pytest.approx(expect_b, rel=1e-6)


def test_dpo_summed_hand_computed():
    etw = torch.tensor([[1.0, 2.0]]); erw = torch.tensor([[0.5, 2.5]])
    etl = torch.tensor([[3.0, 1.0]]); erl = torch.tensor([[1.0, 1.5]])
    d = (3.0 - 3.0) - (4.0 - 2.5)  # summed norms: -1.5
    assert dpo_loss(etw, erw, etl, erl, form="summed") == pytest.approx(-math.log(1 / (1 + math.exp(d))), rel=1e-6)
    with pytest.raises(ValueError):
        dpo_loss(etw, erw, etl, erl, form="other")


def test_dpo_gradient_pushes_subject_error_up_and_paired_error_down():
    """Gradient descent on L_DPO must raise θ's error on x⁻ and lower it on x⁺ (relative to φ)."""
    torch.manual_seed(0)
    etw = torch.rand(2, 4, 3, 3, requires_grad=True)
    etl = torch.rand(2, 4, 3, 3, requires_grad=True)
    erw, erl = torch.rand(2, 4, 3, 3), torch.rand(2, 4, 3, 3)
    dpo_loss(etw, erw, etl, erl).backward()
    assert (etw.grad > 0).all()   # descent lowers err on the winner (paired generic image)
    assert (etl.grad < 0).all()   # descent raises err on the loser (the subject)


def test_naive_loss():
    assert naive_loss(torch.tensor(2.0), torch.tensor(0.5), lam=3.0).item() == pytest.approx(-0.5)


def _subject(tiny_sd):
    g = torch.Generator().manual_seed(0)
    return l2p.Subject(name="s", images=torch.rand(2, 3, 64, 64, generator=g),
                       paired=torch.rand(2, 3, 64, 64, generator=g), class_images=torch.rand(3, 3, 64, 64, generator=g),
                       instance_prompt="a photo of sks person", class_prompt="a photo of a person")


PER = PersonalizationConfig(method="dreambooth", learning_rate=1e-3, batch_size=1)


def test_one_outer_step_changes_theta_not_phi(tiny_sd):
    phi_before = {n: p.clone() for n, p in tiny_sd.unet.named_parameters()}
    pcfg = ProtectConfig(outer_steps=1, inner_steps=2, learning_rate=1e-3, checkpoint_every=0)
    theta, hist, _ = l2p.protect(tiny_sd, [_subject(tiny_sd)], PER, pcfg)
    changed = [n for n, p in theta.named_parameters() if not torch.equal(p, phi_before[n])]
    assert len(changed) > 0.9 * len(phi_before)
    assert all(torch.equal(p, phi_before[n]) for n, p in tiny_sd.unet.named_parameters())
    assert {"loss_dpo", "loss_ppl", "loss_protect", "loss_personalization"} <= set(hist[0])


@pytest.mark.parametrize("variant", [
    dict(inner_steps=0), dict(gradient_leak=True), dict(loss="naive"), dict(trainable="attn2"),
    # resnets + anchor: trainable norms behind a frozen conv_in on channels-last latents (a segfault on CPU before
    # l2p._standard_layout_sample)
    dict(trainable="resnets", anchor_weight=1.0), dict(trainable="lora", lora_rank=2), dict(dpo_form="summed"),
])
def test_variants_run_and_update(tiny_sd, variant):
    pcfg = ProtectConfig(**{"outer_steps": 1, "inner_steps": 1, "learning_rate": 1e-3, "checkpoint_every": 0,
                            **variant})
    theta, hist, _ = l2p.protect(tiny_sd, [_subject(tiny_sd)], PER, pcfg)
    base = dict(tiny_sd.unet.named_parameters())
    changed = {n for n, p in theta.named_parameters() if not torch.equal(p, base[n])}
    assert changed, "protection did not change the UNet"
    if variant.get("trainable") in ("attn2", "resnets"):
        assert all(variant["trainable"] in n for n in changed)
    assert not any("lora" in n for n, _ in theta.named_parameters())  # adapters merged away


@pytest.mark.parametrize("method", ["lora", "ti"])
def test_other_attackers_in_the_inner_loop(tiny_sd, method):
    """A LoRA / TI attacker runs its steps in the inner loop and its trajectory reaches θ: the protection differs
    from the one without inner steps (the outer DPO step alone also changes θ, so θ ≠ φ alone proved nothing)."""
    per = PersonalizationConfig(method=method, learning_rate=1e-2, with_prior_preservation=False)
    pcfg = ProtectConfig(outer_steps=1, inner_steps=2, learning_rate=1e-3, checkpoint_every=0)
    theta, hist, _ = l2p.protect(tiny_sd, [_subject(tiny_sd)], per, pcfg)
    base = dict(tiny_sd.unet.named_parameters())
    assert any(not torch.equal(p, base[n]) for n, p in theta.named_parameters())
    assert hist[0]["attack_depth"] == 2 and hist[0]["loss_personalization"] > 0
    alone, _, _ = l2p.protect(tiny_sd, [_subject(tiny_sd)], per, dataclasses.replace(pcfg, inner_steps=0))
    gap = max(float((p - q).abs().max()) for p, q in zip(theta.parameters(), alone.parameters()))
    assert gap > 1e-6  # the attacker's steps changed what the protection did
    assert len(tiny_sd.tokenizer) == len(tiny_sd.tokenizer.get_vocab())  # base tokenizer untouched


@pytest.mark.parametrize("method", ["lora", "ti"])
def test_protection_images_whatever_the_attacker(tiny_sd, tmp_path, method):
    """L_ppl and the DPO winners need class images even when the simulated attacker uses none (LoRA without
    prior preservation, TI): the bench once crashed there."""
    from apdm.protect_model.run import protection_images

    per = PersonalizationConfig(method=method, with_prior_preservation=False, class_sample_steps=2,
                                class_data_dir=str(tmp_path / "cls"))
    cls, paired = protection_images(tiny_sd, per, "a photo of a dog", num_class_images=3, num_paired=2, quiet=True)
    assert cls.shape == (3, 3, 64, 64) and paired.shape == (2, 3, 64, 64)
    assert not torch.equal(cls[:2], paired)  # x⁺ come from another seed than the prior images
    assert all("a photo of a dog" in f.read_text() for f in (tmp_path / "cls").glob("*/prompt.txt"))


def test_protection_raises_subject_error_relative_to_paired(tiny_sd):
    """A few protection steps (no inner loop) make θ worse on the subject than on the paired generic images."""
    subj = _subject(tiny_sd)
    pcfg = ProtectConfig(outer_steps=8, inner_steps=0, learning_rate=3e-4, checkpoint_every=0, batch_size=2,
                         prior_loss_weight=0.0)
    theta, hist, _ = l2p.protect(tiny_sd, [subj], PER, pcfg)
    from apdm.core import diffusion as D

    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        lat_s = D.encode_images(tiny_sd.vae, subj.images)
        lat_p = D.encode_images(tiny_sd.vae, subj.paired)
        c = D.encode_prompt(tiny_sd.text_encoder, tiny_sd.tokenizer, ["a photo of sks person"] * 2)
        noise = torch.randn(lat_s.shape, generator=g)
        gap = []
        for unet in (tiny_sd.unet, theta):
            vals = []
            for t in (100, 300, 500, 700, 900):
                tt = torch.full((2,), t)
                es = D.noise_prediction_loss(unet, tiny_sd.noise_scheduler, lat_s, c, noise, tt)
                ep = D.noise_prediction_loss(unet, tiny_sd.noise_scheduler, lat_p, c, noise, tt)
                vals.append((es - ep).item())
            gap.append(sum(vals) / len(vals))
    assert gap[1] > gap[0] + 1e-3, gap  # subject error rose relative to the generic images


def test_resume_after_interruption_is_exact(tiny_sd, tmp_path):
    subj = [_subject(tiny_sd)]
    pcfg = ProtectConfig(outer_steps=3, inner_steps=1, learning_rate=1e-3, checkpoint_every=1)
    full, hist_full, _ = l2p.protect(tiny_sd, subj, PER, pcfg, seed=3, checkpoint_dir=tmp_path / "a")
    # interrupted after 2 steps, then resumed from the checkpoint in a new call
    l2p.protect(tiny_sd, subj, PER, pcfg, seed=3, checkpoint_dir=tmp_path / "b", stop_after=2)
    # a run of other settings is refused (before, it resumed and mixed two runs): the folder, the differing keys with
    # both values, and how to start over are named, and the checkpoint is left as it was
    saved = (tmp_path / "b" / "progress.json").read_bytes()
    other_photos = [dataclasses.replace(subj[0], images=subj[0].images.flip(0))]
    for subjects, per, p, seed, differ in [
            (subj, PER, dataclasses.replace(pcfg, loss="naive"), 3, 'protect.loss: "dpo" there, "naive" now'),
            (subj, PER, pcfg, 4, "seed: 3 there, 4 now"),
            (other_photos, PER, pcfg, 3, "subjects[0].photos: "),
            (subj, PER, dataclasses.replace(pcfg, weight_decay=0.5), 3, "protect.weight_decay: 0.01 there, 0.5 now"),
            (subj, dataclasses.replace(PER, learning_rate=5e-3), pcfg, 3,
             "personalization.learning_rate: 0.001 there, 0.005 now")]:
        with pytest.raises(l2p.CheckpointError) as err:
            l2p.protect(tiny_sd, subjects, per, p, seed=seed, checkpoint_dir=tmp_path / "b")
        msg = str(err.value)
        assert msg.startswith(f"{tmp_path / 'b'}: a checkpoint of another protection, made with other settings (")
        assert differ in msg and f"start over with protect.resume=false or delete {tmp_path / 'b'}" in msg, msg
    assert (tmp_path / "b" / "progress.json").read_bytes() == saved
    resumed, hist_res, _ = l2p.protect(tiny_sd, subj, PER, pcfg, seed=3, checkpoint_dir=tmp_path / "b")
    assert [h["step"] for h in hist_res] == [0, 1, 2]
    for (n, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=n)
    # outer_steps is not part of the settings: a finished run extended by one step equals a 4-step run
    longer = dataclasses.replace(pcfg, outer_steps=4)
    four, _, _ = l2p.protect(tiny_sd, subj, PER, longer, seed=3, checkpoint_dir=tmp_path / "c")
    extended, hist_ext, _ = l2p.protect(tiny_sd, subj, PER, longer, seed=3, checkpoint_dir=tmp_path / "b")
    assert [h["step"] for h in hist_ext] == [0, 1, 2, 3]
    for (n, a), (_, b) in zip(four.named_parameters(), extended.named_parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=n)


def test_checkpoint_keeps_the_configured_optimizer_hyperparameters(tmp_path):
    """Only the optimizer's state (moments, step count) comes from a checkpoint; its lr, betas and weight decay stay
    this run's (before, the checkpoint's param_groups silently replaced them)."""
    w = torch.nn.Parameter(torch.ones(2, 3))
    opt = torch.optim.AdamW([w], lr=0.1, betas=(0.5, 0.6), weight_decay=0.5)
    w.grad = torch.full((2, 3), 0.5)
    opt.step()
    l2p.save_checkpoint(tmp_path, 1, {"w": w}, opt, [{"step": 0}])
    w2 = torch.nn.Parameter(torch.zeros(2, 3))
    opt2 = torch.optim.AdamW([w2], lr=1e-3, weight_decay=0.01)
    assert l2p.load_checkpoint(tmp_path, {"w": w2}, opt2) == (1, [{"step": 0}])
    group = opt2.param_groups[0]
    assert (group["lr"], tuple(group["betas"]), group["weight_decay"]) == (1e-3, (0.9, 0.999), 0.01)
    assert torch.equal(w2, w)
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(opt2.state[w2][key], opt.state[w][key]), key


def test_corrupt_or_foreign_checkpoint_is_refused_naming_its_file(tiny_sd, tmp_path):
    """A damaged checkpoint file, or one of another model, is a CheckpointError (a ValueError: the CLI prints it in
    one line) naming the file and how to start over, not a raw SafetensorError / JSON error / size mismatch."""
    import json
    import shutil

    subj = [_subject(tiny_sd)]
    pcfg = ProtectConfig(outer_steps=2, inner_steps=1, learning_rate=1e-3, checkpoint_every=1)
    good = tmp_path / "good"
    l2p.protect(tiny_sd, subj, PER, pcfg, seed=3, checkpoint_dir=good, stop_after=1)
    start_over = "protect.resume=false or delete"
    for name, match in [("state.safetensors", ("the protection checkpoint's tensors cannot be read, the file is "
                                               "corrupt or missing (SafetensorError")),
                        ("progress.json", "the protection checkpoint is corrupt (JSONDecodeError")]:
        bad = tmp_path / f"bad-{name}"
        shutil.copytree(good, bad)
        data = (bad / name).read_bytes()
        (bad / name).write_bytes(data[:len(data) // 2])  # truncated
        with pytest.raises(l2p.CheckpointError) as err:
            l2p.protect(tiny_sd, subj, PER, pcfg, seed=3, checkpoint_dir=bad)
        assert str(err.value).startswith(f"{bad / name}: {match}") and start_over in str(err.value), err.value
    # another model: its fingerprint differs
    from apdm.core.models import tiny_sd as build

    with pytest.raises(l2p.CheckpointError, match=r"another protection, made with other settings \(model: "):
        l2p.protect(build(seed=1), subj, PER, pcfg, seed=3, checkpoint_dir=good)
    # a checkpoint written before the settings were recorded, of other tensor shapes or other tensors
    meta = json.loads((good / "progress.json").read_text())
    del meta["settings"]
    (good / "progress.json").write_text(json.dumps(meta))
    unet = {n: torch.nn.Parameter(p.detach().clone()) for n, p in tiny_sd.unet.named_parameters()}
    shape = tuple(unet["conv_in.weight"].shape)
    for trainable, why in [({**unet, "conv_in.weight": torch.nn.Parameter(torch.zeros(3, 3))},
                            f"conv_in.weight has shape {shape} there, (3, 3) here"),
                           ({"w": torch.nn.Parameter(torch.zeros(3, 3))},
                            f"it lacks w; it holds {min(unet)} and {len(unet) - 1} more, which this run does not train")]:
        with pytest.raises(l2p.CheckpointError) as err:
            l2p.load_checkpoint(good, trainable, torch.optim.AdamW(list(trainable.values())), what="protection",
                                start_over="protect.resume=false")
        assert str(err.value) == (f"{good / 'state.safetensors'}: a protection checkpoint of another model or settings "
                                  f"({why}); start over with protect.resume=false or delete {good}")


def test_finished_protection_is_checkpointed_and_not_redone(tiny_sd, tmp_path, monkeypatch, apdm_log):
    """The last outer step is checkpointed even off the checkpoint_every grid, so a run killed afterwards (in the
    encoder trap) resumes with θ as it ended instead of redoing outer steps."""
    import json

    subj = [_subject(tiny_sd)]
    pcfg = ProtectConfig(outer_steps=3, inner_steps=1, learning_rate=1e-3, checkpoint_every=2)
    full, _, _ = l2p.protect(tiny_sd, subj, PER, pcfg, seed=3, checkpoint_dir=tmp_path)
    assert json.loads((tmp_path / "progress.json").read_text())["next_step"] == 3

    def no_step(*args, **kwargs):
        raise AssertionError("an outer step ran again")

    monkeypatch.setattr(l2p, "outer_step", no_step)
    again, hist, _ = l2p.protect(tiny_sd, subj, PER, pcfg, seed=3, checkpoint_dir=tmp_path)
    assert [h["step"] for h in hist] == [0, 1, 2]  # the history comes back from the checkpoint
    for (n, a), (_, b) in zip(full.named_parameters(), again.named_parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=n)
    # fewer outer steps than the checkpoint has done: refused (before, θ after 3 steps came out as a 2-step run)
    with pytest.raises(l2p.CheckpointError, match=r"at outer step 3, past protect.outer_steps=2; set "
                                                  r"protect.outer_steps to 3 or more to continue it, or start over"):
        l2p.protect(tiny_sd, subj, PER, dataclasses.replace(pcfg, outer_steps=2), seed=3, checkpoint_dir=tmp_path)
    # a checkpoint of an apdm that did not record its settings is resumed, with a warning
    meta = json.loads((tmp_path / "progress.json").read_text())
    del meta["settings"]
    (tmp_path / "progress.json").write_text(json.dumps(meta))
    _, hist, _ = l2p.protect(tiny_sd, subj, PER, pcfg, seed=9, checkpoint_dir=tmp_path)  # (another seed)
    assert [h["step"] for h in hist] == [0, 1, 2]
    assert (f"{tmp_path}: a protection checkpoint written before apdm recorded its settings: resumed without "
            "checking") in apdm_log()


def test_cli_protect_model_writes_loadable_model(tmp_path):
    from diffusers import StableDiffusionPipeline

    from helpers import tiny_protect_model_args

    from apdm.cli import main

    out = tmp_path / "out"
    rc = main(["protect-model", *tiny_protect_model_args(tmp_path)])
    assert rc == 0
    pipe = StableDiffusionPipeline.from_pretrained(str(out / "model"))
    assert pipe(["a photo"], num_inference_steps=2, height=64, width=64, output_type="np").images.shape == (1, 64, 64, 3)
    card = (out / "model" / "README.md").read_text()
    assert "a photo of sks person" in card and "DPO" in card
    assert not (out / "checkpoint").exists()


@pytest.mark.parametrize("override,message", [
    ("protect.outer_steps=0", ("protect.outer_steps must be a whole number >= 1 (0 only for the encoder trap alone, "
                               "with encoder_trap.steps > 0: without either the model would be released unprotected), "
                               "got 0")),
    ("protect.inner_steps=-1", "protect.inner_steps must be a whole number >= 0, got -1"),
    ("protect.batch_size=0", "protect.batch_size must be a whole number >= 1, got 0"),
    ("protect.num_class_images=0", "protect.num_class_images must be a whole number >= 1, got 0"),
    ("protect.loss=dpoo", "protect.loss must be one of dpo, naive, got 'dpoo'"),
    # fp16 autocast without loss scaling flushed the small protection gradients to zero (no GradScaler)
    ("protect.mixed_precision=fp16", "protect.mixed_precision=fp16 is refused: the protection loss is a mean")])
def test_cli_protect_model_refuses_out_of_range_settings_before_any_work(tmp_path, apdm_log, override, message):
    """Before, outer_steps=0 and inner_steps=-1 released an unprotected model with exit 0, num_class_images=0 ended
    in a raw AttributeError and a bad batch_size or loss only after the model and its class images."""
    from helpers import tiny_protect_model_args

    from apdm.cli import main

    assert main(["protect-model", *tiny_protect_model_args(tmp_path), override]) == 1
    assert message in apdm_log()
    assert not (tmp_path / "out").exists() and not (tmp_path / "cls").exists()  # no output, no class images
    key, value = override[len("protect."):].split("=")
    pcfg = ProtectConfig(**{key: value if key in ("loss", "mixed_precision") else int(value)})
    with pytest.raises(ValueError, match=re.escape(message)):  # the same check, for the library's callers
        l2p.check_protect_config(PER, pcfg, encoder_trap_steps=0)
    if key == "outer_steps":  # the encoder trap alone, and a benchmark's protection job, may run no L2P step
        l2p.check_protect_config(PER, pcfg, encoder_trap_steps=5)
        l2p.check_protect_config(PER, pcfg)


def test_bf16_base_model_runs_with_fp32_master_weights():
    """On GPUs the frozen parts (φ, VAE, text encoder) load in bf16 while θ and θ' train in fp32."""
    from apdm.core.models import tiny_sd

    sd16 = tiny_sd(seed=0, dtype=torch.bfloat16)
    pcfg = ProtectConfig(outer_steps=1, inner_steps=1, learning_rate=1e-3, checkpoint_every=0)
    theta, hist, _ = l2p.protect(sd16, [_subject(sd16)], PER, pcfg)
    assert theta.dtype == torch.float32 and sd16.unet.dtype == torch.bfloat16
    assert all(math.isfinite(v) for k, v in hist[0].items() if k != "step")
    assert any(not torch.equal(p, q.float()) for p, q in zip(theta.parameters(), sd16.unet.parameters()))  # stepped


def test_lora_theta_keeps_its_base_in_the_model_dtype():
    """LoRA-θ holds no fp32 copy of the UNet: the frozen base stays bf16 (φ's weights, bit for bit), only the
    adapters are fp32; they train, φ does not move, and the merged θ differs from φ."""
    from apdm.core.models import tiny_sd

    sd16 = tiny_sd(seed=0, dtype=torch.bfloat16)
    pcfg = ProtectConfig(outer_steps=2, inner_steps=1, learning_rate=1e-2, checkpoint_every=0, trainable="lora",
                         lora_rank=2)
    theta, trainable = l2p.prepare_theta(sd16, pcfg)
    base = {n: p for n, p in theta.named_parameters() if "lora_" not in n}
    assert all(p.dtype == torch.bfloat16 for p in base.values())
    assert trainable and all(p.dtype == torch.float32 and p.requires_grad for p in trainable.values())
    phi = {n: p.detach().clone() for n, p in sd16.unet.named_parameters()}
    merged, hist, _ = l2p.protect(sd16, [_subject(sd16)], PER, pcfg)
    assert all(math.isfinite(h["loss_protect"]) for h in hist)
    assert all(torch.equal(p, phi[n]) for n, p in sd16.unet.named_parameters())
    assert any(not torch.equal(p, phi[n]) for n, p in merged.named_parameters())


def test_bench_baseline_reuse_is_checked(tmp_path):
    import json

    from apdm.bench.protect_model import BASELINE_KEYS, load_baseline

    res = {"model_fingerprint": "abc", "instruments_fingerprint": "def", "subject_protected": 1, "subject_other": 7,
           "samples_per_prompt": 8, "attack_overrides": [], "other_identifier": "sks", "identifier": "sks",
           "attack_seeds": 1, "attack_photos": "same"}
    old = dict(res, **{k: 0.5 for k in BASELINE_KEYS}, ism_db_other_unprotected=0.6)
    del old["attack_photos"]  # results written before attack_photos existed attacked the protection's own photos
    del old["attack_seeds"]  # results written before attack_seeds existed ran every attack once
    del old["attack_overrides"]  # results written before attack overrides existed used the default attacker
    del old["other_identifier"], old["identifier"]  # ... and A and B personalized with "sks"
    f = tmp_path / "base.json"
    f.write_text(json.dumps(old))
    got = load_baseline(str(f), res)
    assert got["ism_db_other_unprotected"] == 0.6 and got["baseline_from"] == str(f)
    assert "ism_lora_unprotected" not in got  # optional keys pass through only when the baseline has them
    f.write_text(json.dumps(dict(old, ism_lora_unprotected=0.7)))
    assert load_baseline(str(f), res)["ism_lora_unprotected"] == 0.7
    f.write_text(json.dumps(old))
    with pytest.raises(ValueError, match="model_fingerprint"):
        load_baseline(str(f), dict(res, model_fingerprint="xyz"))
    with pytest.raises(ValueError, match="instruments_fingerprint"):  # KID / FDFR come from the instruments
        load_baseline(str(f), dict(res, instruments_fingerprint="xyz"))
    with pytest.raises(ValueError, match="attack_overrides"):  # a different attacker: not comparable
        load_baseline(str(f), dict(res, attack_overrides=["train_text_encoder=false"]))
    with pytest.raises(ValueError, match="other_identifier"):  # B personalized under another prompt
        load_baseline(str(f), dict(res, other_identifier="zwx"))
    with pytest.raises(ValueError, match="with identifier="):  # A attacked under another prompt: other ISM
        load_baseline(str(f), dict(res, identifier="t@t"))
    with pytest.raises(ValueError, match="attack_photos"):  # A attacked on other photos: another unprotected ISM
        load_baseline(str(f), dict(res, attack_photos="fresh"))
    f.write_text(json.dumps({k: v for k, v in old.items() if k != "ism_db_other_unprotected"}))
    assert "ism_db_other_unprotected" not in load_baseline(str(f), res)  # the bench runs what a baseline lacks
    f.write_text(json.dumps({k: v for k, v in old.items() if k != "kid_class_unprotected"}))
    with pytest.raises(ValueError, match="base.json: baseline result lacks kid_class_unprotected"):
        load_baseline(str(f), res)  # ... but not the class-prompt numbers and the DreamBooth attack
    # two files join: one with the other subject's number, one with LoRA's; a key both hold must agree
    g = tmp_path / "lora.json"
    g.write_text(json.dumps(dict({k: v for k, v in old.items() if k != "ism_db_other_unprotected"},
                                 ism_lora_unprotected=0.7, ism_lora_unprotected_runs=[0.7])))
    f.write_text(json.dumps(old))
    both = load_baseline(f"{f},{g}", res)
    assert (both["ism_db_other_unprotected"], both["ism_lora_unprotected"], both["ism_lora_unprotected_runs"]) == \
        (0.6, 0.7, [0.7])
    g.write_text(json.dumps(dict(old, ism_db_unprotected=0.55)))
    with pytest.raises(ValueError, match="lora.json: baseline has ism_db_unprotected=0.55, but .*base.json has 0.5"):
        load_baseline(f"{f},{g}", res)
    f.write_text("{not json")
    with pytest.raises(ValueError, match="base.json: cannot read"):
        load_baseline(str(f), res)
    # attack_seeds: results written before it existed ran every attack once; the runs come along
    f.write_text(json.dumps(dict(old, attack_seeds=3, ism_db_unprotected_runs=[0.4, 0.5, 0.6])))
    with pytest.raises(ValueError, match="attack_seeds"):
        load_baseline(str(f), dict(res, attack_seeds=1))
    assert load_baseline(str(f), dict(res, attack_seeds=3))["ism_db_unprotected_runs"] == [0.4, 0.5, 0.6]
    f.write_text(json.dumps(old))
    assert "ism_db_unprotected_runs" not in load_baseline(str(f), dict(res, attack_seeds=1))
    # attack_seed_stride: several runs seeded another distance apart are other draws (before it existed: 1 apart);
    # with one run per attack it does not matter
    f.write_text(json.dumps(dict(old, attack_seeds=3, ism_db_unprotected_runs=[0.4, 0.5, 0.6])))
    with pytest.raises(ValueError, match="base.json: baseline ran its attacks with seeds 1 apart"):
        load_baseline(str(f), dict(res, attack_seeds=3, attack_seed_stride=100_003))
    assert load_baseline(str(f), dict(res, attack_seeds=3, attack_seed_stride=1))["ism_db_unprotected"] == 0.5
    f.write_text(json.dumps(dict(old, attack_seed_stride=100_003)))
    assert load_baseline(str(f), dict(res, attack_seed_stride=1))["ism_db_unprotected"] == 0.5


def test_protection_ratios_against_hand_values():
    import statistics

    from apdm.bench.protect_model import protection_ratios

    res = {"ism_class_prompt": 0.1, "ism_db_unprotected": 0.8, "ism_db_protected": 0.1,
           "ism_db_unprotected_runs": [0.7, 0.9], "ism_db_protected_runs": [0.2, 0.0],
           "ism_ti_unprotected": 0.13, "ism_ti_protected": 0.1,
           "ism_ti_unprotected_runs": [0.11, 0.15], "ism_ti_protected_runs": [0.0, 0.2],
           "ism_lora_unprotected": 0.05, "ism_lora_protected": 0.0}  # LoRA gains nothing: no ratio
    out = protection_ratios(res)
    assert out["protection_ratio"] == pytest.approx(0.7 / 0.7)
    assert out["protection_ratio_runs"] == pytest.approx([0.5 / 0.6, 0.9 / 0.8], abs=1e-4)
    # se of the ratio of means (delta method): residuals drop − R·gain = (0.5 − 0.6, 0.9 − 0.8), R = 1
    assert out["protection_ratio_se"] == pytest.approx(statistics.stdev([-0.1, 0.1]) / 2 ** 0.5 / 0.7, abs=1e-4)
    assert out["protection_ratio_se"] != pytest.approx(statistics.stdev([0.5 / 0.6, 0.9 / 0.8]) / 2 ** 0.5, abs=1e-3)
    assert out["protection_ratio_se_method"].startswith("delta method")
    assert out["ism_drop"] == pytest.approx(0.7)
    assert out["ism_drop_se"] == pytest.approx(statistics.stdev([0.5, 0.9]) / 2 ** 0.5, abs=1e-4)
    # TI: tiny gains make per-run ratios wild (11.0 and -1.0) while the paired ISM drop stays readable
    assert out["protection_ratio_ti"] == pytest.approx(0.03 / 0.03)
    assert out["protection_ratio_ti_runs"] == pytest.approx([0.11 / 0.01, -0.05 / 0.05], abs=1e-4)
    assert out["ism_drop_ti"] == pytest.approx(0.03) and out["ism_drop_ti_se"] == pytest.approx(0.08, abs=1e-4)
    assert out["protection_ratio_ti_se"] == pytest.approx(statistics.stdev([0.1, -0.1]) / 2 ** 0.5 / 0.03, abs=1e-3)
    assert out["protection_ratio_lora"] is None and out["ism_drop_lora"] == pytest.approx(0.05)
    assert "ism_drop_lora_se" not in out and "protection_ratio_2x_steps" not in out
    assert "protection_ratio_lora_se" not in out  # no gain, no ratio, no se


def test_gains_kept_against_hand_values():
    import statistics

    from apdm.bench.protect_model import gains_kept

    res = {"ism_class_prompt_other": 0.1, "ism_db_other_unprotected": 0.6, "ism_db_other_protected": 0.5,
           "ism_db_other_unprotected_runs": [0.5, 0.7], "ism_db_other_protected_runs": [0.5, 0.5],
           "ism_class_prompt_dog": 0.2, "ism_db_dog_unprotected": 0.15, "ism_db_dog_protected": 0.1}
    out = gains_kept(res)
    assert out["other_gain_kept"] == pytest.approx(0.4 / 0.5)
    # kept gains (0.4, 0.4), gains (0.4, 0.6), R = 0.8: residuals (0.4 − 0.32, 0.4 − 0.48)
    assert out["other_gain_kept_se"] == pytest.approx(statistics.stdev([0.08, -0.08]) / 2 ** 0.5 / 0.5, abs=1e-4)
    assert out["dog_gain_kept"] is None and "dog_gain_kept_se" not in out  # the dog gains nothing: no share
    assert gains_kept({"ism_class_prompt": 0.1, "ism_db_unprotected": 0.8, "ism_db_protected": 0.1}) == {}


def test_ratio_standard_error_matches_the_spread_of_simulated_ratios():
    """The delta-method se of mean(a) / mean(b) over n paired runs is what the ratio actually scatters by when the
    experiment is repeated: simulate 4,000 experiments of 8 correlated (removed gain, gain) pairs, as a protection's
    runs are (a run with a large gain tends to lose a large one), and compare the spread of their ratios with the
    median of their se; the spread of per-run ratios' mean, what the bench wrote before, is far off when gains vary
    near zero."""
    import random
    import statistics

    from apdm.bench import ratio_standard_error

    rng = random.Random(0)
    ratios, ses, old = [], [], []
    for _ in range(4000):
        gains = [max(0.005, rng.gauss(0.10, 0.06)) for _ in range(8)]  # TI-like: gains 0.005 - 0.25
        drops = [0.55 * g + rng.gauss(0.0, 0.03) for g in gains]
        ratios.append(sum(drops) / sum(gains))
        ses.append(ratio_standard_error(drops, gains))
        old.append(statistics.stdev([d / g for d, g in zip(drops, gains)]) / 8 ** 0.5)
    spread = statistics.stdev(ratios)
    assert statistics.mean(ratios) == pytest.approx(0.55, abs=0.02)
    assert statistics.median(ses) == pytest.approx(spread, rel=0.25)
    assert statistics.median(old) > 1.5 * spread
    assert ratio_standard_error([0.1, 0.2], [-0.1, 0.05]) is None
    with pytest.raises(ValueError, match="paired runs"):
        ratio_standard_error([0.1], [0.2])


def test_bench_runs_the_unprotected_attacks_a_baseline_lacks():
    from apdm.bench.protect_model import unprotected_attacks_to_run

    def keys(*args):
        return [key for key, *_ in unprotected_attacks_to_run(*args)]

    # no baseline: every unprotected attack the options ask for, each with its method, subject and length
    assert unprotected_attacks_to_run({}, {"other", "lora", "ti"}, True) == [
        ("ism_db_unprotected", "dreambooth", False, False), ("ism_db_other_unprotected", "dreambooth", True, False),
        ("ism_lora_unprotected", "lora", False, False), ("ism_ti_unprotected", "ti", False, False),
        ("ism_db_unprotected_2x_steps", "dreambooth", False, True)]
    # a DreamBooth-only baseline asked for LoRA and TI: those two are run (they used to be silently skipped,
    # leaving protection_ratio_lora / _ti out of the result)
    base = {"ism_db_unprotected": 0.8, "ism_db_unprotected_runs": [0.8, 0.8]}
    assert keys(base, {"lora", "ti"}, False) == ["ism_lora_unprotected", "ism_ti_unprotected"]
    assert keys(dict(base, ism_lora_unprotected=0.7), {"lora"}, False) == []
    assert keys(base, set(), True) == ["ism_db_unprotected_2x_steps"]
    assert keys(base, {"dog", "targets"}, False) == []  # never from a baseline: run apart


def test_bench_saved_protection_round_trip_and_checks(tmp_path):
    """save_protected= writes the weights (safetensors) with the protection's settings; protected= reads them back
    exactly and refuses another model's or subject's weights, a file without apdm metadata, a missing file, and
    protection overrides that would not apply."""
    from safetensors.torch import save_file

    from apdm.bench.protect_model import PROTECTED_INFO, bench_protect_model, load_protected, save_protected

    g = torch.Generator().manual_seed(0)
    state = {"conv_in.weight": torch.randn(4, 3, generator=g),
             "text_encoder.emb.weight": torch.randn(5, 2, generator=g)[:, :1]}  # a non-contiguous view
    res = {k: None for k in PROTECTED_INFO} | {"model_fingerprint": "abc", "subject_protected": 1,
                                                "protect_lr_phases": [[300.0, 2e-4], [40.0, 2e-5]],
                                                "protect_config": {"outer_steps": 340}, "seconds_protect": 12.5,
                                                "protect_photos": 16}
    f = tmp_path / "w.safetensors"
    save_protected(str(f), state, res)
    got = load_protected(str(f), {"model_fingerprint": "abc", "subject_protected": 1, "protect_photos": 16})
    assert got["state"].keys() == state.keys()
    assert all(torch.equal(got["state"][k], v) for k, v in state.items())
    assert got["info"] == {k: res[k] for k in PROTECTED_INFO}
    with pytest.raises(ValueError, match="w.safetensors: protected with subject_protected=1, this run has 23"):
        load_protected(str(f), {"model_fingerprint": "abc", "subject_protected": 23, "protect_photos": 16})
    with pytest.raises(ValueError, match="protected with protect_photos=16, this run has 4"):
        load_protected(str(f), {"model_fingerprint": "abc", "subject_protected": 1, "protect_photos": 4})
    with pytest.raises(ValueError, match="model_fingerprint"):
        load_protected(str(f), {"model_fingerprint": "xyz", "subject_protected": 1, "protect_photos": 16})
    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="plain.safetensors: not written by"):
        load_protected(str(plain), {"model_fingerprint": "abc", "subject_protected": 1, "protect_photos": 16})
    with pytest.raises(ValueError, match="nope.safetensors: cannot read"):
        load_protected(str(tmp_path / "nope.safetensors"),
                       {"model_fingerprint": "abc", "subject_protected": 1, "protect_photos": 16})
    with pytest.raises(ValueError, match="protect.beta=0.5 would not apply"):
        bench_protect_model(True, [f"protected={f}", "protect.beta=0.5"])
    with pytest.raises(ValueError, match="outer_steps=3, save_protected=.* would not apply"):
        bench_protect_model(True, [f"protected={f}", "outer_steps=3", f"save_protected={tmp_path / 'again'}"])
    with pytest.raises(ValueError, match="keep_photos=8 would not apply"):
        bench_protect_model(True, [f"protected={f}", "keep_photos=8"])


def test_bench_attack_seeds_runs_and_summary():
    """attack_seeds=K: run r raises the attacker's and the sampling seed by r · attack_seed_stride (run 0 = the single
    attack of earlier results); with the default stride no two runs share a sampling noise or a class image (both
    seeded per image, seed + i), with stride 1 (results before 2026-12-04) they share all but one; each key is the
    mean of its runs, listed under <key>_runs only when there are several."""
    from apdm.bench import attack_run, attack_seed_stride
    from apdm.bench import standard_error
    from apdm.bench.protect_model import _attack_summary, bench_protect_model
    from apdm.config import SampleConfig
    from apdm.core.diffusion import SEED_STRIDE

    per, sample = PersonalizationConfig(seed=5, num_class_images=200), SampleConfig(seed=9, num_images_per_prompt=16)
    assert attack_run(per, sample, 0) == (per, sample)
    per2, sample2 = attack_run(per, sample, 2)
    assert (per2.seed, sample2.seed) == (5 + 2 * SEED_STRIDE, 9 + 2 * SEED_STRIDE) and per.seed == 5
    assert dataclasses.replace(per2, seed=5) == per
    assert [s.seed for _, s in (attack_run(per, sample, r, stride=1) for r in range(3))] == [9, 10, 11]

    def drawn(stride):  # per run: the seeds of its samples' initial noises and of its generated class images
        # (apdm.core.diffusion.generate seeds image i with seed + i; the simulator samples class images at
        # seed + 10,000)
        runs = [attack_run(per, sample, r, stride) for r in range(3)]
        return ([{s.seed + i for i in range(s.num_images_per_prompt)} for _, s in runs],
                [{p.seed + 10_000 + i for i in range(p.num_class_images)} for p, _ in runs])

    for sets in drawn(attack_seed_stride({})):
        assert all(not (a & b) for i, a in enumerate(sets) for b in sets[i + 1:])
    noises, classes = drawn(attack_seed_stride({"attack_seed_stride": "1"}))
    assert len(noises[0] & noises[1]) == 15 and len(classes[0] & classes[1]) == 199
    for bad in ("0", "x"):
        with pytest.raises(ValueError, match="attack_seed_stride must be a whole number"):
            attack_seed_stride({"attack_seed_stride": bad})
    one = _attack_summary("ism_db_protected", [{"ism": 0.25, "fdfr": 0.5}])
    assert one == {"ism_db_protected": 0.25, "fdfr_db_protected": 0.5}
    two = _attack_summary("ism_db_protected", [{"ism": 0.2, "fdfr": 0.5}, {"ism": 0.6, "fdfr": 0.25}])
    assert two["ism_db_protected"] == pytest.approx(0.4) and two["ism_db_protected_runs"] == [0.2, 0.6]
    assert two["fdfr_db_protected"] == pytest.approx(0.375) and two["fdfr_db_protected_runs"] == [0.5, 0.25]
    assert _attack_summary("ism_lora_protected", [{"ism": 0.1, "fdfr": 0.0}] * 2) == {
        "ism_lora_protected": 0.1, "ism_lora_protected_runs": [0.1, 0.1]}
    for bad in ("0", "two"):
        with pytest.raises(ValueError, match="attack_seeds must be a whole number"):
            bench_protect_model(True, [f"attack_seeds={bad}"])
    # the standard error of the runs' mean: sample sd / sqrt(n) (0.56, 0.82, 0.44: sd 0.1942, se 0.1121)
    assert standard_error([0.56, 0.82, 0.44]) == pytest.approx(0.1121, abs=1e-4)
    assert standard_error([0.3, 0.3]) == 0.0


def test_attack_recipe_overrides_leave_the_recipe_alone():
    from apdm.bench.toy_world import toy_recipe
    from apdm.config import ConfigError

    cfg = toy_recipe("dreambooth", ["personalization.train_text_encoder=false", "personalization.steps=7"])
    assert not cfg.personalization.train_text_encoder and cfg.personalization.steps == 7
    base = toy_recipe("dreambooth").personalization
    assert base.train_text_encoder and base.steps != 7  # the recipe itself is untouched
    with pytest.raises(ConfigError, match="no_such_key"):
        toy_recipe("dreambooth", ["personalization.no_such_key=1"])


def test_bench_rejects_unknown_attack_and_recipe_key():
    from apdm.bench.protect_model import bench_protect_model

    with pytest.raises(ValueError, match="unknown attacks"):
        bench_protect_model(True, ["attacks=lora,dreamboot"])
    with pytest.raises((ValueError, KeyError), match="betta"):
        bench_protect_model(True, ["protect.betta=2"])
    with pytest.raises(ValueError, match="nope"):  # ConfigError is a ValueError
        bench_protect_model(True, ["attack.nope=1"])
    with pytest.raises(ValueError, match="two different positions"):
        bench_protect_model(True, ["subjects=1,1"])
    with pytest.raises(ValueError, match="'P,O'"):
        bench_protect_model(True, ["subjects=2"])
    with pytest.raises(ValueError, match="attack_photos must be 'same'"):
        bench_protect_model(True, ["attack_photos=new"])
    with pytest.raises(ValueError, match="protect_photos must be a whole number >= 4"):
        bench_protect_model(True, ["protect_photos=3"])
    with pytest.raises(ValueError, match="encoder_trap.steps"):
        bench_protect_model(True, ["encoder_trap.steps=-5"])
    with pytest.raises(ValueError, match="its own judge"):  # the decoys may not be chosen by the bench's judge
        bench_protect_model(True, ["encoder_trap.steps=1", "encoder_trap.targets=farthest",
                                   "encoder_trap.identity=toy"])
    with pytest.raises(ValueError, match="needs encoder_trap.identity"):
        bench_protect_model(True, ["encoder_trap.steps=1", "encoder_trap.targets=farthest"])
    with pytest.raises(ValueError, match="keep_photos=N is for the encoder trap"):
        bench_protect_model(True, ["keep_photos=8"])
    with pytest.raises(ValueError, match="keep_photos must be a whole number from 0 to 220"):
        bench_protect_model(True, ["keep_photos=300", "encoder_trap.steps=1"])
    with pytest.raises(ValueError, match="inner_restart_every"):
        bench_protect_model(True, ["protect.inner_restart_every=0"])
    with pytest.raises(ValueError, match="other_identifier must be one word"):
        bench_protect_model(True, ["other_identifier=a b"])
    with pytest.raises(ValueError, match="^identifier must be one word"):
        bench_protect_model(True, ["identifier=person"])


def test_bench_attacker_names_the_subject_with_its_own_identifier():
    """identifier=WORD: the evaluation attacker trains and samples "a photo of WORD person"; TI learns <WORD>."""
    from apdm.bench import attack_config
    from apdm.personalization import simulator as S
    from apdm.toy.world import heldout_subjects

    subj = heldout_subjects(1, num_images=1, num_references=1)[0]
    for method in ("dreambooth", "ti"):
        cfg = attack_config(PersonalizationConfig(method=method), subj, "t@t")
        assert cfg.instance_prompt == "a photo of t@t person" and cfg.class_prompt == subj.class_prompt
    assert S.ti_prompt(cfg.instance_prompt, cfg) == "a photo of <t@t> person"
    assert attack_config(PersonalizationConfig(), subj, "sks").instance_prompt == subj.instance_prompt


def test_anchor_keeps_theta_own_class_prior(tiny_sd):
    """anchor_weight adds L_ppl at θ itself; with it θ fits its class images better than without."""
    from apdm.core import diffusion as D

    subj = _subject(tiny_sd)
    g = torch.Generator().manual_seed(0)
    lat = D.encode_images(tiny_sd.vae, subj.class_images).float()
    cond = D.encode_prompt(tiny_sd.text_encoder, tiny_sd.tokenizer, [subj.class_prompt]).expand(lat.shape[0], -1, -1)
    noise = torch.randn(lat.shape, generator=g)
    t = torch.full((lat.shape[0],), 500, dtype=torch.long)

    def prior_loss(unet):
        with torch.no_grad():
            return float(D.noise_prediction_loss(unet, tiny_sd.noise_scheduler, lat, cond, noise, t))

    out = {}
    for w in (0.0, 20.0):
        pcfg = ProtectConfig(outer_steps=4, inner_steps=1, learning_rate=2e-3, checkpoint_every=0, anchor_weight=w)
        theta, hist, _ = l2p.protect(tiny_sd, [subj], PER, pcfg, seed=1)
        out[w] = prior_loss(theta)
        assert ("loss_anchor" in hist[0]) == (w > 0)
    assert out[20.0] < out[0.0]


def test_lr_phases_schedule_and_checks():
    pcfg = ProtectConfig(outer_steps=5, lr_phases=[[2, 1e-3], [3, 1e-5]])
    assert [l2p.learning_rate_at(pcfg, j) for j in range(5)] == [1e-3, 1e-3, 1e-5, 1e-5, 1e-5]
    assert l2p.learning_rate_at(ProtectConfig(learning_rate=7e-6), 3) == 7e-6
    with pytest.raises(ValueError, match="covers 4 outer steps"):
        l2p.check_lr_phases(ProtectConfig(outer_steps=5, lr_phases=[[2, 1e-3], [2, 1e-5]]))
    with pytest.raises(ValueError, match=r"\[steps, lr\]"):
        l2p.check_lr_phases(ProtectConfig(outer_steps=2, lr_phases=[[2]]))


def test_lr_phases_are_applied_and_survive_resume(tiny_sd, tmp_path):
    """A zero-lr first phase leaves θ bit-identical to φ; the second phase, reached after a resume, moves it."""
    subj = [_subject(tiny_sd)]
    pcfg = ProtectConfig(outer_steps=2, inner_steps=1, checkpoint_every=1, learning_rate=5.0,
                         lr_phases=[[1, 0.0], [1, 1e-3]])
    first, hist, _ = l2p.protect(tiny_sd, subj, PER, pcfg, checkpoint_dir=tmp_path, stop_after=1)
    base = dict(tiny_sd.unet.named_parameters())
    assert all(torch.equal(p, base[n]) for n, p in first.named_parameters())
    second, hist, _ = l2p.protect(tiny_sd, subj, PER, pcfg, checkpoint_dir=tmp_path)
    assert [h["lr"] for h in hist] == [0.0, 1e-3]
    assert any(not torch.equal(p, base[n]) for n, p in second.named_parameters())


LORA_MIX = [{"method": "lora", "learning_rate": 1e-2, "lora_rank": 2, "lora_alpha": 2,
             "with_prior_preservation": False}]


def test_attacker_mix_takes_attackers_in_turn(tiny_sd):
    """Outer step 0 simulates ``personalization`` (bit-identical to a run without the mix), step 1 the LoRA
    attacker of ``attacker_mix`` (θ then differs from the single-attacker run)."""
    subj = [_subject(tiny_sd)]
    runs = {}
    for mix in ([], LORA_MIX):
        for steps in (1, 2):
            pcfg = ProtectConfig(outer_steps=steps, inner_steps=1, learning_rate=1e-3, checkpoint_every=0,
                                 attacker_mix=mix)
            runs[len(mix), steps] = l2p.protect(tiny_sd, subj, PER, pcfg, seed=2)
    same = lambda a, b: all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))  # noqa: E731
    assert same(runs[0, 1][0], runs[1, 1][0])
    assert not same(runs[0, 2][0], runs[1, 2][0])
    assert [h["attacker"] for h in runs[1, 2][1]] == [0, 1]
    assert "attacker" not in runs[0, 2][1][0]


def test_attacker_mix_with_several_subjects_meets_every_pair(tiny_sd):
    subjects = [_subject(tiny_sd), dataclasses.replace(_subject(tiny_sd), name="t")]
    pcfg = ProtectConfig(outer_steps=4, inner_steps=1, learning_rate=1e-3, checkpoint_every=0, attacker_mix=LORA_MIX)
    _, hist, _ = l2p.protect(tiny_sd, subjects, PER, pcfg)
    assert [h["attacker"] for h in hist] == [0, 0, 1, 1]  # subjects 0, 1, 0, 1: every (subject, attacker) pair


def test_attacker_mix_is_checked_before_any_work():
    from apdm.config import ConfigError

    with pytest.raises(ConfigError, match=r"attacker_mix\[0\].*lora_rnak"):
        l2p.check_protect_config(PER, ProtectConfig(attacker_mix=[{"lora_rnak": 8}]))
    with pytest.raises(ConfigError, match=r"attacker_mix\[0\].*learning_rate"):
        l2p.check_protect_config(PER, ProtectConfig(attacker_mix=[{"learning_rate": "fast"}]))
    with pytest.raises(ValueError, match="trainable=lora"):
        l2p.check_protect_config(PER, ProtectConfig(trainable="lora", attacker_mix=LORA_MIX))
    assert [a.method for a in l2p.attackers(PER, ProtectConfig(attacker_mix=LORA_MIX))] == ["dreambooth", "lora"]
    from apdm.config import ProtectModelRunConfig, load_config

    rc = load_config(ProtectModelRunConfig, overrides=["protect.attacker_mix=[{method: lora, learning_rate: 2.0e-3}]"])
    mixed = l2p.attackers(rc.personalization, rc.protect)[1]
    assert (mixed.method, mixed.learning_rate, mixed.steps) == ("lora", 2e-3, rc.personalization.steps)


def test_protection_loss_matches_separate_passes(tiny_sd):
    """The one batched θ' pass over [class | x⁺ | x⁻] gives the L_ppl and DPO of three separate passes
    (same images, prompts, noise and t, redrawn here in the loss's order)."""
    from apdm.core import diffusion as D

    subj = _subject(tiny_sd)
    pcfg = ProtectConfig(batch_size=2, beta=3.0)
    theta = l2p.prepare_theta(tiny_sd, pcfg)[0]
    with torch.no_grad():  # θ ≠ φ, so the DPO terms are not trivially zero
        for p in theta.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    loss, logs = l2p.protection_loss(theta, lambda: l2p._phi(theta, tiny_sd.unet), tiny_sd, tiny_sd.text_encoder,
                                     tiny_sd.tokenizer, subj, subj.instance_prompt, pcfg,
                                     torch.Generator().manual_seed(9))
    g, b, sched = torch.Generator().manual_seed(9), 2, tiny_sd.noise_scheduler
    idx, cls_idx = torch.randint(2, (b,), generator=g), torch.randint(3, (b,), generator=g)
    vae_gen = torch.Generator().manual_seed(int(torch.randint(2**31, (1,), generator=g)))
    with torch.no_grad():
        lat = {w: l2p._latents(tiny_sd.vae, subj, w, i, vae_gen)
               for w, i in (("images", idx), ("paired", idx), ("class_images", cls_idx))}
        c_inst, c_cls = (D.encode_prompt(tiny_sd.text_encoder, tiny_sd.tokenizer, [p]).expand(b, -1, -1)
                         for p in (subj.instance_prompt, subj.class_prompt))
        n_cls, t_cls = torch.randn(lat["class_images"].shape, generator=g), D.sample_timesteps(sched, b, "cpu", g)
        noise, t = torch.randn(lat["images"].shape, generator=g), D.sample_timesteps(sched, b, "cpu", g)
        ppl = D.noise_prediction_loss(theta, sched, lat["class_images"], c_cls, n_cls, t_cls)
        err = {(m, w): D.noise_prediction_loss(u, sched, lat[w], c_inst, noise, t, reduction="elementwise")
               for m, u in (("theta", theta), ("phi", tiny_sd.unet)) for w in ("paired", "images")}
    dpo = dpo_loss(err["theta", "paired"], err["phi", "paired"], err["theta", "images"], err["phi", "images"], beta=3.0)
    assert logs["loss_dpo"] > 0.01
    torch.testing.assert_close(torch.tensor([logs["loss_ppl"], logs["loss_dpo"]]), torch.stack([ppl, dpo]),
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss.detach(), dpo + ppl, rtol=1e-4, atol=1e-6)


def test_dpo_extra_prompts_condition_each_pair(tiny_sd):
    """With ``dpo_extra_prompts`` each DPO pair is conditioned on a prompt drawn (last, after noise and t) from the
    instance prompt and the extras; L_ppl and the random stream before that draw are unchanged."""
    from apdm.core import diffusion as D

    subj = _subject(tiny_sd)
    pcfg = ProtectConfig(batch_size=4, dpo_extra_prompts=["{class_prompt}", ""])
    theta = l2p.prepare_theta(tiny_sd, pcfg)[0]
    with torch.no_grad():
        for p in theta.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    phi_ctx = lambda: l2p._phi(theta, tiny_sd.unet)  # noqa: E731
    args = (tiny_sd, tiny_sd.text_encoder, tiny_sd.tokenizer, subj, subj.instance_prompt)
    _, logs = l2p.protection_loss(theta, phi_ctx, *args, pcfg, torch.Generator().manual_seed(7))
    _, logs_plain = l2p.protection_loss(theta, phi_ctx, *args, dataclasses.replace(pcfg, dpo_extra_prompts=[]),
                                        torch.Generator().manual_seed(7))
    g, b, sched = torch.Generator().manual_seed(7), 4, tiny_sd.noise_scheduler
    idx, cls_idx = torch.randint(2, (b,), generator=g), torch.randint(3, (b,), generator=g)
    vae_gen = torch.Generator().manual_seed(int(torch.randint(2**31, (1,), generator=g)))
    with torch.no_grad():
        lat = {w: l2p._latents(tiny_sd.vae, subj, w, i, vae_gen) for w, i in (("images", idx), ("paired", idx))}
        torch.randn(lat["images"].shape, generator=g), D.sample_timesteps(sched, b, "cpu", g)  # L_ppl's noise, t
        noise, t = torch.randn(lat["images"].shape, generator=g), D.sample_timesteps(sched, b, "cpu", g)
        choice = torch.randint(3, (b,), generator=g)
        table = torch.cat([D.encode_prompt(tiny_sd.text_encoder, tiny_sd.tokenizer, [p])
                           for p in (subj.instance_prompt, subj.class_prompt, "")])
        cond = table[choice]
        err = {(m, w): D.noise_prediction_loss(u, sched, lat[w], cond, noise, t, reduction="elementwise")
               for m, u in (("theta", theta), ("phi", tiny_sd.unet)) for w in ("paired", "images")}
    assert len(set(choice.tolist())) >= 2 and (choice > 0).any()  # the seed really mixes prompts
    dpo = dpo_loss(err["theta", "paired"], err["phi", "paired"], err["theta", "images"], err["phi", "images"])
    torch.testing.assert_close(torch.tensor(logs["loss_dpo"]), dpo, rtol=1e-4, atol=1e-6)
    assert logs["loss_ppl"] == logs_plain["loss_ppl"]          # L_ppl drew the same numbers
    assert abs(logs["loss_dpo"] - logs_plain["loss_dpo"]) > 1e-4  # and the DPO term saw other prompts
    with pytest.raises(ValueError, match="dpo_extra_prompts"):
        l2p.check_protect_config(PER, ProtectConfig(loss="naive", dpo_extra_prompts=[""]))


def test_attacked_conditioning_is_a_projected_normalized_gradient_step(tiny_sd):
    """One step of the conditioning attack against the hand-computed one: δ = -r‖c_i‖ ĝ_i (the 2.5·r step
    projected back onto the radius), ĝ the per-row normalized gradient of the noise-prediction loss under the
    noise and t drawn from the same generator; it lowers that loss, leaves no gradient on the UNet, and more steps
    stay within the bound."""
    from apdm.core import diffusion as D

    sched, unet = tiny_sd.noise_scheduler, tiny_sd.unet
    lat = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    c = D.encode_prompt(tiny_sd.text_encoder, tiny_sd.tokenizer, ["a photo of sks person"]).expand(4, -1, -1)
    c_adv, shift = l2p.attacked_conditioning(unet, sched, lat, c, steps=1, radius=0.05,
                                             g=torch.Generator().manual_seed(5))
    assert all(p.grad is None for p in unet.parameters())
    g = torch.Generator().manual_seed(5)
    noise, t = torch.randn(lat.shape, generator=g), D.sample_timesteps(sched, 4, "cpu", g)
    cc = c.detach().clone().requires_grad_(True)
    loss = D.noise_prediction_loss(unet, sched, lat, cc, noise, t)
    (grad,) = torch.autograd.grad(loss, cc)
    norm = lambda x: x.flatten(1).norm(dim=1).view(-1, 1, 1)  # noqa: E731
    torch.testing.assert_close(c_adv, c - 0.05 * norm(c) * grad / norm(grad), rtol=1e-4, atol=1e-6)
    assert abs(shift - 0.05) < 1e-5
    with torch.no_grad():
        assert D.noise_prediction_loss(unet, sched, lat, c_adv, noise, t) < loss
    c_far, shift = l2p.attacked_conditioning(unet, sched, lat, c, steps=6, radius=0.5,
                                             g=torch.Generator().manual_seed(5))
    assert (norm(c_far - c) <= 0.5 * norm(c) * (1 + 1e-5)).all() and shift > 0.1


def test_conditioning_attack_moves_only_the_dpo_pairs(tiny_sd):
    """``conditioning_attack_steps`` draws after every draw of the paper's loss: L_ppl is unchanged, the DPO term
    differs; it is refused with the naive loss or a bad radius."""
    subj = _subject(tiny_sd)
    pcfg = ProtectConfig(batch_size=2, conditioning_attack_steps=2, conditioning_attack_radius=0.5)
    theta = l2p.prepare_theta(tiny_sd, pcfg)[0]
    phi_ctx = lambda: l2p._phi(theta, tiny_sd.unet)  # noqa: E731
    args = (tiny_sd, tiny_sd.text_encoder, tiny_sd.tokenizer, subj, subj.instance_prompt)
    loss, logs = l2p.protection_loss(theta, phi_ctx, *args, pcfg, torch.Generator().manual_seed(7))
    _, plain = l2p.protection_loss(theta, phi_ctx, *args, dataclasses.replace(pcfg, conditioning_attack_steps=0),
                                   torch.Generator().manual_seed(7))
    assert logs["loss_ppl"] == plain["loss_ppl"] and 0 < logs["cond_attack_shift"] <= 0.5 + 1e-5
    assert abs(logs["mse_subject"] - plain["mse_subject"]) > 1e-5
    loss.backward()
    assert sum(float(p.grad.abs().sum()) for p in theta.parameters() if p.grad is not None) > 0
    with pytest.raises(ValueError, match="conditioning_attack_steps"):
        l2p.check_protect_config(PER, ProtectConfig(loss="naive", conditioning_attack_steps=2))
    with pytest.raises(ValueError, match="conditioning_attack_radius"):
        l2p.check_protect_config(PER, ProtectConfig(conditioning_attack_steps=2, conditioning_attack_radius=0))


def test_continuing_attacker_restarts_every_r_steps(tiny_sd):
    """``inner_restart_every=2``: outer step 0 is Algorithm 1's (bit-identical θ), step 1's attacker continues
    (depth 2, θ then differs), step 2 restarts from θ (depth 1). With the protection lr at 0 (θ fixed), two
    outer steps of one continuing inner step equal one outer step of two inner steps."""
    subj = [_subject(tiny_sd)]
    same = lambda a, b: all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))  # noqa: E731
    runs = {}
    for r in (1, 2):
        for steps in (1, 3):
            pcfg = ProtectConfig(outer_steps=steps, inner_steps=1, learning_rate=1e-3, checkpoint_every=0,
                                 inner_restart_every=r)
            runs[r, steps] = l2p.protect(tiny_sd, subj, PER, pcfg, seed=4)
    assert same(runs[1, 1][0], runs[2, 1][0])
    assert not same(runs[1, 3][0], runs[2, 3][0])
    assert [h["attack_depth"] for h in runs[2, 3][1]] == [1, 2, 1]
    assert [h["attack_depth"] for h in runs[1, 3][1]] == [1, 1, 1]
    frozen = dict(learning_rate=0.0, checkpoint_every=0, weight_decay=0.0)
    _, two_outer, _ = l2p.protect(tiny_sd, subj, PER, ProtectConfig(outer_steps=2, inner_steps=1,
                                                                  inner_restart_every=2, **frozen), seed=4)
    _, one_outer, _ = l2p.protect(tiny_sd, subj, PER, ProtectConfig(outer_steps=1, inner_steps=2, **frozen), seed=4)
    per_step = [h["loss_personalization"] for h in two_outer]
    assert sum(per_step) / 2 == pytest.approx(one_outer[0]["loss_personalization"], rel=1e-6)
    assert per_step[0] != per_step[1]


def test_continuing_attacker_follows_theta(tiny_sd, monkeypatch):
    """The continuing θ' starts outer step 1 at θ_new + (θ'_end − θ_old): its own progress on θ's new weights."""
    from apdm.personalization import simulator as S

    subj = [_subject(tiny_sd)]
    pcfg = ProtectConfig(outer_steps=2, inner_steps=1, learning_rate=1e-2, checkpoint_every=0, inner_restart_every=2)
    theta, trainable, phi, opt, _ = l2p.init_protection(tiny_sd, pcfg)
    theta.train()
    name = "conv_in.weight"
    seen = []
    real_step = S.step
    monkeypatch.setattr(S, "step", lambda state, x: (seen.append(
        dict(state.sd.unet.named_parameters())[name].detach().clone()), real_step(state, x))[1])
    carry: dict = {}
    old = trainable[name].detach().clone()
    l2p.outer_step(0, theta, trainable, phi, tiny_sd, subj, PER, pcfg, opt, 0, carry=carry, carry_key=(0, 0))
    state, inner, delta = carry[(0, 0)]
    end = inner[name].detach().clone()
    new = trainable[name].detach().clone()
    assert not torch.equal(new, old) and not torch.equal(end, seen[0])
    torch.testing.assert_close(delta[name], end - old, atol=0, rtol=0)
    l2p.outer_step(1, theta, trainable, phi, tiny_sd, subj, PER, pcfg, opt, 0, carry=carry, carry_key=(0, 0))
    torch.testing.assert_close(seen[1], new + (end - old))
    assert len(carry[(0, 0)][0].history) == 2


def test_continuing_attacker_counts_restarts_in_visits_of_each_subject(tiny_sd):
    """R counted outer steps, while each of K subjects comes up every K steps: with R = 2 and two subjects no
    attacker ever continued (depth 1 every step). Now each subject's attacker continues for R visits."""
    def mk(seed):
        g = torch.Generator().manual_seed(seed)
        return l2p.Subject(f"s{seed}", torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g),
                           torch.rand(2, 3, 64, 64, generator=g), "a photo of sks person", "a photo of a person")

    pcfg = ProtectConfig(outer_steps=8, inner_steps=1, learning_rate=1e-3, checkpoint_every=0, inner_restart_every=2,
                         batch_size=1, num_class_images=2)
    _, hist, _ = l2p.protect(tiny_sd, [mk(0), mk(1)], PER, pcfg, seed=0)
    assert [h["attack_depth"] for h in hist] == [1, 1, 2, 2, 1, 1, 2, 2]
    assert l2p.restart_period(pcfg, 2) == 4
    with pytest.raises(ValueError, match="multiple of 4 .*2 \\(subject, attacker\\) pairs"):
        l2p.check_protect_config(PER, dataclasses.replace(pcfg, checkpoint_every=2), num_subjects=2)
    l2p.check_protect_config(PER, dataclasses.replace(pcfg, checkpoint_every=4), num_subjects=2)


def test_continuing_attacker_checks_and_exact_resume(tiny_sd, tmp_path):
    with pytest.raises(ValueError, match="multiple of"):
        l2p.check_protect_config(PER, ProtectConfig(inner_restart_every=3, checkpoint_every=10))
    with pytest.raises(ValueError, match="whole number"):
        l2p.check_protect_config(PER, ProtectConfig(inner_restart_every=0))
    subj = [_subject(tiny_sd)]
    pcfg = ProtectConfig(outer_steps=4, inner_steps=1, learning_rate=1e-3, checkpoint_every=2, inner_restart_every=2)
    full, _, _ = l2p.protect(tiny_sd, subj, PER, pcfg, seed=3, checkpoint_dir=tmp_path / "a")
    l2p.protect(tiny_sd, subj, PER, pcfg, seed=3, checkpoint_dir=tmp_path / "b", stop_after=2)
    resumed, hist, _ = l2p.protect(tiny_sd, subj, PER, pcfg, seed=3, checkpoint_dir=tmp_path / "b")
    assert [h["attack_depth"] for h in hist] == [1, 2, 1, 2]
    for (n, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=n)


def test_continuing_attacker_per_subject_and_attacker(tiny_sd):
    """Each (subject, attacker) pair continues its own simulated attacker: with 2 subjects, 2 attackers and
    R = 8, the pairs come up in the order (0,0) (1,0) (0,1) (1,1) and each continues on its second visit."""
    subjects = [_subject(tiny_sd), dataclasses.replace(_subject(tiny_sd), name="t")]
    pcfg = ProtectConfig(outer_steps=8, inner_steps=1, learning_rate=1e-3, checkpoint_every=0, attacker_mix=LORA_MIX,
                         inner_restart_every=8)
    _, hist, _ = l2p.protect(tiny_sd, subjects, PER, pcfg)
    assert [h["attacker"] for h in hist] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert [h["attack_depth"] for h in hist] == [1, 1, 1, 1, 2, 2, 2, 2]


@pytest.mark.parametrize("attacker_te", [True, False])
def test_protected_text_encoder_is_trained_and_base_untouched(tiny_sd, attacker_te):
    """``train_text_encoder``: θ's own text encoder moves (whether the simulated attacker trains its copy or shares
    θ's), the base model's does not, and the UNet is still protected."""
    te_before = {n: p.clone() for n, p in tiny_sd.text_encoder.named_parameters()}
    per = dataclasses.replace(PER, train_text_encoder=attacker_te)
    pcfg = ProtectConfig(outer_steps=1, inner_steps=2, learning_rate=1e-3, checkpoint_every=0, train_text_encoder=True,
                         anchor_weight=1.0)
    theta, hist, te = l2p.protect(tiny_sd, [_subject(tiny_sd)], per, pcfg)
    assert te is not None and te is not tiny_sd.text_encoder
    assert all(torch.equal(p, te_before[n]) for n, p in tiny_sd.text_encoder.named_parameters())
    moved = [n for n, p in te.named_parameters() if not torch.equal(p, te_before[n])]
    assert len(moved) > 0.9 * len(te_before), (len(moved), len(te_before))
    assert any(not torch.equal(p, q) for p, q in zip(theta.parameters(), tiny_sd.unet.parameters()))
    _, _, none = l2p.protect(tiny_sd, [_subject(tiny_sd)], per, dataclasses.replace(pcfg, train_text_encoder=False))
    assert none is None


def test_protection_gradient_reaches_the_text_encoder_and_descends(tiny_sd):
    """The protection loss is differentiable w.r.t. the text encoder through the conditioning: a small step against
    that gradient (text encoder only, same draws) lowers the loss; without the option no gradient arrives."""
    subj = _subject(tiny_sd)
    pcfg = ProtectConfig(batch_size=2, train_text_encoder=True)
    theta = l2p.prepare_theta(tiny_sd, pcfg)[0]
    trainable: dict = {}
    te = l2p.prepare_text_encoder(tiny_sd, pcfg, trainable)
    assert trainable and all(n.startswith(l2p.TE_PREFIX) for n in trainable)
    phi_ctx = lambda: l2p._phi(theta, tiny_sd.unet)  # noqa: E731

    def loss_at(cfg):
        return l2p.protection_loss(theta, phi_ctx, tiny_sd, te, tiny_sd.tokenizer, subj, subj.instance_prompt, cfg,
                                   torch.Generator().manual_seed(5))[0]

    loss = loss_at(pcfg)
    loss.backward()
    grads = [p.grad for p in te.parameters()]
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    with torch.no_grad():
        for p in te.parameters():
            if p.grad is not None:
                p.sub_(1e-2 * p.grad / (p.grad.norm() + 1e-12))
                p.grad = None
    assert float(loss_at(pcfg).detach()) < float(loss.detach()) - 1e-6
    loss_at(dataclasses.replace(pcfg, train_text_encoder=False)).backward()
    assert all(p.grad is None for p in te.parameters())


def test_protected_text_encoder_resumes_exactly_and_ti_is_refused(tiny_sd, tmp_path):
    subj = [_subject(tiny_sd)]
    per = dataclasses.replace(PER, train_text_encoder=True)
    pcfg = ProtectConfig(outer_steps=3, inner_steps=1, learning_rate=1e-3, checkpoint_every=1, train_text_encoder=True,
                         text_encoder_lr=3e-3, lr_phases=[[1, 1e-3], [2, 5e-4]])
    _, hist, full = l2p.protect(tiny_sd, subj, per, pcfg, seed=3, checkpoint_dir=tmp_path / "a")
    l2p.protect(tiny_sd, subj, per, pcfg, seed=3, checkpoint_dir=tmp_path / "b", stop_after=2)
    _, _, resumed = l2p.protect(tiny_sd, subj, per, pcfg, seed=3, checkpoint_dir=tmp_path / "b")
    for (n, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=n)
    assert [h["lr"] for h in hist] == [1e-3, 5e-4, 5e-4]  # the UNet's phases
    # the text encoder's own constant lr: its optimizer group, checkpointed with the run
    groups = __import__("json").loads((tmp_path / "b" / "progress.json").read_text())["param_groups"]
    assert [g["lr"] for g in groups] == [5e-4, 3e-3] and groups[1]["apdm_text_encoder"]
    with pytest.raises(ValueError, match="Textual Inversion"):
        l2p.check_protect_config(dataclasses.replace(PER, method="ti"), pcfg)


def test_text_encoder_lr_without_protected_text_encoder_is_ignored_with_a_warning(caplog):
    """A recipe that protects the text encoder can be run UNet-only by overriding ``train_text_encoder=false``."""
    import logging

    with caplog.at_level(logging.WARNING):
        l2p.check_protect_config(PER, ProtectConfig(text_encoder_lr=1e-4))
    assert "text_encoder_lr=0.0001 is ignored" in caplog.text


def test_bench_carries_a_protected_text_encoder(tiny_sd):
    """What a protection job returns (:func:`jobs.unet_state` with a text encoder) rebuilds that text encoder."""
    from apdm.bench import jobs

    te = __import__("copy").deepcopy(tiny_sd.text_encoder)
    with torch.no_grad():
        for p in te.parameters():
            p.add_(0.5)
    spec = jobs.remember_model(tiny_sd)
    sd = jobs.model(spec, jobs.unet_state(tiny_sd.unet, te))
    for (n, a), (_, b) in zip(sd.text_encoder.named_parameters(), te.named_parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=n)
    assert jobs.model(spec, jobs.unet_state(tiny_sd.unet)).text_encoder is tiny_sd.text_encoder


def test_cli_protect_model_saves_the_protected_text_encoder(tmp_path):
    from transformers import CLIPTextModel

    from helpers import tiny_protect_model_args

    from apdm.cli import main
    from apdm.core.models import load_sd

    assert main(["protect-model", *tiny_protect_model_args(tmp_path), "protect.train_text_encoder=true",
                 "personalization.train_text_encoder=true"]) == 0
    saved = CLIPTextModel.from_pretrained(str(tmp_path / "out" / "model" / "text_encoder"))
    base = load_sd("tiny", device="cpu").text_encoder
    assert any(not torch.equal(a, b) for a, b in zip(saved.parameters(), base.parameters()))
    assert "and its text encoder were fine-tuned" in (tmp_path / "out" / "model" / "README.md").read_text()


def test_identifiers_one_word_equals_protecting_under_that_word(tiny_sd):
    """protect.identifiers=[w] protects exactly as a subject whose instance prompt names w; with several words each
    outer step draws one (deterministically: the same draws on a rerun) and the protection differs."""
    subj = _subject(tiny_sd)
    pcfg = ProtectConfig(outer_steps=2, inner_steps=1, learning_rate=1e-3, checkpoint_every=0)
    zwx = dataclasses.replace(subj, instance_prompt="a photo of zwx person")
    ref, _, _ = l2p.protect(tiny_sd, [zwx], PER, pcfg, seed=3)
    got, hist, _ = l2p.protect(tiny_sd, [subj], PER, dataclasses.replace(pcfg, identifiers=["zwx"]), seed=3)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), got.parameters()))
    assert [h["identifier_index"] for h in hist] == [0.0, 0.0]
    plain, _, _ = l2p.protect(tiny_sd, [subj], PER, pcfg, seed=3)  # "sks": another protection
    assert not all(torch.equal(a, b) for a, b in zip(plain.parameters(), got.parameters()))
    many = dataclasses.replace(pcfg, outer_steps=8, identifiers=["sks", "zwx", "t@t"])
    draws = [[h["identifier_index"] for h in l2p.protect(tiny_sd, [subj], PER, many, seed=3)[1]] for _ in range(2)]
    assert draws[0] == draws[1] and len(set(draws[0])) >= 2


def test_identifiers_checks():
    subj = l2p.Subject("bob", torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8),
                       "a photo of ohwx person", "a photo of a person")
    with pytest.raises(ValueError, match="subject 'bob'.*'a photo of ohwx person'.*'sks'"):
        l2p.with_identifier(subj, PER, "zwx")
    s2, cfg = l2p.with_identifier(subj, dataclasses.replace(PER, identifier="ohwx", method="ti"), "t@t")
    assert s2.instance_prompt == "a photo of t@t person" and cfg.identifier == "t@t" and subj.name == s2.name
    with pytest.raises(ValueError, match="one word without spaces"):
        l2p.check_protect_config(PER, ProtectConfig(identifiers=["two words"]))
    with pytest.raises(ValueError, match="continuing simulated attacker"):
        l2p.check_protect_config(PER, ProtectConfig(identifiers=["zwx"], inner_restart_every=2, checkpoint_every=0))


def test_model_card_names_the_drawn_identifiers():
    from apdm.config import ProtectModelRunConfig
    from apdm.protect_model.run import model_card

    cfg = ProtectModelRunConfig()
    assert "replaced" not in model_card(cfg, [], 1.0)
    cfg.protect.identifiers = ["sks", "t@t"]
    assert "by one drawn from `sks`, `t@t`" in model_card(cfg, [{"step": 0, "identifier_index": 1.0}], 1.0)


def test_bench_keep_photos_alternate_persons_and_dogs_of_unused_identities():
    """keep_photos=N: the encoder trap's keep set, persons and dogs alternately, none of the bench's other images."""
    from apdm.bench.protect_model import drawn_dogs, keep_photos
    from apdm.toy import draw

    keep = keep_photos(5)
    assert keep.shape == (5, 3, 64, 64) and 0.0 <= float(keep.min()) and float(keep.max()) <= 1.0
    assert torch.equal(keep[:3], keep_photos(3))  # the first N of a larger set: sets nest
    ids = draw.split()["heldout"][300:303]
    persons, _, _ = draw.render_dataset("person", ids, 1, seed=79)
    dogs, _, _ = draw.render_dataset("dog", ids[:2], 1, seed=79)
    torch.testing.assert_close(keep[0::2], draw.to_tensor(persons), atol=0, rtol=0)
    torch.testing.assert_close(keep[1::2], draw.to_tensor(dogs), atol=0, rtol=0)
    assert not any(torch.equal(k, d) for k in keep for d in drawn_dogs(4))


def test_model_card_redacts_local_paths_and_lists_steps_per_subject(tmp_path):
    """The card promised "prompts only, never the photos" but pasted the settings with the photo folders
    (subjects[].instance_data, check_data, encoder_trap.keep_images) and other local paths; a subject that got no
    outer step (round robin) was listed like the others."""
    from apdm.config import ProtectModelRunConfig, load_config
    from apdm.protect_model.run import model_card

    src = tmp_path / "models" / "my_sd"
    src.mkdir(parents=True)
    cfg = load_config(ProtectModelRunConfig, None, [
        f"model.path={src}", "output_dir=/home/alice_smith/out", "encoder_trap.keep_images=/home/x/bob_jones_keep",
        "personalization.class_data_dir=/home/x/carol_cls",
        ("subjects=[{instance_data: photos/alice_smith, check_data: held/alice_smith_2, "
         "instance_prompt: a photo of sks person}, "
         "{instance_data: photos/dan_doe, instance_prompt: a photo of zwx man}]")])
    card = model_card(cfg, [{"step": 0, "subject": 0, "seconds": 1.5, "loss_protect": 0.5}], 1.5)
    for name in ("alice_smith", "bob_jones", "carol_cls", "dan_doe", str(tmp_path)):
        assert name not in card, name
    assert card.count("<redacted: a local path>") == 6 and "Base model: `my_sd`" in card and "path: my_sd" in card
    assert "- instance prompt `a photo of sks person`, class prompt `a photo of a person`: 1 protection step" in card
    assert ("- instance prompt `a photo of zwx man`, class prompt `a photo of a person`: 0 protection steps (NOT "
            "protected by the UNet: it got no step)") in card
    assert "Final protection losses: loss_protect=0.5" in card  # the subject index and seconds are not losses


@pytest.mark.parametrize("where", ["inside", "model"])
def test_cli_protect_model_refuses_to_overwrite_its_source(tmp_path, apdm_log, where):
    """Before, model.path=re/model output_dir=re replaced the source model with the protected one (and
    output_dir=re wrote into the source folder)."""
    from helpers import tiny_protect_model_args

    from apdm.cli import main
    from apdm.core.models import save_sd, tiny_sd

    src = tmp_path / "re" / "model"
    save_sd(tiny_sd(seed=0), src, quiet=True)
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    out = src if where == "inside" else src.parent
    assert main(["protect-model", *tiny_protect_model_args(tmp_path), f"model.path={src}", f"output_dir={out}"]) == 1
    assert (f"output_dir={out} would overwrite the source model model.path={src}: the protected model is written to "
            f"{out / 'model'}, and {src} is the source model folder; choose an output_dir outside the source model "
            "folder") in apdm_log()
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "cls").exists()  # refused before any work


def test_cli_protect_model_kill_before_the_log_leaves_no_log_and_resume_counts_all_time(tmp_path, monkeypatch):
    """The card was written after the model folder was renamed into place, so a kill in between left model/ without
    its card beside a stale log; and a resumed run reported only its own seconds (0 s when the kill came after the
    protection). The card is in the folder operation now, and the log, which says the run finished, comes after
    it: a kill before the log leaves the complete model/, no log, and the checkpoint, which the rerun resumes."""
    import json

    from helpers import tiny_protect_model_args

    from apdm.cli import main
    from apdm.protect_model import run as R

    def killed(path, data):
        raise KeyboardInterrupt("killed while writing " + str(path))

    out, args = tmp_path / "out", [*tiny_protect_model_args(tmp_path), "protect.checkpoint_every=1"]
    monkeypatch.setattr(R, "atomic_write_json", killed)
    assert main(["protect-model", *args]) == 130  # Ctrl-C or a kill signal: exit 130, one line
    assert (out / "model" / "README.md").is_file() and (out / "checkpoint").exists()
    assert not (out / "protect_log.json").exists()  # so the run is not taken as finished
    assert not [p for p in out.iterdir() if p.name.startswith(".model")]  # no temporary folder left either
    monkeypatch.undo()

    def no_step(*args, **kwargs):
        raise AssertionError("an outer step ran again")

    monkeypatch.setattr(l2p, "outer_step", no_step)  # the rerun resumes the finished protection
    assert main(["protect-model", *args]) == 0
    log = json.loads((out / "protect_log.json").read_text())
    assert [h["subject"] for h in log["history"]] == [0, 0] and log["subject_steps"] == [2]
    total = sum(h["seconds"] for h in log["history"])
    assert total > 0 and log["seconds_protect"] == round(total, 2)
    assert f"Protection took {total:.0f} s for 2 outer steps." in (out / "model" / "README.md").read_text()


def test_cli_protect_model_warns_of_a_subject_without_steps(tmp_path, apdm_log):
    """outer_steps=1 with two subjects: the second got no step (round robin) but was listed as protected."""
    import json

    from helpers import tiny_protect_model_args

    from apdm.cli import main

    args = tiny_protect_model_args(tmp_path)
    photos = tmp_path / "subject"
    assert main(["protect-model", *args, "protect.outer_steps=1",
                 (f"subjects=[{{instance_data: {photos}}}, {{instance_data: {photos}, "
                  "instance_prompt: a photo of zwx man}]")]) == 0
    assert ("subject 1 (subject, prompt 'a photo of zwx man') got no protection step: 1 outer steps went round robin "
            "over 2 subjects; set protect.outer_steps to at least 2") in apdm_log()
    out = tmp_path / "out"
    assert json.loads((out / "protect_log.json").read_text())["subject_steps"] == [1, 0]
    assert "`a photo of zwx man`, class prompt `a photo of a person`: 0 protection steps (NOT protected" in (
        out / "model" / "README.md").read_text()


def test_cli_protect_model_saves_in_the_source_dtype(tmp_path):
    """An fp16 source, protected in fp32 on the CPU, comes out fp16 (before: fp32, twice the size), and what the
    protection did not touch (here the VAE and the text encoder) is the source's to the bit."""
    from helpers import tiny_protect_model_args
    from safetensors.torch import load_file

    from apdm.cli import main
    from apdm.core.models import save_sd, stored_dtype, tiny_sd

    src = tmp_path / "src"
    save_sd(tiny_sd(seed=0), src, quiet=True, dtype=torch.float16)
    assert stored_dtype(str(src)) == torch.float16 and stored_dtype("tiny") is None
    assert main(["protect-model", *tiny_protect_model_args(tmp_path), f"model.path={src}", "model.dtype=fp32"]) == 0
    out = tmp_path / "out" / "model"
    assert stored_dtype(str(out)) == torch.float16
    for part, name in (("vae", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors"),
                       ("unet", "diffusion_pytorch_model.safetensors")):
        got, was = load_file(out / part / name), load_file(src / part / name)
        assert all(t.dtype == torch.float16 for t in got.values()), part
        if part != "unet":
            assert all(torch.equal(got[k], was[k]) for k in was), part
    unet_got, unet_was = load_file(out / "unet" / "diffusion_pytorch_model.safetensors"), load_file(
        src / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(unet_got[k], unet_was[k]) for k in unet_was)  # the protection did change the UNet


def test_cli_protect_model_rerun_of_a_finished_run_does_nothing(tmp_path):
    """The same command again (hours on SD) found the finished model and protected it all over again; now it
    leaves it as is, while another photo, another setting or protect.resume=false protect again."""
    from helpers import tiny_protect_model_args
    from PIL import Image

    from apdm.cli import main

    args = ["protect-model", *tiny_protect_model_args(tmp_path)]
    weights = tmp_path / "out" / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    assert main(args) == 0
    stamp = weights.stat().st_mtime_ns
    assert main(args + ["quiet=false"]) == 0 and weights.stat().st_mtime_ns == stamp  # nothing to do
    import json

    log_file = tmp_path / "out" / "protect_log.json"  # a log from before the number of processes was recorded
    log = json.loads(log_file.read_text())
    del log["run"]["processes"]
    log_file.write_text(json.dumps(log))
    assert main(args) == 0 and weights.stat().st_mtime_ns == stamp  # still the same run: one process
    for again in (["protect.resume=false"], ["protect.learning_rate=2e-3"]):
        assert main(args + again) == 0 and weights.stat().st_mtime_ns != stamp, again
        stamp = weights.stat().st_mtime_ns
    assert main(args) == 0 and weights.stat().st_mtime_ns != stamp  # back to the first settings: a new model
    stamp = weights.stat().st_mtime_ns
    Image.new("RGB", (70, 60), (200, 10, 10)).save(tmp_path / "subject" / "0.png")  # a changed photo
    assert main(args) == 0 and weights.stat().st_mtime_ns != stamp


def test_cli_protect_model_killed_at_the_model_swap_never_reports_another_runs_model_as_done(tmp_path, monkeypatch):
    """Run A finished; run B (other settings) into the same folder is killed just before (or just after) its model
    replaces A's. The new log was written first, so rerunning B found "its" log beside A's model: nothing to do, and
    A's weights stayed. Now the log comes after the swap: both reruns give B's model."""
    import hashlib
    import os

    from helpers import tiny_protect_model_args

    import apdm.utils as U
    from apdm.cli import main

    args = ["protect-model", *tiny_protect_model_args(tmp_path)]
    out = tmp_path / "out"
    weights = out / "model" / "unet" / "diffusion_pytorch_model.safetensors"

    def digest():
        return hashlib.sha256(weights.read_bytes()).hexdigest()

    assert main(args) == 0
    a = digest()
    b_args = args + ["protect.learning_rate=5e-3"]
    real = os.replace
    for when in ("before", "after"):
        def kill(src, dst, when=when):
            swap = str(dst) == str(out / "model") and str(src).startswith(str(out / ".model"))
            if swap and when == "before":
                raise KeyboardInterrupt
            real(src, dst)
            if swap:  # the new model is in place; the kill comes before anything else is written
                raise KeyboardInterrupt

        monkeypatch.setattr(U.os, "replace", kill)
        assert main(b_args) == 130
        monkeypatch.setattr(U.os, "replace", real)
        assert main(b_args) == 0
        b = digest()
        assert b != a, when
        assert main(args) == 0 and digest() == a, when  # and back to A for the next round


def test_cli_protect_model_in_bf16_keeps_the_fp32_sources_precision(tmp_path):
    """An fp32 source protected in bf16 was saved as the bf16 rounding of every weight (7 bits of mantissa), the
    untouched VAE and text encoder included; now each weight is the source's plus the protection's change, so what
    the protection did not change is the source's to the bit, and what it changed moved by the same amount."""
    from helpers import tiny_protect_model_args
    from safetensors.torch import load_file

    from apdm.cli import main
    from apdm.core.models import save_sd, tiny_sd

    src = tmp_path / "src"
    save_sd(tiny_sd(seed=0), src, quiet=True)
    args = ["protect-model", *tiny_protect_model_args(tmp_path), f"model.path={src}", "protect.trainable=up_blocks"]
    assert main(args + ["model.dtype=bf16"]) == 0
    out = tmp_path / "out" / "model"
    for part, name in (("vae", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors"),
                       ("unet", "diffusion_pytorch_model.safetensors")):
        got, was = load_file(out / part / name), load_file(src / part / name)
        assert all(t.dtype == torch.float32 for t in got.values()), part
        frozen = [k for k in was if part != "unet" or not k.startswith("up_blocks")]
        assert frozen and all(torch.equal(got[k], was[k]) for k in frozen), part
        assert any(not torch.equal(was[k], was[k].bfloat16().float()) for k in frozen), part  # rounding would show
    got = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    trained = [k for k in was if k.startswith("up_blocks")]
    # the protected weights differ from the source by the protection's change, not by the rounding of the source
    change = max((got[k] - was[k]).abs().max().item() for k in trained)
    assert change > 0


def test_cli_anchor_weight_without_inner_steps_is_said_once(tmp_path, apdm_log):
    """protect.anchor_weight does nothing with protect.inner_steps=0 (θ′ is θ); said once per run, not once per
    check of the settings (the command checks them before loading the model, the protection again)."""
    from helpers import tiny_protect_model_args

    from apdm.cli import main

    args = [*tiny_protect_model_args(tmp_path), "protect.inner_steps=0", "protect.anchor_weight=1",
            "protect.outer_steps=1"]
    assert main(["protect-model", *args]) == 0
    assert apdm_log().count("protect.anchor_weight=1 does nothing with protect.inner_steps=0") == 1
