"""CURVE authentication and encryption for routing sockets that cross hosts.

By default a collector binds 127.0.0.1 and nothing crosses the machine. To accept senders from
other hosts, bind a routable address *and* give the collector a ``CurveServer`` (its key pair and
the public keys of the senders it accepts); each sender gets a ``CurveClient`` (its key pair and
the collector's public key). Keys are Z85 text, as ``zmq.curve_keypair()`` makes them:

    server = generate_keypair(); client = generate_keypair()
    RoutingCollector(CollectorConfig(bind="tcp://0.0.0.0:5555",
                     curve=CurveServer(server, allowed_clients=(client.public,))))
    RoutingSender(SenderConfig(curve=CurveClient(client, server_public=server.public)))

A sender whose key is not allowed never completes the handshake; the collector counts and logs it
(stats ``rejected["unauthenticated"]``) and keeps serving.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import zmq
from zmq.auth.thread import ThreadAuthenticator

ZAP_DOMAIN = "routing-replay"
log = logging.getLogger("routing_replay.wire")


@dataclass(frozen=True)
class CurveKeyPair:
    public: bytes
    secret: bytes


@dataclass(frozen=True)
class CurveServer:
    keys: CurveKeyPair
    allowed_clients: tuple[bytes, ...]


@dataclass(frozen=True)
class CurveClient:
    keys: CurveKeyPair
    server_public: bytes


def generate_keypair() -> CurveKeyPair:
    public, secret = zmq.curve_keypair()
    return CurveKeyPair(public, secret)


class _AllowList:
    """ZAP credentials provider: accepts the listed client keys, reports every denial."""

    def __init__(self, allowed: tuple[bytes, ...], on_denied: Callable[[], None]) -> None:
        self.allowed = frozenset(allowed)
        self.on_denied = on_denied

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.allowed:
            return True
        self.on_denied()
        log.warning("rejected a routing sender with an unknown CURVE key %s", key.decode(errors="replace"))
        return False


def secure_server(context: zmq.Context, socket: zmq.Socket, curve: CurveServer,
                  on_denied: Callable[[], None]) -> ThreadAuthenticator:
    """Makes ``socket`` a CURVE server that only admits ``curve.allowed_clients``. Call before bind."""
    auth = ThreadAuthenticator(context, log=logging.getLogger("routing_replay.wire.zap"))
    auth.start()
    auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=_AllowList(curve.allowed_clients, on_denied))
    socket.zap_domain = ZAP_DOMAIN.encode()
    socket.curve_server = True
    socket.curve_publickey = curve.keys.public
    socket.curve_secretkey = curve.keys.secret
    return auth


def secure_client(socket: zmq.Socket, curve: CurveClient) -> None:
    """Makes ``socket`` a CURVE client of the server whose public key is given. Call before connect."""
    socket.curve_serverkey = curve.server_public
    socket.curve_publickey = curve.keys.public
    socket.curve_secretkey = curve.keys.secret
