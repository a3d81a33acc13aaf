"""Container images for the local node, built here as OCI tarballs with ``umoci`` (no registry, no
Docker) and imported into containerd with ``ctr -n k8s.io images import``.

* ``local.test/pause:1`` — the pod sandbox image: our own ``pause.c`` linked statically.
* ``local.test/vnpu:dev`` — the image of the operator, device plugin and runtime pods. A real image
  would carry Python, torch and vnpu (gigabytes); this one is a busybox root filesystem whose
  ``vnpu`` command runs the Python environment of the machine the node runs on. The node provides that
  environment read-only to every container (see :func:`vnpu.cluster.node.python_environment_mounts`),
  the way a node image with a preinstalled runtime would; the image only names the interpreter.

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
#: The user of the vnpu image (uid:gid), the same as deploy/image/Containerfile's and the chart's.
NON_ROOT_USER = "65532:65532"
BUSYBOX = Path("/usr/bin/busybox")  # Debian busybox-static: no shared libraries needed
#: Applets linked into the image's /bin (what probes, debugging and the launcher need).
BUSYBOX_APPLETS = (
    "sh", "cat", "ls", "env", "echo", "sleep", "mkdir", "rm", "ps", "id", "grep", "test", "true",
    "false", "wget", "stat", "find", "head", "tail", "wc",
)  # fmt: skip


class ImageBuildError(RuntimeError):
    """A tool needed to build or import an image failed or is missing."""


def _run(argv: Sequence[str], cwd: Path | None = None) -> None:
    if shutil.which(argv[0]) is None:
        raise ImageBuildError(f"`{argv[0]}` is not installed (hack/setup-env.sh installs it)")
    proc = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, check=False, timeout=300)
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


def launcher_script(python: str) -> str:
    """``/bin/vnpu`` in the image: run the ``vnpu`` CLI with the node-provided interpreter.

    A container's first process is PID 1 of its PID namespace, and the kernel drops signals that PID 1
    has no handler for: Python as PID 1 would ignore the kubelet's SIGTERM until it installs a handler
    (after imports that take seconds), and then be SIGKILLed after the grace period. So when the
    launcher is PID 1 it stays as a small init, as ``tini`` does in production images: it forwards
    SIGTERM/SIGINT to ``vnpu`` and exits with its status. Otherwise it simply ``exec``s."""
    py = shlex.quote(python)
    return f"""#!/bin/sh
if [ "$$" != 1 ]; then exec {py} -m vnpu "$@"; fi
{py} -m vnpu "$@" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null' TERM
trap 'kill -INT "$child" 2>/dev/null' INT
status=0
while kill -0 "$child" 2>/dev/null; do wait "$child"; status=$?; done
exit "$status"
"""


def build_vnpu_image(workdir: Path, python: str, image: str = VNPU_IMAGE) -> Path:
    """The operator/device-plugin/runtime image: busybox, ``/bin/vnpu`` launching ``python -m vnpu``,
    and the merged-/usr symlinks (``/lib``, ``/lib64``) the host's shared libraries expect once the
    node mounts ``/usr``."""
    workdir.mkdir(parents=True, exist_ok=True)
    if not BUSYBOX.exists():
        raise ImageBuildError(f"{BUSYBOX} is missing (Debian package busybox-static)")

    def populate(rootfs: Path) -> None:
        bin_dir = rootfs / "bin"
        bin_dir.mkdir()
        shutil.copy2(BUSYBOX, bin_dir / "busybox")
        for applet in BUSYBOX_APPLETS:
            (bin_dir / applet).symlink_to("busybox")
        vnpu = bin_dir / "vnpu"
        vnpu.write_text(launcher_script(python))
        vnpu.chmod(0o755)
        for d in ("usr", "tmp", "root", "etc", "var/tmp"):
            (rootfs / d).mkdir(parents=True, exist_ok=True)
        (rootfs / "tmp").chmod(0o1777)
        (rootfs / "var/tmp").chmod(0o1777)
        (rootfs / "root").chmod(0o755)
        (rootfs / "lib").symlink_to("usr/lib")
        (rootfs / "lib64").symlink_to("usr/lib64")
        # 65532 is the conventional non-root user of distroless images (the chart runs the operator as it).
        (rootfs / "etc/passwd").write_text(
            "root:x:0:0:root:/root:/bin/sh\nnonroot:x:65532:65532::/tmp:/bin/false\n"
            "nobody:x:65534:65534::/:/bin/false\n"
        )
        (rootfs / "etc/group").write_text("root:x:0:\nnonroot:x:65532:\nnogroup:x:65534:\n")

    # Like the real image (deploy/image/Containerfile), processes run as 65532 unless a pod says
    # otherwise (the device plugin runs as root): model pods are tested as the non-root user they are.
    return build_oci_image(workdir, image, populate, user=NON_ROOT_USER)


def import_image(ctr: Sequence[str], tarball: Path, image: str) -> None:
    """Import an OCI tarball into containerd's ``k8s.io`` namespace (the one the CRI plugin uses) as
    ``image``. ``ctr`` is the command prefix reaching the node's containerd."""
    name, _ = split_reference(image)
    _run([*ctr, "-n", "k8s.io", "images", "import", "--base-name", name, str(tarball)])
