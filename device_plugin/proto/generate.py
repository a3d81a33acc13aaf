"""Regenerate (or check) the Python gRPC modules from the .proto files in this folder.

    python -m vnpu.device_plugin.proto.generate          # rewrite the generated files
    python -m vnpu.device_plugin.proto.generate --check  # exit 1 if they are stale

The generated ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` are committed so the plugin's image
needs no grpcio-tools; a test runs ``--check`` so they can never drift from the .proto files.

The .proto files are compiled from a temporary tree ``vnpu/device_plugin/proto/<name>.proto`` so that
(a) the generated ``_pb2_grpc`` modules import their ``_pb2`` siblings by their installed package
path, and (b) the file names registered in protobuf's global descriptor pool are unique to vnpu
(a bare ``api.proto`` could collide with another library's).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE_PATH = Path("vnpu", "device_plugin", "proto")
PROTOS = ("api.proto", "podresources.proto")
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generated_names() -> list[str]:
    return [Path(p).stem + s for p in PROTOS for s in SUFFIXES]


def generate_into(out_dir: Path) -> None:
    """Compile every proto with grpc_tools into ``out_dir`` (flat: one file per generated module)."""
    from grpc_tools import protoc  # the `test` extra; not needed at run time

    with tempfile.TemporaryDirectory(prefix="vnpu-protoc-") as tmp:
        root = Path(tmp)
        (root / PACKAGE_PATH).mkdir(parents=True)
        for proto in PROTOS:
            shutil.copyfile(HERE / proto, root / PACKAGE_PATH / proto)
        args = [
            "grpc_tools.protoc",
            f"-I{root}",
            f"--python_out={root}",
            f"--pyi_out={root}",
            f"--grpc_python_out={root}",
            *(str(PACKAGE_PATH / p) for p in PROTOS),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        for name in generated_names():
            shutil.copyfile(root / PACKAGE_PATH / name, out_dir / name)


def stale_files() -> list[str]:
    """Names of committed generated files that differ from a fresh generation."""
    with tempfile.TemporaryDirectory(prefix="vnpu-protoc-check-") as tmp:
        fresh = Path(tmp)
        generate_into(fresh)
        return [
            n
            for n in generated_names()
            if not (HERE / n).exists() or (HERE / n).read_bytes() != (fresh / n).read_bytes()
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vnpu.device_plugin.proto.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--check", action="store_true", help="only report stale generated files (exit 1 if any)"
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: {HERE / name}", file=sys.stderr)
        return 1 if stale else 0
    generate_into(HERE)
    print(f"generated {', '.join(generated_names())} in {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
