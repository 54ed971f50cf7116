"""Security and integrity (issue #11): names that become paths, atomic writes, OS errors as
one line, the cover share, and the covers' identity in the catalogue fingerprint.

Full disks and read-only folders are made real where the machine allows: a tiny tmpfs (root
with CAP_SYS_ADMIN; skipped elsewhere), chmod (not as root, which ignores permission bits),
and RLIMIT_FSIZE in a child process (any Linux user: a write past the limit fails half done,
with EFBIG). A monkeypatched `os.write` failing with ENOSPC midway runs everywhere.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage import atomic
from storage.catalogue import MIN_COVER_SHARE, check_covers, load_catalogue
from storage.errors import PipelineError, ShortWriteError, as_pipeline_error, describe_os_error, run_cli
from storage.paths import (
    NAME_MAX_LENGTH,
    UnsafeNameError,
    check_name,
    check_writable,
    inside,
    safe_name,
    storage_path,
    subdir,
)

REPO = Path(__file__).resolve().parents[1]


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary files an atomic write may have left."""
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def run_script(code: str, *, fsize: int | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run `code` (which ends in run_cli(main)) as a child process; with `fsize` its files may
    not grow past that many bytes (RLIMIT_FSIZE: the write that crosses it fails half done)."""
    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.RLIM_INFINITY))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("MMNEWS_TRACEBACK", None)
    if fsize is not None:
        # Python's own bytecode writer does not check for a short write: under the limit it would
        # put a truncated .pyc in the environment's __pycache__, and every later import of that
        # module fails ("marshal data too short").
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=limit if fsize is not None else None)


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- real file systems


@pytest.fixture
def tmpfs(tmp_path):
    """mount(name, kib) -> a fresh tmpfs of that size under tmp_path; skips where mounting is
    not allowed. Unmounted at the end."""
    mounted: list[Path] = []

    def mount(name: str, kib: int) -> Path:
        where = tmp_path / name
        where.mkdir()
        if shutil.which("mount") is None or os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root and the mount command")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k,mode=0755", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture
def read_only(tmp_path, tmpfs):
    """make(fill) -> a folder filled by `fill(folder)` and then made really read-only: chmod
    0555 for an ordinary user, a tmpfs remounted read-only for root (skipped if it cannot be)."""
    restore: list[Path] = []

    def make(fill=lambda folder: None) -> Path:
        if os.geteuid() != 0:
            folder = tmp_path / "read-only"
            folder.mkdir()
            fill(folder)
            folder.chmod(0o555)
            restore.append(folder)
            return folder
        folder = tmpfs("read-only", 1024)
        fill(folder)
        proc = subprocess.run(["mount", "-o", "remount,ro", str(folder)], capture_output=True, text=True)
        if proc.returncode:
            pytest.skip(f"cannot remount read-only: {proc.stderr.strip()}")
        return folder

    yield make
    for folder in restore:
        folder.chmod(0o755)


# ----------------------------------------------------------------------------- 1. names and paths

BAD_NAMES = {
    "../../escape": "is a path (contains '/')",
    "/abs/path": "is a path (contains '/')",
    "runs/one": "is a path",
    "a\\b": "is a path (contains '\\\\')",
    "nul\x00byte": "NUL",
    "..": "is not a name",
    ".": "is not a name",
    ".hidden": "starts with '.'",
    "-rf": "starts with '-'",
    "": "is empty",
    "x" * (NAME_MAX_LENGTH + 1): f"is {NAME_MAX_LENGTH + 1} characters long",
    "with space": "contains ' '",
    "caf\u00e9": "contains '\u00e9'",
    "a;rm": "contains ';'",
    "new\nline": "contains '\\n'",
}


@pytest.mark.parametrize("name", list(BAD_NAMES), ids=lambda n: repr(n)[:20])
def test_unsafe_names_are_refused_in_one_line_naming_the_parameter(name):
    with pytest.raises(UnsafeNameError) as info:
        check_name(name, "--name")
    message = str(info.value)
    assert message.startswith(f"--name {repr(name)[:57]}"), message
    assert BAD_NAMES[name] in message and "\n" not in message
    assert "letters, digits" in message  # and says what to give instead
    assert isinstance(info.value, ValueError) and isinstance(info.value, PipelineError)


@pytest.mark.parametrize("name", ["run-1", "mind-small__nrms__hadamard__bert+vit__tokens", "a.b_c-d+e@f=g,h",
                                  "x" * NAME_MAX_LENGTH, "2024-01-01T10.00"])
def test_safe_names_pass_unchanged(name):
    assert check_name(name, "--run-name") == name


def test_non_text_names_are_refused():
    with pytest.raises(UnsafeNameError, match="--run-name 3: not a text name"):
        check_name(3, "--run-name")


@given(st.text(max_size=40))
def test_any_accepted_name_stays_one_component_and_safe_name_is_accepted(text):
    root = Path("/srv/storage/models")
    try:
        name = check_name(text)
    except UnsafeNameError:
        pass
    else:
        assert (root / name).parent == root and os.path.normpath(root / name) == str(root / name)
    assert check_name(safe_name(text)) == safe_name(text)


def test_pydantic_validators_can_call_check_name():
    from pydantic import BaseModel, ValidationError, field_validator

    class Params(BaseModel):
        name: str | None = None

        @field_validator("name")
        @classmethod
        def _safe(cls, value: str | None) -> str | None:
            return None if value is None else check_name(value, "--name")

    assert Params(name="ok").name == "ok"
    with pytest.raises(ValidationError) as info:
        Params(name="../../escape")
    error = info.value.errors()[0]
    assert isinstance(error["ctx"]["error"], UnsafeNameError)
    assert str(error["ctx"]["error"]).startswith("--name '../../escape': is a path")


def test_storage_path_keeps_names_inside_their_folder(tmp_path):
    storage = tmp_path / "storage"
    assert storage_path("reports", "cmp-1", storage=storage) == (storage / "reports" / "cmp-1").resolve()
    for name in ("../../escape", "/abs/path", ".."):
        with pytest.raises(UnsafeNameError, match=r"^--name "):
            storage_path("reports", name, storage=storage, parameter="--name")
    assert not (tmp_path / "escape").exists()
    with pytest.raises(UnsafeNameError):
        storage_path("models", "../x", storage=tmp_path / "untouched")
    assert not (tmp_path / "untouched").exists()  # a refused name creates nothing


def test_a_symbolic_link_leading_out_of_the_storage_is_refused(tmp_path):
    storage, outside = tmp_path / "storage", tmp_path / "elsewhere"
    outside.mkdir()
    models = subdir("models", storage)
    (models / "planted").symlink_to(outside)
    with pytest.raises(UnsafeNameError) as info:
        storage_path("models", "planted", storage=storage, parameter="--run-name")
    message = str(info.value)
    assert message.startswith("--run-name 'planted': ") and "leads outside" in message and str(outside) in message
    (models / "loop").symlink_to(models)  # a link back to the folder itself is no run folder either
    with pytest.raises(UnsafeNameError, match="leads outside"):
        storage_path("models", "loop", storage=storage)
    # A link that stays inside is fine, and so is a subfolder the operator linked elsewhere.
    (models / "real").mkdir()
    (models / "alias").symlink_to(models / "real")
    assert storage_path("models", "alias", storage=storage) == (models / "real").resolve()
    big_disk = tmp_path / "big-disk"
    big_disk.mkdir()
    (storage / "features").symlink_to(big_disk)
    assert storage_path("features", "store", storage=storage) == big_disk.resolve() / "store"


def test_inside_checks_every_component(tmp_path):
    assert inside(tmp_path, "a", "b") == tmp_path.resolve() / "a" / "b"
    with pytest.raises(UnsafeNameError, match="shard name '..'"):
        inside(tmp_path, "a", "..", parameter="shard name")


def test_a_file_as_storage_root_is_one_line(tmp_path):
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    with pytest.raises(PipelineError) as info:
        subdir("models", afile)
    assert str(info.value) == (f"--storage {afile}: is a file, not a folder; give a folder as the storage root "
                               "(it is created if missing)")
    with pytest.raises(PipelineError, match=r"cannot create the storage folder .*a part of this path is a file"):
        subdir("models", afile / "below")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "features").write_text("x")
    with pytest.raises(PipelineError, match=r"is a file where the storage root's features/ folder belongs"):
        subdir("features", tmp_path / "root")


def test_the_environment_variable_is_named_when_it_is_the_source(tmp_path, monkeypatch):
    afile = tmp_path / "f"
    afile.write_text("x")
    monkeypatch.setenv("MMNEWS_STORAGE", str(afile))
    with pytest.raises(PipelineError, match=r"^MMNEWS_STORAGE .*: is a file"):
        subdir("reports")


def test_storage_that_cannot_be_created_or_written_is_one_line(read_only):
    folder = read_only(lambda f: (f / "storage" / "models").mkdir(parents=True))
    with pytest.raises(PipelineError) as info:
        subdir("reports", folder / "storage")
    message = str(info.value)
    assert message.startswith(f"cannot create the storage folder {folder / 'storage' / 'reports'} (--storage): ")
    assert "read-only file system (EROFS)" in message or "permission denied (EACCES)" in message
    assert "\n" not in message
    # An existing folder is returned for reading, and refused for writing.
    assert subdir("models", folder / "storage") == folder / "storage" / "models"
    with pytest.raises(PipelineError, match=r"the storage folder \(--storage\) .*models is not writable: .*models: "):
        subdir("models", folder / "storage", writable=True)


def test_check_writable_reports_the_folder_not_its_probe(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / ".mmnews-write-test-abc"))

    monkeypatch.setattr("storage.paths.tempfile.mkstemp", refuse)
    with pytest.raises(PipelineError) as info:
        check_writable(tmp_path, "--storage")
    assert str(info.value).startswith(f"--storage {tmp_path} is not writable: {tmp_path}: permission denied (EACCES)")


# ----------------------------------------------------------------------------- 4. OS errors as one line

OS_CASES = {
    errno.ENOSPC: "no space left on the device (ENOSPC); free space there",
    errno.EDQUOT: "disk quota exceeded (EDQUOT)",
    errno.EACCES: "permission denied (EACCES); give this user access",
    errno.EPERM: "operation not permitted (EPERM)",
    errno.EROFS: "read-only file system (EROFS); point --storage",
    errno.ENOTDIR: "a part of this path is a file, not a folder (ENOTDIR)",
    errno.EISDIR: "is a folder where a file was expected (EISDIR)",
    errno.ENOENT: "no such file or folder (ENOENT); check the path",
    errno.EFBIG: "file too large",
}


@pytest.mark.parametrize("code", list(OS_CASES), ids=lambda c: errno.errorcode[c])
def test_each_os_error_is_one_line_with_the_path_and_a_fix(code):
    err = OSError(code, os.strerror(code), "/data/storage/models/run/model.txt")
    text = describe_os_error(err, "writing the model")
    assert text.startswith("/data/storage/models/run/model.txt: ") and "\n" not in text
    assert OS_CASES[code] in text.replace(" while writing the model", "")
    assert "while writing the model" in text


def test_library_errors_that_report_an_os_error_are_recognised():
    rust = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert str(as_pipeline_error(rust)).startswith("(the system named no file): no space left on the device (ENOSPC)")
    hdf5 = OSError("Unable to synchronously create file (unable to open file: name = '/s/features/x.h5', "
                   "errno = 13, error message = 'Permission denied', flags = 13, o_flags = 242)")
    assert str(as_pipeline_error(hdf5)).startswith("/s/features/x.h5: permission denied (EACCES)")
    lgbm = Exception("Cannot write binary data to /s/models/r/model.txt, wrote 16384 of 95313 bytes")
    assert str(as_pipeline_error(lgbm)).startswith("/s/models/r/model.txt: the write stopped after 16384 of 95313 "
                                                   "bytes (a full disk, a quota or a file size limit?)")
    assert as_pipeline_error(ValueError("a bug")) is None
    same = PipelineError("already friendly")
    assert as_pipeline_error(same) is same


def test_run_cli_prints_one_line_for_an_os_error_and_keeps_bugs(capsys, monkeypatch):
    def full(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "/s/models/r/model.txt")

    with pytest.raises(SystemExit) as info:
        run_cli(full, [])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: /s/models/r/model.txt: no space left on the device")

    def bug(argv):
        raise KeyError("a bug keeps its traceback")

    with pytest.raises(KeyError):
        run_cli(bug, [])
    monkeypatch.setenv("MMNEWS_TRACEBACK", "1")
    with pytest.raises(OSError):
        run_cli(full, [])


def test_a_read_only_folder_holding_a_truncated_store_is_one_line(read_only):
    """The issue's `PermissionError ... .h5.lock`: resuming a store in a read-only folder."""
    folder = read_only(lambda f: (f / "bert.h5.partial").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100))
    proc = run_script(f"""
        from storage.errors import run_cli
        from storage.features import FeatureWriter, StoreMeta

        def main(argv):
            meta = StoreMeta(extractor="t", checkpoint="c", revision="r", mode="frozen", preprocess={{}},
                             fingerprint="f", dim=4, dtype="float32", token_len=None)
            FeatureWriter({str(folder / 'bert.h5')!r}, meta, ["N1", "N2"])

        run_cli(main)
    """)
    line = assert_one_line_error(proc, str(folder / "bert.h5"))
    assert "read-only file system (EROFS)" in line or "permission denied (EACCES)" in line


# ----------------------------------------------------------------------------- 4. atomic writes


def test_writers_put_complete_files_in_place_with_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        text = atomic.write_text(tmp_path / "a" / "notes.txt", "one\ntwo\n")
        blob = atomic.write_bytes(tmp_path / "blob.bin", b"\x00\x01")
        conf = atomic.write_json(tmp_path / "config.json", {"b": 1, "a": [1.5]})
        arr = atomic.save_npy(tmp_path / "x.npy", np.arange(6).reshape(2, 3))
        npz = atomic.save_npz(tmp_path / "c.npz", {"clicks": np.ones(3)})
        with atomic.atomic_path(tmp_path / "lib.txt") as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".lib.tmp-") and tmp.suffix == ".txt"
            tmp.write_text("written by a library")
    finally:
        os.umask(old)
    assert text.read_text() == "one\ntwo\n" and blob.read_bytes() == b"\x00\x01"
    assert conf.read_text() == '{\n  "a": [\n    1.5\n  ],\n  "b": 1\n}\n'
    assert np.load(arr).tolist() == [[0, 1, 2], [3, 4, 5]]
    with np.load(npz) as saved:
        assert saved["clicks"].tolist() == [1, 1, 1]
    assert (tmp_path / "lib.txt").read_text() == "written by a library"
    assert (text.stat().st_mode & 0o777) == 0o644 and (npz.stat().st_mode & 0o777) == 0o644
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "a") == []


def test_object_arrays_and_unwritable_json_leave_nothing(tmp_path):
    with pytest.raises(ValueError):
        atomic.save_npy(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="Python objects"):
        atomic.save_npz(tmp_path / "o.npz", {"o": np.array([None], dtype=object)})
    with pytest.raises(TypeError):
        atomic.write_json(tmp_path / "o.json", {"x": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def failing_write(monkeypatch, after: int, code: int = errno.ENOSPC) -> None:
    """os.write takes `after` bytes in all, then fails with `code` as a full disk would."""
    real = os.write
    state = {"left": after}

    def write(fd, data):
        if state["left"] <= 0:
            raise OSError(code, os.strerror(code))
        n = real(fd, bytes(data[: state["left"]]))
        state["left"] -= n
        return n

    monkeypatch.setattr(os, "write", write)


def test_a_full_disk_midway_keeps_the_previous_file_and_names_the_final_path(tmp_path, monkeypatch):
    target = tmp_path / "prediction.txt"
    target.write_text("the previous complete file\n")
    failing_write(monkeypatch, after=1000)
    with pytest.raises(OSError) as info:
        atomic.write_text(target, "101 [1,2,3]\n" * 1000)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert target.read_text() == "the previous complete file\n"
    assert leftovers(tmp_path) == []
    assert describe_os_error(info.value).startswith(f"{target}: no space left on the device (ENOSPC); free space")


def test_a_report_written_on_a_full_disk_keeps_the_previous_files_and_leaves_nothing(tmp_path, monkeypatch):
    from test_reports import make_report

    from runs.render import write_report
    from runs.report import FILES

    folder = tmp_path / "report"
    first = write_report(folder, make_report())
    before = {key: path.read_bytes() for key, path in first.items()}
    failing_write(monkeypatch, after=2000)
    with pytest.raises(OSError) as info:
        write_report(folder, make_report())
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC and Path(info.value.filename).name in FILES.values()
    assert {key: path.read_bytes() for key, path in first.items()} == before
    assert leftovers(folder) == []


def test_submission_writers_under_a_full_disk_leave_nothing(tmp_path, monkeypatch, capsys):
    from storage.submission import write_prediction

    def main(argv):
        write_prediction(tmp_path / "prediction.txt", range(2000), np.arange(0, 4001, 2), np.tile([2, 1], 2000))

    failing_write(monkeypatch, after=5000)
    with pytest.raises(SystemExit) as info:
        run_cli(main, [])
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert info.value.code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: {tmp_path / 'prediction.txt'}: no space left on the device (ENOSPC)")
    assert list(tmp_path.iterdir()) == []


def test_a_library_failing_inside_atomic_path_leaves_nothing(tmp_path):
    final = tmp_path / "model.safetensors"
    with pytest.raises(OSError) as info:
        with atomic.atomic_path(final) as tmp:
            tmp.write_bytes(b"half a model")
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(final)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ZeroDivisionError):  # a bug stays itself
        with atomic.atomic_path(final) as tmp:
            tmp.write_bytes(b"x")
            1 / 0
    with pytest.raises(PipelineError, match="the writer produced no file"):
        with atomic.atomic_path(final):
            pass
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_open(tmp_path / "x.txt") as handle:
            handle.write("partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_folder_in_the_way_is_one_line(tmp_path):
    (tmp_path / "config.json").mkdir()
    with pytest.raises(OSError) as info:
        atomic.write_json(tmp_path / "config.json", {})
    assert info.value.errno == errno.EISDIR
    assert describe_os_error(info.value) == (f"{tmp_path / 'config.json'}: is a folder where a file was expected "
                                             "(EISDIR); move the folder away or give the path of a file")
    assert leftovers(tmp_path) == []


def test_file_size_limit_mid_write_numpy_and_baseline_save(tmp_path):
    """A real half-done write (RLIMIT_FSIZE): PopularityRanker.save through run_cli."""
    folder = tmp_path / "models" / "popularity"
    proc = run_script(f"""
        import numpy as np
        from rankers.baselines import PopularityRanker
        from storage.errors import run_cli

        def main(argv):
            ranker = PopularityRanker(alpha=10.0)
            ranker.clicks, ranker.shown = np.ones(100_000), np.ones(100_000)
            ranker.save({str(folder)!r})

        run_cli(main)
    """, fsize=200_000)
    assert_one_line_error(proc, str(folder / "popularity.npz"), "file too large")
    assert sorted(p.name for p in folder.iterdir()) == []  # no counts, no temporary, and no config.json


def test_file_size_limit_mid_write_lightgbm_model(tmp_path):
    """LightGBM writes its model in C++ and reports a short write in its own exception."""
    pytest.importorskip("lightgbm")
    final = tmp_path / "model.txt"
    code = f"""
        import numpy as np, lightgbm as lgb
        from storage.atomic import atomic_path, write_text
        from storage.errors import run_cli

        def main(argv):
            rng = np.random.default_rng(0)
            data = lgb.Dataset(rng.random((500, 20)), rng.random(500))
            booster = lgb.train({{"verbose": -1, "num_threads": 1}}, data, num_boost_round=50)
            assert len(booster.model_to_string()) > 40_000
            if argv[0] == "save_model":
                with atomic_path({str(final)!r}) as tmp:
                    booster.save_model(str(tmp))
            else:
                write_text({str(final)!r}, booster.model_to_string())

        run_cli(main, [{{}}])
    """
    # booster.save_model: LightGBM's C++ logger prints its own "[LightGBM] [Fatal]" line to
    # stderr before raising, which no Python code can stop; ours follows, and nothing is left.
    proc = run_script(code.replace("[{}]", '["save_model"]'), fsize=20_000)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("[LightGBM] [Fatal] Cannot write") and len(lines) == 2
    assert lines[1].startswith(f"error: {final}: the write stopped after 20000 of ")
    assert list(tmp_path.iterdir()) == []
    # model_to_string + write_text (what rankers.lgbm should do): exactly one line.
    line = assert_one_line_error(run_script(code.replace("[{}]", '["text"]'), fsize=20_000), str(final))
    assert "file too large" in line and list(tmp_path.iterdir()) == []


def test_a_real_full_disk(tmpfs):
    small = tmpfs("full", 64)
    with pytest.raises(OSError) as info:
        atomic.write_text(small / "report.md", "x" * 200_000)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(small / "report.md")
    assert list(small.iterdir()) == []
    with pytest.raises(OSError) as info:
        atomic.save_npy(small / "scores_dev.npy", np.zeros(50_000))
    assert info.value.errno == errno.ENOSPC and list(small.iterdir()) == []
    lgb = pytest.importorskip("lightgbm")
    rng = np.random.default_rng(0)
    booster = lgb.train({"verbose": -1, "num_threads": 1}, lgb.Dataset(rng.random((500, 20)), rng.random(500)),
                        num_boost_round=50)
    with pytest.raises(ShortWriteError) as short:
        with atomic.atomic_path(small / "model.txt") as tmp:
            booster.save_model(str(tmp))
    assert short.value.filename == str(small / "model.txt") and list(small.iterdir()) == []


# ----------------------------------------------------------------------------- 5. cover share


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    from storage.synthetic import generate_world

    root = tmp_path_factory.mktemp("cover-worlds")
    generate_world(root / "no-images", scale="tiny", seed=0, images=False)
    generate_world(root / "with-images", scale="tiny", seed=0)
    return root


def test_a_world_without_images_is_refused_unless_allowed(worlds):
    catalogue = load_catalogue(worlds / "no-images")
    assert catalogue.cover_share == 0.0
    with pytest.raises(PipelineError) as info:
        check_covers(catalogue)
    message = str(info.value)
    assert "no news of no-images has a cover image" in message and "images does not exist" in message
    assert "--allow-no-images" in message and "--images" in message and "\n" not in message
    warning = check_covers(catalogue, allow_no_images=True)
    assert warning is not None and "title-only card" in warning


def test_an_empty_or_mismatched_images_folder_is_refused(worlds, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PipelineError, match=r"the image folder .*empty is empty"):
        check_covers(load_catalogue(worlds / "no-images", empty))
    other = tmp_path / "other"
    other.mkdir()
    (other / "N1.JPG").write_bytes(b"x")
    (other / "cover.png").write_bytes(b"x")
    with pytest.raises(PipelineError, match=r"holds 2 entries \(0 .jpg files\) but none is named <news_id>.jpg"):
        check_covers(load_catalogue(worlds / "no-images", other))


def test_a_low_cover_share_warns_and_a_normal_one_does_not(worlds, tmp_path):
    full = load_catalogue(worlds / "with-images")
    assert 0.3 < full.cover_share < 0.6 and check_covers(full) is None
    partial = tmp_path / "partial"
    partial.mkdir()
    some = sorted(full.images)[: max(1, int(0.1 * len(full)))]
    for news_id in some:
        shutil.copy2(full.image_dir / f"{news_id}.jpg", partial)
    catalogue = load_catalogue(worlds / "with-images", partial)
    assert catalogue.cover_share == pytest.approx(len(some) / len(full))
    assert catalogue.cover_share < MIN_COVER_SHARE
    warning = check_covers(catalogue)
    assert warning is not None and f"only {len(some):,} of {len(full):,} news" in warning and "44%" in warning


# ----------------------------------------------------------------------------- 7. stale covers


def test_a_cover_replaced_by_one_of_the_same_size_changes_the_fingerprint(worlds, tmp_path):
    world = tmp_path / "world"
    shutil.copytree(worlds / "with-images", world)  # copy2 keeps times: the same fingerprint
    before = load_catalogue(world)
    assert before.fingerprint() == load_catalogue(worlds / "with-images").fingerprint()
    cover = world / "images" / f"{sorted(before.images)[0]}.jpg"
    old = cover.stat()
    data = bytearray(cover.read_bytes())
    data[len(data) // 2] ^= 0xFF  # other pixels, same size
    cover.write_bytes(bytes(data))
    if cover.stat().st_mtime_ns == old.st_mtime_ns:
        # Written within one tick of the file system clock; a real replacement comes later.
        os.utime(cover, ns=(old.st_atime_ns, old.st_mtime_ns + 1_000_000))
    after = load_catalogue(world)
    assert cover.stat().st_size == old.st_size and after.images == before.images
    assert after.fingerprint() != before.fingerprint()


def test_a_store_over_a_replaced_cover_is_extracted_again(worlds, tmp_path):
    """The fingerprint's change reaches the stores: the next run extracts anew instead of
    serving the vectors of the old cover (the same size, so only its time tells)."""
    from runs.extract import extract_rows
    from runs.params import ExtractParams
    from runs.workspace import Workspace

    world = tmp_path / "world"
    shutil.copytree(worlds / "with-images", world)
    params = ExtractParams(data=world, extractors=["vit:tiny"], storage=tmp_path / "storage", progress=False,
                           workers=0)

    def extract() -> dict:
        return extract_rows(params, Workspace(params.storage), "vit:tiny")

    assert extract()["cached"] is False and extract()["cached"] is True
    cover = world / "images" / f"{sorted(load_catalogue(world).images)[0]}.jpg"
    old = cover.stat()
    data = bytearray(cover.read_bytes())
    data[len(data) // 2] ^= 0xFF  # other pixels, same size
    cover.write_bytes(bytes(data))
    os.utime(cover, ns=(old.st_atime_ns, old.st_mtime_ns + 1_000_000_000))
    assert cover.stat().st_size == old.st_size and extract()["cached"] is False


def test_the_fingerprint_ignores_when_the_catalogue_was_read(worlds):
    assert load_catalogue(worlds / "with-images").fingerprint() == load_catalogue(worlds / "with-images").fingerprint()


def test_saved_ranker_config_is_plain_json(tmp_path):
    from rankers.baselines import RandomRanker

    (path,) = RandomRanker(seed=3).save(tmp_path / "random")
    assert json.loads(path.read_text()) == {"ranker": "random", "seed": 3} and leftovers(tmp_path / "random") == []
    assert RandomRanker.load(tmp_path / "random").seed == 3
