"""Mutual TLS between stages and clients: every server and client of one deployment holds a certificate signed
by the deployment's CA and trusts that CA alone, so a stage answers only its own pipeline's devices and clients.

Without it (the default) gRPC runs in the clear and any host that reaches a port may send requests; say which
on every server's start line. A server's certificate must name the host its peers dial (an IP address or DNS
name in its subjectAltName), as gRPC checks it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import grpc

from distree.errors import DistreeError


@dataclass(frozen=True)
class Tls:
    """PEM bytes: this party's certificate chain and key, and the CA its peers must be signed by."""

    cert: bytes
    key: bytes
    ca: bytes


def load_tls(cert: Optional[str], key: Optional[str], ca: Optional[str]) -> Optional[Tls]:
    """The three files of --tls-cert/--tls-key/--tls-ca, all or none (None: plain gRPC)."""
    given = {"--tls-cert": cert, "--tls-key": key, "--tls-ca": ca}
    if not any(given.values()):
        return None
    missing = [flag for flag, path in given.items() if not path]
    if missing:
        raise DistreeError(f"mutual TLS needs --tls-cert, --tls-key and --tls-ca together; {', '.join(missing)} "
                           "missing")
    pem = {}
    for flag, path in given.items():
        file = Path(path)
        if not file.is_file():
            raise DistreeError(f"{flag} {path}: no such file")
        data = file.read_bytes()
        if b"-----BEGIN " not in data:
            raise DistreeError(f"{flag} {path}: not a PEM file (expected a -----BEGIN ...----- block)")
        pem[flag] = data
    return Tls(cert=pem["--tls-cert"], key=pem["--tls-key"], ca=pem["--tls-ca"])


def add_port(server: grpc.Server, listen: str, tls: Optional[Tls]) -> int:
    """Bind ``listen`` (0: nothing bound); with TLS, only clients whose certificate the CA signed get through."""
    if tls is None:
        return server.add_insecure_port(listen)
    return server.add_secure_port(listen, grpc.ssl_server_credentials(
        [(tls.key, tls.cert)], root_certificates=tls.ca, require_client_auth=True))


def open_channel(address: str, tls: Optional[Tls], options: Sequence[tuple[str, Any]]) -> grpc.Channel:
    """A channel to ``address``: plain, or presenting our certificate and trusting only the CA."""
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    credentials = grpc.ssl_channel_credentials(root_certificates=tls.ca, private_key=tls.key,
                                               certificate_chain=tls.cert)
    return grpc.secure_channel(address, credentials, options=options)
