"""Small pieces of the report's HTML, numbers as people read them, and the page's style.
Arguments are escaped here, except `table`'s cells (already HTML)."""

from __future__ import annotations

import re
from html import escape

from dogbreeds.report.plots import Plot, format_value


def cards(cards: list[tuple[str, str]], small: bool = False) -> str:
    value_class = "value small" if small else "value"
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="{value_class}">{escape(str(value))}</div>'
        f'<div class="label">{escape(label)}</div></div>'
        for value, label in cards
    ) + "</div>"


def table(
    head: list[str], rows: list[tuple[list[str], bool]], first_number: int,
    end_number: int | None = None,
) -> str:
    """A table of HTML cells; columns first_number:end_number are numbers (right-aligned);
    rows are (cells, highlighted)."""
    numeric = set(range(first_number, len(head) if end_number is None else end_number))

    def cell(tag, index, content):
        return f'<{tag}{" class=number" if index in numeric else ""}>{content}</{tag}>'

    header = "".join(cell("th", i, escape(h)) for i, h in enumerate(head))
    body = "".join(
        f'<tr{" class=best" if highlighted else ""}>'
        + "".join(cell("td", i, content) for i, content in enumerate(cells)) + "</tr>"
        for cells, highlighted in rows
    )
    return (f'<div class="table-wrap"><table><thead><tr>{header}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def chips(values: dict) -> str:
    return '<div class="chips">' + "".join(
        f"<span>{escape(str(key))} <b>{escape(format_value(value))}</b></span>"
        for key, value in values.items() if value is not None
    ) + "</div>"


def image(plot: Plot, alt: str) -> str:
    return (f'<img class="plot" style="max-width:{plot.width}px" src="{plot.data_uri}" '
            f'alt="{escape(alt)}">')


def note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def anchor(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name)


def title(prefix: str, title: str) -> str:
    return prefix + title[0].lower() + title[1:] if prefix else title


# Numbers as people read them.


def percent(value) -> str:
    return "—" if value is None else f"{value * 100:.1f}%"


def duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def plural(count, one: str, many: str) -> str:
    return (one if count == 1 else many).format(count)


def number_or_inf(value) -> float:
    return float(value) if isinstance(value, (int, float)) else float("-inf")


CSS = """
:root { --ink:#1f2933; --muted:#616e7c; --line:#e4e7eb; --ground:#f3f5f8; --accent:#2563eb;
  --best:#e4572e; --good:#2a9d8f; --bad:#d1495b; }
* { box-sizing:border-box; }
body { margin:0; background:var(--ground); color:var(--ink);
  font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif; }
main { max-width:1120px; margin:0 auto; padding:24px 20px 48px; }
.hero { background:linear-gradient(135deg,#1e3a8a,#2563eb); color:#fff; padding:26px 30px;
  border-radius:14px; box-shadow:0 4px 18px rgba(30,58,138,.25); }
.hero .kind { text-transform:uppercase; letter-spacing:.09em; font-size:12px; opacity:.8; }
.hero h1 { margin:2px 0 0; font-size:30px; line-height:1.2; }
.facts { display:grid; grid-template-columns:repeat(auto-fit,minmax(190px,1fr)); gap:10px 26px; margin:18px 0 0; }
.facts .wide { grid-column:span 2; }
.facts dt { font-size:12px; opacity:.75; } .facts dd { margin:0; font-weight:600; overflow-wrap:anywhere; }
nav { display:flex; flex-wrap:wrap; gap:6px; margin:16px 0 0; }
nav a { font-size:13px; color:var(--accent); background:#fff; border:1px solid var(--line);
  border-radius:999px; padding:3px 12px; text-decoration:none; }
nav a:hover { border-color:var(--accent); }
section { background:#fff; border:1px solid var(--line); border-radius:14px; padding:20px 26px; margin-top:18px; }
h2 { margin:0 0 10px; font-size:20px; }
h3 { margin:18px 0 8px; font-size:15px; color:var(--muted); }
.note { color:var(--muted); font-size:14px; margin:0 0 12px; }
.cards { display:grid; grid-template-columns:repeat(auto-fit,minmax(160px,1fr)); gap:12px; margin-bottom:10px; }
.card { border:1px solid var(--line); border-radius:10px; padding:12px 16px; background:#fafbfc; }
.card .value { font-size:30px; font-weight:700; font-variant-numeric:tabular-nums; color:#102a43; }
.card .value.small { font-size:22px; overflow-wrap:anywhere; }
.card .label { font-size:13px; color:var(--muted); }
img.plot { display:block; width:100%; height:auto; margin:0 auto; }
.plot-grid { display:grid; grid-template-columns:repeat(auto-fill,minmax(320px,1fr)); gap:14px; }
.chips span { display:inline-block; background:#eef2ff; color:#243b53; border-radius:999px;
  padding:3px 12px; margin:0 6px 8px 0; font-size:14px; }
.chips b { font-variant-numeric:tabular-nums; }
.table-wrap { overflow:auto; max-height:560px; border:1px solid var(--line); border-radius:10px; }
table { border-collapse:collapse; width:100%; font-size:14px; font-variant-numeric:tabular-nums; }
th { position:sticky; top:0; background:#f8fafc; text-align:left; font-weight:600; color:var(--muted);
  border-bottom:2px solid var(--line); padding:8px 12px; white-space:nowrap; }
td { border-bottom:1px solid var(--line); padding:7px 12px; white-space:nowrap; }
td.number, th.number { text-align:right; }
.meter { display:inline-block; width:64px; height:8px; margin-right:8px; background:#edf0f4;
  border-radius:4px; overflow:hidden; vertical-align:middle; }
.meter span { display:block; height:100%; background:var(--accent); }
tbody tr:hover td { background-color:#f8fafc; }
tr.best td { font-weight:700; } tr.best td:first-child { box-shadow:inset 4px 0 0 var(--best); }
.pair { display:grid; grid-template-columns:1fr 150px 1fr; align-items:center; gap:16px;
  padding:12px 0; border-top:1px solid var(--line); }
.breed .name { font-weight:600; } .breed.true { text-align:right; }
.breed.true .thumbs { justify-content:flex-end; }
.thumbs { display:flex; gap:6px; margin-top:6px; min-height:8px; }
.thumbs img { width:96px; height:96px; object-fit:cover; border-radius:8px; }
.arrow { text-align:center; color:var(--bad); }
.arrow .count { font-size:26px; font-weight:700; line-height:1; }
.arrow .share { font-size:12px; color:var(--muted); } .arrow .sign { font-size:28px; line-height:1.1; }
.predictions { display:grid; grid-template-columns:repeat(auto-fill,minmax(180px,1fr)); gap:12px; }
.prediction { margin:0; border:2px solid var(--line); border-radius:12px; padding:8px; }
.prediction.right { border-color:var(--good); } .prediction.wrong { border-color:var(--bad); }
.prediction img { display:block; width:100%; aspect-ratio:1; object-fit:cover; border-radius:8px; }
.prediction .truth { font-weight:700; margin:6px 0 4px; }
.prediction.right .truth::before { content:"\\2713  "; color:var(--good); }
.prediction.wrong .truth::before { content:"\\2717  "; color:var(--bad); }
.prediction ol { list-style:none; margin:0; padding:0; font-size:12px; }
.prediction li { position:relative; display:flex; justify-content:space-between; padding:1px 4px; }
.prediction li .breed-name { overflow:hidden; text-overflow:ellipsis; white-space:nowrap; min-width:0; }
.prediction li .probability { flex:none; margin-left:6px; }
.prediction li .bar { position:absolute; left:0; top:0; bottom:0; background:#dbe7fd; z-index:-1;
  border-radius:3px; }
.prediction li { z-index:0; } .prediction li.true { font-weight:700; }
footer { color:var(--muted); font-size:12px; text-align:center; margin-top:24px; overflow-wrap:anywhere; }
"""
