"""Findings of the 2026-12-07 audit of identity metrics and the report, each with the behaviour it fixed."""
import torch

from apdm.evaluation import identity as I
from apdm.evaluation.metrics import MetricUnavailable

G = torch.Generator().manual_seed(0)
GEN, REF = torch.rand(4, 3, 16, 16, generator=G), torch.rand(3, 3, 16, 16, generator=G)
PROJ = torch.randn(3 * 16 * 16, 8, generator=G)


def embed(images):  # embeds every image, no face mask of its own (as the toy identity encoder)
    return images.flatten(1) @ PROJ


def test_an_ism_over_every_image_because_the_detector_failed_says_so():
    def broken(images):
        raise MetricUnavailable("detector weights missing")

    recs = {r["name"]: r for r in I.identity_records(GEN, REF, embed, broken, "proj", "det")}
    assert recs["fdfr"]["available"] is False
    ism = recs["ism"]
    assert ism["n"] == 4 and ism["faces_from"] is None and "could not run" in ism["note"]  # was silent


def test_an_embedders_own_faces_are_named_and_the_reference_mean_recorded():
    def embed_some(images):  # finds "faces" in the first three images only
        found = torch.tensor([True, True, True, False])[: images.shape[0]] if images.shape[0] == 4 else \
            torch.ones(images.shape[0], dtype=torch.bool)
        return embed(images[found]), found

    def detect(images):  # disagrees with the embedder
        return torch.tensor([0.1, 0.9, 0.9, 0.9])

    for normalize in (True, False):
        ism = {r["name"]: r for r in I.identity_records(GEN, REF, embed_some, detect, "own", "det",
                                                        normalize_refs=normalize)}["ism"]
        assert ism["faces_from"] == "own" and ism["n"] == 3 and ism["normalize_refs"] is normalize


def _record(**kw):
    return {"label": "t", "subject": "s", "scenario": "protected", "attack": "none", "personalization": "db",
            "impl": "x", "n": 4, "higher_is_better": True, **kw}


def test_report_tells_no_face_from_a_missing_backend_and_writes_large_numbers_plainly(tmp_path):
    from apdm.config import EvaluateRunConfig
    from apdm.evaluation.report import _fmt, write_report

    assert _fmt(12345.678) == "12346" and _fmt(0.123456) == "0.1235"  # was 1.235e+04
    cfg = EvaluateRunConfig(label="t")
    cfg.model.path = "toy"
    recs = [_record(metric="ism@x", name="ism", value=None, available=False,
                    reason="no face found in any generated image", n_no_face=4, n_generated=4),
            _record(subject="s2", metric="ism@x", name="ism", value=None, available=False, reason="dlib missing")]
    page = write_report(tmp_path / "r.html", cfg, recs, []).read_text(encoding="utf-8")
    assert "no face (0/4)</td>" in page and page.count(">n/a</td>") == 1


def test_a_partly_faceless_unavailable_record_stays_n_a(tmp_path):  # a guard: this already read n/a
    from apdm.config import EvaluateRunConfig
    from apdm.evaluation.report import write_report

    cfg = EvaluateRunConfig(label="t")
    cfg.model.path = "toy"
    recs = [_record(metric="ism@x", name="ism", value=None, available=False, reason="no reference embedding",
                    n_no_face=3, n_generated=4)]
    assert "no face (" not in write_report(tmp_path / "r.html", cfg, recs, []).read_text(encoding="utf-8")
