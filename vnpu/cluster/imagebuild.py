"""The vnpu image, built on this machine without a container engine or a registry.

``deploy/image/contents.txt`` says what goes in (Debian suite and packages, the wheel's extras);
``deploy/image/Containerfile`` reads the same list, so an engine build and this one cannot drift.
This build:

1. **wheels** — the wheel's dependencies (``pyproject.toml``, with the listed extras) are fetched
   from PyPI into a wheelhouse by this machine's ``pip`` (its index, certificates and proxy settings);
2. **base** — ``mmdebstrap`` makes a Debian root file system with the listed packages, and a
   customize hook creates the virtualenv ``/opt/vnpu`` from Debian's ``python3`` and installs the
   wheelhouse into it offline (no network inside the chroot), then smoke-tests the imports; ``umoci``
   turns the tarball into the first layer of an OCI layout;
3. **vnpu** — the vnpu wheel (built from the checkout) installed into ``/opt/vnpu`` as a second, small
   layer, and the image configuration (``tini`` as entrypoint, user 65532, ``PATH``).

Everything is cached by content hash under ``$VNPU_CACHE_DIR/image`` (default ``~/.cache/vnpu``),
outside the work tree: the base by the list, the dependency pins and the recipe below (minutes to
build, rebuilt only when they change); the image by the base and the wheel's inputs (seconds: editing
vnpu's code rebuilds only the top layer). The result is an OCI archive for ``ctr images import``.

:func:`ensure_image` is what callers use; ``make image`` (``python -m vnpu.cluster.imagebuild``) prints
its path.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from vnpu.cluster import images

REPO_ROOT = Path(__file__).resolve().parents[2]
CONTENTS = REPO_ROOT / "deploy" / "image" / "contents.txt"
CUDA_STUBS = REPO_ROOT / "deploy" / "image" / "cuda_stubs.py"
#: Where the virtualenv lives in the image (the Containerfile's too).
PREFIX = "/opt/vnpu"
PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
#: Paths left out of the Debian packages: documentation nobody reads in a container.
DPKG_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*")
#: The image configuration (the Containerfile's ENTRYPOINT, ENV, USER and CMD).
ENTRYPOINT = ("/usr/bin/tini", "--")
CMD = ("vnpu", "--help")
ENV = (
    f"PATH={PREFIX}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "PYTHONDONTWRITEBYTECODE=1",
    "PYTHONUNBUFFERED=1",
)
#: Imports the base must satisfy before it is cached (what the three components load first).
SMOKE_IMPORTS = (
    "kopf",
    "kubernetes",
    "grpc",
    "google.protobuf",
    "yaml",
    "prometheus_client",
    "tqdm",
    "aiohttp",
)
RUNTIME_IMPORTS = ("torch", "numpy", "gguf", "safetensors", "tokenizers", "jinja2")
EXTRA_SMOKE_IMPORTS = {"runtime": RUNTIME_IMPORTS, "cuda": (*RUNTIME_IMPORTS, "pynvml")}


class ImageBuildError(RuntimeError):
    """The image could not be built; the message says which step failed and where its log is."""


# -- what goes in (pure) -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Contents:
    """``deploy/image/contents.txt``, parsed."""

    suite: str
    debian: tuple[str, ...]
    extras: tuple[str, ...]
    cuda: str = "real"  #: stubs | real: what becomes of torch's CUDA libraries


def parse_contents(text: str) -> Contents:
    """``key: value ...`` lines (values split on whitespace, ``#`` lines are comments), exactly as
    ``deploy/image/contents.sh`` reads them for the Containerfile."""
    values: dict[str, list[str]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, rest = line.partition(":")
        if not sep or not key.strip().replace("-", "").isalnum() or key != key.strip():
            raise ValueError(f"contents line {number} is not `key: values`: {line!r}")
        values.setdefault(key, []).extend(rest.split())
    unknown = set(values) - {"suite", "debian", "extras", "cuda"}
    if unknown:
        raise ValueError(f"contents: unknown keys {sorted(unknown)}; known: suite, debian, extras, cuda")
    suite = values.get("suite", [])
    if len(suite) != 1:
        raise ValueError(f"contents: `suite:` needs exactly one Debian release name, got {suite}")
    if "python3" not in values.get("debian", []):
        raise ValueError("contents: `debian:` must include python3 (the virtualenv is made from it)")
    cuda = values.get("cuda", ["real"])
    if cuda not in (["stubs"], ["real"]):
        raise ValueError(f"contents: `cuda:` is stubs or real, got {cuda}")
    return Contents(suite[0], tuple(values.get("debian", [])), tuple(values.get("extras", [])), cuda[0])


def read_contents(path: Path = CONTENTS) -> Contents:
    return parse_contents(path.read_text())


def requirements(pyproject: dict[str, object], extras: Sequence[str]) -> list[str]:
    """The wheel's dependencies with ``extras``, self-references (``vnpu[runtime]``) expanded."""
    project = pyproject["project"]
    assert isinstance(project, dict)
    name = str(project["name"]).lower()
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    found: list[str] = list(project.get("dependencies", []))
    pending, seen = list(extras), set()
    while pending:
        extra = pending.pop(0)
        if extra in seen:
            continue
        if extra not in optional:
            raise ValueError(f"contents: extra {extra!r} is not in pyproject.toml ({', '.join(optional)})")
        seen.add(extra)
        for req in optional[extra]:
            base, _, rest = req.partition("[")
            if base.strip().lower() == name:
                pending += [e.strip() for e in rest.rstrip("]").split(",")]
            else:
                found.append(req)
    return sorted(dict.fromkeys(found))


def digest(*parts: str | bytes) -> str:
    """A short content hash of ``parts`` (order matters), for cache keys."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()[:16]


def hook_script(
    wheels: Path, requirements_file: Path, contents: Contents, stubs_script: Path = CUDA_STUBS
) -> str:
    """The mmdebstrap customize hook: the virtualenv, the wheels installed offline, torch's CUDA
    libraries stubbed (``cuda: stubs``), the image's user, and a smoke test of the imports (with
    stubs: torch computes on the CPU and finds no GPU). Runs as root on the host, chroot in ``$1``."""
    imports = list(SMOKE_IMPORTS) + [m for e in contents.extras for m in EXTRA_SMOKE_IMPORTS.get(e, ())]
    smoke = "import " + ", ".join(dict.fromkeys(imports))
    stubs = ""
    if contents.cuda == "stubs":
        smoke += "; assert not torch.cuda.is_available(); assert float(torch.ones(4) @ torch.ones(4)) == 4"
        site = f"$root{PREFIX}/lib/python{PYTHON_VERSION}/site-packages"
        stubs = f'python3 {shlex.quote(str(stubs_script))} "{site}"'
    uid, gid = images.NON_ROOT_USER.split(":")
    in_chroot = 'chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C.UTF-8'
    return f"""#!/bin/sh
set -eu
root=$1
mkdir -p "$root/tmp/vnpu-wheels"
mount --bind {shlex.quote(str(wheels))} "$root/tmp/vnpu-wheels"
trap 'umount "$root/tmp/vnpu-wheels"; rmdir "$root/tmp/vnpu-wheels"' EXIT
cp {shlex.quote(str(requirements_file))} "$root/tmp/vnpu-requirements.txt"
{in_chroot} python3 -m venv {PREFIX}
{in_chroot} {PREFIX}/bin/pip install --no-index --find-links /tmp/vnpu-wheels --no-cache-dir \\
    --disable-pip-version-check --progress-bar off -r /tmp/vnpu-requirements.txt
rm "$root/tmp/vnpu-requirements.txt"
{stubs}
# The chart runs the operator and the model pods as {uid}:{gid} (the device plugin as root).
echo 'vnpu:x:{uid}:{gid}:vnpu:/nonexistent:/usr/sbin/nologin' >> "$root/etc/passwd"
echo 'vnpu:x:{gid}:' >> "$root/etc/group"
{in_chroot} {PREFIX}/bin/python -c {shlex.quote(smoke)}
"""


def mmdebstrap_argv(contents: Contents, hook: Path, output: Path) -> list[str]:
    return [
        "mmdebstrap",
        "--variant=essential",
        "--include=" + ",".join(contents.debian),
        *(f"--dpkgopt=path-exclude={p}" for p in DPKG_EXCLUDES),
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        f"--customize-hook={hook}",
        contents.suite,
        str(output),
    ]


def wheel_inputs(repo: Path = REPO_ROOT) -> list[Path]:
    """The files the vnpu wheel is built from: pyproject.toml, README.md and the package folders
    (the Containerfile COPYs the same set)."""
    pyproject = tomllib.loads((repo / "pyproject.toml").read_text())
    folders = sorted(set(pyproject["tool"]["setuptools"]["package-dir"].values()))
    files = [repo / "pyproject.toml", repo / "README.md"]
    for folder in folders:
        for path in sorted((repo / folder).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                files.append(path)
    return files


@dataclass(frozen=True)
class Plan:
    """What to build and under which cache keys."""

    contents: Contents
    requirements: tuple[str, ...]
    base_key: str
    image_key: str


def plan(repo: Path = REPO_ROOT, contents_path: Path = CONTENTS) -> Plan:
    contents = read_contents(contents_path)
    pyproject = tomllib.loads((repo / "pyproject.toml").read_text())
    reqs = tuple(requirements(pyproject, contents.extras))
    base_key = digest(
        repr(contents),
        "\n".join(reqs),
        # Paths are placeholders: the key must not depend on where the checkout or the cache is, so
        # a CI clone in another folder reuses what a developer built on the same machine.
        hook_script(Path("/WHEELS"), Path("/REQUIREMENTS"), contents, Path("/STUBS")),
        CUDA_STUBS.read_bytes() if contents.cuda == "stubs" else b"",
        shlex.join(mmdebstrap_argv(contents, Path("/HOOK"), Path("/OUT"))),
        PYTHON_VERSION,
    )
    sources = [f"{p.relative_to(repo)}\0".encode() + p.read_bytes() for p in wheel_inputs(repo)]
    image_key = digest(base_key, *sources, repr((ENTRYPOINT, CMD, ENV, images.NON_ROOT_USER)))
    return Plan(contents, reqs, base_key, image_key)


# -- progress ------------------------------------------------------------------------------------------
class Progress:
    """``[i/n] step (total Ns)`` lines on stderr and a heartbeat every 30 s, like build-binaries.sh:
    the cold build takes minutes on two cores and must visibly move."""

    def __init__(self, total: int, quiet: bool = False) -> None:
        self.total, self.quiet, self.index, self.t0 = total, quiet, 0, time.monotonic()

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.index += 1
        self.say(f"[{self.index}/{self.total}] {name:<44} (total {time.monotonic() - self.t0:.0f}s)")
        done = threading.Event()
        started = time.monotonic()

        def beat() -> None:
            while not done.wait(30):
                self.say(f"      … still at: {name} ({time.monotonic() - started:.0f}s)")

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()


def run_logged(argv: Sequence[str], log: Path, *, stdin: int = subprocess.DEVNULL) -> None:
    """Run ``argv`` with its output in ``log``; on failure raise with the log's last lines."""
    if shutil.which(argv[0]) is None:
        raise ImageBuildError(f"`{argv[0]}` is not installed (hack/setup-env.sh installs it)")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        out.write(f"$ {shlex.join(argv)}\n".encode())
        out.flush()
        code = subprocess.run(list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=stdin, check=False)
    if code.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise ImageBuildError(f"{shlex.join(argv[:3])} ... failed ({code.returncode}); {log}:\n{tail}")


# -- the build -----------------------------------------------------------------------------------------
def cache_root() -> Path:
    """``$VNPU_CACHE_DIR/image``, by default ``~/.cache/vnpu/image`` (hack/setup-env.sh's layout)."""
    explicit = os.environ.get("VNPU_CACHE_DIR")
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return (Path(explicit) if explicit else xdg / "vnpu") / "image"


def image_path(p: Plan, root: Path | None = None) -> Path:
    return (root or cache_root()) / f"vnpu-{p.image_key}.tar"


def ensure_image(*, quiet: bool = False, repo: Path = REPO_ROOT) -> Path:
    """The OCI archive of ``local.test/vnpu:dev`` for this checkout, built when not cached.

    Needs ``mmdebstrap`` and ``umoci`` (hack/setup-env.sh installs them) and root (mmdebstrap's root
    mode; as a normal user it falls back to its unshare mode, which needs subordinate user ids)."""
    root = cache_root()
    p = plan(repo)
    final = image_path(p, root)
    if final.exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another build of the same cache waits, then reuses
        if final.exists():
            return final
        base = root / f"base-{p.base_key}"
        shutil.rmtree(root / "logs", ignore_errors=True)  # the logs of this build only
        progress = Progress(2 if (base / "index.json").exists() else 5, quiet)
        if not quiet:
            progress.say(f"vnpu: building the image {images.VNPU_IMAGE} into {final} (logs: {root}/logs)")
        if not (base / "index.json").exists():
            build_base(p, root, base, progress)
        build_top(p, repo, root, base, final, progress)
        prune_cache(root, keep={final, base})
        if not quiet:
            size = final.stat().st_size / 2**20
            progress.say(f"vnpu: image ready ({size:.0f} MiB, total {time.monotonic() - progress.t0:.0f}s)")
    return final


def build_base(p: Plan, root: Path, base: Path, progress: Progress) -> None:
    work = root / f"work-{p.base_key}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        _build_base(p, root, base, work, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # gigabytes; the logs stay


def _build_base(p: Plan, root: Path, base: Path, work: Path, progress: Progress) -> None:
    logs, wheels = root / "logs", root / "wheels"
    reqs = work / "requirements.txt"
    reqs.write_text("\n".join(p.requirements) + "\n")
    with progress.step("Python wheels from PyPI (pip wheel)"):
        wheels.mkdir(exist_ok=True)
        run_logged(
            [sys.executable, "-m", "pip", "wheel", "--progress-bar", "off", "--find-links", str(wheels),
             "--wheel-dir", str(wheels), "-r", str(reqs)],
            logs / "wheels.log",
        )  # fmt: skip
    hook = work / "customize.sh"
    hook.write_text(hook_script(wheels, reqs, p.contents))
    hook.chmod(0o755)
    rootfs = work / "rootfs.tar"
    with progress.step(f"Debian {p.contents.suite} + /opt/vnpu (mmdebstrap)"):
        run_logged(mmdebstrap_argv(p.contents, hook, rootfs), logs / "mmdebstrap.log")
    tmp = root / f"base-{p.base_key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with progress.step("base layer (umoci, gzip)"):
        ref = f"{tmp}:base"
        run_logged(["umoci", "init", "--layout", str(tmp)], logs / "umoci.log")
        run_logged(["umoci", "new", "--image", ref], logs / "umoci.log")
        run_logged(["umoci", "raw", "add-layer", "--image", ref, str(rootfs)], logs / "umoci.log")
    shutil.rmtree(base, ignore_errors=True)
    tmp.rename(base)


def fix_shebangs(bin_dir: Path, python: str) -> None:
    """pip writes the installing interpreter into console scripts; in the image it is ``python``."""
    for script in bin_dir.iterdir():
        data = script.read_bytes()
        if data.startswith(b"#!"):
            rest = data.split(b"\n", 1)[1] if b"\n" in data else b""
            script.write_bytes(f"#!{python}\n".encode() + rest)


def build_top(p: Plan, repo: Path, root: Path, base: Path, final: Path, progress: Progress) -> None:
    work = root / f"work-{p.image_key}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        _build_top(repo, root, base, work, final, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _build_top(repo: Path, root: Path, base: Path, work: Path, final: Path, progress: Progress) -> None:
    logs = root / "logs"
    with progress.step("vnpu wheel and its layer"):
        run_logged(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir",
             str(work / "dist"), str(repo)],
            logs / "vnpu-wheel.log",
        )  # fmt: skip
        (wheel,) = (work / "dist").glob("vnpu-*.whl")
        layer = work / "layer"
        run_logged(
            [sys.executable, "-m", "pip", "install", "--no-deps", "--ignore-installed",
             "--no-warn-script-location", "--root", str(layer), "--prefix", PREFIX, str(wheel)],
            logs / "vnpu-wheel.log",
        )  # fmt: skip
        fix_shebangs(layer / PREFIX.lstrip("/") / "bin", f"{PREFIX}/bin/python")
        run_logged(
            ["tar", "--numeric-owner", "--owner=0", "--group=0", "--sort=name", "-C", str(layer), "-cf",
             str(work / "layer.tar"), "."],
            logs / "vnpu-wheel.log",
        )  # fmt: skip
    with progress.step("image (umoci) and its OCI archive"):
        layout = work / "oci"
        layout.mkdir()
        for item in base.iterdir():  # blobs are immutable: hard links; index.json is rewritten: copy
            if item.name == "blobs":
                shutil.copytree(item, layout / "blobs", copy_function=os.link)
            else:
                shutil.copy2(item, layout / item.name)
        _, tag = images.split_reference(images.VNPU_IMAGE)
        ref = f"{layout}:{tag}"
        log = logs / "umoci.log"
        run_logged(["umoci", "tag", "--image", f"{layout}:base", tag], log)
        run_logged(["umoci", "rm", "--image", f"{layout}:base"], log)
        run_logged(["umoci", "raw", "add-layer", "--image", ref, str(work / "layer.tar")], log)
        config = ["umoci", "config", "--image", ref, "--config.user", images.NON_ROOT_USER,
                  "--config.workingdir", "/", "--clear=config.env", "--clear=config.entrypoint",
                  "--clear=config.cmd"]  # fmt: skip
        config += [f"--config.env={e}" for e in ENV]
        config += [f"--config.entrypoint={e}" for e in ENTRYPOINT]
        config += [f"--config.cmd={c}" for c in CMD]
        run_logged(config, log)
        run_logged(["umoci", "gc", "--layout", str(layout)], log)
        tmp = final.with_suffix(".tar.tmp")
        run_logged(["tar", "-C", str(layout), "-cf", str(tmp), "."], log)
        tmp.rename(final)


def prune_cache(root: Path, keep: set[Path], generations: int = 2) -> None:
    """Keep the newest ``generations`` images and bases (each is gigabytes); never those in ``keep``."""
    for pattern in ("vnpu-*.tar", "base-*"):
        found = sorted(root.glob(pattern), key=lambda q: q.stat().st_mtime, reverse=True)
        for old in found[generations:]:
            if old in keep or old.suffix == ".tmp":
                continue
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vnpu.cluster.imagebuild", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    try:
        print(ensure_image(quiet=args.quiet))
    except (ImageBuildError, ValueError) as exc:
        print(f"vnpu: the image could not be built: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
