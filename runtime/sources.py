"""Resolve a model source URI (DESIGN.md: ``spec.source.uri``) to files on local disk. Never downloads.

Accepted forms (``file://``, plain paths and ``hf://`` resolve through the shared
:func:`vnpu.modelfile.local_source_path`):

* ``/abs/path``, ``relative/path`` or ``file:///abs/path`` — a ``.gguf`` file, a ``.safetensors`` file
  (``config.json`` beside it) or a directory holding either.
* ``pvc://<claim>/<path>`` — the PersistentVolumeClaim ``claim`` mounted in the pod at
  ``<pvc_root>/<claim>`` (``--pvc-root`` / ``VNPU_PVC_ROOT``, default ``/mnt/pvc``).
* ``hf://<org>/<name>[@<revision>]`` — a snapshot already in a local Hugging Face hub cache or mirror
  (``--hf-cache`` / ``VNPU_HF_CACHE``, else ``HF_HUB_CACHE``, ``$HF_HOME/hub``, ``~/.cache/huggingface/hub``).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from vnpu.modelfile import ModelFileInfo, local_source_path, read_model_file, resolves_within

FORMATS = ("gguf", "safetensors")
DEFAULT_PVC_ROOT = "/mnt/pvc"


class SourceError(ValueError):
    """The URI is malformed or names nothing usable on this machine (message says what and where)."""


@dataclass(frozen=True)
class ResolvedSource:
    """A model's files on local disk and what their headers say."""

    uri: str
    info: ModelFileInfo

    @property
    def format(self) -> str:
        return self.info.format

    @property
    def weights(self) -> tuple[Path, ...]:
        return tuple(Path(p) for p in self.info.paths)

    @property
    def directory(self) -> Path:
        return self.weights[0].parent

    @property
    def config_json(self) -> Path | None:
        path = self.directory / "config.json"
        return path if path.is_file() else None

    @property
    def header_digest(self) -> str:
        """A digest of what the weights' headers say (every tensor's name, dtype, shape, size and offset,
        and the file it is in): a holder and a replica compare it to know they mean the same weights."""
        digest = hashlib.sha256(self.format.encode())
        for t in sorted(self.info.tensors, key=lambda t: (Path(t.file).name, t.offset, t.name)):
            row = (
                t.name,
                t.dtype,
                ",".join(map(str, t.shape)),
                str(t.nbytes),
                str(t.offset),
                Path(t.file).name,
            )
            digest.update(("\x00".join(row) + "\n").encode())
        return digest.hexdigest()[:32]

    @property
    def tokenizer_json(self) -> Path | None:
        path = self.directory / "tokenizer.json"
        return path if path.is_file() else None


def default_hf_cache() -> Path:
    for var in ("VNPU_HF_CACHE", "HF_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def local_path(
    uri: str,
    *,
    pvc_root: str | os.PathLike[str] | None = None,
    hf_cache: str | os.PathLike[str] | None = None,
) -> Path:
    """The local file or directory ``uri`` names (it may not exist)."""
    parsed = urlparse(uri)
    if parsed.scheme == "pvc":
        claim, rel = parsed.netloc, unquote(parsed.path.lstrip("/"))
        if not claim:
            raise SourceError(f"{uri!r}: expected pvc://<claim>/<path>")
        base = (Path(pvc_root or os.environ.get("VNPU_PVC_ROOT") or DEFAULT_PVC_ROOT) / claim).resolve()
        target = (base / rel).resolve()
        if not resolves_within(target, base):
            raise SourceError(f"{uri!r}: path escapes its volume root {base}")
        return target
    cache = Path(hf_cache) if hf_cache else default_hf_cache()
    try:
        path = local_source_path(uri, cache)
    except ValueError as e:
        raise SourceError(str(e)) from e
    if path is None:
        if parsed.scheme == "hf":
            raise SourceError(
                f"{uri!r} is not in the local model cache {cache} (hf:// sources are never fetched)"
            )
        raise SourceError(
            f"{uri!r}: unsupported scheme {parsed.scheme!r} (use a path, file://, pvc:// or hf://)"
        )
    return path


def resolve(
    uri: str,
    fmt: str | None = None,
    *,
    pvc_root: str | os.PathLike[str] | None = None,
    hf_cache: str | os.PathLike[str] | None = None,
) -> ResolvedSource:
    """Map ``uri`` to local files and read their headers; ``fmt`` (gguf|safetensors) when ambiguous."""
    if fmt is not None and fmt not in FORMATS:
        raise SourceError(f"unknown model format {fmt!r} (expected one of {FORMATS})")
    path = local_path(uri, pvc_root=pvc_root, hf_cache=hf_cache)
    if not path.exists():
        raise SourceError(f"{uri!r}: {path} does not exist")
    try:
        info = read_model_file(path, fmt)  # type: ignore[arg-type]
    except ValueError as e:
        raise SourceError(f"{uri!r}: {e}") from e
    if info.format == "gguf" and len(info.paths) > 1:
        raise SourceError(f"{uri!r}: split GGUF sets are not supported by the runtime; merge them first")
    return ResolvedSource(uri, info)
