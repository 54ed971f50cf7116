"""The report writer: files, JSON round trip, headline, HTML well-formedness, schema errors."""

from __future__ import annotations

import copy
import json
from html.parser import HTMLParser

import numpy as np
import pytest

from rankers.stats import METRICS, slice_metrics
from runs.render import headline, render_markdown, thesis_table
from runs.render import write_report
from runs.report import ReportError

VOID = {"meta", "img", "br", "hr", "link", "input", "source", "col", "wbr"}


def values(v: float, half: float = 0.01) -> dict:
    return {m: {"value": v - 0.1 * i, "lo": v - 0.1 * i - half, "hi": v - 0.1 * i + half}
            for i, m in enumerate(METRICS)}


def delta(d: float, half: float = 0.01, p: float = 0.5) -> dict:
    return {m: {"diff": d, "lo": d - half, "hi": d + half, "p": p} for m in METRICS}


def run(name, sources, fusion=None, v=0.65, seconds=3600.0, rate=20.0, notes=None) -> dict:
    return {"name": name, "ranker": "nrms", "sources": sources, "fusion": fusion,
            "metrics": values(v), "impressions": 1000, "train_seconds": seconds,
            "train_impressions_per_s": rate, "notes": notes}


def make_report(image_diff: float = 0.03) -> dict:
    return {
        "title": "Do images help? <synthetic> & co",
        "created": "2026-11-23T18:00:00",
        "dataset": {"name": "synthetic-tiny", "split": "dev", "impressions": 1000},
        "reference": "text",
        "runs": [
            run("text", ["text"]),
            run("text+image (hadamard)", ["text", "image"], "hadamard", v=0.65 + image_diff,
                notes="best epoch 2"),
            run("image", ["image"], v=0.55, seconds=None, rate=None),
        ],
        "paired": {"text+image (hadamard)": delta(image_diff), "image": delta(-0.1, p=1.0)},
        "slices": {
            "history 0": {
                "text": {"n": 0, "skipped": 0, "metrics": values(float("nan")), "delta": None},
                "text+image (hadamard)": {"n": 0, "skipped": 0, "metrics": values(float("nan")),
                                          "delta": delta(float("nan"))},
                "image": {"n": 0, "skipped": 0, "metrics": values(float("nan")),
                          "delta": delta(float("nan"))},
            },
            "with cover": {
                "text": {"n": 600, "skipped": 400, "metrics": values(0.6), "delta": None},
                "text+image (hadamard)": {"n": 600, "skipped": 400, "metrics": values(0.64),
                                          "delta": delta(0.04)},
                "image": {"n": 600, "skipped": 400, "metrics": values(0.5), "delta": delta(-0.1)},
            },
        },
        "baselines": [{"name": "4: fine-tuned BERT only", "source": "Zhao 2024",
                       "metrics": {"auc": 0.689, "mrr": 0.306, "ndcg@5": 0.336, "ndcg@10": 0.4}}],
        "bootstrap": {"n_boot": 1000, "level": 0.95, "seed": 0},
        "notes": ["a note with <html> & pipes | inside"],
        "config": {"epochs": 3, "lr": 1e-4, "path": "storage/data/x"},
    }


class Page(HTMLParser):
    """Collects image sources and links and checks that every element is closed in order."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.images: list[str] = []
        self.refs: list[str] = []
        self.tags: set[str] = set()
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        for key in ("src", "href"):
            if attrs.get(key):
                self.refs.append(attrs[key])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1:]}>"
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def test_write_report_writes_every_file(tmp_path):
    files = write_report(tmp_path / "out", make_report())
    assert set(files) == {"markdown", "html", "json", "metrics_plot", "deltas_plot", "cost_plot"}
    for path in files.values():
        assert path.parent == tmp_path / "out" and path.stat().st_size > 0
    for key in ("metrics_plot", "deltas_plot", "cost_plot"):
        assert files[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["report.md", "report.html", "metrics.json", "metrics.png", "deltas.png", "cost.png"])


def test_metrics_json_round_trips_without_nan(tmp_path):
    report = make_report()
    report["runs"][0]["metrics"]["auc"]["value"] = np.float64(0.65)  # numpy from rankers.stats
    files = write_report(tmp_path, report)
    text = files["json"].read_text()

    def refuse(name):
        raise AssertionError(f"metrics.json holds {name}")

    loaded = json.loads(text, parse_constant=refuse)
    assert loaded["slices"]["history 0"]["text"]["metrics"]["auc"]["value"] is None
    assert loaded["runs"][0]["metrics"]["auc"]["value"] == 0.65
    assert loaded["runs"][1]["name"] == "text+image (hadamard)"
    # What was written can be written again, and gives the same JSON.
    again = write_report(tmp_path / "again", loaded)
    assert again["json"].read_text() == text


def test_markdown_names_every_run_and_answers_the_question(tmp_path):
    report = make_report()
    md = write_report(tmp_path, report)["markdown"].read_text()
    for r in report["runs"]:
        assert r["name"] in md
    sentence, kind = headline(report)
    assert kind == "help"
    assert sentence in md
    assert "text+image (hadamard) vs text: AUC +0.0300 [+0.0200, +0.0400]" in sentence
    assert "images help" in sentence
    assert "0.6800 [0.6700, 0.6900]" in md  # value [lo, hi] in the main table
    assert "](metrics.png)" in md and "](deltas.png)" in md and "](cost.png)" in md
    assert "| experiment | AUC | MRR | nDCG@5 | nDCG@10 |" in md
    assert "a note with <html> & pipes \\| inside" not in md  # notes are list items, not cells
    assert "best epoch 2" in md


@pytest.mark.parametrize("diff, kind, words", [
    (0.03, "help", "Yes"),
    (0.005, "none", "Not significantly"),
    (-0.03, "hurt", "No, they hurt"),
])
def test_the_headline_follows_the_paired_interval(diff, kind, words):
    sentence, got = headline(make_report(image_diff=diff))
    assert got == kind
    assert words in sentence and "text+image (hadamard) vs text" in sentence
    assert "image vs text" not in sentence  # an image-only run does not answer the question


def test_without_a_run_adding_images_the_headline_says_so():
    report = make_report()
    report["runs"] = [r for r in report["runs"] if r["name"] != "text+image (hadamard)"]
    report["paired"].pop("text+image (hadamard)")
    report["slices"] = {}
    sentence, kind = headline(report)
    assert "cannot say whether images help" in sentence
    assert "image vs text: AUC -0.1000 [-0.1100, -0.0900]" in sentence and kind == "hurt"


def test_a_single_run_has_nothing_to_compare(tmp_path):
    report = make_report()
    report["runs"] = report["runs"][:1]
    report["paired"] = {}
    report["slices"] = {}
    files = write_report(tmp_path, report)
    assert "deltas_plot" not in files and not (tmp_path / "deltas.png").exists()
    assert "nothing to compare" in files["markdown"].read_text()


def test_html_is_well_formed_and_self_contained(tmp_path):
    files = write_report(tmp_path, make_report())
    page = Page()
    page.feed(files["html"].read_text())
    page.close()
    assert page.stack == []
    assert {"html", "head", "style", "body", "table"} <= page.tags
    assert "script" not in page.tags and "link" not in page.tags
    assert sorted(page.images) == ["cost.png", "deltas.png", "metrics.png"]
    for ref in page.refs:
        assert "://" not in ref and (tmp_path / ref).is_file()
    text = "".join(page.text)
    assert "Do images help? <synthetic> & co" in text  # escaped in the source, intact as text
    assert "a note with <html> & pipes | inside" in text
    assert "Do images help? Yes." in text


def test_a_report_from_rankers_stats_is_written(tmp_path):
    rng = np.random.default_rng(0)
    sizes = rng.integers(2, 20, 120)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    labels = (rng.random(offsets[-1]) < 0.2).astype(np.int8)
    labels[offsets[:-1]] = 1
    labels[offsets[:-1] + 1] = 0
    runs = {"text": labels + rng.normal(0, 1, offsets[-1]),
            "text+image": labels + rng.normal(0, 0.5, offsets[-1])}
    history = np.full(120, 8)  # "history 0" stays empty: NaN values must become null
    history[:5] = 25  # "history 20+" holds 5 impressions: values without an interval
    sl = slice_metrics(offsets, labels, runs, "text", history_lengths=history,
                       cand_items=rng.integers(0, 30, offsets[-1]),
                       has_cover=rng.random(30) < 0.5, n_boot=100)
    report = make_report()
    report["runs"] = [
        {"name": "text", "ranker": "nrms", "sources": ["text"], "metrics": sl["all"]["text"]["metrics"],
         "impressions": sl["all"]["text"]["n"]},
        {"name": "text+image", "ranker": "nrms", "sources": ["text", "image"],
         "metrics": sl["all"]["text+image"]["metrics"], "impressions": sl["all"]["text+image"]["n"]},
    ]
    report["paired"] = {"text+image": sl["all"]["text+image"]["delta"]}
    report["slices"] = sl
    files = write_report(tmp_path, report)
    assert "cost_plot" not in files  # no run has a training time
    assert headline(report)[1] == "help"
    json.loads(files["json"].read_text(), parse_constant=lambda c: pytest.fail(c))
    markdown = files["markdown"].read_text()
    small = next(line for line in markdown.splitlines() if line.startswith("| history 20+"))
    assert "too few impressions for an interval" in small and "**" not in small  # no verdict either


@pytest.mark.parametrize("breaks, message", [
    (lambda r: r.pop("runs"), "report: missing key 'runs'"),
    (lambda r: r.pop("title"), "report: missing key 'title'"),
    (lambda r: r["runs"][1].pop("metrics"), "report[\"runs\"][1] ('text+image (hadamard)'): missing key 'metrics'"),
    (lambda r: r["runs"][0]["metrics"].pop("ndcg@10"), "missing key 'ndcg@10'"),
    (lambda r: r["runs"][0]["metrics"]["auc"].pop("lo"), "[\"metrics\"][\"auc\"]: missing key 'lo'"),
    (lambda r: r["paired"]["image"]["mrr"].pop("p"), "missing key 'p'"),
    (lambda r: r.update(reference="bert"), "'bert' is not a run"),
    (lambda r: r["paired"].update(nope=r["paired"]["image"]), "'nope' is not a run"),
    (lambda r: r["runs"].append(copy.deepcopy(r["runs"][0])), "used twice"),
    (lambda r: r["runs"][0].update(sources="text"), "list of source names"),
    (lambda r: r["dataset"].pop("name"), "report[\"dataset\"]: missing key 'name'"),
    (lambda r: r["slices"]["with cover"]["image"].pop("n"), "missing key 'n'"),
])
def test_a_malformed_report_names_what_is_missing(tmp_path, breaks, message):
    report = make_report()
    breaks(report)
    with pytest.raises(ReportError) as err:
        write_report(tmp_path, report)
    assert message in str(err.value)
    assert not (tmp_path / "report.md").exists()


def test_thesis_table_has_the_thesis_format():
    table = thesis_table([
        {"name": "random", "metrics": {"auc": 0.5, "mrr": 0.2013, "ndcg@5": 0.203, "ndcg@10": 0.267}},
        {"name": "text", "metrics": values(0.6891)},
        {"name": "gap", "metrics": {"auc": float("nan"), "mrr": None, "ndcg@5": 0.3, "ndcg@10": 0.4}},
    ])
    lines = table.splitlines()
    assert lines[0] == "| experiment | AUC | MRR | nDCG@5 | nDCG@10 |"
    assert lines[1] == "|---|---:|---:|---:|---:|"
    assert lines[2] == "| random | 0.500 | 0.201 | 0.203 | 0.267 |"
    assert lines[3] == "| text | 0.689 | 0.589 | 0.489 | 0.389 |"
    assert lines[4] == "| gap | — | — | 0.300 | 0.400 |"
    with pytest.raises(ReportError, match="missing key 'metrics'"):
        thesis_table([{"name": "x"}])


def test_render_markdown_is_deterministic():
    report = make_report()
    assert render_markdown(report, {"metrics_plot": "metrics.png"}) == render_markdown(
        copy.deepcopy(report), {"metrics_plot": "metrics.png"})
