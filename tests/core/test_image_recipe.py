"""The image recipe: deploy/image/contents.txt is the one list the Containerfile (through contents.sh)
and `make image` (vnpu/cluster/imagebuild.py) both read; cache keys follow content, not location; the
CUDA stubs load in place of real libraries and answer every call with an error."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from vnpu.cluster import imagebuild
from vnpu.cluster.imagebuild import Contents, parse_contents, plan, read_contents, requirements

REPO = Path(__file__).resolve().parents[2]
IMAGE = REPO / "deploy" / "image"
CONTAINERFILE = IMAGE / "Containerfile"


def sh_contents(key: str, contents: Path = IMAGE / "contents.txt") -> list[str]:
    """What the Containerfile gets from `sh contents.sh KEY`."""
    out = subprocess.run(
        ["sh", str(IMAGE / "contents.sh"), key],
        env={"PATH": "/usr/bin:/bin", "CONTENTS": str(contents)},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return out.stdout.split()


def test_the_containerfile_and_the_build_read_the_same_list() -> None:
    parsed = read_contents()
    assert sh_contents("suite") == [parsed.suite]
    assert sh_contents("debian") == list(parsed.debian)
    assert sh_contents("extras") == list(parsed.extras)
    assert sh_contents("cuda") == [parsed.cuda]
    text = CONTAINERFILE.read_text()
    # Every RUN that installs packages or the wheel takes them from the list, nothing hard-coded.
    assert text.count("$(sh /tmp/image/contents.sh debian)") == 2  # build and final stage
    assert "$(sh /tmp/image/contents.sh extras" in text and "$(sh /tmp/image/contents.sh cuda)" in text
    assert set(re.findall(r"^FROM debian:(\w+)-slim", text, re.M)) == {parsed.suite}
    assert "cuda_stubs.py" in text
    # ... and the build uses the parsed list for mmdebstrap and pip.
    argv = imagebuild.mmdebstrap_argv(parsed, Path("/hook"), Path("/out.tar"))
    assert "--include=" + ",".join(parsed.debian) in argv and parsed.suite in argv
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert plan().requirements == tuple(requirements(pyproject, parsed.extras))


def test_a_changed_list_changes_both_readers(tmp_path: Path) -> None:
    edited = tmp_path / "contents.txt"
    edited.write_text((IMAGE / "contents.txt").read_text().replace("tini", "tini curl"))
    assert "curl" in sh_contents("debian", edited)
    assert "curl" in parse_contents(edited.read_text()).debian


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("suite: bookworm\ndebian: tini\n", "must include python3"),
        ("suite: bookworm trixie\ndebian: python3\n", "exactly one Debian release"),
        ("suite: bookworm\ndebian: python3\ncolour: red\n", "unknown keys ['colour']"),
        ("suite: bookworm\ndebian: python3\ncuda: maybe\n", "stubs or real"),
        ("suite bookworm\n", "not `key: values`"),
    ],
)
def test_bad_lists_are_refused_with_what_to_change(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_contents(text)


def test_requirements_expand_the_extras_of_vnpu_itself() -> None:
    pyproject = {
        "project": {
            "name": "vnpu",
            "dependencies": ["kopf==1"],
            "optional-dependencies": {"runtime": ["torch==2"], "cuda": ["vnpu[runtime]", "nvidia-ml-py"]},
        }
    }
    assert requirements(pyproject, ["cuda"]) == ["kopf==1", "nvidia-ml-py", "torch==2"]
    assert requirements(pyproject, []) == ["kopf==1"]
    with pytest.raises(ValueError, match=r"extra 'gpu' is not in pyproject\.toml"):
        requirements(pyproject, ["gpu"])


def copy_checkout(to: Path) -> Path:
    """The files the image is built from, in another folder (as CI's fresh clone is)."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, to / name)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    for folder in set(pyproject["tool"]["setuptools"]["package-dir"].values()):
        shutil.copytree(REPO / folder, to / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return to


def test_cache_keys_follow_content_not_location(tmp_path: Path) -> None:
    here = plan()
    elsewhere = plan(copy_checkout(tmp_path))
    assert (elsewhere.base_key, elsewhere.image_key) == (here.base_key, here.image_key)
    model = tmp_path / "runtime" / "model.py"
    model.write_text(model.read_text() + "\n# edited\n")
    edited = plan(tmp_path)
    assert edited.base_key == here.base_key  # the dependencies' layer is reused ...
    assert edited.image_key != here.image_key  # ... only the vnpu layer is rebuilt


def test_the_image_runs_as_the_charts_user_with_tini_as_pid_1() -> None:
    hook = imagebuild.hook_script(Path("/w"), Path("/r"), Contents("bookworm", ("python3", "tini"), ()))
    assert "vnpu:x:65532:65532:" in hook
    assert imagebuild.ENTRYPOINT == ("/usr/bin/tini", "--")
    assert 'ENTRYPOINT ["/usr/bin/tini", "--"]' in CONTAINERFILE.read_text()
    assert "tini" in read_contents().debian


# -- CUDA stubs ------------------------------------------------------------------------------------------
def gcc(out: Path, source: str, *flags: str) -> None:
    src = out.with_suffix(".c")
    src.write_text(source)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(out), str(src), *flags], check=True)


def test_cuda_stubs_stand_in_for_the_libraries_torch_links(tmp_path: Path) -> None:
    """A fake site-packages: `torch/lib/libtorch_fake.so` needs `libfakecuda.so.1` (versioned symbols,
    a status function and an error-string function) from `nvidia/cu13/lib`, found through its RPATH
    as torch's libraries find theirs. After stubbing, the real library is gone, the stub loads in its
    place and answers with an error status and a message."""
    import sys

    sys.path.insert(0, str(IMAGE))
    try:
        import cuda_stubs
    finally:
        sys.path.remove(str(IMAGE))
    site = tmp_path / "site-packages"
    cuda_lib = site / "nvidia" / "cu13" / "lib"
    torch_lib = site / "torch" / "lib"
    cuda_lib.mkdir(parents=True)
    torch_lib.mkdir(parents=True)
    version_map = tmp_path / "fake.map"
    version_map.write_text(
        "libfakecuda.so.1 { global: fakeInit; fakeGetErrorString; fakeUnused; local: *; };\n"
    )
    gcc(
        cuda_lib / "libfakecuda.so.1",
        "int fakeInit(int *n) { *n = 8; return 0; }\n"
        'const char *fakeGetErrorString(int e) { return "real"; }\nint fakeUnused(void) { return 0; }\n'
        + "char padding[4 << 20] = {1};\n",  # a big real library
        "-Wl,-soname,libfakecuda.so.1",
        f"-Wl,--version-script={version_map}",
    )
    gcc(
        torch_lib / "libtorch_fake.so",
        "int fakeInit(int *n); const char *fakeGetErrorString(int e);\n"
        "int devices(void) { int n = 0; return fakeInit(&n) ? -n - 1 : n; }\n"
        "const char *why(void) { return fakeGetErrorString(100); }\n",
        f"-L{cuda_lib}",
        "-l:libfakecuda.so.1",
        "-Wl,--disable-new-dtags,-rpath,$ORIGIN/../../nvidia/cu13/lib",
    )
    (site / "triton").mkdir()

    assert cuda_stubs.replace_with_stubs(site) == ["libfakecuda.so.1"]
    stub = cuda_lib / "libfakecuda.so.1"
    assert stub.stat().st_size < 64 * 1024 and not (site / "triton").exists()
    defined = subprocess.run(["nm", "-D", "--defined-only", str(stub)], capture_output=True, text=True).stdout
    assert "fakeInit@@libfakecuda.so.1" in defined and "fakeUnused" not in defined  # only what torch imports
    torch = ctypes.CDLL(str(torch_lib / "libtorch_fake.so"))
    assert torch.devices() == -1  # an error status (100), and no device count written
    torch.why.restype = ctypes.c_char_p
    assert b"CUDA is not available" in torch.why()
