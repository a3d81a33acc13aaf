"""Container images for the local node, built here as OCI tarballs with ``umoci`` (no registry, no
Docker) and imported into containerd with ``ctr -n k8s.io images import``.

* ``local.test/pause:1`` — the pod sandbox image: our own ``pause.c`` linked statically.
* ``local.test/vnpu:dev`` — the image of the operator, device plugin and runtime pods: Debian's
  python3 with vnpu and its dependencies, built from deploy/image/contents.txt by
  :mod:`vnpu.cluster.imagebuild` (cached by content hash) and only imported here.

Pods must use ``imagePullPolicy: Never`` (or ``IfNotPresent``): nothing can be pulled.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

PAUSE_SOURCE = Path(__file__).with_name("pause.c")
PAUSE_IMAGE = "local.test/pause:1"
VNPU_IMAGE = "local.test/vnpu:dev"
#: The user of the vnpu image (uid:gid), the same as deploy/image/Containerfile's and the chart's:
#: 65532 is the conventional non-root user of distroless images.
NON_ROOT_USER = "65532:65532"


class ImageBuildError(RuntimeError):
    """A tool needed to build or import an image failed or is missing."""


def _run(argv: Sequence[str], cwd: Path | None = None, timeout: float = 300) -> None:
    if shutil.which(argv[0]) is None:
        raise ImageBuildError(f"`{argv[0]}` is not installed (hack/setup-env.sh installs it)")
    proc = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, check=False, timeout=timeout)
    if proc.returncode != 0:
        raise ImageBuildError(f"{shlex.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")


def split_reference(image: str) -> tuple[str, str]:
    """``local.test/vnpu:dev`` -> (``local.test/vnpu``, ``dev``)."""
    name, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:
        raise ValueError(f"image reference {image!r} needs an explicit tag")
    return name, tag


def build_oci_image(
    workdir: Path,
    image: str,
    populate: object,
    *,
    entrypoint: Sequence[str] = (),
    env: Sequence[str] = ("PATH=/bin:/usr/bin:/usr/local/bin",),
    user: str = "",
) -> Path:
    """Build a one-layer OCI image: ``populate(rootfs: Path)`` fills the root filesystem. Returns the
    tarball of the OCI layout, ready for ``ctr images import``."""
    _, tag = split_reference(image)
    slug = image.replace("/", "_").replace(":", "_")
    layout, bundle = workdir / f"{slug}.oci", workdir / f"{slug}.bundle"
    for p in (layout, bundle):
        shutil.rmtree(p, ignore_errors=True)
    ref = f"{layout}:{tag}"
    _run(["umoci", "init", "--layout", str(layout)])
    _run(["umoci", "new", "--image", ref])
    _run(["umoci", "unpack", "--image", ref, str(bundle)])
    populate(bundle / "rootfs")  # type: ignore[operator]
    _run(["umoci", "repack", "--image", ref, str(bundle)])
    config = ["umoci", "config", "--image", ref, "--config.workingdir", "/"]
    config += [f"--config.env={e}" for e in env]
    if entrypoint:
        config += [f"--config.entrypoint={part}" for part in entrypoint]
    if user:
        config.append(f"--config.user={user}")
    _run(config)
    _run(["umoci", "gc", "--layout", str(layout)])
    shutil.rmtree(bundle)
    tarball = workdir / f"{slug}.tar"
    _run(["tar", "-C", str(layout), "-cf", str(tarball), "."])
    shutil.rmtree(layout)
    return tarball


def build_pause_image(workdir: Path) -> Path:
    """``local.test/pause:1`` from ``pause.c`` (``gcc -static``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    binary = workdir / "pause"
    _run(["gcc", "-static", "-Os", "-Wall", "-o", str(binary), str(PAUSE_SOURCE)])

    def populate(rootfs: Path) -> None:
        shutil.copy2(binary, rootfs / "pause")

    return build_oci_image(workdir, PAUSE_IMAGE, populate, entrypoint=["/pause"], env=())


def import_image(ctr: Sequence[str], tarball: Path, image: str) -> None:
    """Import an OCI tarball into containerd's ``k8s.io`` namespace (the one the CRI plugin uses) as
    ``image``. ``ctr`` is the command prefix reaching the node's containerd."""
    name, _ = split_reference(image)
    # The vnpu image is gigabytes (torch): unpacking it takes minutes on a slow disk.
    _run([*ctr, "-n", "k8s.io", "images", "import", "--base-name", name, str(tarball)], timeout=1800)
