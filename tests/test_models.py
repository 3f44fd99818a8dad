"""``load_sd``: which model folders it loads, and the one clear error for each it does not.

Every folder is a tiny real pipeline saved with diffusers into ``tmp_path`` (the way a user's folder is made), then
changed the way the faulty folders users have are (a component deleted, weights as pickles, ...).
"""

import contextlib
import json
import logging
import re
import shutil
import warnings

import pytest
import torch

from apdm.core.models import ModelLoadError, load_sd, save_sd
from apdm.utils import LOG, select_device


def _sd15_scheduler():
    from diffusers import PNDMScheduler

    return PNDMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)


def _save(folder, sd, unet=None, cls=None, **save):
    """Save ``sd`` (with ``unet`` in place of its own, if given) as a diffusers pipeline of class ``cls``."""
    from diffusers import StableDiffusionPipeline

    pipe = (cls or StableDiffusionPipeline)(
        vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=unet or sd.unet,
        scheduler=_sd15_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder), **save)
    return folder


def _sdxl_unet():
    """A tiny UNet of SDXL's kind: extra ``text_time`` conditioning (pooled text embedding and image sizes)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), norm_num_groups=32, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80)


@contextlib.contextmanager
def _apdm_warnings():
    """The apdm logger's warnings (the CLI stops that logger propagating, so caplog may not see them)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    level = LOG.level
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    try:
        yield records
    finally:
        LOG.removeHandler(handler)
        LOG.setLevel(level)


def test_sdxl_inpainting_and_extra_conditioned_folders_are_refused_at_load_time(tiny_sd, tmp_path):
    """They used to load and crash later (TypeError / size mismatch deep in a step); now load_sd names the folder and
    what it is."""
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionInpaintPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    text_config = {**tiny_sd.text_encoder.config.to_dict(), "projection_dim": 32}
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       steps_offset=1)
    StableDiffusionXLPipeline(
        vae=tiny_sd.vae, text_encoder=tiny_sd.text_encoder, tokenizer=tiny_sd.tokenizer, unet=_sdxl_unet(),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text_config)), tokenizer_2=tiny_sd.tokenizer,
        scheduler=scheduler,
    ).save_pretrained(str(tmp_path / "sdxl"))
    config = {k: v for k, v in tiny_sd.unet.config.items() if not k.startswith("_")}
    _save(tmp_path / "inpaint", tiny_sd, UNet2DConditionModel(**{**config, "in_channels": 9}),
          cls=StableDiffusionInpaintPipeline)
    _save(tmp_path / "xl_unet", tiny_sd, _sdxl_unet())  # an SDXL UNet in an SD-1.x pipeline folder
    for name, said in (("sdxl", "an SDXL pipeline (two text encoders): apdm supports Stable Diffusion 1.x/2.x"),
                       ("inpaint", "an inpainting UNet (9 input channels"),
                       ("xl_unet", "a UNet with addition_embed_type='text_time'")):
        with pytest.raises(ModelLoadError, match=re.escape(f"{tmp_path / name}: {said}")):
            load_sd(str(tmp_path / name), device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_a_device_this_machine_lacks_is_refused_before_loading(tmp_path):
    """``model.device=cuda`` without CUDA used to give a bare AssertionError after the whole model had loaded."""
    for device in ("cuda", "cuda:3"):
        with pytest.raises(RuntimeError, match=re.escape(f"device '{device}': CUDA is not available here")) as info:
            select_device(device)
        assert "use model.device=cpu or model.device=auto (in apdm bench: device=cpu" in str(info.value)
    if not torch.backends.mps.is_available():
        with pytest.raises(RuntimeError, match="MPS .* is not available here"):
            select_device("mps")
    assert select_device("cpu") == torch.device("cpu")
    # load_sd asks first: the device error, not the missing folder (nor a model loaded for nothing)
    for path in (str(tmp_path / "nope"), "tiny"):
        with pytest.raises(RuntimeError, match="CUDA is not available here") as info:
            load_sd(path, device="cuda")
        assert not isinstance(info.value, ModelLoadError)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_index_past_the_last_gpu_is_refused():
    count = torch.cuda.device_count()
    with pytest.raises(RuntimeError, match=f"CUDA device index {count} does not exist; there are {count}"):
        select_device(f"cuda:{count}")
    assert select_device(f"cuda:{count - 1}").index == count - 1


def test_pickled_weights_are_refused_naming_the_component_and_never_unpickled(tiny_sd, tmp_path, monkeypatch):
    """A component whose weights are only a ``.bin`` pickle is refused before loading, naming its folder and how to
    convert it; a component with both formats loads its safetensors. torch.load is never called."""
    from safetensors.torch import load_file

    folder = save_sd(tiny_sd, tmp_path / "m", quiet=True)
    weights = folder / "text_encoder" / "model.safetensors"
    torch.save(load_file(weights), folder / "text_encoder" / "pytorch_model.bin")

    def tripwire(*args, **kwargs):
        raise AssertionError(f"apdm unpickled {args[:1]}")

    monkeypatch.setattr(torch, "load", tripwire)
    sd = load_sd(str(folder), device="cpu")  # both formats: the safetensors are read
    assert sd.fingerprint() == tiny_sd.fingerprint()
    weights.unlink()
    with pytest.raises(ModelLoadError, match="weights only as pickles") as info:
        load_sd(str(folder), device="cpu")
    message = str(info.value)
    assert f"{folder / 'text_encoder'}: pytorch_model.bin" in message
    assert "safe_serialization=True" in message and "unet" not in message


def test_fp16_variant_folder_loads_and_a_revision_for_a_folder_is_warned_about(tmp_path):
    """A folder from ``save_pretrained(variant="fp16")`` (only ``*.fp16.safetensors``) used to fail with "no file
    named diffusion_pytorch_model.bin"; ``revision`` means nothing for a local folder and now says so."""
    from apdm.core.models import tiny_sd

    sd = tiny_sd(seed=2)
    expected = [p.detach().half().float() for p in sd.unet.parameters()]
    folder = _save(tmp_path / "fp16", sd.pipeline().to(torch.float16), variant="fp16")
    assert not list(folder.glob("unet/diffusion_pytorch_model.safetensors"))
    with _apdm_warnings() as records:
        loaded = load_sd(str(folder), device="cpu", dtype="fp32", revision="v1.0")
    assert loaded.unet.dtype == torch.float32
    for got, want in zip(loaded.unet.parameters(), expected):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert any("model.revision=v1.0 is ignored" in r.getMessage() and str(folder) in r.getMessage() for r in records)


def test_a_missing_component_folder_is_named_and_unused_optional_ones_are_not_needed(tiny_sd, tmp_path):
    """A folder without vae/ used to say "no file named config.json found in directory <root>"."""
    folder = save_sd(tiny_sd, tmp_path / "m", quiet=True)
    shutil.copytree(folder, tmp_path / "novae")
    shutil.rmtree(tmp_path / "novae" / "vae")
    with pytest.raises(ModelLoadError, match=re.escape(f"lists 'vae', but the sub-folder {tmp_path / 'novae' / 'vae'} "
                                                       f"is missing")):
        load_sd(str(tmp_path / "novae"), device="cpu")
    # a feature extractor listed but not there: apdm never uses it, so it is not needed (diffusers alone would fail)
    index = json.loads((folder / "model_index.json").read_text())
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    (folder / "model_index.json").write_text(json.dumps(index))
    assert load_sd(str(folder), device="cpu").fingerprint() == tiny_sd.fingerprint()


def test_paths_that_look_local_say_not_found_and_hub_ids_name_hf_download(tmp_path, monkeypatch):
    """``models/sd15`` (its parent folder exists) and ``x.ckpt`` are local paths; they used to get the offline-hub
    message. A hub id that cannot be fetched says how to download it with today's CLI (``hf download``)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for path, said in (("models/sd15", "model folder not found"), ("x.ckpt", "model file not found"),
                       ("sd15", "model folder not found")):
        with pytest.raises(ModelLoadError, match=re.escape(f"{said}: {tmp_path / path}")) as info:
            load_sd(path, device="cpu")
        assert "hub" not in str(info.value)
    with pytest.raises(ModelLoadError) as info:  # offline in the tests (conftest); a 404 says the same online
        load_sd("apdm-tests/no-such-model", device="cpu")
    message = str(info.value)
    assert "not found as a local folder" in message and "Hugging Face hub" in message
    assert "`hf download apdm-tests/no-such-model --local-dir ./sd`" in message and "huggingface-cli" not in message


def test_a_hub_id_is_checked_from_its_configs_before_any_weight_is_fetched(tiny_sd, tmp_path, monkeypatch):
    """An SDXL or inpainting hub id is refused from its model_index.json and unet/config.json (here in an offline HF
    cache holding only those), before gigabytes of weights are downloaded."""
    from huggingface_hub import constants

    from apdm.core.models import tiny_sd as build

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    commit = "0123456789abcdef0123456789abcdef01234567"
    sd = build(seed=1)
    sd.unet.register_to_config(in_channels=9)  # only the config is kept below
    for name, model in (("inpaint", sd), ("sd15", tiny_sd)):
        saved = save_sd(model, tmp_path / name, quiet=True)
        repo = tmp_path / "hub" / f"models--apdm-tests--{name}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        for file in ("model_index.json", "unet/config.json", "vae/config.json"):
            (repo / "snapshots" / commit / file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(saved / file, repo / "snapshots" / commit / file)
    with pytest.raises(ModelLoadError, match=re.escape("'apdm-tests/inpaint' on the Hugging Face hub: an inpainting")):
        load_sd("apdm-tests/inpaint", device="cpu")
    with pytest.raises(ModelLoadError, match="'apdm-tests/sd15' .from the Hugging Face hub.: could not load"):
        load_sd("apdm-tests/sd15", device="cpu")  # a supported model: its weights are not in this cache


def test_a_single_file_checkpoint_is_named_with_how_to_convert_it(tmp_path):
    """An existing ``x.safetensors`` / ``x.ckpt`` used to be "not a diffusers model folder"."""
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(tmp_path / "v1-5.safetensors"))
    (tmp_path / "v1-5.ckpt").write_bytes(b"\x80\x02}q\x00.")  # a pickle's bytes; never opened
    for name in ("v1-5.safetensors", "v1-5.ckpt"):
        with pytest.raises(ModelLoadError, match=re.escape(f"{tmp_path / name}: a single-file checkpoint")) as info:
            load_sd(str(tmp_path / name), device="cpu")
        message = str(info.value)
        assert f"from_single_file('{tmp_path / name}').save_pretrained('{tmp_path / 'v1-5-diffusers'}')" in message
        assert ("is a pickle" in message) == name.endswith(".ckpt")


def test_loading_does_not_warn_about_torch_dtype(tiny_sd, tmp_path):
    """diffusers ≥ 0.36 warns that ``torch_dtype`` is deprecated on every load that passes it: not on ours."""
    folder = save_sd(tiny_sd, tmp_path / "m", quiet=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_sd(str(folder), device="cpu", dtype="fp32")
    assert not [w for w in caught if "torch_dtype" in str(w.message)]


def test_local_folder_resolves_what_a_model_path_loads_from(tmp_path, monkeypatch):
    """protect-model keeps the source's dtype and precision by reading the source's files; for ``toy`` and a hub id
    there were none (stored_dtype(model.path) was None), so the protected model came out in the computing dtype."""
    from pathlib import Path

    from apdm.core.models import local_folder, stored_dtype
    from apdm.toy import model_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert local_folder("toy") == Path(model_path()) and stored_dtype(str(local_folder("toy"))) is not None
    assert local_folder("tiny") is None and local_folder("random:sd15") is None
    assert local_folder(str(tmp_path)) == tmp_path
    assert local_folder("someone/not-downloaded-model") is None  # nothing is fetched
