"""Tests for the MIND readers: columnar round trips, strict errors at the exact line,
lenient skipping and counting, the `validate` command line, and property tests that
random well-formed files round-trip and a corrupted line is found where it is."""

from __future__ import annotations

import datetime
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage import mind
from storage.errors import DataFormatError, PipelineError
from storage.mind import (
    ReadReport,
    format_time,
    load_split,
    main,
    parse_time,
    read_behaviors,
    read_news,
)

ENTITY = (
    '[{"Label": "Title", "Type": "P", "WikidataId": "Q1", "Confidence": 1.0, '
    '"OccurrenceOffsets": [0], "SurfaceForms": ["Title"]}]'
)
NEWS_ROWS = [
    ["N1", "sports", "football", "Title one", "", "https://x/N1", "[]", ""],
    ["N2", "news", "world", "Title two", "An abstract", "https://x/N2", ENTITY, "[]"],
    ["N3", "finance", "markets", "Title three", "", "", "", ""],
    ["N4", "lifestyle", "food", "Title four", "More text", "https://x/N4", "[]", "[]"],
]
TRAIN_ROWS = [
    "1\tU1\t11/11/2019 9:05:58 AM\tN1 N2\tN3-1 N4-0 N1-0",
    "2\tU2\t11/11/2019 12:00:00 AM\t\tN2-0 N3-1",
    "3\tU1\t11/12/2019 12:30:15 PM\tN4\tN1-0",
]
TEST_ROWS = [
    "10\tU3\t11/15/2019 11:59:59 PM\tN1\tN2 N3",
    "11\tU4\t11/15/2019 1:02:03 AM\t\tN4",
]


def utc(*fields: int) -> int:
    return int(datetime.datetime(*fields, tzinfo=datetime.timezone.utc).timestamp())


def write(path: Path, lines: list[str] | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(lines, bytes):
        path.write_bytes(lines)
    else:
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_news(path: Path, rows: list[list[str]] = NEWS_ROWS) -> Path:
    return write(path, ["\t".join(row) for row in rows])


def write_split(folder: Path, behaviors: list[str] | bytes = TRAIN_ROWS) -> Path:
    write_news(folder / "news.tsv")
    write(folder / "behaviors.tsv", behaviors)
    return folder


def news_index() -> dict[str, int]:
    return {row[0]: i for i, row in enumerate(NEWS_ROWS)}


# ---------------------------------------------------------------- round trips


def test_news_columns_and_entities(tmp_path):
    news = read_news(write_news(tmp_path / "news.tsv"))
    assert len(news) == 4
    assert news.ids.tolist() == ["N1", "N2", "N3", "N4"]
    assert news.index == news_index()
    assert news.abstract.tolist() == ["", "An abstract", "", "More text"]
    assert news.title[2] == "Title three"
    assert news.lines.tolist() == [1, 2, 3, 4]
    assert news.entities(0) == [] and news.entities(0, "abstract") == []
    assert news.entities(2) == []
    assert news.entities(1)[0]["WikidataId"] == "Q1"
    assert news.entities(1, field="abstract") == []
    with pytest.raises(ValueError):
        news.entities(1, field="body")


def test_news_entities_bad_json_names_line(tmp_path):
    rows = [row[:] for row in NEWS_ROWS]
    rows[2][6] = "[{not json"
    news = read_news(write_news(tmp_path / "news.tsv", rows))
    with pytest.raises(DataFormatError) as err:
        news.entities(2)
    assert str(err.value).startswith(f"{tmp_path / 'news.tsv'}:3: title_entities of news N3")


def test_news_fingerprint_is_stable_and_content_sensitive(tmp_path):
    first = read_news(write_news(tmp_path / "a.tsv")).fingerprint()
    assert first == read_news(write_news(tmp_path / "b.tsv")).fingerprint()
    assert len(first) == 64 and int(first, 16) >= 0
    changed = [row[:] for row in NEWS_ROWS]
    changed[3][3] = "Another title"
    assert read_news(write_news(tmp_path / "c.tsv", changed)).fingerprint() != first
    url_only = [row[:] for row in NEWS_ROWS]
    url_only[0][5] = "https://elsewhere"  # urls are not part of the content
    assert read_news(write_news(tmp_path / "d.tsv", url_only)).fingerprint() == first


def test_labeled_behaviors_round_trip(tmp_path):
    b = read_behaviors(write(tmp_path / "behaviors.tsv", TRAIN_ROWS), news_index())
    assert b.labeled
    assert b.impression_ids.tolist() == [1, 2, 3]
    assert b.impression_ids.dtype == np.int64
    assert b.user_ids.tolist() == ["U1", "U2", "U1"]
    assert b.times.tolist() == [
        utc(2019, 11, 11, 9, 5, 58),
        utc(2019, 11, 11, 0, 0, 0),
        utc(2019, 11, 12, 12, 30, 15),
    ]
    assert b.hist_offsets.tolist() == [0, 2, 2, 3]
    assert b.hist_items.tolist() == [0, 1, 3]
    assert b.cand_offsets.tolist() == [0, 3, 5, 6]
    assert b.cand_items.tolist() == [2, 3, 0, 1, 2, 0]
    assert b.labels.tolist() == [1, 0, 0, 0, 1, 0]
    assert (b.hist_items.dtype, b.cand_items.dtype, b.labels.dtype) == (
        np.int32,
        np.int32,
        np.int8,
    )
    assert b.n_impressions == len(b) == 3 and b.n_candidates == 6
    assert b.histories(0).tolist() == [0, 1] and b.histories(1).tolist() == []
    assert b.candidates(1).tolist() == [1, 2]
    assert b.candidate_labels(1).tolist() == [0, 1]
    assert b.users().tolist() == ["U1", "U2"]


def test_unlabeled_behaviors_round_trip(tmp_path):
    b = read_behaviors(write(tmp_path / "behaviors.tsv", TEST_ROWS), news_index())
    assert not b.labeled
    assert b.impression_ids.tolist() == [10, 11]
    assert b.times.tolist() == [utc(2019, 11, 15, 23, 59, 59), utc(2019, 11, 15, 1, 2, 3)]
    assert b.hist_offsets.tolist() == [0, 1, 1]
    assert b.cand_offsets.tolist() == [0, 2, 3]
    assert b.cand_items.tolist() == [1, 2, 3]
    assert b.labels.tolist() == [-1, -1, -1]


def test_crlf_and_byte_order_mark_are_accepted(tmp_path):
    data = ("\ufeff" + "\r\n".join(TRAIN_ROWS) + "\r\n").encode("utf-8")
    b = read_behaviors(write(tmp_path / "behaviors.tsv", data), news_index())
    assert b.impression_ids.tolist() == [1, 2, 3]
    assert b.labels.tolist() == [1, 0, 0, 0, 1, 0]


def test_load_split_reads_both_files(tmp_path):
    split = load_split(write_split(tmp_path / "train"))
    assert len(split.news) == 4 and split.behaviors.n_impressions == 3
    assert not split.report


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(PipelineError, match="news.tsv: no such file"):
        read_news(tmp_path / "news.tsv")
    with pytest.raises(PipelineError, match="no such folder"):
        load_split(tmp_path / "nowhere")
    write_news(tmp_path / "train" / "news.tsv")
    with pytest.raises(PipelineError) as err:
        load_split(tmp_path / "train")
    assert str(tmp_path / "train" / "behaviors.tsv") in str(err.value)


def test_time_parsing_matches_datetime():
    for text in ["11/11/2019 9:05:58 AM", "1/2/2020 12:00:00 AM", "12/31/2019 12:59:59 PM"]:
        expected = datetime.datetime.strptime(text, "%m/%d/%Y %I:%M:%S %p")
        assert parse_time(text) == int(expected.replace(tzinfo=datetime.timezone.utc).timestamp())
        assert format_time(parse_time(text)) == text
    with pytest.raises(ValueError, match="is not"):
        parse_time("11/11/2019 0:05:58 AM")


# ---------------------------------------------------------------- strict errors


def behaviors_error(tmp_path: Path, bad_line: str, rows: list[str] = TRAIN_ROWS) -> str:
    """Insert `bad_line` as line 3 (after two good rows) and return the strict error."""
    lines = rows[:2] + [bad_line] + rows[2:]
    path = write(tmp_path / "behaviors.tsv", lines)
    with pytest.raises(DataFormatError) as err:
        read_behaviors(path, news_index())
    return str(err.value).removeprefix(f"{path}:")


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ("5\tU1\t11/11/2019 9:05:58 AM\tN1", "expected 5 tab-separated columns, found 4"),
        ("5\tU1\t11/11/2019 9:05:58 AM\tN1\tN1-1\tx", "found 6"),
        ("", "found an empty line"),
        ("5\tU1\t11/11/2019 9:05:58 AM\tN1\tN1-2", "bad candidate token 'N1-2'"),
        ("5\tU1\t11/11/2019 9:05:58 AM\tN1\tN1-1 N1-", "bad candidate token 'N1-'"),
        ("5\tU1\t11/11/2019 9:05:58 AM\tN1\t-1", "bad candidate token '-1'"),
        ("5\tU1\t11/11/2019 9:05:58 AM\tN1\tN1-1  N2-0", "bad candidate token ''"),
        ("5\tU1\t11/11/2019 9:05:58 AM\tN1\t N1-1", "bad candidate token ''"),
        ("5\tU1\t11/11/2019 9:05:58 AM\tN1\t", "bad candidate token ''"),
        ("5\tU1\t11/11/2019 9:05:58 AM\tN1\tN1-1 N2", "has no -0/-1 label but the file is labeled"),
        ("5\tU1\t11/11/2019 9:05:58 AM\tN1\tN9-1", "candidate news id N9 is not in news.tsv"),
        ("5\tU1\t11/11/2019 9:05:58 AM\tN1 N9\tN1-1", "history news id N9 is not in news.tsv"),
        ("5\tU1\t11/11/2019 9:05:58 AM\tN1  N2\tN1-1", "empty history token"),
        ("5\tU1\t11/11/2019 9:05:58 AM\tN1 \tN1-1", "empty history token"),
        ("1\tU1\t11/11/2019 9:05:58 AM\tN1\tN1-1", "impression id 1 already appears on line 1"),
        ("x5\tU1\t11/11/2019 9:05:58 AM\tN1\tN1-1", "impression id 'x5' is not"),
        ("5.0\tU1\t11/11/2019 9:05:58 AM\tN1\tN1-1", "impression id '5.0' is not"),
        ("\tU1\t11/11/2019 9:05:58 AM\tN1\tN1-1", "impression id '' is not"),
        ("-5\tU1\t11/11/2019 9:05:58 AM\tN1\tN1-1", "impression id '-5' is not"),
        ("\u0665\tU1\t11/11/2019 9:05:58 AM\tN1\tN1-1", "is not a non-negative integer"),
        ("99999999999999999999\tU1\t11/11/2019 9:05:58 AM\tN1\tN1-1", "is not a non-negative"),
        ("5\t\t11/11/2019 9:05:58 AM\tN1\tN1-1", "the user id is empty"),
        ("5\tU1\t13/11/2019 9:05:58 AM\tN1\tN1-1", "time '13/11/2019 9:05:58 AM' is not"),
        ("5\tU1\t11/31/2019 9:05:58 AM\tN1\tN1-1", "time '11/31/2019 9:05:58 AM' is not"),
        ("5\tU1\t11/11/2019 13:05:58 PM\tN1\tN1-1", "time '11/11/2019 13:05:58 PM'"),
        ("5\tU1\t11/11/2019 9:05:58\tN1\tN1-1", "time '11/11/2019 9:05:58' is not"),
        ("5\tU1\t2019-11-11 09:05:58\tN1\tN1-1", "time '2019-11-11 09:05:58' is not"),
        ("5\tU1\t11/11/2019 9:5:60 AM\tN1\tN1-1", "time '11/11/2019 9:5:60 AM'"),
    ],
)
def test_strict_error_names_path_and_line(tmp_path, bad_line, expected):
    message = behaviors_error(tmp_path, bad_line)
    assert message.startswith("3: "), message
    assert expected in message
    assert "lenient" in message  # says what to do


def test_label_in_unlabeled_file_is_mixing(tmp_path):
    message = behaviors_error(tmp_path, "12\tU1\t11/15/2019 1:02:03 AM\t\tN1 N2-1", TEST_ROWS)
    assert message.startswith("3: candidate N2-1 has a label but the file is unlabeled")


def test_unknown_candidate_in_unlabeled_file(tmp_path):
    message = behaviors_error(tmp_path, "12\tU1\t11/15/2019 1:02:03 AM\t\tN1 N77", TEST_ROWS)
    assert message.startswith("3: candidate news id N77 is not in news.tsv")


def test_not_utf8_names_line(tmp_path):
    good = ("\n".join(TRAIN_ROWS[:2]) + "\n").encode()
    data = good + b"3\tU\xff1\t11/11/2019 9:05:58 AM\t\tN1-1\n"
    path = write(tmp_path / "behaviors.tsv", data)
    with pytest.raises(DataFormatError) as err:
        read_behaviors(path, news_index())
    assert str(err.value).startswith(f"{path}:3: byte 0xff at column 4 is not valid UTF-8")


def test_empty_files_are_errors(tmp_path):
    path = write(tmp_path / "behaviors.tsv", b"")
    for strict in (True, False):
        with pytest.raises(DataFormatError, match=r"behaviors.tsv:1: the file is empty"):
            read_behaviors(path, news_index(), strict=strict)
    with pytest.raises(DataFormatError, match=r"news.tsv:1: the file is empty"):
        read_news(write(tmp_path / "news.tsv", b""))


@pytest.mark.parametrize(
    ("bad_row", "expected"),
    [
        (["N9", "a", "b", "t", "", ""], "expected 8 tab-separated columns, found 6"),
        (["N2", "a", "b", "t", "", "", "", ""], "news id N2 already appears on line 2"),
        (["", "a", "b", "t", "", "", "", ""], "news id '' is empty"),
        (["N 9", "a", "b", "t", "", "", "", ""], "news id 'N 9' is empty or contains whitespace"),
    ],
)
def test_news_strict_errors(tmp_path, bad_row, expected):
    rows = NEWS_ROWS[:2] + [bad_row] + NEWS_ROWS[2:]
    path = write_news(tmp_path / "news.tsv", rows)
    with pytest.raises(DataFormatError) as err:
        read_news(path)
    assert str(err.value).startswith(f"{path}:3: {expected}")


def test_news_not_utf8(tmp_path):
    path = write(tmp_path / "news.tsv", b"N1\ta\tb\tt\t\t\t\t\nN2\ta\tb\t\xc3(\t\t\t\t\n")
    with pytest.raises(DataFormatError, match=r"news.tsv:2: byte 0xc3 at column 8"):
        read_news(path)
    report = ReadReport()
    news = read_news(path, strict=False, report=report)
    assert news.ids.tolist() == ["N1"]
    assert report.skipped == {mind.NOT_UTF8: 1}


# ---------------------------------------------------------------- lenient mode


def test_lenient_skips_counts_and_drops(tmp_path):
    lines = [
        TRAIN_ROWS[0],  # 1 good
        "2\tU2\t11/11/2019 9:05:58 AM\tN1\tN1-2",  # 2 bad candidate
        "3\tU3\t11/11/2019 9:05:58 AM\tN1 N9 N8\tN2-1",  # 3 kept, N9 and N8 dropped
        "4\tU4\tyesterday\t\tN2-1",  # 4 bad time
        "1\tU5\t11/11/2019 9:05:58 AM\t\tN2-1",  # 5 duplicate of line 1
        "6\tU6\t11/11/2019 9:05:58 AM\t\tN7-0 N3-1 N6-0",  # 6 unknown candidates
        "7\tU7",  # 7 column count
        "8\tU8\t11/11/2019 9:05:58 AM\t\tN4-0",  # 8 good, no click
    ]
    report = ReadReport()
    b = read_behaviors(write(tmp_path / "b.tsv", lines), news_index(), strict=False, report=report)
    assert b.impression_ids.tolist() == [1, 3, 8]
    assert b.histories(1).tolist() == [0]
    assert b.cand_items.tolist() == [2, 3, 0, 1, 3]
    assert report.skipped == {
        mind.BAD_CANDIDATE: 1,
        mind.BAD_TIME: 1,
        mind.DUPLICATE_IMPRESSION_ID: 1,
        mind.UNKNOWN_CANDIDATE: 1,
        mind.BAD_COLUMNS: 1,
    }
    assert report.total_skipped == 5
    assert report.dropped == {mind.UNKNOWN_HISTORY: 2}
    assert report.missing_ids == {"N9", "N8", "N7", "N6"}
    assert [(e.line, e.reason) for e in report.examples] == [
        (2, mind.BAD_CANDIDATE),
        (3, mind.UNKNOWN_HISTORY),
        (4, mind.BAD_TIME),
        (5, mind.DUPLICATE_IMPRESSION_ID),
        (6, mind.UNKNOWN_CANDIDATE),
        (7, mind.BAD_COLUMNS),
    ]
    assert any("e.g. " in line and ":5: impression id 1" in line for line in report.lines())


def test_missing_ids_count_every_row_skipped_or_kept(tmp_path):
    lines = [
        "1\tU1\t11/11/2019 9:05:58 AM\tN1 N90\tN77-0 N3-1",  # skipped (unknown candidate N77); history N90
        "2\tU2\tyesterday\tN91\tN78-1",  # skipped for its time; N91 and N78 are still referenced
        "3\tU3\t11/11/2019 9:05:58 AM\tN92 N2\tN2-1",  # kept, N92 dropped
        "3\tU4\t11/11/2019 9:05:58 AM\tN93\tN2-1",  # duplicate id; N93 referenced all the same
        "5\tU5\t11/11/2019 9:05:58 AM\tN94\tN2-2",  # bad token; N94 referenced, "N2-2" names no id
    ]
    report = ReadReport()
    b = read_behaviors(write(tmp_path / "b.tsv", lines), news_index(), strict=False, report=report)
    assert b.impression_ids.tolist() == [3]
    assert report.missing_ids == {"N90", "N77", "N91", "N78", "N92", "N93", "N94"}
    assert report.to_dict()["missing_ids"] == 7


def test_lenient_skips_non_utf8_lines_and_keeps_line_numbers(tmp_path):
    data = (
        TRAIN_ROWS[0].encode() + b"\n" + b"2\tU\xfe\t11/11/2019 9:05:58 AM\t\tN1-1\n"
        + b"3\tU3\t11/11/2019 9:05:58 AM\t\tN1-1 N2-2\n" + TRAIN_ROWS[2].encode() + b"\n"
    )
    report = ReadReport()
    b = read_behaviors(write(tmp_path / "b.tsv", data), news_index(), strict=False, report=report)
    assert b.impression_ids.tolist() == [1, 3]
    assert [(e.line, e.reason) for e in report.examples] == [
        (2, mind.NOT_UTF8),
        (3, mind.BAD_CANDIDATE),
    ]


def test_lenient_news_keeps_first_duplicate(tmp_path):
    rows = NEWS_ROWS + [["N1", "x", "y", "dup", "", "", "", ""], ["bad row"]]
    report = ReadReport()
    news = read_news(write_news(tmp_path / "news.tsv", rows), strict=False, report=report)
    assert news.ids.tolist() == ["N1", "N2", "N3", "N4"]
    assert news.title[0] == "Title one"
    assert report.skipped == {mind.DUPLICATE_NEWS_ID: 1, mind.BAD_COLUMNS: 1}


def test_duplicates_and_errors_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(mind, "_CHUNK_ROWS", 2)
    rows = [f"{i}\tU{i}\t11/11/2019 9:05:58 AM\tN1\tN2-1" for i in range(1, 8)]
    rows[5] = rows[5].replace("6\t", "2\t", 1)  # line 6 repeats id 2 from the first chunk
    path = write(tmp_path / "b.tsv", rows)
    expected = r"b.tsv:6: impression id 2 already appears on line 2"
    with pytest.raises(DataFormatError, match=expected):
        read_behaviors(path, news_index())
    report = ReadReport()
    b = read_behaviors(path, news_index(), strict=False, report=report)
    assert b.impression_ids.tolist() == [1, 2, 3, 4, 5, 7]
    assert b.cand_offsets.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert report.skipped == {mind.DUPLICATE_IMPRESSION_ID: 1}


# ---------------------------------------------------------------- command line


def test_validate_prints_counts(tmp_path, capsys):
    split = write_split(tmp_path / "train")
    assert main(["validate", str(split)]) == 0
    out = capsys.readouterr().out
    header, *rows = out.split("\n\n")[0].splitlines()
    assert header.split() == ["train"]
    table = dict(line.rsplit(None, 1) for line in rows)
    table = {label.strip(): value for label, value in table.items()}
    assert table["news"] == "4"
    assert table["users"] == "2"
    assert table["impressions"] == "3"
    assert table["candidates"] == "6"
    assert table["labeled"] == "yes"
    assert table["clicks"] == "2"
    assert table["empty histories"] == "1"
    assert table["impressions without clicks"] == "1"
    assert table["ids missing from news.tsv"] == "0"
    assert "ok: 1 split(s) read (strict)" in out
    # One impression has no click: what we do with it, and no claim that the official scorer skips it.
    assert "1 labeled impression(s) have no click; they are kept" in out
    assert "our metrics skip and count them" in out and "the official scorer does not skip them" in out
    assert "the official scorer skips" not in out


def test_validate_dataset_root_and_json(tmp_path, capsys):
    write_split(tmp_path / "train")
    write_split(tmp_path / "test", TEST_ROWS)
    assert main(["validate", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result) == ["train", "test"]
    assert result["train"]["impressions"] == 3 and result["train"]["clicks"] == 2
    assert result["test"]["labeled"] is False and result["test"]["clicks"] is None
    assert result["test"]["candidates"] == 3
    assert result["train"]["report"]["skipped_rows"] == {}


def test_validate_lenient_prints_report(tmp_path, capsys):
    split = write_split(tmp_path / "dev", TRAIN_ROWS + ["9\tU9\t11/11/2019 9:05:58 AM\tN5\tN1-1"])
    assert main(["validate", str(split), "--lenient"]) == 0
    out = capsys.readouterr().out
    assert "dropped 1 id(s): unknown news id in history" in out
    assert "behaviors.tsv:4: history news id N5 is not in news.tsv" in out
    assert re.search(r"ids missing from news.tsv +1\n", out)


def test_validate_errors_without_splits(tmp_path):
    with pytest.raises(PipelineError, match="neither a split folder"):
        main(["validate", str(tmp_path)])
    with pytest.raises(PipelineError, match="no such file or folder"):
        main(["validate", str(tmp_path / "missing")])


def run_validate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "storage.mind", "validate", *args],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=120,
    )


def test_cli_exit_codes_and_one_line_errors(tmp_path):
    good = write_split(tmp_path / "good")
    done = run_validate(str(good))
    assert done.returncode == 0, done.stderr
    assert "impressions" in done.stdout

    bad_rows = TRAIN_ROWS[:2] + ["7\tU1\t11/11/2019 9:05:58 AM\tN1\tN1-2"]
    bad = write_split(tmp_path / "bad", bad_rows)
    done = run_validate(str(bad))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: {bad / 'behaviors.tsv'}:3: bad candidate token 'N1-2'")
    assert run_validate(str(bad), "--lenient").returncode == 0


# ---------------------------------------------------------------- properties

ID_CHARS = st.sampled_from("N0123456789abcXé-_")
# An unlabeled candidate ending in -0/-1 would read as labeled: the format cannot tell.
news_ids = st.lists(
    st.text(ID_CHARS, min_size=1, max_size=20).filter(lambda s: s[-2:] not in ("-0", "-1")),
    min_size=1,
    max_size=12,
    unique=True,
)


@st.composite
def worlds(draw):
    """Random news ids (short, long, non-ASCII) and well-formed impressions over them."""
    ids = draw(news_ids)
    labeled = draw(st.booleans())
    n = draw(st.integers(0, 8))
    impression_ids = draw(st.lists(st.integers(0, 2**63 - 1), min_size=n, max_size=n, unique=True))
    pick = st.integers(0, len(ids) - 1)
    rows = []
    for imp in impression_ids:
        user = draw(st.text(st.sampled_from("U0123456789x"), min_size=1, max_size=6))
        seconds = draw(st.integers(0, 4_102_444_799))  # up to the end of 2099
        history = draw(st.lists(pick, max_size=6))
        candidates = draw(st.lists(pick, min_size=1, max_size=6))
        size = len(candidates)
        labels = draw(st.lists(st.integers(0, 1), min_size=size, max_size=size))
        rows.append((imp, user, seconds, history, candidates, labels))
    return ids, labeled, rows


def render(ids, labeled, rows) -> list[str]:
    lines = []
    for imp, user, seconds, history, candidates, labels in rows:
        cands = [
            f"{ids[c]}-{y}" if labeled else ids[c] for c, y in zip(candidates, labels)
        ]
        hist = " ".join(ids[h] for h in history)
        lines.append(f"{imp}\t{user}\t{format_time(seconds)}\t{hist}\t{' '.join(cands)}")
    return lines


# tmp_path is shared by a test's examples; each example overwrites its files.
FAST = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FAST
@given(world=worlds())
def test_well_formed_behaviors_round_trip(tmp_path, world):
    ids, labeled, rows = world
    index = {news_id: i for i, news_id in enumerate(ids)}
    if not rows:
        return  # an empty file is an error, tested separately
    path = write(tmp_path / "behaviors.tsv", render(ids, labeled, rows))
    report = ReadReport()
    b = read_behaviors(path, index, strict=False, report=report)
    assert not report
    strict = read_behaviors(path, index)
    for name in ("impression_ids", "times", "hist_offsets", "hist_items", "cand_offsets",
                 "cand_items", "labels"):
        assert np.array_equal(getattr(b, name), getattr(strict, name))
    assert b.labeled == labeled
    assert b.impression_ids.tolist() == [r[0] for r in rows]
    assert b.user_ids.tolist() == [r[1] for r in rows]
    assert b.times.tolist() == [r[2] for r in rows]
    assert b.hist_offsets.tolist() == np.cumsum([0] + [len(r[3]) for r in rows]).tolist()
    assert b.hist_items.tolist() == [h for r in rows for h in r[3]]
    assert b.cand_offsets.tolist() == np.cumsum([0] + [len(r[4]) for r in rows]).tolist()
    assert b.cand_items.tolist() == [c for r in rows for c in r[4]]
    expected_labels = [y if labeled else -1 for r in rows for y in r[5]]
    assert b.labels.tolist() == expected_labels


CORRUPTIONS = [
    lambda parts: parts[:4],
    lambda parts: [parts[0] + "x", *parts[1:]],
    lambda parts: [*parts[:2], parts[2].replace("/", "-"), *parts[3:]],
    lambda parts: [*parts[:3], " ".join(filter(None, [parts[3], "ZZunknown"])), parts[4]],
    lambda parts: [*parts[:4], parts[4] + "  " + parts[4]],
    lambda parts: [*parts[:4], parts[4] + " ZZunknown-1"],
    lambda parts: [parts[0], "", *parts[2:]],
]


@FAST
@given(world=worlds(), which=st.integers(0, 100), how=st.integers(0, len(CORRUPTIONS) - 1))
def test_corrupted_line_is_found_exactly(tmp_path, monkeypatch, world, which, how):
    ids, _, rows = world
    if not rows:
        return
    index = {news_id: i for i, news_id in enumerate(ids)}
    rows = [(r[0], r[1], r[2], [h % len(ids) for h in r[3]], [c % len(ids) for c in r[4]], r[5])
            for r in rows]
    lines = render(ids, True, rows)
    bad = which % len(lines)
    lines[bad] = "\t".join(CORRUPTIONS[how](lines[bad].split("\t")))
    monkeypatch.setattr(mind, "_CHUNK_ROWS", 3)  # exercise chunk boundaries
    path = write(tmp_path / "behaviors.tsv", lines)
    with pytest.raises(DataFormatError) as err:
        read_behaviors(path, index)
    assert str(err.value).startswith(f"{path}:{bad + 1}: ")
    report = ReadReport()
    b = read_behaviors(path, index, strict=False, report=report)
    if how == 3:  # an unknown history id is dropped, the row kept
        assert report.dropped == {mind.UNKNOWN_HISTORY: 1} and len(b) == len(rows)
    else:
        assert report.total_skipped == 1 and len(b) == len(rows) - 1
        assert [e.line for e in report.examples] == [bad + 1]


@FAST
@given(ids=news_ids, picks=st.lists(st.integers(0, 40), max_size=30))
def test_news_keys_match_a_dict(ids, picks):
    """The byte-level hash table gives the same indices as a dict, or None for unknowns."""
    index = {news_id: 3 * i + 1 for i, news_id in enumerate(ids)}
    tokens = [ids[p] if p < len(ids) else f"N{p}é" for p in picks]
    if not tokens:
        return
    raw, starts, ends = mind._token_bounds(" ".join(tokens))
    found = mind._NewsKeys(index).lookup(raw, starts, ends - starts)
    if all(t in index for t in tokens):
        assert found is not None and found.tolist() == [index[t] for t in tokens]
    else:
        assert found is None


@FAST
@given(seconds=st.integers(0, 4_102_444_799))
def test_time_round_trip(seconds):
    text = format_time(seconds)
    assert parse_time(text) == seconds
    stamp = datetime.datetime.strptime(text, "%m/%d/%Y %I:%M:%S %p")
    assert int(stamp.replace(tzinfo=datetime.timezone.utc).timestamp()) == seconds
