"""Tests of the procedural toy-world generator (apdm.toy.draw)."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from apdm.toy import draw as D


def test_identity_space_is_large_and_indices_are_distinct_and_invertible():
    assert D.num_identities("person") > 100_000
    assert D.num_identities("dog") > 5_000
    for cls in D.CLASSES:
        idents = [D.identity_from_index(cls, i) for i in range(500)]
        keys = {tuple(sorted(d.items())) for d in idents}
        assert len(keys) == 500  # distinct indices -> distinct identities
        for i, ident in enumerate(idents[:50]):
            assert ident["class"] == cls
            assert set(ident) == {"class", *D.ATTRIBUTES[cls]}
            assert D.identity_index(ident) == i
        # the permutation balances attributes: every value of every attribute appears among 500 identities
        for name, values in D.ATTRIBUTES[cls].items():
            assert {d[name] for d in idents} == set(values)
    assert D.identity_from_index("person", 3) == D.identity_from_index("person", 3)
    assert D.identity_from_index("person", 3, seed=1) != D.identity_from_index("person", 3, seed=0)
    with pytest.raises(IndexError):
        D.identity_from_index("dog", D.num_identities("dog"))
    with pytest.raises(ValueError):
        D.identity_from_index("cat", 0)


def test_draw_is_deterministic_and_seed_dependent():
    ident = D.identity_from_index("person", 7)
    a = np.asarray(D.draw(ident, 5))
    b = np.asarray(D.draw(ident, 5))
    c = np.asarray(D.draw(ident, 6))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert D.draw(ident, np.random.default_rng(5)).tobytes() == a.tobytes()
    big = D.draw(D.identity_from_index("dog", 1), 0, size=128)
    assert big.size == (128, 128) and big.mode == "RGB"


def test_render_dataset_shapes_determinism_and_order_independence():
    imgs, ids, caps = D.render_dataset("dog", [5, 9, 2], 3, seed=1)
    assert imgs.shape == (9, 64, 64, 3) and imgs.dtype == np.uint8
    assert ids.tolist() == [5, 5, 5, 9, 9, 9, 2, 2, 2]
    assert len(caps) == 9 and all(c.startswith("a photo of a dog") for c in caps)
    imgs2, _, caps2 = D.render_dataset("dog", [5, 9, 2], 3, seed=1)
    assert np.array_equal(imgs, imgs2) and caps == caps2
    imgs3, _, _ = D.render_dataset("dog", [5, 9, 2], 3, seed=2)
    assert not np.array_equal(imgs, imgs3)
    # photo j of identity 9 does not depend on which other identities are rendered
    alone, _, _ = D.render_dataset("dog", [9], 3, seed=1)
    assert np.array_equal(alone, imgs[3:6])
    # photos of one identity differ (nuisance), but not wildly
    assert not np.array_equal(imgs[0], imgs[1])
    # rendering in worker processes gives the same bytes, captions and order
    par = D.render_dataset("dog", [5, 9, 2], 3, seed=1, workers=2)
    assert np.array_equal(par[0], imgs) and par[1].tolist() == ids.tolist() and par[2] == caps


def test_identity_dominates_nuisance():
    """Mean-colour distance between photos of one identity is smaller than between identities."""
    imgs, ids, _ = D.render_dataset("person", range(40), 4, seed=0)
    # central crop (the face) as a coarse descriptor
    f = imgs[:, 16:48, 16:48].reshape(len(imgs), 4, 8, 4, 8, 3).mean(axis=(2, 4)).reshape(len(imgs), -1)
    d = np.linalg.norm(f[:, None] - f[None], axis=-1)
    same = ids[:, None] == ids[None]
    off = ~np.eye(len(ids), dtype=bool)
    assert d[same & off].mean() < 0.7 * d[~same].mean()


def test_captions_use_only_vocabulary_words():
    vocab = set(D.vocabulary())
    assert {"a", "photo", "of", "person", "dog", "with", "and", "glasses", "sks"} - vocab == {"sks"}
    assert all(w.isascii() and w.isalpha() and w.islower() for w in vocab)
    rng = np.random.default_rng(0)
    for cls in D.CLASSES:
        for i in range(300):
            ident = D.identity_from_index(cls, i)
            for detail in ("class", "full", "partial", "mixed"):
                cap = D.caption(ident, cls, detail, rng)
                assert set(cap.split()) <= vocab, cap
    ident = D.identity_from_index("person", 0)
    assert D.caption(ident, detail="class") == "a photo of a person"
    full = D.caption(ident, detail="full")
    assert full.startswith("a photo of a person with ")
    assert f"{ident['skin']} skin" in full
    with pytest.raises(ValueError):
        D.caption(ident, detail="everything")


def test_caption_phrases_describe_attributes():
    ident = {"class": "person", "face_shape": "round", "skin": "pale", "hair_style": "spiky",
             "hair_colour": "red", "eye_colour": "blue", "eye_shape": "big", "nose": "small", "mouth": "wide",
             "accessory": "round_glasses", "beard": "none"}
    assert D.caption(ident, detail="full") == (
        "a photo of a person with a round face and pale skin and red spiky hair and big blue eyes and a small "
        "nose and a wide mouth and round glasses")
    dog = {"class": "dog", "fur": "black", "ears": "floppy", "snout": "long", "head": "round", "pattern": "spots",
           "eye_colour": "brown", "nose": "pink", "collar": "none"}
    assert D.caption(dog, detail="full") == (
        "a photo of a dog with black fur and floppy ears and a long snout and a round head and white spots and "
        "brown eyes and a pink nose")


def test_split_is_disjoint_complete_and_stable():
    s = D.split(1000, 0.1, seed=0)
    assert len(s["heldout"]) == 100 and len(s["pretrain"]) == 900
    assert not set(s["heldout"]) & set(s["pretrain"])
    assert sorted(s["heldout"] + s["pretrain"]) == list(range(1000))
    assert D.split(1000, 0.1, seed=0) == s
    assert D.split(1000, 0.1, seed=1)["heldout"] != s["heldout"]
    assert len(D.split(10, 0.01)["heldout"]) == 1


def test_negatives_deterministic_all_kinds_and_unlike_subjects():
    neg, kinds = D.render_negatives(2 * len(D.NEGATIVE_KINDS), seed=3)
    assert neg.shape == (20, 64, 64, 3) and neg.dtype == np.uint8
    assert set(kinds) == set(D.NEGATIVE_KINDS)
    neg2, _ = D.render_negatives(2 * len(D.NEGATIVE_KINDS), seed=3)
    assert np.array_equal(neg, neg2)
    assert not np.array_equal(neg, D.render_negatives(20, seed=4)[0])
    for kind in D.NEGATIVE_KINDS:
        img = D.draw_negative(0, kind=kind, cls="dog")
        assert img.shape == (64, 64, 3)
    with pytest.raises(ValueError):
        D.draw_negative(0, kind="nonsense")
    # blur_tint / background have far less edge energy than drawn subjects (pixel noise removed first)
    subj, _, _ = D.render_dataset("person", range(10), 1, seed=0)
    blur = np.stack([D.draw_negative(i, kind="blur_tint") for i in range(10)])
    empty = np.stack([D.draw_negative(i, kind="background") for i in range(10)])
    edges = lambda a: np.abs(np.diff(  # noqa: E731
        [np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(1.5)), float) for x in a], axis=2)).mean()
    assert edges(blur) < 0.7 * edges(subj)
    assert edges(empty) < 0.3 * edges(subj)
    tiles = D.draw_negative(1, kind="tiles")
    assert tiles.shape == (64, 64, 3)


def test_to_tensor_and_grid():
    imgs, _, _ = D.render_dataset("person", [0, 1], 2)
    t = D.to_tensor(imgs)
    assert t.shape == (4, 3, 64, 64) and t.dtype == torch.float32
    assert 0.0 <= float(t.min()) and float(t.max()) <= 1.0
    assert torch.allclose(t[1].permute(1, 2, 0) * 255, torch.from_numpy(imgs[1]).float())
    assert D.to_tensor(D.draw(D.identity_from_index("dog", 0))).shape == (1, 3, 64, 64)
    g = D.image_grid([imgs[:2], imgs[2:]], pad=2, scale=2)
    assert g.size == (2 * 128 + 3 * 2, 2 * 128 + 3 * 2)
