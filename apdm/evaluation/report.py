"""The HTML report of ``apdm evaluate``: one self-contained page (images referenced by relative path).

Sections: summary table (mean of each metric per cell), per-subject image grids (references, protected inputs,
generations of every cell), and plots of each metric against attack strength for parameterised attacks
(``jpeg:quality=…``, ``diffpure:strength=…``, ``impress:radius=k/255``), drawn as inline SVG so no plotting
library is needed.
"""

from __future__ import annotations

import html
import re
import urllib.parse
from collections import defaultdict
from pathlib import Path

from apdm.evaluation.metrics import PROTECTION_WANTS
from apdm.utils import atomic_write_text

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td.l{text-align:left}.na{color:#999}figure{display:inline-block;margin:6px;vertical-align:top}
figcaption{font-size:12px;max-width:520px}img{image-rendering:pixelated;max-width:520px;border:1px solid #ddd}
.note{color:#555;font-size:13px}.warn{background:#fff3cd;border:1px solid #e0c36c;padding:6px 10px}
"""


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"  # FID 12345.7 reads 12346, not 1.235e+04
    return str(v)


def _cell(r: dict) -> tuple[str, str]:
    """(text, tooltip) of one record in the summary table: the value, the budget check's max for L∞, ``*`` where
    the record says it is unreliable; the tooltip holds n, std and the record's qualifiers."""
    v = r.get("value")
    text = "identical" if v is None and r.get("identical") else _fmt(v)
    if r.get("name") == "linf_255" and r.get("max") is not None:
        text = f"{_fmt(v)}/255 (max {_fmt(r['max'])}/255)"
    if r.get("reliable") is False:
        text += "*"
    tip = [f"{k}={_fmt(r[k])}" for k in ("n", "std", "n_identical", "n_no_face", "value_all_images")
           if r.get(k) is not None]
    if r.get("note"):
        tip.append(str(r["note"]))
    return text, "; ".join(tip)


def summary_table(records: list[dict]) -> tuple[list[str], list[tuple], dict]:
    """Pivot records: rows = (label, subject, scenario, attack, personalization, prompt), columns = metric tags."""
    metrics: list[str] = []
    rows: dict[tuple, dict] = {}
    for r in records:
        tag = r.get("metric")
        if tag is None:
            continue
        if tag not in metrics:
            metrics.append(tag)
        key = (r.get("label"), r.get("subject"), r.get("scenario"), r.get("attack"), r.get("personalization"),
               r.get("prompt"))
        rows.setdefault(key, {})[tag] = r
    return metrics, list(rows), rows


def _strength(attack: str) -> tuple[str, float] | None:
    """(family, value) of a one-parameter attack such as ``jpeg:quality=60`` or ``impress:radius=16/255``."""
    m = re.match(r"^([a-z_]+):([a-z_]+)=([0-9.]+)(?:/([0-9.]+))?$", attack or "")
    if not m:
        return None
    try:
        value = float(m.group(3)) / (float(m.group(4)) if m.group(4) else 1.0)
    except (ValueError, ZeroDivisionError):
        return None
    return f"{m.group(1)} {m.group(2)}", value


def _svg_plot(title: str, series: dict[str, list[tuple[float, float]]], xlabel: str) -> str:
    """A small line plot as inline SVG: ``series`` = {name: [(x, y), ...]}."""
    pts = [p for s in series.values() for p in s]
    if not pts:
        return ""
    W, H, L, B = 420, 240, 50, 35
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    pad = 0.08 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad

    def sx(x):
        return L + (x - x0) / (x1 - x0) * (W - L - 15)

    def sy(y):
        return H - B - (y - y0) / (y1 - y0) * (H - B - 25)

    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    parts = [f'<svg width="{W}" height="{H}" xmlns="http://www.w3.org/2000/svg" font-size="11">',
             f'<text x="{W / 2}" y="14" text-anchor="middle" font-weight="bold">{html.escape(title)}</text>',
             f'<line x1="{L}" y1="{H - B}" x2="{W - 10}" y2="{H - B}" stroke="#333"/>',
             f'<line x1="{L}" y1="20" x2="{L}" y2="{H - B}" stroke="#333"/>',
             f'<text x="{W / 2}" y="{H - 5}" text-anchor="middle">{html.escape(xlabel)}</text>']
    for v in (y0 + pad, (y0 + y1) / 2, y1 - pad):
        parts.append(f'<text x="{L - 4}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>')
    for v in sorted(set(xs)):
        parts.append(f'<text x="{sx(v):.1f}" y="{H - B + 14}" text-anchor="middle">{v:g}</text>')
    for i, (name, s) in enumerate(series.items()):
        s = sorted(s)
        c = colors[i % len(colors)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s)
        parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="{path}"/>')
        parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{c}"/>' for x, y in s]
        parts.append(f'<text x="{W - 12}" y="{30 + 13 * i}" text-anchor="end" fill="{c}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def strength_plots(records: list[dict]) -> list[str]:
    """One SVG per (attack family, metric): the metric against the attack's strength, a line per scenario/method."""
    data: dict[tuple[str, str], dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        st = _strength(r.get("attack", ""))
        if st is None or r.get("value") is None or not r.get("available", True):
            continue
        fam, x = st
        series = f"{r.get('label')}/{r.get('scenario')}/{r.get('personalization')}"
        data[(fam, r["metric"])][series].append((x, float(r["value"])))
    out = []
    for (fam, metric), series in sorted(data.items()):
        # average repeated points (several subjects / prompts)
        merged = {}
        for name, pts in series.items():
            acc = defaultdict(list)
            for x, y in pts:
                acc[x].append(y)
            merged[name] = [(x, sum(v) / len(v)) for x, v in acc.items()]
        if any(len(p) > 1 for p in merged.values()):
            out.append(_svg_plot(f"{metric} vs {fam}", merged, fam))
    return out


def write_report(path: str | Path, cfg, records: list[dict], gallery: list[dict]) -> Path:
    """Write the report; ``gallery`` items are ``{"subject", "title", "file"}`` with ``file`` relative to it."""
    from apdm.core.models import is_untrained
    from apdm.evaluation.run import personalization_labels

    metrics, keys, rows = summary_table(records)
    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>apdm evaluate: {html.escape(cfg.label)}</title>"
         f"<style>{_CSS}</style></head><body>",
         f"<h1>apdm evaluate — {html.escape(cfg.label)}</h1>",
         *([(f"<p class='warn'>model <code>{html.escape(cfg.model.path)}</code> is a random-weight pipeline for "
             "tests and timing: these numbers say nothing about protection on a real model.</p>")]
           if is_untrained(cfg.model.path) else []),
         f"<p class='note'>model <code>{html.escape(cfg.model.path)}</code>; scenarios "
         f"{html.escape(', '.join(cfg.scenarios))}; attacks {html.escape(', '.join(cfg.attacks))}; personalization "
         f"{html.escape(', '.join(personalization_labels(cfg.personalizations)))}; "
         f"{cfg.sample.num_images_per_prompt} images per prompt. Every metric is tagged "
         "<code>name@implementation</code>; ↑/↓ give the metric's own direction (of quality or similarity), the row "
         "below what protection wants (docs/metrics.md). Each cell is a mean: hover for n, std and the record's "
         "notes; <code>*</code> marks a value the metric calls unreliable (e.g. FID on fewer than 50 images); L∞ is "
         "in k/255 with its max over the images, the budget check.</p>",
         "<h2>Metrics</h2><table><tr><th>label</th><th>subject</th><th>scenario</th><th>attack</th>"
         "<th>personalization</th><th>prompt</th>"]
    wants = []
    for m in metrics:
        first = next((r for k in keys for t, r in rows[k].items() if t == m), {})
        hib = first.get("higher_is_better")
        arrow = "" if hib is None else (" ↑" if hib else " ↓")
        h.append(f"<th>{html.escape(m)}{arrow}</th>")
        wants.append(PROTECTION_WANTS.get(first.get("name") or m.split("@")[0], ""))
    h.append("</tr><tr><th class='l' colspan='6'>protection wants</th>"
             + "".join(f"<th>{html.escape(w)}</th>" for w in wants) + "</tr>")
    for k in keys:
        h.append("<tr>" + "".join(f"<td class='l'>{html.escape(_fmt(v))}</td>" for v in k))
        for m in metrics:
            r = rows[k].get(m)
            if r is None:
                h.append("<td></td>")
            elif not r.get("available", True) and r.get("n_generated") and r.get("n_no_face") == r["n_generated"]:
                # not a missing backend: no generated image had a face (the protection's success for ISM)
                h.append(f"<td class='na' title='{html.escape(str(r.get('reason', '')))}'>no face "
                         f"(0/{r['n_generated']})</td>")
            elif not r.get("available", True):
                h.append(f"<td class='na' title='{html.escape(str(r.get('reason', '')))}'>n/a</td>")
            else:
                text, tip = _cell(r)
                h.append(f"<td title='{html.escape(tip)}'>{html.escape(text)}</td>")
        h.append("</tr>")
    h.append("</table>")
    unavailable = {(r["metric"], r.get("reason", "")) for r in records if not r.get("available", True)}
    if unavailable:
        h.append("<h3>Unavailable metrics</h3><ul>")
        h += [f"<li><code>{html.escape(m)}</code>: {html.escape(reason)}</li>" for m, reason in sorted(unavailable)]
        h.append("</ul>")
    plots = strength_plots(records)
    if plots:
        h.append("<h2>Metric vs attack strength</h2>")
        h += [f"<figure>{p}</figure>" for p in plots]
    h.append("<h2>Images</h2>")
    by_subject: dict[str, list[dict]] = defaultdict(list)
    for g in gallery:
        by_subject[g["subject"]].append(g)
    for subject, items in by_subject.items():
        h.append(f"<h3>{html.escape(subject)}</h3>")
        for g in items:
            h.append(f"<figure><img src='{html.escape(urllib.parse.quote(g['file']))}' alt='{html.escape(g['title'])}'>"
                     f"<figcaption>{html.escape(g['title'])}</figcaption></figure>")
    h.append("</body></html>")
    return atomic_write_text(path, "\n".join(h))
