"""CURVE on the worker sockets, for workers on other hosts (the Ray backend): the sockets are
tcp:// there, so every one is encrypted and only the processes of this start may connect.

Each start of a replica's workers makes fresh key pairs: one for the scheduler's sockets (a
CURVE server), one for the drafter's drafts socket (a CURVE server, frames transport) and one
the workers present as clients. A ZAP handler on each server admits only that client key, so a
process that knows a server's public key (it travels in handles) still cannot connect.
The secret keys reach the workers as arguments of their Ray actor calls, never over ZeroMQ.
Standard library and pyzmq only (and the role names of common/protocol.py): both the scheduler and the workers import this.
"""

from __future__ import annotations

import zmq
from zmq.auth.thread import ThreadAuthenticator

from minedraft.common.protocol import DRAFTER

ZAP_DOMAIN = "minedraft-workers"


def new_worker_keys() -> dict[str, str]:
    """Fresh key pairs (z85 text) for one start of a replica's workers."""
    keys = {}
    for name in ("scheduler", "drafts", "worker"):
        public, secret = zmq.curve_keypair()
        keys[f"{name}_public"], keys[f"{name}_secret"] = public.decode(), secret.decode()
    return keys


def for_worker(keys: dict[str, str], role: str) -> dict[str, str]:
    """What one worker is given: its client key pair, the servers' public keys and, for the
    drafter, its drafts socket's key pair. The scheduler's secret key stays with the scheduler."""
    given = {key: keys[key] for key in ("scheduler_public", "drafts_public", "worker_public", "worker_secret")}
    if role == DRAFTER:
        given["drafts_secret"] = keys["drafts_secret"]
    return given


def make_server(sock: zmq.Socket, public: str, secret: str) -> None:
    """A CURVE server socket whose clients the ZAP handler (start_authenticator) checks."""
    sock.curve_publickey, sock.curve_secretkey = public.encode(), secret.encode()
    sock.curve_server = True
    sock.zap_domain = ZAP_DOMAIN.encode()


def make_client(sock: zmq.Socket, server_public: str, keys: dict[str, str]) -> None:
    sock.curve_serverkey = server_public.encode()
    sock.curve_publickey, sock.curve_secretkey = keys["worker_public"].encode(), keys["worker_secret"].encode()


def bind_tcp(sock: zmq.Socket, host: str, ports: tuple[int, ...] = ()) -> str:
    """Bind sock on tcp://host at any free port, or at a free one in ports = (first, last);
    returns the endpoint bound. ValueError when the range has no free port."""
    if not ports:
        sock.bind(f"tcp://{host}:*")
    else:
        first, last = ports
        try:
            sock.bind_to_random_port(f"tcp://{host}", first, last + 1, max_tries=min(4 * (last - first + 1), 20000))
        except zmq.ZMQBindError:
            raise ValueError(f"no free port in cluster.worker_ports [{first}, {last}] on {host}") from None
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


class _OneKey:
    def __init__(self, public: str):
        self.public = public.encode()

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self.public


def start_authenticator(context: zmq.Context, client_public: str) -> ThreadAuthenticator:
    """A ZAP handler on this context that admits only client_public on the workers' domain.
    One per context: give each pool and each drafter a context of its own."""
    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=_OneKey(client_public))
    return auth
