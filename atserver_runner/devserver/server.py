"""The dev atServer: one atSign, TLS, enough of the at protocol for the ``atsdk`` client.

:class:`Session` turns request lines into answer lines (no network, testable on its own);
:class:`DevServer` owns the data directory (fence + key store) and the TLS listener.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import re
import ssl
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from atserver_runner.devserver import protocol as p
from atserver_runner.devserver.fence import Fence, FenceError, read_fence
from atserver_runner.devserver.store import KeyStore, Record

VERSION = "0.1.0-dev"
PKAM_PUBLIC_KEY = "privatekey:at_pkam_publickey"
CRAM_SECRET_KEY = "privatekey:at_secret"
MAX_REGEX_CHARS = 1000

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_FENCED_AT_START = 3
EXIT_FENCED_WHILE_RUNNING = 4
EXIT_STORAGE_LOST = 5


def log_event(event: str, *, json_logs: bool = False, **fields: Any) -> None:
    """One event per line on stderr (``event key=value ...`` or JSON)."""
    if json_logs:
        line = json.dumps({"ts": round(time.time(), 3), "event": event, **fields}, default=str)
    else:
        parts = [
            f"{k}={v!r}" if isinstance(v, str) and " " in v else f"{k}={v}"
            for k, v in fields.items()
        ]
        line = " ".join([time.strftime("%Y-%m-%dT%H:%M:%S"), event, *parts])
    print(line, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class DevServerConfig:
    """What one dev atServer serves and where."""

    atsign: str
    host: str
    port: int
    data_dir: Path
    fencing_token: int
    cert: Path
    key: Path
    cram_secret: str | None = None
    pkam_public_key: str | None = None
    """Base64 DER SubjectPublicKeyInfo to install instead of onboarding with CRAM."""
    max_line_bytes: int = 1024 * 1024
    fence_poll_s: float = 1.0
    idle_timeout_s: float = 600.0
    max_connections: int = 256
    write_timeout_s: float = 30.0
    """A client that does not read its answers for this long is disconnected."""
    json_logs: bool = False


class Fenced(Exception):
    """A higher fencing token took over the data directory while we were serving, or the
    storage stopped answering: no write is acknowledged any more."""


class StorageLost(Exception):
    """The data directory stopped answering (e.g. ESHUTDOWN after a CephFS eviction)."""


class Backend:
    """The atSign's data: fence + key store, writes serialized and made durable in a thread."""

    def __init__(self, config: DevServerConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.atsign = p.normalize_atsign(config.atsign)
        self.fence = Fence(config.data_dir, config.fencing_token)
        self.store = KeyStore(config.data_dir, clock=clock)
        self.started = time.monotonic()
        self._write_lock = asyncio.Lock()
        self.fenced = False
        self.storage_lost: str | None = None
        """Why the storage stopped answering, once it did (the server then stops)."""

    def open(self) -> None:
        """Claim the fence (FenceError if a higher token is there), then load the data."""
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        self.fence.claim()
        self.store.open()
        if self.store.get(PKAM_PUBLIC_KEY) is None:
            if self.config.pkam_public_key:
                _load_public_key(self.config.pkam_public_key)  # reject a bad key at start
                with self.fence.held():
                    self.store.put(PKAM_PUBLIC_KEY, self.config.pkam_public_key, {})
            elif self.config.cram_secret and self.store.get(CRAM_SECRET_KEY) is None:
                with self.fence.held():
                    self.store.put(CRAM_SECRET_KEY, self.config.cram_secret, {})

    def close(self) -> None:
        self.store.close()
        self.fence.close()

    async def write(
        self, op: str, key: str, value: str = "", meta: dict[str, Any] | None = None
    ) -> Any:
        """Apply a write durably under the fence; raises :class:`Fenced` if overtaken."""
        if self.fenced:
            raise Fenced(f"{self.fence.path} holds a higher token than {self.fence.token}")
        async with self._write_lock:
            try:
                return await asyncio.to_thread(self._write_sync, op, key, value, meta or {})
            except FenceError as exc:
                self.fenced = True
                raise Fenced(str(exc)) from exc
            except (StorageLost, OSError) as exc:
                self.fenced = True
                self.storage_lost = str(exc)
                raise Fenced(f"the storage did not confirm the write: {exc}") from exc

    def _write_sync(self, op: str, key: str, value: str, meta: dict[str, Any]) -> Any:
        with self.fence.held():
            result = self.store.put(key, value, meta) if op == "put" else self.store.delete(key)
        self.confirm()
        return result

    def confirm(self) -> None:
        """A fresh operation on the storage after the fsync, before a write is acknowledged.

        On CephFS a client that was frozen, evicted and blocklisted, then thawed, got
        success from ``fsync()`` for a record that never reached the file; only the next
        operation failed (ESHUTDOWN). So the fence file is opened and read again: a higher
        token raises FenceError, any error StorageLost, and the write is not acknowledged.
        """
        try:
            current = read_fence(self.config.data_dir)
        except OSError as exc:
            raise StorageLost(f"{self.fence.path}: {exc.strerror or exc}") from exc
        if current != self.fence.token:
            raise FenceError(self.fence.path, self.fence.token, current)


def _load_public_key(b64: str) -> rsa.RSAPublicKey:
    try:
        key = serialization.load_der_public_key(base64.b64decode(b64, validate=True))
    except (ValueError, binascii.Error) as exc:
        raise ValueError(f"PKAM public key is not base64 DER: {exc}") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("PKAM public key is not an RSA key")
    return key


class Session:
    """One client connection's state; :meth:`handle` answers one raw line."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.authenticated = False
        self.challenge: str | None = None

    @property
    def prompt(self) -> str:
        return f"{self.backend.atsign}@" if self.authenticated else "@"

    async def handle(self, raw: bytes) -> tuple[str, bool]:
        """Answer for one request line (without its ``\\n``): (text incl. prompt, close after)."""
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as exc:
            return self._answer(
                p.error_line(
                    p.INVALID_SYNTAX, f"request is not UTF-8 ({exc.reason} at byte {exc.start})"
                )
            ), False
        if not line.strip():
            return self.prompt, False
        try:
            cmd = p.parse_command(line)
            if cmd.verb == "exit":
                return "", True
            answer = await self._execute(cmd)
        except p.ProtocolError as exc:
            answer = exc.line()
        except Fenced as exc:
            return self._answer(p.error_line(p.SERVER_PAUSED, f"write not accepted: {exc}")), True
        except Exception as exc:  # a bug or an I/O error must not kill the connection loop
            log_event("internal_error", error=repr(exc), json_logs=self.backend.config.json_logs)
            answer = p.error_line(p.INTERNAL_SERVER_EXCEPTION, f"{type(exc).__name__}: {exc}")
        return self._answer(answer), False

    def _answer(self, text: str) -> str:
        return f"{text}\n{self.prompt}"

    def _require_auth(self, cmd: p.Command) -> None:
        if not self.authenticated:
            raise p.ProtocolError(
                p.UNAUTHENTICATED, f"{cmd.verb} needs an authenticated connection (from + pkam)"
            )

    def _require_own(self, key: str) -> None:
        owner = p.key_owner(key)
        if owner is None and key.startswith(("privatekey:", "private:")):
            return
        if owner != self.backend.atsign:
            raise p.ProtocolError(
                p.INVALID_ATKEY, f"{key} does not belong to {self.backend.atsign}"
            )

    async def _execute(self, cmd: p.Command) -> str:
        handler = getattr(self, f"_verb_{cmd.verb}")
        result: str = await handler(cmd)
        return result

    async def _verb_info(self, cmd: p.Command) -> str:
        uptime = time.monotonic() - self.backend.started
        info: dict[str, Any] = {"version": VERSION}
        if cmd.detail == "brief":
            info["uptimeAsMillis"] = int(uptime * 1000)
        else:
            info["uptimeAsWords"] = f"{int(uptime)} seconds"
            info["features"] = [
                {"name": "noop:", "status": "Beta", "syntax": r"^noop:(?<delayMillis>\d+)$"},
                {"name": "info:", "status": "Beta", "syntax": r"^info(:brief)?$"},
            ]
        info["atSign"] = self.backend.atsign
        info["fencingToken"] = self.backend.fence.token
        return "data:" + json.dumps(info, separators=(",", ":"))

    async def _verb_noop(self, cmd: p.Command) -> str:
        await asyncio.sleep(int(cmd.arg) / 1000.0)
        return "data:ok"

    async def _verb_from(self, cmd: p.Command) -> str:
        if cmd.arg != self.backend.atsign:
            raise p.ProtocolError(
                p.UNAUTHORIZED,
                f"this dev atServer serves {self.backend.atsign} only; "
                f"from:{cmd.arg} (proof of life between atSigns) is not supported",
            )
        self.authenticated = False
        self.challenge = f"_{uuid.uuid4()}{self.backend.atsign}:{uuid.uuid4()}"
        return "data:" + self.challenge

    def _take_challenge(self, verb: str) -> str:
        challenge, self.challenge = self.challenge, None
        if challenge is None:
            raise p.ProtocolError(
                p.UNAUTHENTICATED, f"send from:{self.backend.atsign} before {verb}"
            )
        return challenge

    async def _verb_pkam(self, cmd: p.Command) -> str:
        challenge = self._take_challenge("pkam")
        rec = self.backend.store.get(PKAM_PUBLIC_KEY)
        if rec is None:
            raise p.ProtocolError(
                p.UNAUTHENTICATED, "no PKAM public key is stored yet: onboard with cram first"
            )
        try:
            signature = base64.b64decode(cmd.arg, validate=True)
            _load_public_key(rec.value).verify(
                signature, challenge.encode(), padding.PKCS1v15(), hashes.SHA256()
            )
        except (ValueError, binascii.Error, InvalidSignature):
            raise p.ProtocolError(p.UNAUTHENTICATED, "pkam signature verification failed") from None
        self.authenticated = True
        return "data:success"

    async def _verb_cram(self, cmd: p.Command) -> str:
        challenge = self._take_challenge("cram")
        rec = self.backend.store.get(CRAM_SECRET_KEY)
        if rec is None:
            raise p.ProtocolError(
                p.UNAUTHENTICATED,
                "CRAM is not available (no secret, or onboarding already finished)",
            )
        expected = hashlib.sha512((rec.value + challenge).encode()).hexdigest()
        if not hmac.compare_digest(expected, cmd.arg.lower()):
            raise p.ProtocolError(p.UNAUTHENTICATED, "cram digest verification failed")
        self.authenticated = True
        return "data:success"

    async def _verb_update(self, cmd: p.Command) -> str:
        self._require_auth(cmd)
        self._require_own(cmd.arg)
        await self.backend.write("put", cmd.arg, cmd.value, dict(cmd.meta))
        return f"data:{self.backend.store.commit_id}"

    async def _verb_delete(self, cmd: p.Command) -> str:
        self._require_auth(cmd)
        self._require_own(cmd.arg)
        if self.backend.store.get(cmd.arg) is None:
            raise p.ProtocolError(p.KEY_NOT_FOUND, f"{cmd.arg} does not exist in keystore")
        await self.backend.write("delete", cmd.arg)
        return f"data:{self.backend.store.commit_id}"

    def _lookup_answer(self, rec: Record, detail: str, shown_key: str) -> str:
        if detail == "meta":
            return "data:" + json.dumps(rec.metadata_json(), separators=(",", ":"))
        if detail == "all":
            body = {"key": shown_key, "data": rec.value, "metaData": rec.metadata_json()}
            return "data:" + json.dumps(body, separators=(",", ":"))
        return "data:" + rec.value

    async def _verb_llookup(self, cmd: p.Command) -> str:
        self._require_auth(cmd)
        rec = self.backend.store.get(cmd.arg)
        if rec is None:
            raise p.ProtocolError(p.KEY_NOT_FOUND, f"{cmd.arg} does not exist in keystore")
        return self._lookup_answer(rec, cmd.detail, cmd.arg)

    def _own_remote_key(self, key: str) -> None:
        owner = p.key_owner(key)
        if owner != self.backend.atsign:
            raise p.ProtocolError(
                p.SECONDARY_NOT_FOUND,
                f"{key}: lookups of other atSigns' keys are not supported by the dev atServer",
            )

    async def _verb_lookup(self, cmd: p.Command) -> str:
        self._own_remote_key(cmd.arg)
        candidates = [cmd.arg, "public:" + cmd.arg] if self.authenticated else ["public:" + cmd.arg]
        for key in candidates:
            rec = self.backend.store.get(key)
            if rec is not None:
                return self._lookup_answer(rec, cmd.detail, key)
        raise p.ProtocolError(p.KEY_NOT_FOUND, f"{cmd.arg} does not exist in keystore")

    async def _verb_plookup(self, cmd: p.Command) -> str:
        self._own_remote_key(cmd.arg)
        key = "public:" + cmd.arg
        rec = self.backend.store.get(key)
        if rec is None:
            raise p.ProtocolError(p.KEY_NOT_FOUND, f"{key} does not exist in keystore")
        return self._lookup_answer(rec, cmd.detail, key)

    async def _verb_scan(self, cmd: p.Command) -> str:
        if cmd.for_atsign and cmd.for_atsign != self.backend.atsign:
            raise p.ProtocolError(
                p.SECONDARY_NOT_FOUND,
                f"scan of {cmd.for_atsign} is not supported by the dev atServer",
            )
        if len(cmd.detail) > MAX_REGEX_CHARS:
            raise p.ProtocolError(
                p.ILLEGAL_ARGUMENT, f"scan regex longer than {MAX_REGEX_CHARS} characters"
            )
        try:
            pattern = re.compile(cmd.detail) if cmd.detail else None
        except re.error as exc:
            raise p.ProtocolError(
                p.ILLEGAL_ARGUMENT, f"invalid scan regex {cmd.detail[:80]!r}: {exc}"
            ) from None
        shown: list[str] = []
        for key in self.backend.store.live_keys():
            if pattern is not None and not pattern.search(key):
                continue
            name = p.visible_in_scan(key, cmd.show_hidden, self.authenticated)
            if name is not None:
                shown.append(name)
        return "data:" + json.dumps(shown, separators=(",", ":"))


class LineTooLong(Exception):
    """A request line exceeded the limit; its bytes were skipped up to the next newline."""


async def read_line(reader: asyncio.StreamReader, timeout: float) -> bytes | None:
    """The next line without ``\\n``; ``None`` at EOF.

    Raises LineTooLong after skipping an over-long line up to its newline.
    """
    try:
        line = await asyncio.wait_for(reader.readuntil(b"\n"), timeout)
        return line[:-1]
    except asyncio.IncompleteReadError:
        return None
    except asyncio.LimitOverrunError as exc:
        consumed = exc.consumed
    while True:  # skip the rest of the over-long line, each read bounded by the idle timeout
        await asyncio.wait_for(reader.readexactly(max(consumed, 1)), timeout)
        try:
            await asyncio.wait_for(reader.readuntil(b"\n"), timeout)
            raise LineTooLong()
        except asyncio.LimitOverrunError as again:
            consumed = again.consumed
        except asyncio.IncompleteReadError:
            return None


class DevServer:
    """A TLS listener serving one atSign from its data directory."""

    def __init__(self, config: DevServerConfig) -> None:
        self.config = config
        self.backend = Backend(config)
        self._server: asyncio.Server | None = None
        self._stopped = asyncio.Event()
        self.exit_code = EXIT_OK
        self._writers: set[asyncio.StreamWriter] = set()
        self._watch: asyncio.Task[None] | None = None

    def _log(self, event: str, **fields: Any) -> None:
        log_event(event, json_logs=self.config.json_logs, atsign=self.backend.atsign, **fields)

    async def start(self) -> None:
        """Claim the data dir (FenceError if overtaken) and listen."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.config.cert, self.config.key)
        await asyncio.to_thread(self.backend.open)
        self._server = await asyncio.start_server(
            self._client,
            self.config.host,
            self.config.port,
            ssl=ctx,
            limit=self.config.max_line_bytes,
            reuse_address=True,
            ssl_handshake_timeout=10.0,
        )
        self._watch = asyncio.create_task(self._watch_fence())
        self._log(
            "listening",
            host=self.config.host,
            port=self.config.port,
            fencing_token=self.config.fencing_token,
            keys=len(self.backend.store.live_keys()),
        )

    async def _watch_fence(self) -> None:
        while not self._stopped.is_set():
            await asyncio.sleep(self.config.fence_poll_s)
            try:
                await asyncio.to_thread(self.backend.fence.check)
            except FenceError as exc:
                self.backend.fenced = True
                self._log("fenced", detail=str(exc))
                self.stop(EXIT_FENCED_WHILE_RUNNING)
                return
            except OSError as exc:
                self.backend.fenced = True
                self.backend.storage_lost = str(exc)
                self._log("storage_lost", detail=str(exc))
                self.stop(EXIT_STORAGE_LOST)
                return

    def stop(self, exit_code: int = EXIT_OK) -> None:
        """Stop accepting, close client connections; :meth:`wait` then returns."""
        if self._stopped.is_set():
            return
        self.exit_code = exit_code
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        self._stopped.set()

    async def wait(self) -> int:
        """Wait until stopped; release the data dir; return the exit code."""
        await self._stopped.wait()
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)
        self.backend.close()
        self._log("stopped", exit_code=self.exit_code)
        return self.exit_code

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        await asyncio.wait_for(writer.drain(), self.config.write_timeout_s)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._writers) >= self.config.max_connections:
            await self._refuse(writer)
            return
        self._writers.add(writer)
        session = Session(self.backend)
        try:
            await self._send(writer, b"@")
            while not self._stopped.is_set():
                try:
                    raw = await read_line(reader, self.config.idle_timeout_s)
                except LineTooLong:
                    text = session._answer(
                        p.error_line(
                            p.BUFFER_OVERFLOW,
                            f"request line longer than {self.config.max_line_bytes} bytes",
                        )
                    )
                    await self._send(writer, text.encode())
                    continue
                if raw is None:
                    break
                text, close = await session.handle(raw)
                if text:
                    await self._send(writer, text.encode())
                if self.backend.storage_lost is not None:
                    self._log("storage_lost", detail=self.backend.storage_lost)
                    self.stop(EXIT_STORAGE_LOST)
                    break
                if self.backend.fenced:
                    self._log("fenced", detail="a write met a higher fencing token")
                    self.stop(EXIT_FENCED_WHILE_RUNNING)
                    break
                if close:
                    break
        except (TimeoutError, ConnectionError, ssl.SSLError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2.0)

    async def _refuse(self, writer: asyncio.StreamWriter) -> None:
        """Over the connection limit: say so (SDK error format) and hang up."""
        self._log("connection_refused", reason="max_connections", limit=self.config.max_connections)
        line = p.error_line(
            p.INBOUND_CONNECTION_LIMIT,
            f"{self.config.max_connections} connections are open; try again later",
        )
        with contextlib.suppress(TimeoutError, ConnectionError, ssl.SSLError, OSError):
            await asyncio.wait_for(self._write_and_close(writer, f"@{line}\n@".encode()), 2.0)
        writer.close()

    async def _write_and_close(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        await writer.drain()
        writer.close()
        await writer.wait_closed()
