"""GENRE-style enhanced titles: the strict titles-file reader, the catalogue that carries
them (another fingerprint and name), and stores that sit beside the original titles' ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage.catalogue import load_catalogue, with_titles
from storage.errors import DataFormatError, PipelineError
from storage.mind import read_titles


@pytest.fixture(scope="module")
def catalogue(tiny_world):
    return load_catalogue(tiny_world)


def _write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return path


def test_a_titles_file_reads_into_a_mapping(tmp_path, catalogue):
    a, b = catalogue.ids[:2]
    path = _write(tmp_path / "t.tsv", f"\ufeff{a}\tA better title\r\n{b}\tAnother one, with\u00e9 accents\n")
    assert read_titles(path, known=catalogue.index) == {a: "A better title", b: "Another one, with\u00e9 accents"}


@pytest.mark.parametrize("text, line, message", [
    ("N1\tok\nN2\n", 2, "expected 2 tab-separated columns"),
    ("N1\tok\nN2\ttitle\textra\n", 2, "found 3 columns"),
    ("N1\tok\n\nN2\tx\n", 2, "an empty line"),
    ("N1\tok\nN 2\tx\n", 2, "bad news id"),
    ("N1\tok\nN2\t  \n", 2, "empty title for N2"),
    ("N1\tok\nN2\tx\nN1\tagain\n", 3, "duplicate news id N1 (first at line 1)"),
])
def test_malformed_lines_are_named_by_file_and_line(tmp_path, text, line, message):
    path = _write(tmp_path / "t.tsv", text)
    with pytest.raises(DataFormatError) as err:
        read_titles(path)
    assert err.value.line == line and message in str(err.value)
    assert str(err.value).startswith(f"{path}:{line}: ")


def test_unknown_news_ids_are_all_named(tmp_path, catalogue):
    known = catalogue.ids[0]
    path = _write(tmp_path / "t.tsv", f"{known}\tfine\nNX1\ta\nNX2\tb\n")
    with pytest.raises(DataFormatError, match=r":2: news id NX1 is not in the dataset's news.tsv \(2 unknown in all: NX1, NX2\)"):
        read_titles(path, known=catalogue.index)
    with pytest.raises(PipelineError, match="NX1, NX2"):
        with_titles(catalogue, {"NX1": "a", "NX2": "b"}, path)


def test_not_utf8_empty_and_missing_files(tmp_path):
    with pytest.raises(DataFormatError, match=r":2: bytes that are not UTF-8"):
        read_titles(_write(tmp_path / "latin1.tsv", b"N1\tok\nN2\tcaf\xe9\n"))
    with pytest.raises(PipelineError, match="no titles"):
        read_titles(_write(tmp_path / "empty.tsv", ""))
    with pytest.raises(PipelineError, match="does not exist"):
        read_titles(tmp_path / "nope.tsv")


def test_enhanced_titles_make_another_catalogue(tiny_world, tmp_path, catalogue):
    first, second = catalogue.ids[:2]
    path = _write(tmp_path / "t.tsv", f"{first}\tA much more informative title\n")
    enhanced = load_catalogue(tiny_world, titles=path)
    assert enhanced.title[0] == "A much more informative title" and enhanced.title[1] == catalogue.title[1]
    assert enhanced.enhanced == 1 and enhanced.titles_file == path
    assert enhanced.fingerprint() != catalogue.fingerprint()
    assert enhanced.name.startswith(f"{catalogue.name}-enhanced-") and enhanced.name != catalogue.name
    assert list(enhanced.ids) == list(catalogue.ids) and catalogue.title[0] != enhanced.title[0]
    # The same titles give the same catalogue; other titles another one.
    again = load_catalogue(tiny_world, titles=_write(tmp_path / "copy.tsv", path.read_text()))
    assert (again.name, again.fingerprint()) == (enhanced.name, enhanced.fingerprint())
    other = with_titles(catalogue, {second: "Something else"}, "other.tsv")
    assert other.name != enhanced.name and other.fingerprint() != enhanced.fingerprint()
    # Even a file that changes no title is a catalogue of its own (its stores are its own).
    same = with_titles(catalogue, {first: str(catalogue.title[0])}, "same.tsv")
    assert same.fingerprint() != catalogue.fingerprint()
    with pytest.raises(PipelineError, match="already has enhanced titles"):
        with_titles(enhanced, {second: "x"}, "again.tsv")


def test_enhanced_title_stores_sit_beside_the_original(tiny_world, tmp_path, catalogue):
    from runs.extract import extract_rows
    from runs.params import ExtractParams
    from runs.workspace import Workspace
    from storage.features import FeatureStore

    path = _write(tmp_path / "t.tsv", "".join(f"{n}\t{t} {c}\n" for n, t, c in
                                              zip(catalogue.ids, catalogue.title, catalogue.category)))
    rows = {}
    for titles in (None, path):
        params = ExtractParams(data=tiny_world, titles=titles, extractors=["bert"], storage=tmp_path, progress=False)
        rows[titles] = extract_rows(params, Workspace(tmp_path), "bert")
    original, enhanced = Path(rows[None]["store"]), Path(rows[path]["store"])
    assert original != enhanced and original.is_file() and enhanced.is_file()
    assert enhanced.name.startswith(f"{catalogue.name}-enhanced-")
    with FeatureStore.open(original, expected_fingerprint=catalogue.fingerprint()) as store:
        assert store.meta.mode == "frozen"
    with FeatureStore.open(enhanced, expected_fingerprint=load_catalogue(tiny_world, titles=path).fingerprint()):
        pass
    # The original store is still the original catalogue's, and reused as it is.
    again = extract_rows(ExtractParams(data=tiny_world, extractors=["bert"], storage=tmp_path, progress=False),
                         Workspace(tmp_path), "bert")
    assert again["cached"] and again["store"] == str(original)
