"""Pre-trained checkpoints in their real on-disk layouts (shrunk to 2 layers, random weights):
stores equal what plain transformers or timm compute, the preflight refuses what it cannot
load in one line, and different or changed weights never share a store.

Every public layout the README names is written by extractors.layouts (config.json with its
architectures, model.safetensors with the architecture's key names, tokenizer and
preprocessor files as the hub has them), once per module.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from extractors.checkpoints import ensure_available, slug_of
from extractors.layouts import LAYOUTS, install_in_hub_cache, write_checkpoint
from extractors.registry import create
from extractors.run import extract_catalogue
from storage.catalogue import load_catalogue
from storage.errors import PipelineError, run_cli
from storage.features import FeatureStore
from _checkpoints import (TITLES, cosines, reference_blip, reference_text, reference_vision, world_images,
                          write_world)

ROOT = Path(__file__).resolve().parents[1]
TEXT_AND_VISION = [repo for repo, layout in LAYOUTS.items() if layout.extractor in ("bert", "vit")]
BLIP = [repo for repo, layout in LAYOUTS.items() if layout.extractor == "blip"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return write_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Every layout of extractors.layouts, tiny, in a folder named after its repository."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {repo: write_checkpoint(repo, root / repo.replace("/", "__"), TITLES) for repo in LAYOUTS}


def stored(result) -> tuple[np.ndarray, FeatureStore]:
    """The vectors and metadata of a store: an ExtractResult's, or the one at a path."""
    with FeatureStore.open(getattr(result, "path", result)) as store:
        return store.load().vectors.astype(np.float32), store.meta


def extract(spec: str, world: Path, features: Path, **options):
    extractor = create(spec, **options)
    return extractor, extract_catalogue(extractor, load_catalogue(world), features, device="cpu", progress=False)


def extract_as_the_flow_does(spec: str, world: Path, storage: Path, pooling: str | None = None):
    """The store `flows.extract` writes: its parameters (their validators are the preflight)
    and its task's run-layer function; and the extractor, for its attributes. (The plain
    function: see test_a_checkpoint_in_the_hub_cache_is_found_by_its_name.)"""
    from runs.extract import extract_rows
    from runs.params import ExtractParams
    from runs.workspace import Workspace

    params = ExtractParams(data=world, extractors=[spec], pooling=pooling, storage=storage, device="cpu",
                           workers=0, progress=False)
    row = extract_rows(params, Workspace(params.storage), spec)
    return create(spec, pooling=pooling), Path(row["store"])


# ---------------------------------------------------------------- equal to the libraries


@pytest.mark.parametrize("repo, pooling", [(repo, None) for repo in TEXT_AND_VISION] + [
    ("openai/clip-vit-base-patch32", "model"),  # CLIP's projection: the joint image-text space
    ("sentence-transformers/all-MiniLM-L6-v2", "mean"),
    ("bert-base-uncased", "mean"),
])
def test_stores_equal_what_the_library_computes(repo, pooling, folders, world, tmp_path):
    layout, path = LAYOUTS[repo], folders[repo]
    ckpt = ensure_available(layout.extractor, str(path), pooling)
    assert (ckpt.family, ckpt.pooling) == (layout.family, pooling or layout.pooling)
    extractor, store_path = extract_as_the_flow_does(f"{layout.extractor}:{path}", world, tmp_path, pooling)
    vectors, meta = stored(store_path)
    if layout.extractor == "bert":
        expected = reference_text(path, ckpt.pooling)
    else:
        expected = reference_vision(layout.family, path, world_images(world), ckpt.pooling)
        vectors = vectors[:4]  # N5 has no image
    assert cosines(vectors, expected).min() >= 0.999, cosines(vectors, expected)
    assert meta.dim == extractor.dim == expected.shape[1] and ckpt.width in (None, meta.dim)
    assert meta.preprocess["pooling"] == ckpt.pooling and meta.preprocess["weights"].startswith("dir:")
    assert meta.revision == ckpt.revision and meta.revision.startswith("files-")
    with FeatureStore.open(store_path) as store:
        tokens, mask = store.take_tokens(np.arange(len(TITLES)))
    assert tokens.shape[1:] == (extractor.num_tokens, extractor.token_dim)
    if layout.extractor == "vit":  # every patch token is real, and the count is the model's own
        assert mask[:4].all()


@pytest.mark.parametrize("repo", BLIP)
def test_blip_retrieval_checkpoints_equal_transformers(repo, folders, world, tmp_path):
    path = folders[repo]
    extractor, store_path = extract_as_the_flow_does(f"blip:{path}", world, tmp_path)
    vectors, meta = stored(store_path)
    expected = reference_blip(path, world_images(world), TITLES[:4])
    assert cosines(vectors[:4], expected["vectors"]).min() >= 0.999
    assert meta.dim == int(json.loads((path / "config.json").read_text())["text_config"]["hidden_size"])
    # The unimodal pair, stored beside the grounded vector as extra datasets.
    with FeatureStore.open(store_path) as store:
        extras = store.load(tokens=False, extras=True).extras
    for name in ("image_embeds", "text_embeds"):
        assert extras[name].shape == (len(TITLES), extractor.projection_dim)
        assert cosines(extras[name][:4].astype(np.float32), expected[name]).min() >= 0.999, name


def test_a_checkpoint_in_the_hub_cache_is_found_by_its_name(folders, world, tmp_path, monkeypatch):
    """The thesis' ViT by its hub name, through flows.extract's parameters (their validators are
    the preflight) and its task's run-layer function, from a fake cache (blobs, snapshots of
    links, refs/main); bare timm and BERT names as their libraries spell them. (The plain
    function: a Prefect harness started here would be shared by later tests, whose DataLoader
    workers it breaks.)"""
    from runs.extract import extract_rows
    from runs.params import ExtractParams
    from runs.workspace import Workspace

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    snapshot = install_in_hub_cache(folders["google/vit-base-patch16-224"], cache, "google/vit-base-patch16-224")
    install_in_hub_cache(folders["timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"], cache,
                         "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k")
    install_in_hub_cache(folders["bert-base-uncased"], cache, "google-bert/bert-base-uncased")

    ckpt = ensure_available("vit", "google/vit-base-patch16-224")
    assert (ckpt.source, ckpt.path, ckpt.revision) == ("hub", snapshot, snapshot.name)
    assert ensure_available("vit", "vit_base_patch16_224").repo == "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"
    assert ensure_available("vit", "hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k").format == "timm"
    assert ensure_available("bert", "bert-base-uncased").repo == "google-bert/bert-base-uncased"

    params = ExtractParams(data=world, extractors=["vit:google/vit-base-patch16-224"], storage=tmp_path / "storage",
                           device="cpu", progress=False)
    row = extract_rows(params, Workspace(params.storage), params.extractors[0])
    path = Path(row["store"])
    assert path.name.startswith(f"{world.name}__vit-google-vit-base-patch16-224-") and not row["cached"]
    with FeatureStore.open(path) as store:
        vectors, meta = store.load().vectors.astype(np.float32), store.meta
    expected = reference_vision("ViT", snapshot, world_images(world), "cls")
    assert cosines(vectors[:4], expected).min() >= 0.999
    assert meta.preprocess["weights"] == f"hub:google/vit-base-patch16-224@{snapshot.name}"


# ---------------------------------------------------------------- refused in one line


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def broken(folders, tmp_path_factory) -> dict[str, Path]:
    """Folders each failure case is made of."""
    root = tmp_path_factory.mktemp("broken")
    out = {"clip": folders["openai/clip-vit-base-patch32"], "bert": folders["bert-base-uncased"],
           "vit": folders["google/vit-base-patch16-224"]}
    out["no-weights"] = _copy(folders["google/vit-base-patch16-224"], root / "no-weights")
    (out["no-weights"] / "model.safetensors").unlink()
    out["tf-only"] = _copy(out["no-weights"], root / "tf-only")
    (out["tf-only"] / "tf_model.h5").write_bytes(b"\x89HDF")
    out["empty"] = root / "empty"
    out["empty"].mkdir()
    out["bad-json"] = _copy(folders["google/vit-base-patch16-224"], root / "bad-json")
    (out["bad-json"] / "config.json").write_text('{\n  "model_type": "vit",\n  "hidden_size": 32,,\n}')
    out["no-preprocessor"] = _copy(folders["google/vit-base-patch16-224"], root / "no-preprocessor")
    (out["no-preprocessor"] / "preprocessor_config.json").unlink()
    out["captioning"] = _copy(folders["Salesforce/blip-itm-base-coco"], root / "captioning")
    config = json.loads((out["captioning"] / "config.json").read_text())
    captioning = {**config, "architectures": ["BlipForConditionalGeneration"]}
    (out["captioning"] / "config.json").write_text(json.dumps(captioning))
    out["remote-code"] = _copy(folders["bert-base-uncased"], root / "remote-code")
    config = json.loads((out["remote-code"] / "config.json").read_text())
    (out["remote-code"] / "config.json").write_text(json.dumps({**config, "model_type": "new",
                                                                "auto_map": {"AutoModel": "modeling.NewModel"}}))
    out["spm-only"] = _copy(folders["microsoft/deberta-v3-base"], root / "spm-only")
    (out["spm-only"] / "tokenizer.json").unlink()
    (out["spm-only"] / "spm.model").write_bytes(b"\x0a\x0b")  # microsoft/deberta-v3-base ships only this
    out["dense"] = _copy(folders["sentence-transformers/all-MiniLM-L6-v2"], root / "dense")
    modules = json.loads((out["dense"] / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (out["dense"] / "modules.json").write_text(json.dumps(modules))
    return out


def _sentencepiece_readable() -> bool:
    import importlib.util

    try:
        return all(importlib.util.find_spec(m) for m in ("sentencepiece", "google.protobuf"))
    except ModuleNotFoundError:
        return False


FAILURES = [
    ("bert:{clip}", ["CLIP checkpoint", "not a text encoder", "pass vit:", "--pooling model"]),
    ("vit:{bert}", ["BERT checkpoint", "pass bert:"]),
    ("blip:{vit}", ["ViT checkpoint", "pass vit:"]),
    ("vit:{no-weights}", ["holds config.json but no weights", "model.safetensors"]),
    ("vit:{tf-only}", ["holds only tf_model.h5"]),
    ("vit:{empty}", ["has no config.json"]),
    ("vit:{bad-json}", ["config.json:3: not valid JSON"]),
    ("vit:{no-preprocessor}", ["no preprocessor_config.json"]),
    ("blip:{captioning}", ["BlipForConditionalGeneration", "blip-itm-base-coco"]),
    ("bert:{remote-code}", ["custom model code"]),
    ("bert:{dense}", ["Dense (2_Dense)", "pooling cls or mean"]),
    ("bert:no-org/no-such-model", ["not a local folder", "hf download no-org/no-such-model", "tiny"]),
    ("vit:./no/such/dir", ["does not exist"]),
] + ([] if _sentencepiece_readable() else [  # where they are installed, such a checkpoint loads
    ("bert:{spm-only}", ["only tokenizer is a SentencePiece model (spm.model)", "uv add sentencepiece"]),
])


@pytest.mark.parametrize("spec, expected", FAILURES, ids=[f[0] for f in FAILURES])
def test_the_command_refuses_in_one_line_before_prefect(spec, expected, broken, capsys, tmp_path):
    from flows.extract import main

    spec = spec.format(**broken)
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, ["--extractor", spec, "--storage", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "huggingface-cli" not in err
    for part in expected:
        assert part in err, (part, err)
    if "does not exist" not in expected:
        assert "does not exist" not in err  # a folder that is there is never called missing


def test_the_preflight_reads_files_only(broken, folders, tmp_path):
    """No torch, transformers or timm is imported to answer, failures or not (what keeps it
    to a second), and importing the torch-free extractor modules changes no environment variable."""
    specs = [spec.format(**broken) for spec, _ in FAILURES] + [
        f"{LAYOUTS[repo].extractor}:{path}" for repo, path in folders.items()]
    code = (
        "import json, os, sys\n"
        "before = dict(os.environ)\n"
        "import extractors.checkpoints, extractors.families, extractors.registry, extractors.config\n"
        "from extractors.checkpoints import ensure_available\n"
        "from extractors.registry import parse_spec\n"
        "from storage.errors import PipelineError\n"
        "env = dict(os.environ) == before\n"
        "out = []\n"
        f"for spec in {specs!r}:\n"
        "    try:\n"
        "        out.append(ensure_available(*parse_spec(spec)).family)\n"
        "    except PipelineError as err:\n"
        "        out.append('error: ' + str(err))\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'timm', 'PIL') if m in sys.modules)\n"
        "print(json.dumps({'out': out, 'heavy': heavy, 'env': env}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty-cache")})
    report = json.loads(done.stdout)
    assert report["heavy"] == [] and report["env"] is True
    assert [o.startswith("error: ") for o in report["out"]] == [True] * len(FAILURES) + [False] * len(folders)
    assert report["out"][len(FAILURES):] == [LAYOUTS[repo].family for repo in folders]


def test_library_code_sets_no_environment_variable():
    """Importing an extractor never sets process-wide state (HF_HUB_OFFLINE and the like)."""
    import ast

    for path in sorted((ROOT / "extractors").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                text = ast.unparse(node.func)
            elif isinstance(node, ast.Assign):
                text = ast.unparse(node.targets[0])
            else:
                continue
            assert not text.startswith(("os.environ.setdefault", "os.environ.update", "os.environ[", "os.putenv")), \
                f"{path.name}:{node.lineno}: {text}"


def test_a_checkpoint_that_fails_to_load_says_why_in_one_line(folders, tmp_path):
    broken = _copy(folders["bert-base-uncased"], tmp_path / "truncated")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # an interrupted copy
    with pytest.raises(PipelineError) as err:
        create(f"bert:{broken}")
    message = str(err.value)
    assert "\n" not in message and str(broken) in message and "loading the encoder failed" in message
    assert "Error" in message  # the library's own error type, not a guess


def test_pooling_that_the_model_does_not_have_is_refused(folders):
    with pytest.raises(PipelineError, match="has no class token; pass pooling model"):
        create(f"vit:{folders['google/siglip-base-patch16-224']}", pooling="cls")
    with pytest.raises(PipelineError, match="has no class token"):
        create(f"vit:{folders['timm/vit_base_patch16_siglip_224.webli']}", pooling="cls")
    with pytest.raises(PipelineError, match="no sentence-transformers pooling"):
        create(f"bert:{folders['bert-base-uncased']}", pooling="model")
    with pytest.raises(PipelineError, match="unknown pooling 'max'"):
        create(f"bert:{folders['bert-base-uncased']}", pooling="max")


def test_dense_sentence_models_run_with_an_explicit_pooling(broken):
    assert ensure_available("bert", str(broken["dense"]), "mean").pooling == "mean"


# ---------------------------------------------------------------- store identity


def test_checkpoints_with_the_same_folder_name_never_share_a_store(folders, world, tmp_path):
    a = _copy(folders["bert-base-uncased"], tmp_path / "a" / "model")
    b = write_checkpoint("bert-base-uncased", tmp_path / "b" / "model", TITLES, seed=1)
    assert slug_of("bert", str(a)) != slug_of("bert", str(b))
    assert slug_of("bert", str(a)).startswith("bert-model-")
    features = tmp_path / "features"
    _, first = extract(f"bert:{a}", world, features)
    _, second = extract(f"bert:{b}", world, features)
    assert first.path != second.path and not second.cached
    assert not np.allclose(stored(first)[0], stored(second)[0])


def test_hub_names_of_other_organisations_never_share_a_store(folders, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    install_in_hub_cache(folders["bert-base-uncased"], tmp_path, "org1/name")
    install_in_hub_cache(folders["bert-base-uncased"], tmp_path, "org2/name")
    assert slug_of("bert", "org1/name") != slug_of("bert", "org2/name")
    with pytest.raises(PipelineError, match="several checkpoints of that name: org1/name, org2/name"):
        ensure_available("bert", "name")


def test_weights_replaced_in_place_are_never_served_stale(folders, world, tmp_path, caplog):
    folder = _copy(folders["bert-base-uncased"], tmp_path / "model")
    features = tmp_path / "features"
    _, first = extract(f"bert:{folder}", world, features)
    with caplog.at_level("INFO", logger="extractors.run"):
        _, again = extract(f"bert:{folder}", world, features)
    assert again.cached and again.path == first.path
    assert "reused" in again.note and str(folder) in again.note and again.note in caplog.text

    write_checkpoint("bert-base-uncased", folder, TITLES, seed=1)  # new weights, same folder and file names
    _, fresh = extract(f"bert:{folder}", world, features)
    assert not fresh.cached and fresh.path != first.path
    assert not np.allclose(stored(first)[0], stored(fresh)[0])
    assert slug_of("bert", str(folder)) == fresh.path.name.split("__")[1]


# ---------------------------------------------------------------- the documented table


def test_the_documented_table_is_what_the_tests_load():
    """docs/checkpoints.md's table of families (the README's) lists exactly these layouts,
    with the family and default pooling the preflight finds (checked above, per layout)."""
    rows = set()
    for line in (ROOT / "docs" / "checkpoints.md").read_text().splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] in ("bert", "vit", "blip"):
            rows.add((cells[0], cells[1], cells[2], cells[3].split()[0]))
    assert rows == {(layout.extractor, layout.family, repo, layout.pooling) for repo, layout in LAYOUTS.items()}


def test_the_benchmark_runs_over_real_layouts(tmp_path, monkeypatch, tiny_world):
    """benchmarks/extract.py times the thesis' three checkpoints from their layouts; shrunk here."""
    import importlib.util

    (tmp_path / "synthetic-tiny-seed0").symlink_to(tiny_world)  # the world it would generate

    spec = importlib.util.spec_from_file_location("bench_extract", ROOT / "benchmarks" / "extract.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    out = tmp_path / "result.json"
    assert bench.main(["--models", "tiny", "--checkpoints", "layouts", "--device", "cpu", "--scale", "tiny",
                       "--rows", "12", "--naive-rows", "3", "--threads", "1", "--cache", str(tmp_path),
                       "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["checkpoints"] == "layouts" and [r["extractor"] for r in doc["results"]] == ["bert", "vit", "blip"]
    assert all(r["rows"] == 12 and r["max_abs_diff"] < 1e-2 for r in doc["results"])
    written = {p.name for p in (tmp_path / "checkpoints" / "tiny").iterdir()}
    assert written == {"bert-base-uncased", "google__vit-base-patch16-224", "Salesforce__blip-itm-base-coco"}
