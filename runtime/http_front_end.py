"""The daemon's side of the HTTP front-end process: its listening socket, bound here before the
workers start (a busy port fails the start; a restarted front end inherits the same socket, so
nothing races for the port), the spawn, a restart when it exits unexpectedly, and the stop.
Standard library only: the scheduler imports this, never the ASGI stack.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time

from minedraft.common.config import Config, parse_listen

log = logging.getLogger("minedraft.http")
LISTEN_BACKLOG = 1024
EXIT_WAIT_S = 8.0  # SIGTERM, then this long to finish open streams, then SIGKILL
RESTART_DELAY_S = 1.0  # between an unexpected exit and the restart; doubles with each restart
MAX_RESTART_DELAY_S = 60.0  # (a front end that cannot start is retried at this pace)
HTTP_MODULES = ("fastapi", "uvicorn", "prometheus_client", "jinja2")  # the `http` extra


def missing_http_modules() -> list[str]:
    return [name for name in HTTP_MODULES if importlib.util.find_spec(name) is None]


def bind_listener(listen: str) -> socket.socket:
    """A listening TCP socket on HOST:PORT (port 0: any free port); OSError when it cannot bind."""
    host, port = parse_listen(listen)
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def listen_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class HttpFrontEnd:
    def __init__(self, config: Config, run_dir: str):
        self.config = config
        self.config_path = os.path.join(run_dir, "config.json")
        self.sock: socket.socket | None = None
        self.proc: subprocess.Popen | None = None
        self.num_restarts = 0
        self.exited_s: float | None = None  # when an unexpected exit was seen

    def bind(self) -> None:
        """Check the `http` extra and bind the port; RuntimeError (with the fix) otherwise."""
        missing = missing_http_modules()
        if missing:
            raise RuntimeError(f"server.http needs {', '.join(missing)}: pip install 'minedraft-runtime[http]'")
        try:
            self.sock = bind_listener(self.config.server.http)
        except OSError as exc:
            raise RuntimeError(f"server.http: cannot listen on {self.config.server.http}: {exc}") from None
        log.info("HTTP front end will listen on %s", listen_url(self.sock))

    def spawn(self) -> None:
        fd = self.sock.fileno()
        cmd = [sys.executable, "-m", "minedraft.runtime.http_server", self.config_path, "--fd", str(fd),
               "--parent-pid", str(os.getpid())]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, pass_fds=(fd,))
        log.info("HTTP front end started: pid=%d", self.proc.pid)

    def check(self) -> None:
        """Called from the daemon's loop: restart a front end that exited on its own."""
        if self.proc is None or self.proc.poll() is None:
            return
        now = time.monotonic()
        if self.exited_s is None:
            self.exited_s = now
            log.error("HTTP front end exited with code %s; restarting it", self.proc.returncode)
        if now - self.exited_s >= min(RESTART_DELAY_S * 2**self.num_restarts, MAX_RESTART_DELAY_S):
            self.exited_s = None
            self.num_restarts += 1
            self.spawn()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # it finishes open responses, then exits
            try:
                self.proc.wait(EXIT_WAIT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def status(self) -> dict:
        return {
            "url": listen_url(self.sock) if self.sock is not None else None,
            "pid": self.proc.pid if self.proc is not None else None,
            "is_running": self.proc is not None and self.proc.poll() is None,
            "num_restarts": self.num_restarts,
        }
