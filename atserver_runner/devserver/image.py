"""Build a local Docker image of the dev atServer without any registry: ``docker import``.

    python -m atserver_runner.devserver.image build [--tag atfailover/devserver:dev]

The root filesystem is assembled from this machine: the Python runtime that runs this
command (its standard library, pruned of tests, IDLE, Tk and build files), the third-party
packages the dev atServer actually imports (found by importing it in a child interpreter),
the shared libraries ``ldd`` names for every ELF file included, and the dev atServer's own
sources. Nothing is downloaded. The image is labelled with a SHA-256 over the content of
every file it holds; when the tag already carries that label the build is skipped, so the
command is idempotent and takes well under a second when nothing changed.

Layout inside the image: Python under ``/opt/python``, packages under ``/opt/app``
(``PYTHONPATH``), data in ``/data``; entrypoint ``python -m atserver_runner.devserver``
(configured by ``ATSERVER_*`` variables, see the DockerRunner), user 10001, port 6464.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_TAG = "atfailover/devserver:dev"
HASH_LABEL = "atfailover.devserver.content-sha256"
BUILDER_VERSION = "1"
"""Bump when the layout or the image config changes (it is part of the content hash)."""
PYTHON_HOME = "/opt/python"
APP_DIR = "/opt/app"
CONTAINER_PORT = 6464
CONTAINER_UID = 10001
LDD_TIMEOUT_S = 30.0
PROBE_TIMEOUT_S = 60.0

# Parts of the standard library a TLS server never needs (saves ~200 MB).
STDLIB_SKIP = frozenset(
    {
        "site-packages",
        "test",
        "idlelib",
        "tkinter",
        "turtledemo",
        "ensurepip",
        "lib2to3",
        "pydoc_data",
        "distutils",
        "venv",
        "sqlite3",
        "curses",
        "dbm",
    }
)
_SKIP_FILE = re.compile(
    r"(\.opt-[12]\.pyc|\.a|\.exe|\.whl)$|^_test|^_xxtest|^xxlimited|^_tkinter|^_ctypes_test"
    r"|^(_sqlite3|readline|_curses|_curses_panel|nis|_dbm|_gdbm)\."
)

# Imported by the child interpreter; whatever of site-packages this loads goes in the image.
_IMPORT_PROBE = """
import json, sys
import atserver_runner.devserver.__main__, atserver_runner.devserver.server
from cryptography.hazmat.primitives.asymmetric import padding, rsa  # noqa: F401
from cryptography.hazmat.primitives import hashes, serialization  # noqa: F401
files = sorted({getattr(m, "__file__", None) or "" for m in list(sys.modules.values())})
print(json.dumps({"files": [f for f in files if f], "paths": sys.path}))
"""


class ImageBuildError(Exception):
    """The image could not be built (with what failed)."""


@dataclass(frozen=True)
class Entry:
    """One file of the root filesystem: where it comes from and where it goes."""

    source: Path
    arcname: str
    executable: bool


@dataclass(frozen=True)
class BuildResult:
    """What ``build`` did."""

    tag: str
    image_id: str
    content_sha256: str
    built: bool
    """False when an image with the same content hash already had the tag."""
    size_bytes: int
    seconds: float
    files: int


def _walk(root: Path, dest: str, skip_dirs: Iterable[str] = ()) -> list[Entry]:
    skip = set(skip_dirs)
    out: list[Entry] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir == Path("."):
            dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith("config-")]
        dirnames.sort()
        for name in sorted(filenames):
            if _SKIP_FILE.search(name):
                continue
            src = Path(dirpath) / name
            st = src.stat()
            if not stat.S_ISREG(st.st_mode):
                continue
            arc = f"{dest}/{rel_dir / name}" if rel_dir != Path(".") else f"{dest}/{name}"
            out.append(Entry(src, arc.lstrip("/"), bool(st.st_mode & 0o111)))
    return out


def _python_entries(prefix: Path) -> list[Entry]:
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    exe = (prefix / "bin" / version).resolve()
    if not exe.is_file():
        raise ImageBuildError(f"no interpreter at {prefix / 'bin' / version}")
    entries = [Entry(exe, f"{PYTHON_HOME.lstrip('/')}/bin/{version}", True)]
    libdir = prefix / "lib"
    libpython = libdir / f"lib{version}.so.1.0"  # the SONAME the interpreter links to
    if libpython.exists():
        entries.append(
            Entry(libpython.resolve(), f"{PYTHON_HOME.lstrip('/')}/lib/{libpython.name}", True)
        )
    stdlib = libdir / version
    if not (stdlib / "os.py").is_file():
        raise ImageBuildError(f"no standard library at {stdlib}")
    entries += _walk(stdlib, f"{PYTHON_HOME}/lib/{version}", STDLIB_SKIP)
    return entries


def _imported_site_packages(python: str, app_root: Path) -> list[Entry]:
    """Third-party packages/modules the dev atServer imports, found by importing it."""
    env = {**os.environ, "PYTHONPATH": str(app_root)}
    try:
        done = subprocess.run(
            [python, "-c", _IMPORT_PROBE],
            capture_output=True,
            text=True,
            env=env,
            timeout=PROBE_TIMEOUT_S,
            check=True,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise ImageBuildError(f"importing the dev atServer failed: {exc}") from exc
    found = json.loads(done.stdout)
    tops: dict[str, Path] = {}
    for name in found["files"]:
        path = Path(name)
        for parent in path.parents:
            if parent.name in ("site-packages", "dist-packages"):
                top = path.relative_to(parent).parts[0]
                if not top.startswith(("__editable__", "_distutils_hack")):
                    tops[top] = parent / top
                break
    entries: list[Entry] = []
    for top, path in sorted(tops.items()):
        if path.is_dir():
            entries += _walk(path, f"{APP_DIR}/{top}")
        else:
            entries.append(Entry(path, f"{APP_DIR.lstrip('/')}/{top}", True))
    return entries


def _app_entries(package_root: Path) -> list[Entry]:
    """``atserver_runner/__init__.py`` and the devserver package (not the runners)."""
    pkg = package_root / "atserver_runner"
    app = APP_DIR.lstrip("/")
    entries = [Entry(pkg / "__init__.py", f"{app}/atserver_runner/__init__.py", False)]
    for src in sorted((pkg / "devserver").glob("*.py")):
        if src.name != "image.py":
            arc = f"{app}/atserver_runner/devserver/{src.name}"
            entries.append(Entry(src, arc, False))
    return entries


_LDD_LINE = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x")


def _shared_libraries(elves: Iterable[Path], skip_under: Path) -> list[Entry]:
    """Every library ``ldd`` resolves for the given ELF files (and the loader), at its path."""
    needed: dict[str, Path] = {}
    for elf in elves:
        try:
            done = subprocess.run(
                ["ldd", str(elf)], capture_output=True, text=True, timeout=LDD_TIMEOUT_S
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ImageBuildError(f"ldd {elf}: {exc}") from exc
        for line in done.stdout.splitlines():
            m = _LDD_LINE.search(line)
            if m is None:
                continue
            lib = Path(m.group(1))
            if skip_under in lib.parents:
                continue  # the interpreter's own libpython is copied with it
            needed[str(lib)] = lib.resolve()
    return [Entry(real, path.lstrip("/"), True) for path, real in sorted(needed.items())]


def _is_elf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def collect(python_prefix: Path, package_root: Path, python: str) -> list[Entry]:
    """Every file of the image's root filesystem, sorted by path."""
    entries = _python_entries(python_prefix)
    entries += _imported_site_packages(python, package_root)
    entries += _app_entries(package_root)
    elves = [e.source for e in entries if e.executable and _is_elf(e.source)]
    elves += [e.source for e in entries if e.source.suffix == ".so" and e.source not in elves]
    entries += _shared_libraries(elves, python_prefix.resolve())
    unique = {e.arcname: e for e in entries}
    return [unique[k] for k in sorted(unique)]


def _etc_files() -> dict[str, bytes]:
    uid = CONTAINER_UID
    passwd = "root:x:0:0:root:/root:/sbin/nologin\n"
    passwd += f"atserver:x:{uid}:{uid}::/data:/sbin/nologin\n"
    return {
        "etc/passwd": passwd.encode(),
        "etc/group": f"root:x:0:\natserver:x:{uid}:\n".encode(),
    }


def image_changes() -> list[str]:
    """The image config (Dockerfile instructions ``docker import`` accepts)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    entrypoint = json.dumps([f"{PYTHON_HOME}/bin/{version}", "-m", "atserver_runner.devserver"])
    return [
        f"ENTRYPOINT {entrypoint}",
        f"ENV LD_LIBRARY_PATH={PYTHON_HOME}/lib",
        f"ENV PYTHONPATH={APP_DIR}",
        "ENV PYTHONDONTWRITEBYTECODE=1",
        "ENV PYTHONUNBUFFERED=1",
        "ENV ATSERVER_DATA_DIR=/data",
        f"ENV ATSERVER_PORT={CONTAINER_PORT}",
        "ENV ATSERVER_HOST=0.0.0.0",
        f"EXPOSE {CONTAINER_PORT}/tcp",
        f"USER {CONTAINER_UID}:{CONTAINER_UID}",
        "WORKDIR /data",
    ]


def content_hash(entries: Sequence[Entry]) -> str:
    """SHA-256 over every file's path, mode and bytes, the config and the builder version."""
    h = hashlib.sha256(f"builder {BUILDER_VERSION}\n".encode())
    for change in image_changes():
        h.update(change.encode() + b"\n")
    for name, data in sorted(_etc_files().items()):
        h.update(f"{name}\0{len(data)}\0".encode() + data)
    for e in entries:
        h.update(f"{e.arcname}\0{int(e.executable)}\0".encode())
        with open(e.source, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def write_rootfs(entries: Sequence[Entry], out: Path) -> None:
    """A reproducible, uncompressed tar of the root filesystem (owner root, mtime 0)."""

    def info(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.mtime, ti.uid, ti.gid = kind, mode, 0, 0, 0
        return ti

    dirs = {"tmp": 0o1777, "data": 0o755, "run": 0o755, "etc": 0o755}
    for e in entries:
        for parent in Path(e.arcname).parents:
            if str(parent) != ".":
                dirs.setdefault(str(parent), 0o755)
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for d in sorted(dirs):
            tar.addfile(info(d, tarfile.DIRTYPE, dirs[d]))
        for name, data in sorted(_etc_files().items()):
            ti = info(name, tarfile.REGTYPE, 0o644)
            ti.size = len(data)
            tar.addfile(ti, _bytes_reader(data))
        for e in entries:
            ti = info(e.arcname, tarfile.REGTYPE, 0o755 if e.executable else 0o644)
            ti.size = e.source.stat().st_size
            with open(e.source, "rb") as f:
                tar.addfile(ti, f)


def _bytes_reader(data: bytes) -> Any:
    import io

    return io.BytesIO(data)


def _image_labels(client: Any, tag: str) -> tuple[str, dict[str, str]] | None:
    import docker.errors

    try:
        image = client.images.get(tag)
    except docker.errors.ImageNotFound:
        return None
    labels = (image.attrs.get("Config") or {}).get("Labels") or {}
    return str(image.id), dict(labels)


def build(
    client: Any,
    tag: str = DEFAULT_TAG,
    *,
    python_prefix: Path | None = None,
    package_root: Path | None = None,
    force: bool = False,
    keep_tarball: Path | None = None,
) -> BuildResult:
    """Build (or find up to date) the dev atServer image under ``tag``."""
    t0 = time.monotonic()
    prefix = python_prefix or Path(sys.base_prefix)
    root = package_root or Path(__file__).resolve().parents[2]
    entries = collect(prefix, root, sys.executable)
    digest = content_hash(entries)
    repository, _, version = tag.rpartition(":") if ":" in tag.split("/")[-1] else (tag, "", "")
    repository = repository or tag
    current = _image_labels(client, tag)
    if not force and current is not None and current[1].get(HASH_LABEL) == digest:
        return BuildResult(
            tag, current[0], digest, False, _size(client, tag), time.monotonic() - t0, len(entries)
        )
    with tempfile.TemporaryDirectory(prefix="devserver-image-") as tmp:
        tarball = keep_tarball or Path(tmp) / "rootfs.tar"
        write_rootfs(entries, tarball)
        changes = [*image_changes(), f"LABEL {HASH_LABEL}={digest}"]
        try:
            client.api.import_image_from_file(
                str(tarball), repository=repository, tag=version or "latest", changes=changes
            )
        except Exception as exc:  # docker.errors.APIError and connection errors
            raise ImageBuildError(f"docker import of {tarball} as {tag} failed: {exc}") from exc
    found = _image_labels(client, tag)
    if found is None or found[1].get(HASH_LABEL) != digest:
        raise ImageBuildError(f"docker import finished but {tag} does not carry hash {digest}")
    if current is not None and current[0] != found[0]:
        _remove_replaced(client, current[0])
    return BuildResult(
        tag, found[0], digest, True, _size(client, tag), time.monotonic() - t0, len(entries)
    )


def _remove_replaced(client: Any, image_id: str) -> None:
    """Remove the image the tag pointed to before, unless a container still uses it."""
    import docker.errors

    with contextlib.suppress(docker.errors.APIError):  # still used by a container: leave it
        client.images.remove(image_id)


def _size(client: Any, tag: str) -> int:
    return int(client.images.get(tag).attrs.get("Size") or 0)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m atserver_runner.devserver.image",
        description="Build the dev atServer image locally with `docker import` (no registry).",
    )
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the image unless it is up to date")
    b.add_argument("--tag", default=DEFAULT_TAG, help=f"image tag (default {DEFAULT_TAG})")
    b.add_argument("--docker-url", default=None, help="Docker engine URL (default: environment)")
    b.add_argument("--force", action="store_true", help="rebuild even when up to date")
    b.add_argument("--keep-tarball", type=Path, default=None, help="also keep the rootfs tar here")
    ns = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    import docker

    try:
        client = (
            docker.DockerClient(base_url=ns.docker_url, timeout=120)
            if ns.docker_url
            else docker.from_env(timeout=120)
        )
    except docker.errors.DockerException as exc:
        print(f"error: cannot reach the Docker engine: {exc}", file=sys.stderr)
        return 1
    try:
        result = build(client, ns.tag, force=ns.force, keep_tarball=ns.keep_tarball)
    except ImageBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(json.dumps(result.__dict__))
    return 0


if __name__ == "__main__":
    sys.exit(main())
