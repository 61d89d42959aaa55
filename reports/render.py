"""Render :class:`reports.tables.Table` as Markdown (tabulate), LaTeX (booktabs), CSV and HTML.

LaTeX is written by hand instead of ``DataFrame.style.to_latex`` because per-cell bold marks and
the escaping of method names (``coda_prompt``, ``l2p@tag``) are simpler to control directly, and it
keeps the output free of pandas-version-dependent Styler markup.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Dict, List

from tabulate import tabulate

from reports.tables import Table

_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
                  "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_LATEX_SYMBOLS = {"±": r"$\pm$", "↑": r"$\uparrow$", "↓": r"$\downarrow$", "Δ": r"$\Delta$", "−": "--", "—": "--",
                  "≈": r"$\approx$", "×": r"$\times$", "√": r"$\surd$"}


def latex_escape(text: str) -> str:
    """Escape LaTeX specials and map the few unicode symbols the tables use to math mode."""
    out = "".join(_LATEX_ESCAPES.get(c, c) for c in str(text))
    for sym, rep in _LATEX_SYMBOLS.items():
        out = out.replace(sym, rep)
    return out


def to_markdown(t: Table) -> str:
    """GitHub-flavoured pipe table; best cells in ``**bold**``; notes as an italic list below."""
    lines = [f"### {t.title}", ""]
    if t.empty:
        lines.append("_(no rows)_")
    else:
        body = [[f"**{c.text}**" if c.best else c.text for c in row] for row in t.rows]
        lines.append(tabulate(body, headers=t.columns, tablefmt="github", disable_numparse=True))
    lines += [""] + [f"- _{n}_" for n in t.notes]
    return "\n".join(lines).rstrip() + "\n"


def to_latex(t: Table) -> str:
    """A ``table`` float with a booktabs ``tabular``; best cells in ``\\textbf``; notes in the caption."""
    align = "l" * min(2, len(t.columns)) + "r" * max(0, len(t.columns) - 2)
    lines = [r"% requires \usepackage{booktabs}", r"\begin{table}[t]", r"\centering", r"\small",
             rf"\begin{{tabular}}{{{align}}}", r"\toprule",
             " & ".join(latex_escape(c) for c in t.columns) + r" \\", r"\midrule"]
    prev_first = None
    for row in t.rows:
        if prev_first is not None and row and row[0].text != prev_first and t.columns and t.columns[0] == "benchmark":
            lines.append(r"\midrule")
        prev_first = row[0].text if row else None
        lines.append(" & ".join(rf"\textbf{{{latex_escape(c.text)}}}" if c.best else latex_escape(c.text) for c in row) + r" \\")
    caption = latex_escape(t.title + (". " + " ".join(t.notes) if t.notes else ""))
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{caption}}}", rf"\label{{tab:{t.name}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_html(t: Table) -> str:
    """An HTML ``<table>`` fragment; best cells in ``<b>``."""
    out = [f"<h3 id='{html.escape(t.name)}'>{html.escape(t.title)}</h3>"]
    if t.empty:
        out.append("<p><em>(no rows)</em></p>")
    else:
        out.append(f"<table class='data' data-name='{html.escape(t.name)}'><thead><tr>"
                   + "".join(f"<th>{html.escape(c)}</th>" for c in t.columns) + "</tr></thead><tbody>")
        for row in t.rows:
            out.append("<tr>" + "".join(f"<td class='best'><b>{html.escape(c.text)}</b></td>" if c.best
                                        else f"<td>{html.escape(c.text)}</td>" for c in row) + "</tr>")
        out.append("</tbody></table>")
    if t.notes:
        out.append("<ul class='notes'>" + "".join(f"<li>{html.escape(n)}</li>" for n in t.notes) + "</ul>")
    return "\n".join(out)


def write_table(t: Table, folder: Path) -> Dict[str, Path]:
    """``<name>.md``, ``<name>.tex`` and ``<name>.csv`` (the numeric frame) under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"md": folder / f"{t.name}.md", "tex": folder / f"{t.name}.tex", "csv": folder / f"{t.name}.csv"}
    paths["md"].write_text(to_markdown(t))
    paths["tex"].write_text(to_latex(t))
    t.data.to_csv(paths["csv"], index=False)
    return paths


def markdown_document(title: str, tables: List[Table], preamble: List[str]) -> str:
    """Every table in one Markdown file (``report.md``)."""
    return "\n".join([f"# {title}", ""] + preamble + [""] + [to_markdown(t) for t in tables])
