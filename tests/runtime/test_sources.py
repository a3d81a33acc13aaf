"""Model source URIs resolve to local files only: paths, file://, pvc:// under a root, hf:// from a cache."""

from __future__ import annotations

from pathlib import Path

import pytest
from rt_helpers import GGUF_NAME

from vnpu.runtime.sources import SourceError, resolve


def link_model(smollm2_path: Path, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / GGUF_NAME).symlink_to(smollm2_path / GGUF_NAME)
    return directory


def test_plain_path_file_uri_and_file(smollm2_path: Path) -> None:
    for uri in (str(smollm2_path), f"file://{smollm2_path}", str(smollm2_path / GGUF_NAME)):
        source = resolve(uri)
        assert source.format == "gguf" and source.weights == (smollm2_path / GGUF_NAME,)
    with pytest.raises(SourceError, match="absolute"):
        resolve("file://relative/path")
    with pytest.raises(SourceError, match="does not exist"):
        resolve("/nonexistent/model")
    with pytest.raises(SourceError, match="safetensors"):
        resolve(str(smollm2_path), "safetensors")


def test_pvc_uri_resolves_under_the_mount_root(smollm2_path: Path, tmp_path: Path) -> None:
    link_model(smollm2_path, tmp_path / "models-claim" / "smol")
    source = resolve("pvc://models-claim/smol", pvc_root=tmp_path)
    assert source.weights[0].name == GGUF_NAME
    with pytest.raises(SourceError, match="escapes"):
        resolve("pvc://models-claim/../../etc", pvc_root=tmp_path)
    with pytest.raises(SourceError, match="does not exist"):
        resolve("pvc://other-claim/smol", pvc_root=tmp_path)


def test_hf_uri_from_a_local_hub_cache_never_fetched(smollm2_path: Path, tmp_path: Path) -> None:
    repo = tmp_path / "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    link_model(smollm2_path, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    for uri in (
        "hf://HuggingFaceTB/SmolLM2-135M-Instruct",
        "hf://HuggingFaceTB/SmolLM2-135M-Instruct@abc123",
    ):
        assert resolve(uri, hf_cache=tmp_path).weights[0].name == GGUF_NAME
    with pytest.raises(SourceError, match="never fetched"):
        resolve("hf://HuggingFaceTB/SmolLM2-135M-Instruct@v9", hf_cache=tmp_path)
    with pytest.raises(SourceError, match="never fetched"):
        resolve("hf://someone/else", hf_cache=tmp_path)


def test_unknown_scheme_and_ambiguous_directories(smollm2_path: Path, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="unsupported scheme"):
        resolve("s3://bucket/model")
    directory = link_model(smollm2_path, tmp_path / "two")
    (directory / "copy.gguf").symlink_to(smollm2_path / GGUF_NAME)
    with pytest.raises(SourceError, match="several GGUF"):
        resolve(str(directory))
