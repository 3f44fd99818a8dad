"""protect-model run-level audit (session 63): a bf16 computation on an fp32 source lost most of the protection's
change in the saved model; the saved folder recorded the source's absolute path; gradient checkpointing did nothing
for θ's own backward passes."""


import pytest
import torch
from safetensors.torch import load_file

from apdm.cli import main


@pytest.fixture(scope="module")
def fp32_source(tmp_path_factory):
    from apdm.core.models import save_sd, tiny_sd

    out = tmp_path_factory.mktemp("src") / "AliceSmith_private" / "base"
    save_sd(tiny_sd(seed=0), out, quiet=True)
    return out


@pytest.mark.parametrize("trainable", ["all", "lora"])
def test_a_bf16_protection_of_an_fp32_source_keeps_its_change(tmp_path, fp32_source, monkeypatch, trainable):
    """The fp32 master θ was cast to bf16 before the source's precision was restored (LoRA: merged into the bf16
    base in bf16): the saved change was the fp32 change rounded to bf16 steps, most of it lost (relative error of the
    change 0.59 median, 0.96 for LoRA, on an fp32 copy of the toy model). Now it is the fp32 change itself."""
    from helpers import tiny_protect_model_args

    import apdm.protect_model.l2p as L

    seen = {}
    real_protect = L.protect

    def protect(*a, **kw):
        unet, history, te = real_protect(*a, **kw)  # the merged θ, before run.py casts it
        seen["theta"] = {k: v.detach().float().clone() for k, v in unet.state_dict().items()}
        return unet, history, te

    monkeypatch.setattr(L, "protect", protect)
    from diffusers import UNet2DConditionModel

    real_fuse = UNet2DConditionModel.fuse_lora

    def fuse(self, *a, **k):  # the adapters in fp32, just before they are merged
        seen["lora"] = {n: p.detach().float().clone() for n, p in self.named_parameters() if "lora_" in n}
        return real_fuse(self, *a, **k)

    monkeypatch.setattr(UNet2DConditionModel, "fuse_lora", fuse)
    args = [a for a in tiny_protect_model_args(tmp_path) if not a.startswith(("model.path", "protect.learning_rate"))]
    assert main(["protect-model", *args, f"model.path={fp32_source}", "model.dtype=bf16",
                 f"protect.trainable={trainable}", "protect.lora_rank=4", "protect.learning_rate=1e-4"]) == 0
    saved = load_file(str(tmp_path / "out" / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    src = load_file(str(fp32_source / "unet" / "diffusion_pytorch_model.safetensors"))
    assert next(iter(saved.values())).dtype == torch.float32
    rel, changed = [], 0
    deltas = {}  # LoRA: B·A (lora_alpha = rank by default: scale 1)
    for n, a in seen.get("lora", {}).items():
        if ".lora_A." in n:
            key = n.split(".lora_A.")[0] + ".weight"
            deltas[key] = (seen["lora"][n.replace("lora_A", "lora_B")] @ a).reshape(src[key].shape)
    assert (trainable == "lora") == bool(deltas)
    for k, t in seen["theta"].items():
        # the protection's change to the weights it loaded
        want = deltas.get(k, torch.zeros_like(t)) if deltas else t - src[k].to(torch.bfloat16).float()
        if want.norm() == 0:
            assert torch.equal(saved[k], src[k]), k  # untouched: the source's own bits
            continue
        changed += 1
        rel.append(float((saved[k] - src[k] - want).norm() / want.norm()))
    assert changed > 0
    assert max(rel) < 1e-3, (trainable, sorted(rel)[len(rel) // 2], max(rel))


def test_the_saved_model_records_no_local_path(tmp_path, fp32_source):
    """unet/config.json and vae/config.json held "_name_or_path": the source's absolute path (home folder, a folder
    named after a person), though the card redacts local paths."""
    from helpers import tiny_protect_model_args

    args = [a for a in tiny_protect_model_args(tmp_path) if not a.startswith("model.path")]
    assert main(["protect-model", *args, f"model.path={fp32_source}", "protect.outer_steps=1"]) == 0
    for f in (tmp_path / "out" / "model").rglob("*.json"):
        text = f.read_text()
        assert "AliceSmith_private" not in text and str(tmp_path) not in text, f


def test_gradient_checkpointing_reaches_theta_without_inner_steps(monkeypatch):
    """protect.gradient_checkpointing=true checkpointed only the inner copy θ': with inner_steps=0 (and in θ's
    anchor term) it did nothing; the weights are the same with and without it."""
    import torch.utils.checkpoint as C

    from apdm.config import PersonalizationConfig, ProtectConfig
    from apdm.core.models import tiny_sd
    from apdm.protect_model import l2p

    calls, real = [0], C.checkpoint

    def counted(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(C, "checkpoint", counted)
    g = torch.Generator().manual_seed(0)
    subject = l2p.Subject("s", torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g),
                          torch.rand(3, 3, 64, 64, generator=g), "a photo of sks person", "a photo of a person")
    sd = tiny_sd(seed=0)
    weights = []
    for gc in (False, True):
        calls[0] = 0
        unet, _, _ = l2p.protect(sd, [subject], PersonalizationConfig(learning_rate=1e-3),
                                 ProtectConfig(outer_steps=1, inner_steps=0, num_class_images=3,
                                               gradient_checkpointing=gc, checkpoint_every=0))
        weights.append(unet.state_dict())
        assert (calls[0] > 0) == gc
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-6) for k in weights[0])


def test_the_card_names_a_multi_process_run():
    from apdm.config import ProtectModelRunConfig, SubjectConfig
    from apdm.protect_model.run import model_card

    cfg = ProtectModelRunConfig(subjects=[SubjectConfig(instance_data="x")])
    history = [{"step": 0, "subject": 0, "seconds": 1.5, "loss_protect": 0.5}]
    assert "data-parallel over 2 processes" in model_card(cfg, history, 1.5, world=2)
    assert "data-parallel" not in model_card(cfg, history, 1.5)
