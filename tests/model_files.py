"""Model files for tests that size models from their files: a small real one, and a hostile one."""

from __future__ import annotations

import struct
from pathlib import Path


def hostile_gguf(path: Path) -> Path:
    """A GGUF header inside every size bound whose metadata is one array of ~5.6M empty arrays: seconds
    of CPU to walk (10 s on the CI machine)."""
    budget = 64 * 1024 * 1024 - 100
    n = budget // 12
    with open(path, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, 0, 1))
        f.write(struct.pack("<Q", 1) + b"k" + struct.pack("<I", 9))
        f.write(struct.pack("<IQ", 9, n))
        f.write(struct.pack("<IQ", 0, 0) * n)
    return path


def safetensors(path: Path) -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"w": np.zeros((1024, 512), dtype=np.float32)}, str(path))
    return path
