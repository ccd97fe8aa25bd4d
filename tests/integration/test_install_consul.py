"""scripts/install-consul.sh: the vendored .deb fallback and its checksum check, for real."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "install-consul.sh"
VENDOR = REPO.parent / "shared" / "vendor"

pytestmark = pytest.mark.skipif(
    not any(VENDOR.glob("consul_*.deb")), reason=f"no vendored consul .deb in {VENDOR}"
)


def _run(tmp_path: Path, vendor: Path) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ,
        CONSUL_TOOLS_DIR=str(tmp_path / "tools"),
        CONSUL_VENDOR_DIR=str(vendor),
        CONSUL_SKIP_PATH="1",
        CONSUL_SKIP_APT="1",
    )
    return subprocess.run(
        [str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_vendored_deb_is_checked_and_extracted(tmp_path: Path) -> None:
    result = _run(tmp_path, VENDOR)
    assert result.returncode == 0, result.stderr
    binary = tmp_path / "tools" / "bin" / "consul"
    version = subprocess.run([str(binary), "version"], capture_output=True, text=True, timeout=30)
    assert version.stdout.startswith("Consul v1.8.7"), version.stdout


def test_corrupted_deb_is_refused(tmp_path: Path) -> None:
    vendor = tmp_path / "vendor"
    vendor.mkdir()
    shutil.copy(VENDOR / "SHA256SUMS", vendor / "SHA256SUMS")
    deb = next(VENDOR.glob("consul_*.deb"))
    data = bytearray(deb.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (vendor / deb.name).write_bytes(bytes(data))
    result = _run(tmp_path, vendor)
    assert result.returncode != 0
    assert "checksum mismatch" in result.stderr
    assert not (tmp_path / "tools" / "bin" / "consul").exists()
