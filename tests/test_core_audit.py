"""Audit fixes in ``apdm.core``: model fingerprints of ``~`` paths and ``toy``, tokenizer folders without a
vocabulary, 16-bit planar TIFFs, the slow-tokenizer files ``save_sd`` writes, photo formats only (no EPS), camera
RAW given by name, float64 on MPS, and img2img's noise precision on a bf16 model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, TiffImagePlugin, features

from apdm.core import diffusion as D
from apdm.core.images import ImageLoadError, load_image
from apdm.core.models import ModelLoadError, load_sd, model_fingerprint, save_sd

PROMPTS = ["a photo of sks person", "a dslr portrait of a smiling woman, red background", "Zebra!! café  xyz", ""]


def _ids(tokenizer, prompts=PROMPTS):
    return [tokenizer(p).input_ids for p in prompts]


# ---------------------------------------------------------------------------------------------- model fingerprint
def _model(path):
    return SimpleNamespace(path=path, revision=None, dtype="fp32")


def test_fingerprint_of_a_home_path_lists_its_files_and_changes_when_saved_again(tmp_path, monkeypatch):
    from apdm.core.models import tiny_sd

    sd = tiny_sd(seed=0)  # save_sd(dtype=) casts it in place: not the shared fixture
    monkeypatch.setenv("HOME", str(tmp_path))
    save_sd(sd, tmp_path / "m", quiet=True)
    home, absolute = model_fingerprint(_model("~/m")), model_fingerprint(_model(str(tmp_path / "m")))
    assert home == absolute
    assert any(f[0] == "model_index.json" for f in home["files"])
    save_sd(sd, tmp_path / "m", quiet=True, dtype=torch.float16)  # a changed model saved in the same place
    assert model_fingerprint(_model("~/m")) != home


def test_fingerprint_of_a_small_folder_follows_its_contents_not_its_file_times(tmp_path):
    """A fresh checkout gives the committed toy model new file times, so every clone recomputed its cached toy
    results; a folder up to HASHED_FOLDER_BYTES is fingerprinted by content: a copy with new times keeps it, a
    changed weight does not."""
    import os
    import shutil

    from apdm.core.models import tiny_sd

    save_sd(tiny_sd(seed=0), tmp_path / "m", quiet=True)
    before = model_fingerprint(_model(str(tmp_path / "m")))
    for f in (tmp_path / "m").rglob("*"):
        if f.is_file():
            os.utime(f, ns=(1, 1))
    assert model_fingerprint(_model(str(tmp_path / "m"))) == before
    shutil.copytree(tmp_path / "m", tmp_path / "c")
    assert model_fingerprint(_model(str(tmp_path / "c")))["files"] == before["files"]
    save_sd(tiny_sd(seed=1), tmp_path / "m", quiet=True)
    assert model_fingerprint(_model(str(tmp_path / "m"))) != before


def test_fingerprint_of_toy_lists_the_toy_models_files():
    from apdm.toy import model_path

    try:
        folder = Path(model_path())
    except FileNotFoundError:
        pytest.skip("no toy model here")
    fp = model_fingerprint(_model("toy"))
    assert fp["path"] == "toy"
    assert sorted(f[0] for f in fp["files"]) == sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                                                        if p.is_file())


# ---------------------------------------------------------------------------------------------- tokenizer folder
@pytest.mark.parametrize("keep", [("tokenizer_config.json",), ()], ids=["config-only", "empty"])
def test_tokenizer_folder_without_vocabulary_is_refused(tmp_path, tiny_sd, keep):
    folder = save_sd(tiny_sd, tmp_path / "m", quiet=True)
    tok = folder / "tokenizer"
    for f in tok.iterdir():
        if f.name not in keep:
            f.unlink()
    with pytest.raises(ModelLoadError) as err:
        load_sd(str(folder), device="cpu")
    msg = str(err.value)
    assert str(tok) in msg and "tokenizer.json" in msg and "vocab.json" in msg and "merges.txt" in msg


def test_tokenizer_folder_with_vocab_and_merges_only_loads_the_same_tokenizer(tmp_path, tiny_sd):
    folder = save_sd(tiny_sd, tmp_path / "m", quiet=True)
    (folder / "tokenizer" / "tokenizer.json").unlink()  # the SD-1.5 layout of transformers 4's slow tokenizer
    assert _ids(load_sd(str(folder), device="cpu").tokenizer) == _ids(tiny_sd.tokenizer)


# ---------------------------------------------------------------------------------------------- 16-bit planar TIFF
def test_16bit_planar_tiff_is_refused_and_contiguous_and_8bit_planar_load_exactly(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    a = np.random.default_rng(2).integers(0, 65536, (9, 11, 3), dtype=np.uint16)
    planar = np.moveaxis(a, 2, 0).copy()
    tifffile.imwrite(tmp_path / "planar.tif", planar, photometric="rgb", planarconfig="separate")
    tifffile.imwrite(tmp_path / "planar_zip.tif", planar, photometric="rgb", planarconfig="separate",
                     compression="zlib")
    for name in ("planar.tif", "planar_zip.tif"):
        with pytest.raises(ImageLoadError) as err:
            load_image(tmp_path / name)
        assert str(err.value) == (f"{tmp_path / name}: 16-bit TIFF with planar (per-channel) pixel order, which cannot "
                                  "be read correctly; save it with interleaved pixel order or as PNG")
    tifffile.imwrite(tmp_path / "contig.tif", a, photometric="rgb")
    li = load_image(tmp_path / "contig.tif")
    assert li.bit_depth == 16 and np.array_equal(np.round(li.pixels.numpy().transpose(1, 2, 0) * 65535), a)
    b = (a >> 8).astype(np.uint8)  # Pillow reads 8-bit planar TIFFs right: they are kept
    tifffile.imwrite(tmp_path / "planar8.tif", np.moveaxis(b, 2, 0).copy(), photometric="rgb", planarconfig="separate")
    assert np.array_equal(np.round(load_image(tmp_path / "planar8.tif").pixels.numpy().transpose(1, 2, 0) * 255), b)


# ---------------------------------------------------------------------------------------------- slow-tokenizer files
def _slow_clip_tokenizer(folder: Path):
    """A CLIP tokenizer from vocab.json + merges.txt read as transformers 4's slow ``CLIPTokenizer`` reads them (the
    JSON vocabulary; the merges after the ``#version`` line, one pair a line), and the added tokens of
    added_tokens.json."""
    from transformers import CLIPTokenizer

    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").strip().split("\n")[1:]
    tok = CLIPTokenizer(vocab=vocab, merges=[tuple(line.split()) for line in lines])
    added = folder / "added_tokens.json"
    for token, index in sorted(json.loads(added.read_text()).items() if added.is_file() else [], key=lambda kv: kv[1]):
        tok.add_tokens([token])
        assert tok.convert_tokens_to_ids(token) == index
    return tok


def test_save_sd_writes_the_slow_tokenizer_files_that_tokenize_the_same(tmp_path):
    from transformers import CLIPTokenizer

    from apdm.core.models import tiny_sd

    sd = tiny_sd(seed=0)
    sd.tokenizer.add_tokens(["<sks>"])  # a token past the BPE vocabulary, as textual inversion adds
    folder = save_sd(sd, tmp_path / "m", quiet=True) / "tokenizer"
    assert (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    prompts = [*PROMPTS, "a photo of <sks> person"]
    want = _ids(sd.tokenizer, prompts)
    assert _ids(_slow_clip_tokenizer(folder), prompts) == want
    slow_only = tmp_path / "slow"  # only the files transformers 4's CLIPTokenizer.from_pretrained reads
    slow_only.mkdir()
    for name in ("vocab.json", "merges.txt", "added_tokens.json", "tokenizer_config.json"):
        shutil.copy(folder / name, slow_only / name)
    assert _ids(CLIPTokenizer.from_pretrained(str(slow_only)), prompts) == want
    assert _ids(load_sd(str(tmp_path / "m"), device="cpu").tokenizer, prompts) == want  # transformers 5 as before


def test_toy_assets_tokenizer_has_slow_files_that_tokenize_the_same():
    from transformers import CLIPTokenizer

    folder = Path(__file__).resolve().parents[1] / "assets" / "toy" / "model" / "tokenizer"
    if not (folder / "tokenizer.json").is_file():
        pytest.skip("toy model not committed")
    fast = CLIPTokenizer.from_pretrained(str(folder))
    prompts = [*PROMPTS, "a photo of a person", "a painting of skss person in the snow"]
    assert fast("a photo of sks person").input_ids[0] == fast.bos_token_id
    assert _ids(_slow_clip_tokenizer(folder), prompts) == _ids(fast, prompts)


# ---------------------------------------------------------------------------------------------- photo formats only
def test_postscript_named_jpg_is_refused_without_opening_it_as_eps(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    def no_ghostscript(*args, **kwargs):
        raise AssertionError("Ghostscript was run")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", no_ghostscript)
    f = tmp_path / "photo.jpg"
    f.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\n"
                  b"showpage\n%%EOF\n")
    with pytest.raises(ImageLoadError) as err:
        load_image(f)
    assert str(err.value) == f"{f}: not a supported photo format (EPS)"


def test_photo_formats_still_load(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    files = {"a.png": {}, "a.jpg": {"quality": 95}, "a.webp": {"lossless": True}, "a.tif": {}, "a.bmp": {},
             "a.gif": {}}
    if features.check("avif"):
        files["a.avif"] = {"quality": 90}
    try:
        import pillow_heif

        pillow_heif.register_heif_opener()
        files["a.heic"] = {"quality": 90}
    except ImportError:
        pass
    for name, kw in files.items():
        im.save(tmp_path / name, **kw)
        li = load_image(tmp_path / name)
        assert li.size == (12, 10), name
        if name in ("a.png", "a.webp", "a.tif", "a.bmp"):
            assert np.array_equal(np.round(li.pixels.numpy().transpose(1, 2, 0) * 255), arr), name
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(ImageLoadError, match="not an image"):
        load_image(tmp_path / "text.png")


# ---------------------------------------------------------------------------------------------- camera RAW
def _dng(path: Path) -> None:
    ifd = TiffImagePlugin.ImageFileDirectory_v2()
    ifd[254], ifd[271], ifd[50706] = 1, "Canon", b"\x01\x04\x00\x00"  # preview sub-file, Make, DNGVersion
    Image.new("RGB", (32, 21), (10, 200, 30)).save(path, format="TIFF", tiffinfo=ifd)


def test_camera_raw_is_refused_by_name_and_a_dng_by_its_tag(tmp_path):
    _dng(tmp_path / "IMG_0001.dng")
    with pytest.raises(ImageLoadError) as err:
        load_image(tmp_path / "IMG_0001.dng")
    assert str(err.value).startswith(f"{tmp_path / 'IMG_0001.dng'}: a camera RAW file")
    assert "export it as JPEG, PNG or TIFF" in str(err.value)
    _dng(tmp_path / "renamed.tif")
    with pytest.raises(ImageLoadError) as err:
        load_image(tmp_path / "renamed.tif")
    assert str(err.value).startswith(f"{tmp_path / 'renamed.tif'}: a camera RAW file (DNG)")
    Image.new("RGB", (32, 21), (10, 200, 30)).save(tmp_path / "plain.tif")
    assert load_image(tmp_path / "plain.tif").size == (21, 32)


# ---------------------------------------------------------------------------------------------- float64 and MPS
def test_alphas_cumprod_is_unchanged_on_cpu_and_never_float64_on_mps(tiny_sd, monkeypatch):
    s = tiny_sd.noise_scheduler
    ac = D.alphas_cumprod(s, "cpu")
    assert ac.dtype == torch.float64 and torch.equal(ac, s.alphas_cumprod.to(device="cpu", dtype=torch.float64))
    assert torch.equal(D.alphas_cumprod(s), ac)
    x, e, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999])
    a = s.alphas_cumprod.to(dtype=torch.float64)[t]
    want = a.sqrt().float().view(-1, 1, 1, 1) * x + (1 - a).sqrt().float().view(-1, 1, 1, 1) * e
    assert torch.equal(D.add_noise(s, x, e, t), want)

    real_to, asked = torch.Tensor.to, []

    def to(self, *args, **kwargs):  # a stand-in MPS: refuses float64 as MPS does, else stays on the CPU
        device = kwargs.get("device", args[0] if args and isinstance(args[0], (str, torch.device)) else None)
        if device is None or torch.device(device).type != "mps":
            return real_to(self, *args, **kwargs)
        dtype = kwargs.get("dtype", args[1] if len(args) > 1 else self.dtype)
        asked.append(dtype)
        if dtype == torch.float64:
            raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support float64")
        return real_to(self, dtype=dtype)

    monkeypatch.setattr(torch.Tensor, "to", to)
    on_mps = D.alphas_cumprod(s, torch.device("mps"))
    assert asked and torch.float64 not in asked
    assert on_mps.dtype == torch.float32 and torch.equal(on_mps, s.alphas_cumprod)


# ---------------------------------------------------------------------------------------------- img2img noise
def test_img2img_noise_is_the_float32_draw_on_a_bf16_model(monkeypatch):
    from apdm.core.models import tiny_sd

    sd = tiny_sd(seed=0, dtype=torch.bfloat16)
    seen = {}

    class Stop(Exception):
        pass

    def capture(noise_scheduler, latents, noise, timesteps):
        seen["noise"] = noise
        raise Stop

    monkeypatch.setattr(D, "add_noise", capture)
    with pytest.raises(Stop):
        D.img2img(sd, torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)), 0.5,
                  num_inference_steps=4, seed=7)
    want = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    assert seen["noise"].dtype == torch.float32 and torch.equal(seen["noise"], want)
