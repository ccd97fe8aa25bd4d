"""The dev atServer: a small at-protocol server for one atSign, for tests and local clusters.

Run it with ``python -m atserver_runner.devserver --atsign @alice ...`` (see ``--help`` and
docs/atserver_runner.md); build the argv with :func:`argv`. Every option can also be given
as an environment variable ``ATSERVER_<OPTION>`` (e.g. ``ATSERVER_FENCING_TOKEN``), which is
how the Docker runner configures the container.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

MODULE = "atserver_runner.devserver"
CRAM_SECRET_ENV = "ATSERVER_CRAM_SECRET"


def argv(
    *,
    python: str | None,
    atsign: str,
    port: int,
    data_dir: Path | str,
    fencing_token: int,
    cert: Path | str,
    key: Path | str,
    host: str = "127.0.0.1",
    cram_secret_file: Path | str | None = None,
    pkam_public_key_file: Path | str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line of a dev atServer.

    With ``python`` (an interpreter path, e.g. ``sys.executable``) the result is a complete
    argv for the process runner; with ``python=None`` it is only the arguments, for an image
    whose entrypoint is already ``python -m atserver_runner.devserver``.
    """
    args = [
        "--atsign",
        atsign,
        "--host",
        host,
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--fencing-token",
        str(fencing_token),
        "--cert",
        str(cert),
        "--key",
        str(key),
    ]
    if cram_secret_file is not None:
        args += ["--cram-secret-file", str(cram_secret_file)]
    if pkam_public_key_file is not None:
        args += ["--pkam-public-key-file", str(pkam_public_key_file)]
    args += list(extra)
    return [python, "-m", MODULE, *args] if python is not None else args
