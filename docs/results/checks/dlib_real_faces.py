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
the candidates are (grey, 25 px, three crops): does the recognizer rank it above the strangers? And with each of the
first ``--lfw-persons`` LFW faces dlib finds as the person instead (three views: the face, its mirror image, a 90 %
crop; candidates: the 200 images and the astronaut), the same decoy checks per person, and where the person's own
image lands in the ranking (``own_rank`` 0 = most alike).
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
    ap.add_argument("--lfw-persons", type=int, default=20, help="also protect each of the first N LFW faces found")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import skimage.data as skd

    backend, tag = identity_backend("dlib")
    seen = {}

    def embed(images):  # each image set embedded once, for the trap's calls and the checks alike
        key = (images.data_ptr(), tuple(images.shape))
        if key not in seen:
            seen[key] = (*backend(images), images)  # the images held, so their memory is not reused under the key
        return seen[key][:2]

    def scale(t, mode="bilinear"):
        return F.interpolate(t, size=(args.px, args.px), mode=mode, antialias=mode == "bilinear").clamp(0, 1)

    a = torch.from_numpy(skd.astronaut()).permute(2, 0, 1).float().div(255)[None]
    face = a[..., :256, 64:320]
    photos = torch.cat([scale(face), scale(face.flip(-1)), scale(a[..., 10:250, 80:320]), scale(a[..., :288, 48:336])])
    lfw = scale(torch.from_numpy(skd.lfw_subset()).float()[:, None].repeat(1, 3, 1, 1), "bicubic")  # 100 + 100

    rows, cos, ref = likeness(photos, lfw, embed, "encoder_trap.targets=farthest", "the astronaut")
    idx, dcos = choose_decoys(photos, lfw, embed, args.decoys)
    e_photos, _ = embed(photos)
    e_cand, _ = embed(lfw)  # (K, 128): the found candidates, in the order of rows
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
    pool = torch.cat([lfw, photos[:1]])
    e_pool, found_pool = embed(pool)
    rows_pool = torch.nonzero(found_pool).flatten()
    at_pool = {int(r): k for k, r in enumerate(rows_pool.tolist())}  # pool row -> row of e_pool
    persons = []
    for p in [int(r) for r in rows_pool if r < 100][:args.lfw_persons]:
        x = pool[p:p + 1]
        m = args.px // 20
        views = torch.cat([x, x.flip(-1), scale(x[..., m:-m, m:-m])])
        r, c, ref_p = likeness(views, pool, embed, "check", f"LFW face {p}")
        if ref_p.shape[0] == 0:
            continue
        d_idx, _ = choose_decoys(views, pool, embed, args.decoys)  # the person's own image is a candidate too
        e_views, _ = embed(views)
        e_r = e_pool[[at_pool[k] for k in r.tolist()]]
        dist_p = (e_r - e_views.mean(0)).norm(dim=1)
        by_dist = r[torch.argsort(dist_p, descending=True)].tolist()  # farthest first
        top = by_dist[:args.decoys]
        e_d = e_pool[[at_pool[k] for k in d_idx.tolist()]]
        persons.append({"lfw_face": p, "views_found": int(ref_p.shape[0]),
                        "own_rank": int((c > c[r == p][0]).sum()),
                        "decoys_are_dlib_farthest": sorted(top) == sorted(d_idx.tolist()),
                        "decoy_dlib_ranks": sorted(by_dist.index(k) for k in d_idx.tolist()),  # 0 = farthest
                        "decoy_distance_mean": round(float(dist_p[[r.tolist().index(k) for k in d_idx.tolist()]]
                                                           .mean()), 4),
                        "dlib_farthest_distance_mean": round(float(dist_p.sort(descending=True).values[:args.decoys]
                                                                   .mean()), 4),
                        "decoy_distance_min": round(float(torch.cdist(e_d, e_views).min()), 4),
                        "spearman": round(float(spearmanr(c.numpy(), (-dist_p).numpy()).correlation), 4)})
    res["lfw_persons"] = persons
    if persons:
        res["lfw_persons_summary"] = {
            "n": len(persons), "own_rank_0": sum(q["own_rank"] == 0 for q in persons),
            "decoys_are_dlib_farthest": sum(q["decoys_are_dlib_farthest"] for q in persons),
            "decoy_distance_min": min(q["decoy_distance_min"] for q in persons),
            "decoy_dlib_rank_max": max(max(q["decoy_dlib_ranks"]) for q in persons),
            "decoy_vs_dlib_farthest_distance_mean": [
                round(sum(q["decoy_distance_mean"] for q in persons) / len(persons), 4),
                round(sum(q["dlib_farthest_distance_mean"] for q in persons) / len(persons), 4)],
            "spearman_min_median": [min(q["spearman"] for q in persons),
                                    sorted(q["spearman"] for q in persons)[len(persons) // 2]]}
    atomic_write_json(args.out, res)
    print({k: v for k, v in res.items() if k != "lfw_persons"})


if __name__ == "__main__":
    main()
