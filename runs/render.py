"""How a comparison report looks: Markdown, a self-contained HTML page, and PNG plots.

The report's content and file format are runs.report's typed models; rendering reads a
validated report as plain data (`Report.model_dump()`), so a notebook can render any dict
that validates. The headline reads the AUC differences of the runs whose sources strictly
contain their reference's (text + image against text); an image-only run does not answer
the question, and without any such run the headline says so. A difference is significant
when its interval excludes 0.

Plots use matplotlib's object API with the Agg canvas (no pyplot, no global backend).
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runs.report import FILES, Report, ReportError
from storage import atomic

METRICS = ("auc", "mrr", "ndcg@5", "ndcg@10")
LABELS = {"auc": "AUC", "mrr": "MRR", "ndcg@5": "nDCG@5", "ndcg@10": "nDCG@10"}
DASH = "—"
FEW = "too few impressions for an interval"


def as_data(report) -> Mapping:
    """A report (runs.report.Report or a dict that validates as one) as plain validated data."""
    return report.model_dump() if isinstance(report, Report) else Report.parse(report).model_dump()


# ---------------------------------------------------------------------------- formatting


def _num(v: object) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _fmt(v: object, digits: int = 4, sign: bool = False) -> str:
    x = _num(v)
    if x is None:
        return DASH
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _fmt_seconds(v: object) -> str:
    s = _num(v)
    if s is None:
        return DASH
    if s < 120:
        return f"{s:.1f} s"
    if s < 2 * 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _fmt_rate(v: object) -> str:
    r = _num(v)
    if r is None:
        return DASH
    return f"{r:,.1f}" if r < 100 else f"{r:,.0f}"


def _fmt_int(v: object) -> str:
    x = _num(v)
    return DASH if x is None else f"{int(x):,}"


def _level(report: Mapping) -> str:
    level = (report.get("bootstrap") or {}).get("level", 0.95)
    return f"{100 * float(level):g}%"


def _significance(entry: Mapping) -> str:
    """"up" when the interval lies above 0, "down" below, "" otherwise or undefined."""
    lo, hi = _num(entry.get("lo")), _num(entry.get("hi"))
    if lo is not None and lo > 0:
        return "up"
    if hi is not None and hi < 0:
        return "down"
    return ""


@dataclass(frozen=True)
class Cell:
    """One table cell, rendered for markdown and for HTML (already escaped)."""

    md: str
    html: str
    num: bool = False
    cls: str = ""


def _text(s: object, num: bool = False) -> Cell:
    s = DASH if s is None else str(s)
    return Cell(s, html.escape(s), num)


def _value_cell(entry: Mapping | None) -> Cell:
    if entry is None or _num(entry.get("value")) is None:
        return Cell(DASH, DASH, True)
    if _num(entry.get("lo")) is None:  # a slice too small for an interval
        v = _fmt(entry["value"])
        return Cell(f"{v} [{FEW}]", f'{v}<span class="ci">{FEW}</span>', True)
    v, lo, hi = _fmt(entry["value"]), _fmt(entry.get("lo")), _fmt(entry.get("hi"))
    return Cell(f"{v} [{lo}, {hi}]", f'{v}<span class="ci">{lo} – {hi}</span>', True)


def _delta_cell(entry: Mapping | None) -> Cell:
    if entry is None or _num(entry.get("diff")) is None:
        return Cell(DASH, DASH, True)
    if _num(entry.get("lo")) is None:
        d = _fmt(entry["diff"], sign=True)
        return Cell(f"{d} [{FEW}]", f'{d}<span class="ci">{FEW}</span>', True)
    d = _fmt(entry["diff"], sign=True)
    lo, hi = _fmt(entry.get("lo"), sign=True), _fmt(entry.get("hi"), sign=True)
    sig = _significance(entry)
    md = f"{d} [{lo}, {hi}]"
    return Cell(f"**{md}**" if sig else md, f'{d}<span class="ci">{lo} – {hi}</span>', True, sig)


@dataclass(frozen=True)
class Table:
    headers: list[Cell]
    rows: list[list[Cell]]
    row_classes: list[str] | None = None

    def markdown(self) -> str:
        def line(cells: list[Cell]) -> str:
            return "| " + " | ".join(c.md.replace("|", "\\|") for c in cells) + " |"

        rule = "|" + "|".join("---:" if h.num else "---" for h in self.headers) + "|"
        return "\n".join([line(self.headers), rule] + [line(r) for r in self.rows])

    def html(self) -> str:
        def cell(tag: str, c: Cell) -> str:
            cls = " ".join(x for x in ("num" if c.num else "", c.cls) if x)
            return f'<{tag}{f" class={chr(34)}{cls}{chr(34)}" if cls else ""}>{c.html}</{tag}>'

        head = "".join(cell("th", h) for h in self.headers)
        body = []
        for i, row in enumerate(self.rows):
            rc = (self.row_classes or [""] * len(self.rows))[i]
            attr = f' class="{rc}"' if rc else ""
            body.append(f"<tr{attr}>" + "".join(cell("td", c) for c in row) + "</tr>")
        return (f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead>'
                f'<tbody>{"".join(body)}</tbody></table></div>')


# ---------------------------------------------------------------------------- content


@dataclass(frozen=True)
class Verdict:
    run: str
    entry: Mapping  # the AUC difference
    kind: str  # "help", "hurt", "none"; "higher"/"lower" for runs that add no source
    adds_images: bool
    reference: str = ""

    def sentence(self, reference: str | None = None) -> str:
        reference = self.reference or reference
        e = self.entry
        words = {"help": "images help", "hurt": "images hurt", "higher": "significantly higher",
                 "lower": "significantly lower", "none": "no significant difference"}[self.kind]
        return (f"{self.run} vs {reference}: AUC {_fmt(e['diff'], sign=True)} "
                f"[{_fmt(e['lo'], sign=True)}, {_fmt(e['hi'], sign=True)}] {DASH} {words}")


def verdicts(report: Mapping) -> list[Verdict]:
    """The AUC verdict of every run compared with the reference, image runs first."""
    runs = {r["name"]: r for r in report["runs"]}
    out = []
    for name, delta in report["paired"].items():
        ref = reference_of(report, name)
        if name == ref:
            continue
        # Image-only runs replace text rather than add to it: they do not answer the question;
        # nor does adding only the cover flag (it tells that there is an image, not what it shows).
        added = set(runs[name]["sources"]) - set(runs[ref]["sources"])
        adds = set(runs[ref]["sources"]) < set(runs[name]["sources"]) and any(
            s.split(" ")[0] in ("image", "blip") for s in added)
        sig = _significance(delta["auc"])
        if adds:
            kind = {"up": "help", "down": "hurt"}.get(sig, "none")
        else:
            kind = {"up": "higher", "down": "lower"}.get(sig, "none")
        out.append(Verdict(name, delta["auc"], kind, adds, ref))
    out.sort(key=lambda v: not v.adds_images)
    return out


def _ref_phrase(report: Mapping) -> str:
    return "each run's reference" if report.get("references") else str(report["reference"])


def reference_of(report: Mapping, run: str) -> str:
    """The run that `run` is paired with: its entry in "references", else "reference"."""
    return (report.get("references") or {}).get(run, report["reference"])


QUESTIONS = {"content": "Does the cover's content help, beyond knowing that a news has a cover?",
             "presence": "Does having a cover help?"}
ANSWERS = {"yes": "yes", "no": "not significantly", "hurts": "no, it hurts", "undecided": "too few impressions to say"}


def question_sentences(report: Mapping) -> list[tuple[str, str]]:
    """(sentence, kind) for each of the report's questions that it answers, content first: each
    ranker's answer with its paired AUC difference; kind as `headline`'s."""
    out = []
    for kind, question in QUESTIONS.items():
        found = [q for q in report.get("questions") or [] if q["kind"] == kind]
        if not found:
            continue
        parts = [f"{ANSWERS[q['answer']]} for {q['ranker']} ({q['run']} vs {q['reference']}: AUC "
                 f"{_fmt(q['auc']['diff'], sign=True)} [{_fmt(q['auc']['lo'], sign=True)}, "
                 f"{_fmt(q['auc']['hi'], sign=True)}])" for q in found]
        answers = {q["answer"] for q in found}
        tone = "help" if answers == {"yes"} else "hurt" if answers == {"hurts"} else "none"
        out.append((f"{question} " + "; ".join(parts)[0].upper() + "; ".join(parts)[1:] + ".", tone))
    return out


def headline(report: Mapping) -> tuple[str, str]:
    """(sentence, kind) answering "do images help?"; kind is "help", "hurt" or "none".

    With the presence control (text+cover runs), the answer to "does the cover's content help
    beyond knowing there is a cover?". Otherwise it reads the runs whose sources strictly contain
    the reference's; without any, it says so and reports the best other comparison.
    """
    asked = question_sentences(report)
    if asked:
        return asked[0]
    ref = report["reference"]
    found = verdicts(report)
    if not found:
        return f"Only the reference run {ref} was scored: there is nothing to compare.", "none"

    def best(vs: list[Verdict]) -> Verdict:
        return max(vs, key=lambda v: _num(v.entry["diff"]) or -math.inf)

    kinds = {"help": "help", "higher": "help", "hurt": "hurt", "lower": "hurt", "none": "none"}
    image = [v for v in found if v.adds_images]
    if not image:
        top = best(found)
        return (f"No run adds a source to those of {ref}, so this report cannot say whether "
                f"images help. Best comparison: {top.sentence(ref)}.", kinds[top.kind])
    helps = [v for v in image if v.kind == "help"]
    neutral = [v for v in image if v.kind == "none"]
    if helps:
        return f"Do images help? Yes. {best(helps).sentence(ref)}.", "help"
    if neutral:
        return f"Do images help? Not significantly. {best(neutral).sentence(ref)}.", "none"
    return f"Do images help? No, they hurt. {best(image).sentence(ref)}.", "hurt"


def thesis_table(runs: Sequence[Mapping], digits: int = 3) -> str:
    """A markdown table in the format of the Zhao thesis: experiment | AUC | MRR | nDCG@5 | nDCG@10.

    Each run is {"name", "metrics": {metric: number or {"value": number}}} and an optional
    "source" shown after the name; values are fractions printed with `digits` decimals.
    """
    return _thesis(runs, digits).markdown()


def _thesis(runs: Sequence[Mapping], digits: int = 3) -> Table:
    headers = [_text("experiment")] + [_text(LABELS[m], num=True) for m in METRICS]
    rows = []
    for i, run in enumerate(runs):
        if "metrics" not in run or "name" not in run:
            raise ReportError(f"runs[{i}]: missing key {'name' if 'name' not in run else 'metrics'!r}")
        name = str(run["name"]) + (f" ({run['source']})" if run.get("source") else "")
        row = [_text(name)]
        for m in METRICS:
            v = run["metrics"].get(m)
            v = v.get("value") if isinstance(v, Mapping) else v
            row.append(_text(_fmt(v, digits), num=True))
        rows.append(row)
    return Table(headers, rows)


def _sources(run: Mapping) -> Cell:
    s = " + ".join(map(str, run["sources"])) or DASH
    if not run.get("fusion"):
        return _text(s)
    fusion = str(run["fusion"])
    return Cell(f"{s} · {fusion}", f'{html.escape(s)}<span class="sub">{html.escape(fusion)} fusion</span>')


def _run_name(name: str, reference: str) -> Cell:
    if name != reference:
        return _text(name)
    return Cell(f"{name} (reference)", f'{html.escape(name)}<span class="sub">reference</span>')


def _main_table(report: Mapping) -> Table:
    ref = report["reference"]
    share = any(_num(run.get("oracle_share")) is not None for run in report["runs"])
    seeded = any(run.get("seeds") for run in report["runs"])
    headers = ([_text("run"), _text("ranker"), _text("sources")]
               + [_text(LABELS[m], num=True) for m in METRICS]
               + ([_text("AUC of each seed", True)] if seeded else [])
               + ([_text("share of oracle lift", True)] if share else [])
               + [_text("impressions", True), _text("train time", True), _text("impressions / s", True)])
    rows, classes = [], []
    for run in report["runs"]:
        lift = _num(run.get("oracle_share"))
        rows.append([_run_name(run["name"], ref), _text(run["ranker"]), _sources(run)]
                    + [_value_cell(run["metrics"][m]) for m in METRICS]
                    + ([_text(" / ".join(_fmt(s["metrics"]["auc"], 3) for s in run.get("seeds") or []) or DASH,
                              True)] if seeded else [])
                    + ([_text(DASH if lift is None else f"{lift:.0%}", True)] if share else [])
                    + [_text(_fmt_int(run["impressions"]), True),
                       _text(_fmt_seconds(run.get("train_seconds")), True),
                       _text(_fmt_rate(run.get("train_impressions_per_s")), True)])
        classes.append("reference" if run["name"] == ref else "")
    return Table(headers, rows, classes)


def _paired_table(report: Mapping) -> Table:
    headers = ([_text("run"), _text("vs")] + [_text(f"Δ {LABELS[m]}", num=True) for m in METRICS]
               + [_text("p (AUC)", True), _text("verdict")])
    by_run = {v.run: v for v in verdicts(report)}
    rows = []
    for run in report["runs"]:
        delta = report["paired"].get(run["name"])
        if delta is None or run["name"] == reference_of(report, run["name"]):
            continue
        v = by_run[run["name"]]
        verdict = {"help": "images help", "hurt": "images hurt", "higher": "higher",
                   "lower": "lower", "none": "no significant difference"}[v.kind]
        rows.append([_text(run["name"]), _text(v.reference)] + [_delta_cell(delta[m]) for m in METRICS]
                    + [_text(_fmt(delta["auc"].get("p"), 3), True), _text(verdict)])
    return Table(headers, rows)


def _slice_overview(report: Mapping) -> Table:
    ref = report["reference"]
    slices = report.get("slices") or {}
    others = [r["name"] for r in report["runs"] if r["name"] != ref]
    headers = ([_text("slice"), _text("impressions", True), _text(f"{ref} AUC", True)]
               + [_text(f"Δ AUC {name}", True) for name in others])
    rows = []
    for sname, by_run in slices.items():
        base = by_run.get(ref) or next(iter(by_run.values()), {})
        row = [_text(sname), _text(_fmt_int(base.get("n")), True),
               _value_cell((by_run.get(ref) or {}).get("metrics", {}).get("auc"))]
        for name in others:
            delta = (by_run.get(name) or {}).get("delta")
            row.append(_delta_cell(delta["auc"] if delta else None))
        rows.append(row)
    return Table(headers, rows)


def _slice_detail(report: Mapping, by_run: Mapping) -> Table:
    ref = report["reference"]
    headers = ([_text("run"), _text("impressions", True), _text("skipped", True)]
               + [_text(LABELS[m], num=True) for m in METRICS] + [_text(f"Δ AUC vs {ref}", True)])
    rows, classes = [], []
    for run in report["runs"]:
        entry = by_run.get(run["name"])
        if entry is None:
            continue
        delta = entry.get("delta")
        rows.append([_run_name(run["name"], ref), _text(_fmt_int(entry["n"]), True),
                     _text(_fmt_int(entry.get("skipped")), True)]
                    + [_value_cell(entry["metrics"][m]) for m in METRICS]
                    + [_delta_cell(delta["auc"] if delta else None)])
        classes.append("reference" if run["name"] == ref else "")
    return Table(headers, rows, classes)


def _meta_lines(report: Mapping) -> list[str]:
    ds = report["dataset"]
    extra = ", ".join(f"{k}: {_plain(v)}" for k, v in ds.items() if k != "name")
    boot = report.get("bootstrap") or {}
    seeded = max((len(run.get("seeds") or []) for run in report["runs"]), default=0)
    how = f"{_level(report)} percentile bootstrap intervals over impressions" + (
        f" and the {seeded} training seeds (two-level)" if seeded > 1 else "")
    if boot.get("n_boot"):
        how += f", {_fmt_int(boot['n_boot'])} resamples"
    if boot.get("seed") is not None:
        how += f", seed {boot['seed']}"
    how += ("; differences are paired (the same resamples for both runs) and significant "
            "when their interval excludes 0")
    created = report["created"]
    created = created.isoformat() if isinstance(created, (_dt.datetime, _dt.date)) else created
    return [f"Created {created}.",
            f"Dataset: {ds['name']}" + (f" ({extra})." if extra else "."),
            how + "."]


def _plain(v: object) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def _notes(report: Mapping) -> list[str]:
    notes = [str(n) for n in report.get("notes") or []]
    notes += [f"{r['name']}: {r['notes']}" for r in report["runs"] if r.get("notes")]
    return notes


THESIS_NOTE = ("Three decimals, as in the thesis table. Rows with a source in parentheses are "
               "published numbers, not runs of this pipeline.")

PLOT_CAPTIONS = {
    "metrics_plot": "Every run's metrics with {level} intervals",
    "deltas_plot": "Paired differences from {ref} per slice, with {level} intervals",
    "cost_plot": "Training time per run",
}


def render_markdown(report: Mapping, plots: Mapping[str, str] | None = None) -> str:
    """The report as markdown; `plots` maps "metrics_plot" etc. to relative file names."""
    report = as_data(report)
    ref = report["reference"]
    level = _level(report)
    sentence, _ = headline(report)
    out = [f"# {report['title']}", "", *(_meta_lines(report)), "", f"**{sentence}**", ""]
    out += [f"**{s}**\n" for s, _ in question_sentences(report)[1:]]
    out += [f"- {v.sentence(ref)}" for v in verdicts(report)]
    out += ["", f"## Results ({level} intervals)", "", _main_table(report).markdown(), ""]
    paired = _paired_table(report)
    if paired.rows:
        out += [f"## Paired differences from {_ref_phrase(report)}", "",
                f"Run minus {_ref_phrase(report)} on the same impressions, with {level} intervals; "
                "bold where the interval excludes 0.", "", paired.markdown(), ""]
    slices = report.get("slices") or {}
    if slices:
        out += ["## Slices", "", f"Δ AUC from {_ref_phrase(report)} on each slice.", "",
                _slice_overview(report).markdown(), ""]
        for sname, by_run in slices.items():
            out += [f"### {sname}", "", _slice_detail(report, by_run).markdown(), ""]
    out += ["## In the format of the thesis", "", THESIS_NOTE, "",
            _thesis(list(report["runs"]) + list(report.get("baselines") or [])).markdown(), ""]
    if plots:
        out += ["## Plots", ""]
        for key, name in plots.items():
            caption = PLOT_CAPTIONS.get(key, key).format(level=level, ref=_ref_phrase(report))
            out += [f"![{caption}]({name})", ""]
    if report.get("config"):
        config = json.dumps(report["config"], indent=2, ensure_ascii=False, default=str)
        out += ["## Configuration", "", "```json", config, "```", ""]
    notes = _notes(report)
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)


CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --soft: #f6f8fa;
        --up: #1a7f37; --down: #cf222e; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff; line-height: 1.5; font-size: 15px;
       font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue",
       "Noto Sans", "DejaVu Sans", Arial, sans-serif; }
main { max-width: 1400px; margin: 0 auto; padding: 28px 28px 64px; }
h1 { font-size: 1.85rem; line-height: 1.25; margin: 0 0 6px; }
h2 { font-size: 1.3rem; margin: 34px 0 8px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 1.05rem; margin: 18px 0 6px; }
p { margin: 6px 0; }
.meta { color: var(--muted); margin: 0 0 18px; }
.meta p { margin: 2px 0; }
.headline { margin: 18px 0 8px; padding: 14px 18px; border-radius: 8px; border-left: 6px solid;
            font-size: 1.2rem; font-weight: 600; }
.headline.help { background: #dafbe1; border-color: var(--up); }
.headline.hurt { background: #ffebe9; border-color: var(--down); }
.headline.none { background: #fff8c5; border-color: #9a6700; }
ul.verdicts { margin: 6px 0 0; padding-left: 22px; color: var(--muted); }
.table-wrap { overflow-x: auto; margin: 8px 0 14px; }
table { border-collapse: collapse; font-size: 0.9rem; }
th, td { padding: 6px 9px; border-bottom: 1px solid var(--line); vertical-align: top; text-align: left; }
thead th { background: var(--soft); border-bottom: 2px solid var(--line); font-weight: 600;
           vertical-align: bottom; }
.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td .ci { display: block; font-size: 0.78rem; color: var(--muted); font-weight: 400; }
td.up { color: var(--up); font-weight: 600; }
td.down { color: var(--down); font-weight: 600; }
td .sub { display: block; font-size: 0.78rem; color: var(--muted); }
td:nth-child(2), td:nth-child(3) { white-space: nowrap; }
thead th.num { white-space: normal; }
tr.reference td { background: #fbfcfd; }
tbody tr:hover td { background: #f3f6f9; }
.note { color: var(--muted); font-size: 0.9rem; }
details { margin: 6px 0; }
summary { cursor: pointer; font-weight: 600; padding: 4px 0; }
figure { margin: 14px 0 22px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }
figcaption { color: var(--muted); font-size: 0.9rem; margin-top: 4px; }
pre { background: var(--soft); border: 1px solid var(--line); border-radius: 6px; padding: 12px 14px;
      overflow-x: auto; font-size: 0.82rem; line-height: 1.4; }
code, pre { font-family: ui-monospace, SFMono-Regular, "DejaVu Sans Mono", Menlo, Consolas, monospace; }
"""


def render_html(report: Mapping, plots: Mapping[str, str] | None = None) -> str:
    """The report as one self-contained HTML page (inline CSS; plots by relative path)."""
    report = as_data(report)
    esc = html.escape
    ref = report["reference"]
    level = _level(report)
    sentence, kind = headline(report)
    parts = [f"<h1>{esc(report['title'])}</h1>",
             '<div class="meta">' + "".join(f"<p>{esc(x)}</p>" for x in _meta_lines(report)) + "</div>",
             f'<div class="headline {kind}">{esc(sentence)}</div>']
    parts += [f'<div class="headline {k}">{esc(s)}</div>' for s, k in question_sentences(report)[1:]]
    found = verdicts(report)
    if len(found) > 1:
        items = "".join(f"<li>{esc(v.sentence(ref))}</li>" for v in found)
        parts.append(f'<ul class="verdicts">{items}</ul>')
    parts += [f"<h2>Results <small>({esc(level)} intervals)</small></h2>", _main_table(report).html()]
    paired = _paired_table(report)
    if paired.rows:
        parts += [f"<h2>Paired differences from {esc(_ref_phrase(report))}</h2>",
                  f'<p class="note">Run minus {esc(_ref_phrase(report))} on the same impressions, with {esc(level)} '
                  "intervals; coloured where the interval excludes 0.</p>", paired.html()]
    slices = report.get("slices") or {}
    if slices:
        parts += ["<h2>Slices</h2>", f'<p class="note">Δ AUC from {esc(_ref_phrase(report))} on each slice; '
                  "open a slice for all metrics.</p>", _slice_overview(report).html()]
        for sname, by_run in slices.items():
            detail = _slice_detail(report, by_run).html()
            parts.append(f"<details><summary>{esc(sname)}</summary>{detail}</details>")
    if plots:
        parts.append("<h2>Plots</h2>")
        for key, name in plots.items():
            caption = esc(PLOT_CAPTIONS.get(key, key).format(level=level, ref=_ref_phrase(report)))
            parts.append(f'<figure><img src="{esc(name)}" alt="{caption}">'
                         f"<figcaption>{caption}</figcaption></figure>")
    parts += ["<h2>In the format of the thesis</h2>", f'<p class="note">{esc(THESIS_NOTE)}</p>',
              _thesis(list(report["runs"]) + list(report.get("baselines") or [])).html()]
    if report.get("config"):
        config = json.dumps(report["config"], indent=2, ensure_ascii=False, default=str)
        parts += ["<h2>Configuration</h2>", f"<pre><code>{esc(config)}</code></pre>"]
    notes = _notes(report)
    if notes:
        parts += ["<h2>Notes</h2>", "<ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{esc(report['title'])}</title>\n<style>{CSS}</style>\n</head>\n"
            "<body>\n<main>\n" + "\n".join(parts) + "\n</main>\n</body>\n</html>\n")


# ---------------------------------------------------------------------------- plots

PALETTE = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3",
           "#8c8c8c", "#ccb974", "#64b5cd")
REFERENCE_COLOR = "#6e7781"


def _colors(report: Mapping) -> dict[str, str]:
    others = [r["name"] for r in report["runs"] if r["name"] != report["reference"]]
    colors = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(others)}
    colors[report["reference"]] = REFERENCE_COLOR
    return colors


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _style(ax) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.tick_params(labelsize=9)


def plot_metrics(report: Mapping):
    runs = report["runs"]
    colors = _colors(report)
    fig = _figure(10, 4.6)
    ax = fig.add_subplot()
    width = 0.8 / len(runs)
    top = 0.0
    for j, run in enumerate(runs):
        vals, lo_err, hi_err = [], [], []
        for m in METRICS:
            e = run["metrics"][m]
            v, lo, hi = _num(e["value"]), _num(e["lo"]), _num(e["hi"])
            vals.append(v if v is not None else np.nan)
            lo_err.append(v - lo if v is not None and lo is not None else 0.0)
            hi_err.append(hi - v if v is not None and hi is not None else 0.0)
            top = max(top, hi or v or 0.0)
        x = np.arange(len(METRICS)) - 0.4 + width * (j + 0.5)
        ax.bar(x, vals, width * 0.92, yerr=[lo_err, hi_err], capsize=3, color=colors[run["name"]],
               error_kw={"elinewidth": 1, "ecolor": "#24292f"}, label=run["name"])
        if len(runs) <= 6:
            for xi, v, h in zip(x, vals, hi_err):
                if np.isfinite(v):
                    ax.text(xi, v + h + 0.008, f"{v:.3f}", ha="center", va="bottom", fontsize=7,
                            rotation=90 if len(runs) > 3 else 0)
    ax.set_xticks(np.arange(len(METRICS)), [LABELS[m] for m in METRICS], fontsize=10)
    ax.set_ylim(0, min(1.0, top * 1.18 + 0.02))
    ax.set_ylabel("score")
    ax.grid(axis="y", color="#e6e9ec", linewidth=0.8)
    ax.set_axisbelow(True)
    _style(ax)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=min(len(runs), 4), frameon=False, fontsize=9)
    ax.set_title(f"Metrics per run ({_level(report)} bootstrap intervals)", fontsize=11, loc="left")
    return fig


def _delta_groups(report: Mapping) -> list[tuple[str, dict[str, Mapping]]]:
    """[(label, {run: delta dict})]: overall first (from `paired` unless a slice is "all")."""
    ref = report["reference"]
    slices = report.get("slices") or {}
    groups = []
    if "all" not in slices:
        n = next(r["impressions"] for r in report["runs"] if r["name"] == ref)
        groups.append((f"all (n={_fmt_int(n)})", dict(report["paired"])))
    for sname, by_run in slices.items():
        n = (by_run.get(ref) or next(iter(by_run.values()), {})).get("n")
        deltas = {name: e["delta"] for name, e in by_run.items() if name != ref and e.get("delta")}
        groups.append((f"{sname} (n={_fmt_int(n)})", deltas))
    return groups


def plot_deltas(report: Mapping):
    ref = report["reference"]
    others = [r["name"] for r in report["runs"] if r["name"] != ref]
    groups = _delta_groups(report)
    if not others or not any(d for _, d in groups):
        return None
    colors = _colors(report)
    rows = len(groups)
    fig = _figure(11, 1.6 + 0.32 * rows * max(1, len(others)) * 1.2 + 0.6)
    axes = fig.subplots(1, len(METRICS), sharey=True)
    step = 0.7 / max(1, len(others))
    for ax, m in zip(axes, METRICS):
        ax.axvline(0, color="#24292f", linewidth=0.9)
        for j, name in enumerate(others):
            ys, xs, lo_err, hi_err = [], [], [], []
            for i, (_, deltas) in enumerate(groups):
                e = (deltas.get(name) or {}).get(m)
                if e is None or _num(e.get("diff")) is None or _num(e.get("lo")) is None:
                    continue  # no estimate, or too few impressions for an interval
                d, lo, hi = _num(e["diff"]), _num(e["lo"]), _num(e["hi"])
                ys.append(i - 0.35 + step * (j + 0.5))
                xs.append(d)
                lo_err.append(d - lo if lo is not None else 0.0)
                hi_err.append(hi - d if hi is not None else 0.0)
            if xs:
                ax.errorbar(xs, ys, xerr=[lo_err, hi_err], fmt="o", markersize=4, capsize=2.5,
                            color=colors[name], elinewidth=1.2, label=name)
        for i, (_, deltas) in enumerate(groups):
            entries = [(d or {}).get(m, {}) for d in deltas.values()]
            if not any(_num(e.get("diff")) is not None for e in entries):
                note = "no scored impressions"
            elif not any(_num(e.get("lo")) is not None for e in entries):
                note = "too few impressions for an interval"
            else:
                continue
            ax.text(0, i, note, ha="center", va="center", fontsize=8,
                    color="#8c959f", bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
        ax.set_title(f"Δ {LABELS[m]}", fontsize=10)
        ax.grid(axis="x", color="#e6e9ec", linewidth=0.8)
        ax.set_axisbelow(True)
        for i in range(1, rows):
            ax.axhline(i - 0.5, color="#eef1f4", linewidth=0.8)
        _style(ax)
    axes[0].set_yticks(np.arange(rows), [label for label, _ in groups], fontsize=9)
    axes[0].set_ylim(rows - 0.5, -0.5)
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:
        for ax in axes[1:]:
            handles, labels = ax.get_legend_handles_labels()
            if handles:
                break
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(others), 4), frameon=False, fontsize=9)
    fig.suptitle(f"Paired differences from {_ref_phrase(report)} ({_level(report)} intervals; right of 0 = better)",
                 fontsize=11, x=0.01, ha="left")
    return fig


def plot_cost(report: Mapping):
    runs = [r for r in report["runs"] if _num(r.get("train_seconds")) is not None]
    if not runs:
        return None
    colors = _colors(report)
    secs = np.array([_num(r["train_seconds"]) for r in runs])
    if secs.max() >= 2 * 3600:
        scale, unit = 3600, "hours"
    else:
        scale, unit = (60, "minutes") if secs.max() >= 120 else (1, "seconds")
    fig = _figure(10, 1.2 + 0.45 * len(runs))
    ax = fig.add_subplot()
    y = np.arange(len(runs))
    ax.barh(y, secs / scale, color=[colors[r["name"]] for r in runs], height=0.6)
    for yi, r, s in zip(y, runs, secs):
        rate = _num(r.get("train_impressions_per_s"))
        label = _fmt_seconds(s) + (f"  ·  {_fmt_rate(rate)} impressions/s" if rate is not None else "")
        ax.text(s / scale, yi, "  " + label, va="center", fontsize=8)
    ax.set_yticks(y, [r["name"] for r in runs], fontsize=9)
    ax.set_ylim(len(runs) - 0.5, -0.5)
    ax.set_xlim(0, secs.max() / scale * 1.45)
    ax.set_xlabel(f"training time ({unit})")
    ax.grid(axis="x", color="#e6e9ec", linewidth=0.8)
    ax.set_axisbelow(True)
    _style(ax)
    ax.set_title("Training cost per run", fontsize=11, loc="left")
    return fig


PLOTS = {"metrics_plot": plot_metrics, "deltas_plot": plot_deltas, "cost_plot": plot_cost}
"""File key -> drawing function (a figure, or None where there is nothing to draw)."""


def write_report(folder: str | os.PathLike[str], report: Report | Mapping) -> dict[str, Path]:
    """Validate `report` and write report.md, report.html, metrics.json and the plots.

    Returns {"markdown", "html", "json", "metrics_plot", and where drawn "deltas_plot",
    "cost_plot"} -> path. Files are replaced atomically.
    """
    model = report if isinstance(report, Report) else Report.parse(report)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    plots: dict[str, str] = {}
    data = model.model_dump()
    for key, draw in PLOTS.items():
        fig = draw(data)
        if fig is not None:
            path = folder / FILES[key]
            with atomic.atomic_open(path, "wb") as handle:
                fig.savefig(handle, format="png", dpi=fig.dpi)
            written[key] = path
            plots[key] = path.name
    written["markdown"] = atomic.write_text(folder / FILES["markdown"], render_markdown(model, plots))
    written["html"] = atomic.write_text(folder / FILES["html"], render_html(model, plots))
    written["json"] = atomic.write_text(folder / FILES["json"], model.model_dump_json(indent=2) + "\n")
    return written
