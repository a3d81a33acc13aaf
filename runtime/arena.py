"""One flat buffer of weights per device, exported by the weights-holder and imported zero-copy.

A backend allocates an arena (owner side), lets the loader write tensors into it, seals it, exports
it as ``(meta, fds)`` — JSON-able metadata plus file descriptors to pass with SCM_RIGHTS — and, in
another process, imports it read-only. Every parameter is then a view ``arena[offset : offset+n]``.

Backends:

* ``cpu`` — a sealed ``memfd`` (shared memory). Replicas ``mmap`` it ``PROT_READ``: one physical copy,
  visible in each process's PSS as a share. The seals (write/grow/shrink) mean no process, not even
  the holder, can change the weights after loading.
* ``cuda`` — one ``torch.empty`` device allocation shared with torch's CUDA IPC
  (``UntypedStorage._share_cuda_`` / ``rebuild_cuda_tensor``); the handle travels as bytes in the meta.
* ``npu`` — the same through ``torch_npu`` (``_share_npu_`` / ``rebuild_npu_tensor``).

torch (and torch_npu) import lazily: the CPU holder loads GGUF weights with numpy only.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import mmap
import os
import warnings
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from vnpu.runtime.manifest import TensorEntry


class ArenaError(RuntimeError):
    """An arena could not be allocated, exported or imported (the message says which and why)."""


class Arena(ABC):
    """A flat byte buffer holding packed weights on one device."""

    backend: str
    nbytes: int
    device: str

    @abstractmethod
    def write(self, offset: int, data: np.ndarray) -> None:
        """Copy the uint8 array ``data`` to ``offset`` (owner side, before :meth:`seal`)."""

    @abstractmethod
    def seal(self) -> None:
        """Finish loading: after this the contents never change."""

    @abstractmethod
    def export(self) -> tuple[dict[str, Any], list[int]]:
        """Metadata and file descriptors another process needs to import this arena."""

    @abstractmethod
    def byte_tensor(self) -> Any:
        """The whole arena as a 1-D ``torch.uint8`` tensor (no copy)."""

    def view(self, entry: TensorEntry) -> Any:
        """The tensor ``entry`` as a zero-copy view into the arena."""
        import torch

        flat = self.byte_tensor()[entry.offset : entry.offset + entry.nbytes]
        return flat.view(getattr(torch, entry.dtype)).view(entry.shape)

    @abstractmethod
    def close(self) -> None:
        """Release this process's mapping (views must be dropped first)."""


#: The seals a CPU arena has once sealed (see CpuArena.seal), and a replica insists on; by name.
_SEALS = {
    "writes": fcntl.F_SEAL_WRITE,
    "shrinking": fcntl.F_SEAL_SHRINK,
    "growth": fcntl.F_SEAL_GROW,
    "further sealing": fcntl.F_SEAL_SEAL,
}


class CpuArena(Arena):
    """A memfd mapped into this process. The owner maps it writable until :meth:`seal`."""

    backend = "cpu"
    device = "cpu"

    def __init__(self, fd: int, nbytes: int, writable: bool) -> None:
        self.fd = fd
        self.nbytes = nbytes
        self._map: mmap.mmap | None = mmap.mmap(
            fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        )
        self._writable = writable
        self._tensor: Any = None

    @classmethod
    def allocate(cls, nbytes: int, label: str = "vnpu-weights") -> CpuArena:
        try:
            fd = os.memfd_create(label, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(fd, nbytes)
        except OSError as e:
            raise ArenaError(f"cannot allocate a {nbytes}-byte shared-memory arena: {e}") from e
        return cls(fd, nbytes, writable=True)

    def write(self, offset: int, data: np.ndarray) -> None:
        if not self._writable or self._map is None:
            raise ArenaError("arena is sealed or imported read-only")
        self._map[offset : offset + data.nbytes] = data.reshape(-1).view(np.uint8)

    def seal(self) -> None:
        if not self._writable:
            return
        assert self._map is not None
        self._map.close()  # F_SEAL_WRITE needs the writable shared mapping gone
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, sum(_SEALS.values()))  # distinct bits: sum is their OR
        # MAP_POPULATE: the owner's mapping holds the pages, so they count (shared) in its PSS too.
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        self._map = mmap.mmap(self.fd, self.nbytes, flags=flags, prot=mmap.PROT_READ)
        self._writable = False

    def export(self) -> tuple[dict[str, Any], list[int]]:
        if self._writable:
            raise ArenaError("seal the arena before exporting it")
        return {"backend": "cpu", "nbytes": self.nbytes}, [self.fd]

    @classmethod
    def import_(cls, meta: dict[str, Any], fds: list[int]) -> CpuArena:
        """Map the holder's memfd read-only. Takes ``fds`` over: every one is closed, refused or not
        (the mapping keeps the memory); a replica retrying would otherwise pin an arena per try."""
        try:
            if len(fds) != 1:
                raise ArenaError(f"cpu arena import expects one file descriptor, got {len(fds)}")
            fd = fds[0]
            size = os.fstat(fd).st_size
            if size != meta["nbytes"]:
                raise ArenaError(f"arena fd holds {size} bytes, manifest says {meta['nbytes']}")
            try:
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            except OSError as e:
                raise ArenaError(f"refusing an arena that is not a sealable memfd: {e}") from e
            missing = [name for name, seal in _SEALS.items() if not seals & seal]
            if missing:
                # Without F_SEAL_SHRINK its sender could truncate it and every read here would SIGBUS.
                raise ArenaError(
                    f"refusing an arena that is not sealed against {', '.join(missing)}: "
                    "its sender could still change it under us"
                )
            arena = cls(fd, size, writable=False)
        finally:
            _close_all(fds)
        arena.fd = -1
        return arena

    def byte_tensor(self) -> Any:
        if self._tensor is None:
            import torch

            with warnings.catch_warnings():
                # The mapping is read-only on purpose; torch warns that it cannot write to it.
                warnings.simplefilter("ignore", UserWarning)
                self._tensor = torch.frombuffer(self._map, dtype=torch.uint8)
        return self._tensor

    def numpy(self) -> np.ndarray:
        assert self._map is not None
        return np.frombuffer(self._map, dtype=np.uint8)

    def close(self) -> None:
        self._tensor = None
        if self._map is not None:
            # BufferError: views are still alive somewhere; the mapping goes when they do.
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _encode(value: Any) -> Any:
    """JSON-able form of one argument of torch's IPC rebuild functions (bytes, dtypes, sizes)."""
    import torch

    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode()}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.Size | tuple | list):
        return [_encode(v) for v in value]
    if isinstance(value, type):
        return {"class": value.__name__}
    if isinstance(value, torch.device):
        return value.index
    return value


def _decode(value: Any) -> Any:
    import torch

    if isinstance(value, dict) and "b64" in value:
        return base64.b64decode(value["b64"])
    if isinstance(value, dict) and "dtype" in value:
        return getattr(torch, value["dtype"])
    if isinstance(value, dict) and "class" in value:
        return {"Tensor": torch.Tensor, "Parameter": torch.nn.Parameter}.get(
            value["class"], torch.UntypedStorage
        )
    if isinstance(value, list):
        return tuple(_decode(v) for v in value)
    return value


class TorchIpcArena(Arena):
    """A device allocation shared with torch's IPC (CUDA, or Ascend through torch_npu)."""

    #: Position of the device index in the rebuild arguments (torch's and torch_npu's reducers agree).
    _DEVICE_ARG = 6

    def __init__(self, backend: str, tensor: Any) -> None:
        self.backend = backend
        self._buf = tensor
        self.nbytes = int(tensor.numel())
        self.device = str(tensor.device)

    @staticmethod
    def _torch_device(backend: str, device: str) -> Any:
        import torch

        if backend == "npu":
            import torch_npu  # noqa: F401  - registers the "npu" device and its IPC reducers
        dev = torch.device(device if ":" in device else f"{backend}:0")
        if dev.type != backend:
            raise ArenaError(f"device {device!r} does not belong to backend {backend!r}")
        return dev

    @classmethod
    def allocate(cls, backend: str, nbytes: int, device: str) -> TorchIpcArena:
        import torch

        dev = cls._torch_device(backend, device)
        try:
            return cls(backend, torch.empty(nbytes, dtype=torch.uint8, device=dev))
        except RuntimeError as e:  # out of memory and friends
            raise ArenaError(f"cannot allocate a {nbytes}-byte arena on {dev}: {e}") from e

    def write(self, offset: int, data: np.ndarray) -> None:
        import torch

        with warnings.catch_warnings():
            # A read-only host mapping (a sealed arena): the copy only reads it.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            source = torch.from_numpy(np.ascontiguousarray(data).reshape(-1))
        self._buf[offset : offset + data.nbytes].copy_(source)

    def seal(self) -> None:
        import torch

        getattr(torch, self.backend).synchronize()  # every write is complete before anyone imports

    def export(self) -> tuple[dict[str, Any], list[int]]:
        from torch.multiprocessing.reductions import reduce_tensor

        _, args = reduce_tensor(self._buf)
        return {
            "backend": self.backend,
            "nbytes": self.nbytes,
            "rebuild_args": [_encode(a) for a in args],
        }, []

    @classmethod
    def import_(cls, meta: dict[str, Any], fds: list[int], device: str) -> TorchIpcArena:
        _close_all(fds)
        backend = meta["backend"]
        dev = cls._torch_device(backend, device)
        args = [_decode(a) for a in meta["rebuild_args"]]
        # The holder's device index is meaningless here (visible-device lists differ per container):
        # map the allocation onto this process's device, as vLLM's weight cache does.
        args[cls._DEVICE_ARG] = dev.index if dev.index is not None else 0
        if backend == "cuda":
            from torch.multiprocessing.reductions import rebuild_cuda_tensor as rebuild
        else:
            from torch_npu.multiprocessing.reductions import rebuild_npu_tensor as rebuild
        try:
            tensor = rebuild(*args)
        except RuntimeError as e:
            raise ArenaError(f"cannot import the {backend} arena on {dev}: {e}") from e
        if tensor.numel() != meta["nbytes"]:
            raise ArenaError(f"imported arena has {tensor.numel()} bytes, expected {meta['nbytes']}")
        return cls(backend, tensor)

    def byte_tensor(self) -> Any:
        return self._buf

    def close(self) -> None:
        self._buf = None


BACKENDS = ("cpu", "cuda", "npu")


def backend_for_device(device: str) -> str:
    kind = device.split(":", 1)[0]
    if kind not in BACKENDS:
        raise ArenaError(f"unknown device {device!r} (expected cpu, cuda[:N] or npu[:N])")
    return kind


def allocate(nbytes: int, device: str = "cpu", label: str = "vnpu-weights") -> Arena:
    backend = backend_for_device(device)
    if backend == "cpu":
        return CpuArena.allocate(nbytes, label)
    return TorchIpcArena.allocate(backend, nbytes, device)


def import_arena(meta: dict[str, Any], fds: list[int], device: str = "cpu") -> Arena:
    """Import the arena ``meta`` describes. Takes ``fds`` over: closed on every path."""
    backend = meta.get("backend") if isinstance(meta, dict) else None
    if backend == "cpu":
        return CpuArena.import_(meta, fds)
    if backend in ("cuda", "npu"):
        return TorchIpcArena.import_(meta, fds, device)
    _close_all(fds)
    raise ArenaError(f"unknown arena backend {backend!r}")
