"""The trap's recognizer path with ``encoder_trap.identity=dlib`` on real faces (docs/protect_model.md, "The dlib
recognizer on real faces"). Needs the extra ``faces`` (dlib-bin and face_recognition_models, from the package index).

    python docs/results/checks/dlib_real_faces.py [--px 256] [--decoys 3] --out F.json   # ~1 min on 2 cores

Real photos from scikit-image's bundled data, nothing downloaded: the person is its astronaut (public domain; four
views: the face crop, its mirror image, two wider crops), the candidates are ``lfw_subset``'s 100 LFW faces and 100
non-faces (25x25 grey), all scaled to ``--px``. Records what the trap's own functions make of them
(:func:`apdm.protect_model.encoder_trap.likeness` and ``choose_decoys``, the backend of ``identity=dlib``): faces
found, the decoys chosen and their cosines, and, by dlib's own rule (L2 distance between 128-d descriptors, the same
person below 0.6), how far the decoys and every found stranger are from the person, and whether the cosine ranking
the trap uses agrees with that distance (Spearman over the found candidates). Also the person's own face degraded as
the candidates are (grey, 25 px, three crops): does the recognizer rank it above the strangers?
"""

import argparse

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from apdm.evaluation.run import identity_backend
from apdm.protect_model.encoder_trap import choose_decoys, likeness
from apdm.utils import atomic_write_json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--px", type=int, default=256, help="every image is scaled to px x px")
    ap.add_argument("--decoys", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import skimage.data as skd

    embed, tag = identity_backend("dlib")

    def scale(t, mode="bilinear"):
        return F.interpolate(t, size=(args.px, args.px), mode=mode, antialias=mode == "bilinear").clamp(0, 1)

    a = torch.from_numpy(skd.astronaut()).permute(2, 0, 1).float().div(255)[None]
    face = a[..., :256, 64:320]
    photos = torch.cat([scale(face), scale(face.flip(-1)), scale(a[..., 10:250, 80:320]), scale(a[..., :288, 48:336])])
    lfw = scale(torch.from_numpy(skd.lfw_subset()).float()[:, None].repeat(1, 3, 1, 1), "bicubic")  # 100 + 100

    rows, cos, ref = likeness(photos, lfw, embed, "encoder_trap.targets=farthest", "the astronaut")
    idx, dcos = choose_decoys(photos, lfw, embed, args.decoys)
    e_photos, _ = embed(photos)
    e_cand, _ = embed(lfw[rows])
    dist = (e_cand - e_photos.mean(0)).norm(dim=1)  # dlib's distance of each found stranger to the person
    at = {int(r): k for k, r in enumerate(rows.tolist())}
    far = rows[torch.argsort(dist, descending=True)[:args.decoys]].tolist()
    res = {"recognizer": tag, "px": args.px, "photos_found": int(ref.shape[0]),
           "lfw_faces_found": int((rows < 100).sum()), "lfw_nonfaces_found": int((rows >= 100).sum()),
           "photos_pairwise_distance_max": round(float(torch.pdist(e_photos).max()), 4),
           "decoys": idx.tolist(), "decoy_cosines": [round(float(c), 4) for c in dcos],
           "decoy_distance_to_photos_min": round(float(torch.cdist(e_cand[[at[int(i)] for i in idx]], e_photos).min()),
                                                 4),
           "dlib_farthest": far, "decoys_are_dlib_farthest": sorted(far) == sorted(idx.tolist()),
           "stranger_cosine_range": [round(float(cos.min()), 4), round(float(cos.max()), 4)],
           "stranger_distance_min_median_max": [round(float(v), 4) for v in (dist.min(), dist.median(), dist.max())],
           "spearman_cosine_vs_neg_distance": round(float(spearmanr(cos.numpy(), (-dist).numpy()).correlation), 4)}
    grey = face.mean(1, keepdim=True).repeat(1, 3, 1, 1)
    res["own_face_degraded"] = []
    for lo, hi in ((30, 230), (40, 216), (60, 200)):
        own = scale(F.interpolate(grey[..., lo:hi, lo:hi], size=(25, 25), mode="area"), "bicubic")
        r2, c2, _ = likeness(photos, torch.cat([lfw[:100], own]), embed, "check", "the astronaut")
        found = bool((r2 == 100).any())
        res["own_face_degraded"].append({
            "crop": [lo, hi], "found": found,
            "cosine": round(float(c2[r2 == 100][0]), 4) if found else None,
            "strangers_above": int((c2[r2 < 100] > c2[r2 == 100][0]).sum()) if found else None})
    atomic_write_json(args.out, res)
    print(res)


if __name__ == "__main__":
    main()
