#!/usr/bin/python3
"""A token-protected git server for tests: git http-backend behind a check of the
Authorization header, as a private GitHub repository over https would behave.

    GITHTTP_TOKEN=TOKEN githttp.py ROOT PORT

serves the repositories under ROOT at http://127.0.0.1:PORT/NAME.git to clients sending
"Authorization: Basic base64(x-access-token:TOKEN)", answers 401 to everyone else, and logs
one line per request to stderr (never the header). Without GITHTTP_TOKEN everyone may read.
With GITHTTP_HANG=SECONDS it accepts connections but answers none until it has run that long,
as a remote that hangs would.
"""

from __future__ import annotations

import base64
import hmac
import os
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


def make_handler(root: str, token: str, answer_from: float = 0.0) -> type[BaseHTTPRequestHandler]:
    expected = "Basic " + base64.b64encode(f"x-access-token:{token}".encode()).decode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.serve()

        def do_POST(self) -> None:
            self.serve()

        def serve(self) -> None:
            time.sleep(max(0.0, answer_from - time.monotonic()))
            given = self.headers.get("Authorization", "")
            if token and not hmac.compare_digest(given.encode(), expected.encode()):
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="git"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            env = {
                "GIT_PROJECT_ROOT": root, "GIT_HTTP_EXPORT_ALL": "1", "PATH_INFO": url.path,
                "QUERY_STRING": url.query, "REQUEST_METHOD": self.command,
                "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                "CONTENT_LENGTH": str(len(body)), "REMOTE_ADDR": "127.0.0.1",
                "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""), "PATH": "/usr/bin:/bin",
            }
            result = subprocess.run(["git", "http-backend"], input=body, env=env,
                                    capture_output=True, check=False)
            head, _, payload = result.stdout.partition(b"\r\n\r\n")
            status = 200
            headers = []
            for line in head.split(b"\r\n"):
                name, _, value = line.decode().partition(":")
                if name.lower() == "status":
                    status = int(value.split()[0])
                elif name:
                    headers.append((name, value.strip()))
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, fmt: str, *args: object) -> None:
            code = args[1] if len(args) > 1 else ""
            sys.stderr.write(f"githttp: {self.command} {urlsplit(self.path).path} {code}\n")

    return Handler


def main() -> int:
    root, port, token = sys.argv[1], int(sys.argv[2]), os.environ.get("GITHTTP_TOKEN", "")
    answer_from = time.monotonic() + float(os.environ.get("GITHTTP_HANG", "0"))
    server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(root, token, answer_from))
    print("listening", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
