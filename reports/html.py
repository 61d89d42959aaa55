"""``report.html``: one self-contained page (inline CSS, tables inline, PNGs embedded as base64).

It opens from disk in any browser, without a server or network access; the PDF versions of the
figures sit next to it under ``plots/`` and are linked by relative path.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from reports.render import to_html
from reports.tables import Table

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1300px;color:#111;padding:0 16px}
h1{font-size:1.6em;margin-bottom:0.2em} h2{border-bottom:1px solid #ccc;padding-bottom:3px;margin-top:2em}
h3{font-size:1.05em;margin-top:1.4em}
table.data{border-collapse:collapse;font-size:0.86em;margin:6px 0;display:block;overflow-x:auto}
table.data th,table.data td{border:1px solid #bbb;padding:3px 7px;text-align:right;white-space:nowrap}
table.data th{background:#eee} table.data td:first-child,table.data td:nth-child(2){text-align:left}
td.best{background:#e8e8e8}
ul.notes{font-size:0.82em;color:#444;margin-top:2px} .meta{color:#555;font-size:0.9em}
figure{margin:10px 0 22px 0} figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:0.85em;color:#444} nav a{margin-right:12px}
.warn{background:#fff3cd;border:1px solid #e0c97a;padding:6px 10px;font-size:0.9em}
"""


def embed_png(path: Path) -> str:
    """``data:image/png;base64,...`` for an ``<img src>``."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def figure_html(paths: Dict[str, Path], caption: str, out_dir: Path) -> str:
    pdf = paths.get("pdf")
    link = f" (<a href='{html.escape(str(pdf.relative_to(out_dir)))}'>PDF</a>)" if pdf is not None else ""
    return (f"<figure><img alt='{html.escape(caption)}' src='{embed_png(paths['png'])}'>"
            f"<figcaption>{html.escape(caption)}{link}</figcaption></figure>")


def page(title: str, meta: Sequence[str], sections: Sequence[Tuple[str, str, List[str]]], warnings: Sequence[str],
         out_dir: Path) -> str:
    """The whole page. ``sections``: (anchor, heading, list of HTML fragments)."""
    nav = " ".join(f"<a href='#{a}'>{html.escape(h)}</a>" for a, h, frags in sections if frags)
    body = [f"<h1>{html.escape(title)}</h1>", "<p class='meta'>" + "<br>".join(html.escape(m) for m in meta) + "</p>",
            f"<nav>{nav}</nav>"]
    for w in warnings:
        body.append(f"<p class='warn'>{html.escape(w)}</p>")
    for anchor, heading, frags in sections:
        if frags:
            body.append(f"<h2 id='{anchor}'>{html.escape(heading)}</h2>")
            body += frags
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def table_fragments(tables: Sequence[Optional[Table]]) -> List[str]:
    return [to_html(t) for t in tables if t is not None]
