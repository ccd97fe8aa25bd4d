"""The dev atServer's per-connection logic (``Session``) on a real data dir, without network:
any input line gets one ``data:``/``error:`` answer plus the prompt, never an exception."""

from __future__ import annotations

import asyncio
import base64
import errno
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atserver_runner.devserver import server as server_module
from atserver_runner.devserver.server import Backend, DevServerConfig, Session

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PUBLIC_B64 = base64.b64encode(
    KEY.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
).decode()


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    data = tmp_path_factory.mktemp("session")
    cfg = DevServerConfig(
        atsign="@alice",
        host="127.0.0.1",
        port=1,
        data_dir=data,
        fencing_token=1,
        cert=data / "unused.pem",
        key=data / "unused.key",
        pkam_public_key=PUBLIC_B64,
    )
    b = Backend(cfg)
    b.open()
    try:
        yield b
    finally:
        b.close()


def ask(session: Session, line: bytes) -> tuple[str, bool]:
    return asyncio.run(session.handle(line))


def test_pkam_login_then_update_llookup_scan_delete(backend: Backend) -> None:
    s = Session(backend)
    challenge, _ = ask(s, b"from:@alice")
    assert challenge.startswith("data:") and challenge.endswith("\n@")
    sig = KEY.sign(challenge[5:].split("\n")[0].encode(), padding.PKCS1v15(), hashes.SHA256())
    answer, _ = ask(s, b"pkam:" + base64.b64encode(sig))
    assert answer == "data:success\n@alice@"
    assert ask(s, b"update:ttr:-1:x.test@alice v")[0].startswith("error:AT0022-")
    assert ask(s, b"update:x.test@alice hello there")[0].startswith("data:")
    assert ask(s, b"llookup:x.test@alice")[0] == "data:hello there\n@alice@"
    assert '"x.test@alice"' in ask(s, b"scan")[0]
    assert ask(s, b"update:x.test@bob v")[0].startswith("error:AT0016-")
    assert ask(s, b"delete:x.test@alice")[0].startswith("data:")
    assert ask(s, b"llookup:x.test@alice")[0].startswith("error:AT0015-Key not found : ")
    assert ask(s, b"@exit") == ("", True)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    line=st.one_of(
        st.binary(max_size=200).map(lambda b: b.replace(b"\n", b"")),
        st.sampled_from(
            ["update:", "llookup:", "lookup:", "scan", "delete:", "from:", "noop:"]
        ).flatmap(
            lambda verb: st.text(max_size=80).map(lambda t: (verb + t).replace("\n", "").encode())
        ),
    ),
    logged_in=st.booleans(),
)
def test_any_line_gets_one_answer_and_the_prompt(
    backend: Backend, line: bytes, logged_in: bool
) -> None:
    s = Session(backend)
    s.authenticated = logged_in  # exercise the verbs behind login with arbitrary input too
    text, close = ask(s, line)
    if close:
        assert text == ""
        return
    prompt = "@alice@" if s.authenticated else "@"
    assert text.endswith(prompt), text
    body = text[: -len(prompt)]
    if body:
        assert body.endswith("\n") and body.count("\n") == 1, text
        assert body.startswith(("data:", "error:AT")), text
        assert "AT0011" not in body, text  # no internal error for any input


@pytest.mark.parametrize("failure", ["error", "higher-token"])
def test_a_write_is_not_acknowledged_when_the_fence_recheck_after_the_fsync_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """CephFS: an evicted, thawed client's fsync() returned success for a record that never
    landed; only the next operation failed. The server must re-read its fence after the
    fsync and treat any error as 'not acknowledged'."""
    cfg = DevServerConfig(
        atsign="@alice",
        host="127.0.0.1",
        port=1,
        data_dir=tmp_path,
        fencing_token=7,
        cert=tmp_path / "unused.pem",
        key=tmp_path / "unused.key",
        pkam_public_key=PUBLIC_B64,
    )
    b = Backend(cfg)
    b.open()
    try:
        s = Session(b)
        challenge, _ = ask(s, b"from:@alice")
        sig = KEY.sign(challenge[5:].split("\n")[0].encode(), padding.PKCS1v15(), hashes.SHA256())
        ask(s, b"pkam:" + base64.b64encode(sig))
        assert ask(s, b"update:ok.test@alice 1")[0].startswith("data:")

        def broken_read_fence(data_dir: Path) -> int:
            if failure == "error":
                raise OSError(errno.ESHUTDOWN, "Cannot send after transport endpoint shutdown")
            return 8  # a newer owner's token appeared after our write

        monkeypatch.setattr(server_module, "read_fence", broken_read_fence)
        answer, close = ask(s, b"update:lost.test@alice 2")
        assert answer.startswith("error:"), answer
        assert "not accepted" in answer
        assert close is True
        assert b.fenced
        assert (b.storage_lost is not None) == (failure == "error")
        # Nothing more is acknowledged on this server.
        with pytest.raises(server_module.Fenced):
            asyncio.run(b.write("put", "x.test@alice", "3"))
    finally:
        b.close()
