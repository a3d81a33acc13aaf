"""Which files a model's header read opens: regular files only, inside the root its source was allowed
under (a checkpoint is its author's; a link or a FIFO among its files must not lead the operator
elsewhere or stall its pass)."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pytest
from safetensors.numpy import save_file

from vnpu import modelfile
from vnpu.memory import EstimateError, estimate_from_spec
from vnpu.modelfile import MAX_CONFIG_FILE, read_model_file

CONFIG = {
    "model_type": "llama",
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "hidden_size": 128,
    "intermediate_size": 256,
    "vocab_size": 1000,
}
SECRET = b"TOPSECRET-KEY-MATERIAL" * 4


def _shard(path: Path) -> None:
    save_file({"t": np.zeros((4,), dtype=np.float32)}, str(path))


def _index(ckpt: Path, *shards: str) -> None:
    weight_map = {f"t{i}": shard for i, shard in enumerate(shards)}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _spec(uri: str) -> dict:
    return {"source": {"uri": uri}, "memory": {"kvCacheMiB": 1}}


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(root, a checkpoint inside it, a file outside it the operator can read)."""
    root, secret = tmp_path / "models", tmp_path / "operator-secret"
    ckpt = root / "tenant-a"
    ckpt.mkdir(parents=True)
    secret.write_bytes(SECRET)
    return root, ckpt, secret


@pytest.mark.parametrize("with_index", [True, False])
def test_a_shard_linked_outside_the_root_is_refused(roots, with_index):
    root, ckpt, secret = roots
    _shard(ckpt / "a.safetensors")
    os.symlink(secret, ckpt / "b.safetensors")  # lexically inside the checkpoint
    if with_index:
        _index(ckpt, "a.safetensors", "b.safetensors")
    with pytest.raises(ValueError, match=r"^b\.safetensors: resolves outside") as refused:
        read_model_file(ckpt, root=root)
    with pytest.raises(EstimateError, match=r"b\.safetensors: resolves outside") as estimated:
        estimate_from_spec(_spec(f"file://{ckpt}"), file_roots=[str(root)])
    for exc in (refused.value, estimated.value):  # nothing of the target: not its path, not its bytes
        assert str(secret) not in str(exc) and str(int.from_bytes(SECRET[:8], "little")) not in str(exc)
    # The index and config.json are opened the same way (config.json: the weights are still sized).
    (ckpt / "b.safetensors").unlink()
    _shard(ckpt / "b.safetensors")
    os.symlink(secret, ckpt / "config.json")
    info = read_model_file(ckpt, root=root)
    assert info.config is None and "config.json: resolves outside" in info.config_error
    if with_index:
        (ckpt / "model.safetensors.index.json").rename(secret.with_name("index.json"))
        os.symlink(secret.with_name("index.json"), ckpt / "model.safetensors.index.json")
        with pytest.raises(ValueError, match=r"^model\.safetensors\.index\.json: resolves outside"):
            read_model_file(ckpt, root=root)


def _read_in_thread(target, *args, **kwargs) -> tuple[threading.Thread, list]:
    result: list = []

    def run() -> None:
        try:
            result.append(target(*args, **kwargs))
        except Exception as exc:
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)
    return thread, result


@pytest.mark.parametrize("with_index", [True, False])
def test_a_fifo_shard_is_refused_without_blocking(roots, with_index):
    # Estimates run in the operator's reconcile pass: an open() that waits for a writer stalls it.
    root, ckpt, _ = roots
    fifo = ckpt / "b.safetensors"
    _shard(ckpt / "a.safetensors")
    os.mkfifo(fifo)
    if with_index:
        _index(ckpt, "a.safetensors", "b.safetensors")
    thread, result = _read_in_thread(read_model_file, ckpt, root=root)
    if thread.is_alive():  # a writer's open releases the blocked reader, so no thread is left behind
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(10)
        pytest.fail("reading a checkpoint with a FIFO shard blocked")
    assert isinstance(result[0], ValueError)
    assert str(result[0]) == "b.safetensors: not a regular file (a FIFO)"


@pytest.mark.parametrize("with_index", [True, False])
def test_a_shard_that_is_a_directory_or_device_is_refused(roots, with_index):
    root, ckpt, _ = roots
    _shard(ckpt / "a.safetensors")
    (ckpt / "b.safetensors").mkdir()
    if with_index:
        _index(ckpt, "a.safetensors", "b.safetensors")
    with pytest.raises(ValueError, match=r"^b\.safetensors: not a regular file \(a directory\)$"):
        read_model_file(ckpt, root=root)
    with pytest.raises(ValueError, match=r"^b\.safetensors: not a regular file \(a directory\)$"):
        read_model_file(ckpt)  # no root (a user's own machine, the runtime): still a regular file only
    (ckpt / "b.safetensors").rmdir()
    os.symlink("/dev/zero", ckpt / "b.safetensors")
    with pytest.raises(ValueError, match=r"^b\.safetensors: not a regular file \(a device"):
        read_model_file(ckpt)


def test_a_hugging_face_cache_links_its_snapshots_into_its_blobs(tmp_path):
    cache = tmp_path / "hub"
    hub = cache / "models--org--tiny"
    snapshot, blobs = hub / "snapshots" / "abc123", hub / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("abc123")
    _shard(blobs / "1111")
    (blobs / "2222").write_text(json.dumps(CONFIG))
    os.symlink("../../blobs/1111", snapshot / "model.safetensors")
    os.symlink("../../blobs/2222", snapshot / "config.json")
    est = estimate_from_spec(_spec("hf://org/tiny"), cache_dir=cache)
    assert est.weights_mib == 1
    info = read_model_file(snapshot, root=cache)
    assert info.total_bytes == 16 and info.config is not None and info.config.n_layers == 2
    # A blob that is itself a link out of the cache is not.
    secret = tmp_path / "operator-secret"
    secret.write_bytes(SECRET)
    (blobs / "1111").unlink()
    os.symlink(secret, blobs / "1111")
    with pytest.raises(EstimateError, match=r"model\.safetensors: resolves outside"):
        estimate_from_spec(_spec("hf://org/tiny"), cache_dir=cache)


def test_a_config_json_is_read_only_up_to_its_bound(roots, monkeypatch):
    # Read whole, a huge (here sparse) config.json beside the weights would take the operator's memory.
    root, ckpt, _ = roots
    _shard(ckpt / "a.safetensors")
    with open(ckpt / "config.json", "wb") as f:
        f.truncate(16 * MAX_CONFIG_FILE)
    opened = modelfile._open_model_file
    asked: list[int] = []

    class Counted:
        def __init__(self, f: BinaryIO) -> None:
            self.f = f

        def __getattr__(self, name: str) -> Any:
            return getattr(self.f, name)

        def read(self, size: int = -1) -> bytes:
            asked.append(size)
            return self.f.read(size)

    @contextlib.contextmanager
    def counting(*args: Any) -> Iterator[Counted]:
        with opened(*args) as f:
            yield Counted(f)

    monkeypatch.setattr(modelfile, "_open_model_file", counting)
    info = read_model_file(ckpt, root=root)
    assert asked and all(0 <= n <= MAX_CONFIG_FILE + 1 for n in asked)
    assert info.config is None and info.config_error == (
        f"{ckpt / 'config.json'}: model config larger than {MAX_CONFIG_FILE} bytes"
    )


def test_a_cache_ref_that_cannot_be_read_is_the_models_estimate_error(tmp_path):
    # A ref linked out of the cache says why in the model's status, as any other unreadable source
    # does: not as an unforeseen failure.
    hub = tmp_path / "hub" / "models--org--tiny"
    (hub / "refs").mkdir(parents=True)
    (tmp_path / "elsewhere").write_text("abc123")
    os.symlink(tmp_path / "elsewhere", hub / "refs" / "main")
    with pytest.raises(EstimateError, match=r"^cannot resolve hf://org/tiny: refs/main: resolves outside"):
        estimate_from_spec(_spec("hf://org/tiny"), cache_dir=tmp_path / "hub")


@pytest.mark.parametrize("how", ["index", "link"])
def test_a_file_named_twice_is_read_once_and_refused(roots, how):
    """A split set of links to one file, or an index naming ``a`` and ``./a``, made the operator's pass
    walk one header per name: 40 links to an 8 MiB GGUF header took 53 s, 1024 of 64 MiB hours."""
    _, ckpt, _ = roots
    _shard(ckpt / "a.safetensors")
    if how == "index":
        _index(ckpt, "a.safetensors", "./a.safetensors", "././a.safetensors")
    else:
        (ckpt / "b.safetensors").symlink_to("a.safetensors")
    (ckpt / "config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(ValueError, match=r"\.safetensors: the same file as a\.safetensors: a checkpoint"):
        read_model_file(ckpt)


def test_the_headers_a_checkpoint_walks_are_bounded_over_its_files(roots, monkeypatch):
    _, ckpt, _ = roots
    for name in ("a", "b", "c"):
        _shard(ckpt / f"{name}.safetensors")
    one = os.path.getsize(ckpt / "a.safetensors") - 16  # the header (the data: one float32[4])
    monkeypatch.setattr(modelfile, "MAX_MODEL_HEADER_BYTES", 2 * one + 1)
    with pytest.raises(ValueError, match=r"headers of its 3 files run past .* \(at c.safetensors\)"):
        read_model_file(ckpt)
    monkeypatch.setattr(modelfile, "MAX_MODEL_HEADER_BYTES", 3 * one)
    assert len(read_model_file(ckpt).tensors) == 3
