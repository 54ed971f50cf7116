"""The synthetic MIND + IM-MIND world: formats, determinism, consistency and planted signal.

Worlds are generated at the tiny scale (well under a second each) and parsed here with
plain Python, independently of storage.mind, so a reader bug cannot hide a generator bug.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from storage.cards import CARD_SIZE, COVER_BOX, render_card, wrap_title
from storage.errors import PipelineError
from storage.synthetic import CLICKS, SCALES, generate_world, main

ENTITY_KEYS = ["Label", "Type", "WikidataId", "Confidence", "OccurrenceOffsets", "SurfaceForms"]
TIME_RE = re.compile(r"^(\d{1,2})/(\d{1,2})/(\d{4}) (\d{1,2}):(\d{2}):(\d{2}) (AM|PM)$")


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("worlds")
    out = {}
    for name, seed, images in (("a", 0, True), ("b", 0, True), ("c", 1, True), ("noimg", 0, False)):
        out[name] = root / name
        generate_world(out[name], "tiny", seed, images=images)
    return out


@pytest.fixture(scope="module")
def world(worlds) -> Path:
    return worlds["a"]


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _rows(path: Path) -> list[list[str]]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n") and "\r" not in text
    return [line.split("\t") for line in text.split("\n")[:-1]]


def _unix(text: str) -> int:
    m = TIME_RE.match(text)
    assert m, f"bad time {text!r}"
    mo, d, y, h, mi, s, ampm = m.groups()
    hour = int(h) % 12 + (12 if ampm == "PM" else 0)
    dt = datetime.datetime(int(y), int(mo), int(d), hour, int(mi), int(s), tzinfo=datetime.timezone.utc)
    return int(dt.timestamp())


def _behaviors(world: Path, split: str) -> list[dict]:
    out = []
    for row in _rows(world / split / "behaviors.tsv"):
        assert len(row) == 5, row
        cands = row[4].split(" ")
        labeled = split != "test"
        out.append({
            "id": int(row[0]),
            "user": row[1],
            "time": _unix(row[2]),
            "history": row[3].split(" ") if row[3] else [],
            "cands": [c.rsplit("-", 1)[0] for c in cands] if labeled else cands,
            "labels": [int(c.rsplit("-", 1)[1]) for c in cands] if labeled else None,
        })
    return out


def _hidden(world: Path, name: str) -> dict[str, dict[str, str]]:
    rows = _rows(world / "hidden" / name)
    head = rows[0]
    return {r[0]: dict(zip(head, r)) for r in rows[1:]}


def _bracketed(path: Path) -> list[tuple[int, list[str]]]:
    out = []
    for line in path.read_text().splitlines():
        m = re.fullmatch(r"(\d+) \[([^\] ]*)\]", line)
        assert m, f"{path}: bad line {line!r}"
        out.append((int(m.group(1)), m.group(2).split(",")))
    return out


def test_same_seed_same_bytes_other_seed_other_bytes(worlds):
    a, b, c = _hashes(worlds["a"]), _hashes(worlds["b"]), _hashes(worlds["c"])
    assert any(k.startswith("images/") for k in a)
    assert a == b
    assert a.keys() != c.keys() or a != c
    for f in ("train/behaviors.tsv", "dev/news.tsv", "dev/click_probs.txt", "hidden/users.tsv"):
        assert a[f] != c[f], f


def test_images_do_not_change_the_text(worlds):
    a, n = _hashes(worlds["a"]), _hashes(worlds["noimg"])
    assert not any(k.startswith("images/") for k in n)
    for k, v in n.items():
        if k != "world.json":
            assert a[k] == v, k


def test_layout_and_columns(world):
    for split in ("train", "dev", "test"):
        news = _rows(world / split / "news.tsv")
        assert news and all(len(r) == 8 for r in news)
        assert all(re.fullmatch(r"N\d+", r[0]) for r in news)
        assert len({r[0] for r in news}) == len(news)
        beh = _behaviors(world, split)
        assert [b["id"] for b in beh] == list(range(1, len(beh) + 1))
        assert all(re.fullmatch(r"U\d+", b["user"]) for b in beh)
    assert (world / "dev" / "click_probs.txt").is_file() and (world / "test" / "truth.txt").is_file()
    doc = json.loads((world / "world.json").read_text())
    assert doc["params"]["scale"] == "tiny"
    assert doc["click_model"]["visual_weight"] == doc["params"]["visual_weight"] == CLICKS.visual_weight == 4.0
    assert doc["click_model"]["cover_effect"] == doc["params"]["cover_effect"] == CLICKS.cover_effect == 0.8
    assert doc["click_model"]["visual_centre"] == pytest.approx(1 / len(doc["visual_styles"]))
    assert len(_rows(world / "train" / "news.tsv")[0]) == 8


def test_entities_are_mind_json_with_correct_offsets(world):
    rows = _rows(world / "train" / "news.tsv")
    n_mentions = 0
    for r in rows:
        for text, column in ((r[3], r[6]), (r[4], r[7])):
            if column == "":
                assert text == ""  # only an empty abstract has an empty entity column
                continue
            for ent in json.loads(column):
                assert list(ent) == ENTITY_KEYS
                assert re.fullmatch(r"Q\d+", ent["WikidataId"]) and ent["Type"] in "POG"
                assert len(ent["OccurrenceOffsets"]) == len(ent["SurfaceForms"]) >= 1
                for off, form in zip(ent["OccurrenceOffsets"], ent["SurfaceForms"]):
                    assert text[off : off + len(form)] == form
                    n_mentions += 1
    assert n_mentions > len(rows) // 2
    assert any(r[4] == "" for r in _rows(world / "test" / "news.tsv") + rows)
    assert any(r[6] == "[]" for r in rows)


def test_every_referenced_news_is_in_the_split(world):
    for split in ("train", "dev", "test"):
        ids = {r[0] for r in _rows(world / split / "news.tsv")}
        for b in _behaviors(world, split):
            assert set(b["history"]) <= ids and set(b["cands"]) <= ids
            assert len(set(b["cands"])) == len(b["cands"])


def test_time_order_of_splits(world):
    times = {s: [b["time"] for b in _behaviors(world, s)] for s in ("train", "dev", "test")}
    day = 86_400
    assert max(times["train"]) < min(times["dev"]) and max(times["dev"]) < min(times["test"])
    assert min(times["dev"]) // day == max(times["train"]) // day + 1  # dev: the day after train
    assert max(times["dev"]) // day == min(times["dev"]) // day  # one day


def test_histories_are_earlier_news_and_grow_consistently(world):
    published = {k: int(v["published"]) for k, v in _hidden(world, "news.tsv").items()}
    by_user: dict[str, list[tuple[int, str, list[str]]]] = {}
    for split in ("train", "dev", "test"):
        for b in _behaviors(world, split):
            assert len(set(b["history"])) == len(b["history"])
            assert all(published[n] < b["time"] for n in b["history"] + b["cands"])
            by_user.setdefault(b["user"], []).append((b["time"], split, b["history"]))
    for events in by_user.values():
        events.sort()
        for (_, s0, h0), (_, s1, h1) in zip(events, events[1:]):
            assert h1[: len(h0)] == h0  # a later history extends an earlier one
            if s0 == s1 != "train":
                assert h0 == h1  # fixed within dev and within test: no label leaks


def test_cold_start_and_a_mix_of_history_lengths(world):
    lengths = np.array([len(b["history"]) for s in ("train", "dev", "test") for b in _behaviors(world, s)])
    assert (lengths == 0).sum() > 0
    assert ((lengths >= 1) & (lengths <= 4)).sum() > 0
    assert (lengths >= 20).sum() > 0


def test_clicks_labels_and_truth(world):
    for split in ("train", "dev"):
        beh = _behaviors(world, split)
        assert all(sum(b["labels"]) >= 1 for b in beh)
        assert all(set(b["labels"]) <= {0, 1} for b in beh)
    raw = (world / "test" / "behaviors.tsv").read_text()
    assert "-0" not in raw and "-1" not in raw
    test = _behaviors(world, "test")
    truth = _bracketed(world / "test" / "truth.txt")
    assert [i for i, _ in truth] == [b["id"] for b in test]
    for (_, labels), b in zip(truth, test):
        assert len(labels) == len(b["cands"]) and set(labels) <= {"0", "1"} and "1" in labels


def test_click_probs_align_with_candidates_and_the_hidden_model(world):
    dev = _behaviors(world, "dev")
    probs = _bracketed(world / "dev" / "click_probs.txt")
    assert [i for i, _ in probs] == [b["id"] for b in dev]
    news, users = _hidden(world, "news.tsv"), _hidden(world, "users.tsv")
    bias = json.loads((world / "world.json").read_text())["click_model"]["bias"]
    got, expect = [], []
    for (_, ps), b in zip(probs, dev):
        assert len(ps) == len(b["cands"])
        assert all(re.fullmatch(r"0\.\d{6}|1\.000000", p) for p in ps)
        theta = [float(x) for x in users[b["user"]]["interests"].split(",")]
        tau = [float(x) for x in users[b["user"]]["taste"].split(",")]
        for p, n in zip(ps, b["cands"]):
            h = news[n]
            got.append(float(p))
            cover = int(h["has_cover"])
            expect.append(CLICKS.topic * theta[int(h["topic"])] + CLICKS.popularity * float(h["popularity"]) + bias
                          + CLICKS.visual_weight * (tau[int(h["visual_style"])] - CLICKS.visual_centre) * cover
                          + CLICKS.cover_effect * cover)
    got = np.clip(np.array(got), 1e-6, 1 - 1e-6)
    # The files' p adds N(0, 0.5) noise to the hidden logit; alignment makes them agree closely.
    assert np.corrcoef(np.log(got / (1 - got)), expect)[0, 1] > 0.8


def test_planted_visual_signal(world):
    news, users = _hidden(world, "news.tsv"), _hidden(world, "users.tsv")
    match = {1: ([], []), 0: ([], [])}  # has_cover -> (clicked, not clicked) visual matches
    for split in ("train", "dev"):
        for b in _behaviors(world, split):
            tau = [float(x) for x in users[b["user"]]["taste"].split(",")]
            for n, y in zip(b["cands"], b["labels"]):
                h = news[n]
                match[int(h["has_cover"])][1 - y].append(tau[int(h["visual_style"])])
    with_cover = np.mean(match[1][0]) - np.mean(match[1][1])
    without = np.mean(match[0][0]) - np.mean(match[0][1])
    assert with_cover > 0.08  # clicked covered news match the user's taste much better...
    assert abs(without) < with_cover / 2  # ...while an unseen style hardly matters
    metrics = json.loads((world / "world.json").read_text())["summary"]["dev_metrics"]
    if metrics is not None:
        assert 0.72 < metrics["oracle"]["auc"] < 0.92
        assert metrics["oracle"]["auc"] > metrics["oracle_text_only"]["auc"] + 0.03
        assert abs(metrics["random"]["auc"] - 0.5) < 0.06


def _image_terms(world: Path) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares fit of the dev logit's image part: (intercept, cover, centred match) and its SEs.

    The residual logit(p) - topic/popularity terms - bias of every dev candidate is regressed
    on 1, has_cover and (tau[style] - 1/S) * has_cover: the click model says the coefficients
    are (0, cover_effect, visual_weight) up to the N(0, noise_sd) noise.
    """
    news, users = _hidden(world, "news.tsv"), _hidden(world, "users.tsv")
    doc = json.loads((world / "world.json").read_text())
    cm = doc["click_model"]
    rows, resid = [], []
    for (_, ps), b in zip(_bracketed(world / "dev" / "click_probs.txt"), _behaviors(world, "dev")):
        theta = [float(x) for x in users[b["user"]]["interests"].split(",")]
        tau = [float(x) for x in users[b["user"]]["taste"].split(",")]
        for p, n in zip(ps, b["cands"]):
            p = float(p)
            if not 1e-4 < p < 1 - 1e-4:  # six decimals: too coarse a logit there
                continue
            h = news[n]
            cover = int(h["has_cover"])
            text = cm["topic"] * theta[int(h["topic"])] + cm["popularity"] * float(h["popularity"]) + cm["bias"]
            resid.append(np.log(p / (1 - p)) - text)
            rows.append((1.0, cover, (tau[int(h["visual_style"])] - cm["visual_centre"]) * cover))
    x, y = np.array(rows), np.array(resid)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    sigma2 = np.sum((y - x @ coef) ** 2) / (len(y) - 3)
    se = np.sqrt(np.diag(np.linalg.inv(x.T @ x)) * sigma2)
    return coef, se


def _cover_click_gap(world: Path) -> float:
    """Train + dev click rate of covered candidates minus that of uncovered ones."""
    news = _hidden(world, "news.tsv")
    clicks = {0: [], 1: []}
    for split in ("train", "dev"):
        for b in _behaviors(world, split):
            for n, y in zip(b["cands"], b["labels"]):
                clicks[int(news[n]["has_cover"])].append(y)
    return float(np.mean(clicks[1]) - np.mean(clicks[0]))


@pytest.mark.parametrize(
    ("knobs", "expect"),
    [({}, (0.8, 4.0)), ({"cover_effect": 0.0, "visual_weight": 0.0}, (0.0, 0.0)), ({"cover_effect": 1.5, "visual_weight": 0.0}, (1.5, 0.0))],
    ids=["default", "null", "presence-only"],
)
def test_cover_presence_and_style_are_separate_effects(tmp_path, knobs, expect):
    world = tmp_path / "w"
    summary = generate_world(world, "tiny", 4, images=False, **knobs)
    doc = json.loads((world / "world.json").read_text())
    assert (doc["click_model"]["cover_effect"], doc["click_model"]["visual_weight"]) == expect
    coef, se = _image_terms(world)
    # Intercept 0: the style term is centred, so nothing but cover_effect rides on presence.
    assert abs(coef[0]) < 0.1
    for got, err, want in zip(coef[1:], se[1:], expect):
        assert abs(got - want) < max(5 * err, 0.1), (coef, se)
    gap = _cover_click_gap(world)
    metrics = summary["dev_metrics"]
    if expect == (0.0, 0.0):
        # Images carry nothing: p itself ignores covers, so the three oracles are one ranking.
        assert metrics["oracle"] == metrics["oracle_text_only"] == metrics["oracle_presence"]
        assert abs(gap) < 0.03
    else:
        assert gap > 0.04  # a cover's bonus shows in raw click rates
        assert metrics["oracle_presence"]["auc"] > metrics["oracle_text_only"]["auc"]
    if expect[1] == 0.0:
        assert metrics["oracle"] == metrics["oracle_presence"]  # the style adds nothing
    else:
        assert metrics["oracle"]["auc"] > metrics["oracle_presence"]["auc"] + 0.02


def test_click_knobs_are_part_of_the_world_identity(world, tmp_path, capsys):
    with pytest.raises(PipelineError, match="other parameters.*visual_weight=4.0 \\(asked 0.0\\)"):
        generate_world(world, "tiny", 0, visual_weight=0.0)
    with pytest.raises(PipelineError, match="other parameters.*cover_effect"):
        generate_world(world, "tiny", 0, cover_effect=0.5)
    assert generate_world(world, "tiny", 0, cover_effect=0.8, visual_weight=4)["skipped"] is True
    for bad in (float("nan"), 100.0, "1", True):
        with pytest.raises(PipelineError, match="cover_effect must"):
            generate_world(tmp_path / "x", "tiny", 0, cover_effect=bad)
    assert not (tmp_path / "x").exists()
    argv = ["--out", str(tmp_path / "n"), "--scale", "tiny", "--seed", "1", "--no-images", "--cover-effect", "0", "--visual-weight", "0"]
    assert main(argv) == 0
    params = json.loads((tmp_path / "n" / "world.json").read_text())["params"]
    assert (params["cover_effect"], params["visual_weight"]) == (0.0, 0.0)
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--cover-effect" in capsys.readouterr().out


def test_images_exactly_for_covered_news(world):
    hidden = _hidden(world, "news.tsv")
    in_splits = set().union(*({r[0] for r in _rows(world / s / "news.tsv")} for s in ("train", "dev", "test")))
    assert set(hidden) == in_splits
    covered = {k for k, v in hidden.items() if v["has_cover"] == "1"}
    files = {p.stem for p in (world / "images").glob("*")}
    assert files == covered
    share = len(covered) / len(hidden)
    assert abs(share - 0.44) < 0.08
    for news_id in sorted(covered)[:5]:
        with Image.open(world / "images" / f"{news_id}.jpg") as img:
            assert img.format == "JPEG" and img.mode == "RGB" and img.size == CARD_SIZE
            # The cover fills its box: no white there, unlike a title-only card.
            box = np.asarray(img.crop(COVER_BOX), dtype=np.float32)
            assert box.mean() < 240


def test_cover_rate_option(tmp_path):
    summary = generate_world(tmp_path / "w", "tiny", 3, images=False, cover_rate=0.0)
    assert summary["cover_share"] == 0.0 and summary["images"] == 0
    hidden = _hidden(tmp_path / "w", "news.tsv")
    assert all(v["has_cover"] == "0" for v in hidden.values())


def test_rerun_skips_and_foreign_folders_are_refused(world, tmp_path, capsys):
    summary = generate_world(world, "tiny", 0)
    assert summary["skipped"] is True and summary["splits"]["dev"]["impressions"] == SCALES["tiny"].dev_impressions
    assert main(["--out", str(world), "--scale", "tiny", "--seed", "0"]) == 0
    assert "already there" in capsys.readouterr().out
    with pytest.raises(PipelineError, match="other parameters.*seed"):
        generate_world(world, "tiny", 5)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(PipelineError, match="not empty.*delete"):
        generate_world(tmp_path / "junk", "tiny", 0)
    with pytest.raises(PipelineError, match="unknown scale"):
        generate_world(tmp_path / "x", "huge", 0)
    with pytest.raises(PipelineError, match="cover rate"):
        generate_world(tmp_path / "x", "tiny", 0, cover_rate=1.5)


def test_an_interrupted_generation_starts_again_and_ends_identical(worlds, tmp_path, monkeypatch):
    import storage.synthetic as synthetic

    out = tmp_path / "w"

    def killed(*args, **kwargs):  # every file is written, world.json not yet
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_dev_metrics", killed)
    with pytest.raises(KeyboardInterrupt):
        generate_world(out, "tiny", 0)
    assert (out / "train" / "behaviors.tsv").is_file() and not (out / "world.json").exists()
    (out / "train" / "behaviors.tsv").write_text("half a line")  # as a kill mid-write leaves it
    monkeypatch.undo()
    summary = generate_world(out, "tiny", 0)
    assert summary["skipped"] is False
    assert _hashes(out) == _hashes(worlds["a"])  # the same world, nothing of the first try left
    assert not (out / synthetic.GENERATING).exists()
    assert generate_world(out, "tiny", 0)["skipped"] is True


def test_a_second_generation_into_a_folder_being_generated_is_refused(tmp_path):
    import fcntl
    import os

    import storage.synthetic as synthetic

    out = tmp_path / "w"
    out.mkdir()
    (out / "train").mkdir()  # a generation in progress: its marker locked, its files arriving
    fd = os.open(out / synthetic.GENERATING, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(PipelineError, match="another process is generating a world there"):
            generate_world(out, "tiny", 0)
        assert (out / "train").is_dir()  # nothing of the running generation touched
    finally:
        os.close(fd)
    assert generate_world(out, "tiny", 0)["skipped"] is False  # unlocked: an interrupted one, started again


def test_cli_prints_summary_and_metrics(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "w"), "--scale", "tiny", "--seed", "2", "--no-images"]) == 0
    out = capsys.readouterr().out
    for word in ("train", "dev", "test", "CTR", "cover share", "generated in"):
        assert word in out
    assert (tmp_path / "w" / "world.json").is_file()


def test_render_card_title_only_and_with_cover():
    title = "A very long synthetic title that will certainly need more than three lines on the card to fit"
    card = render_card(title, "sports")
    assert card.mode == "RGB" and card.size == CARD_SIZE
    pixels = np.asarray(card)
    x0, y0, x1, y1 = COVER_BOX
    assert (pixels[y0:y1, x0:x1] == 255).all()  # title-only: the cover box stays white
    assert pixels[:, 228:].min() < 100  # dark title text on the right
    cover = Image.new("RGB", (40, 30), (200, 30, 30))
    with_cover = np.asarray(render_card("Short title", "news", cover)).astype(int)
    assert np.abs(with_cover[y0 + 5 : y1 - 5, x0 + 5 : x1 - 5] - [200, 30, 30]).max() < 3
    lines = wrap_title(title)
    assert len(lines) == 3 and lines[-1].endswith("...") and all(len(line) <= 27 for line in lines)
    assert wrap_title("Short title") == ["Short title"]
    assert wrap_title("x" * 60) == ["x" * 27, "x" * 27, "xxxxxx"]
