"""A lightweight stand-in atServer for scale benchmarks: TLS, the ``@`` prompt, ``info:brief``.

A thousand dev atServers do not fit on a benchmark machine (33 MB RSS each, asyncio and
the key store). This answers exactly what the supervisor's probe asks, the real at-protocol
round trip over TLS: it sends ``@``, answers each ``info:brief`` with
``data:{"atSign":...,"fencingToken":...}`` and the prompt, keeps the connection open until
``@exit`` (a thread per client), and stores nothing.
Run with Debian's python3 ``-S -I`` (no site packages): about 15 MB RSS, most of it shared.

    python3 -S -I bench/standin_atserver.py --atsign @a --host 127.0.0.1 --port 7001 \\
        --fencing-token 7 --cert cert.pem --key key.pem
"""

import socket
import ssl
import sys
import threading


def main(argv: list[str]) -> int:
    args = dict(zip(argv[0::2], argv[1::2], strict=False))
    try:
        atsign, host, port = args["--atsign"], args["--host"], int(args["--port"])
        token = int(args["--fencing-token"])
        cert, key = args["--cert"], args["--key"]
    except (KeyError, ValueError) as exc:
        print(f"standin_atserver: bad arguments: {exc!r}", file=sys.stderr)
        return 2
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port))
    server.listen(64)
    info = f'data:{{"version":"standin","atSign":"{atsign}","fencingToken":{token}}}\n@'.encode()

    def serve(conn: socket.socket) -> None:
        """One client: the prompt, then an answer per line (a real atServer keeps the
        connection open too), until ``@exit``, EOF or a minute without a line."""
        try:
            conn.settimeout(60.0)
            tls = ctx.wrap_socket(conn, server_side=True)
            tls.sendall(b"@")
            buf = b""
            while True:
                while b"\n" not in buf:
                    chunk = tls.recv(4096)
                    if not chunk or len(buf) > 65536:
                        return
                    buf += chunk
                line, _, buf = buf.partition(b"\n")
                if line.strip() == b"@exit":
                    return
                tls.sendall(info if line.startswith(b"info") else b"error:AT0003-Invalid syntax\n@")
        except OSError:
            pass
        finally:
            conn.close()

    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
