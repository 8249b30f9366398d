"""Where jobd is and how to reach it: the address, TLS, and the bearer token.

The settings and their environment fallbacks are jobctl's, so one shell
setup serves both:

- address: the argument, else ``JOBD_ADDR``, else ``http://127.0.0.1:50051``.
  ``http://`` is plaintext, ``https://`` is TLS, a bare ``host:port`` is
  plaintext (as jobctl reads it).
- TLS: ``ca_cert`` (else ``JOBD_CA_CERT``) is the CA to trust, else the
  system's roots; ``client_cert`` and ``client_key`` (else
  ``JOBD_CLIENT_CERT``, ``JOBD_CLIENT_KEY``) present a client certificate.
  Each is a path or the PEM bytes themselves.
- token: ``token`` (the token itself), else ``token_file`` (else
  ``JOBD_TOKEN_FILE``: the first word of its first line that is not a
  comment, so a line of jobd's own token file works), else ``JOBD_TOKEN``.
  It is sent as ``authorization: Bearer TOKEN`` on every call.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import grpc

if TYPE_CHECKING:
    import grpc.aio

DEFAULT_ADDRESS = "http://127.0.0.1:50051"

PemSource = str | os.PathLike[str] | bytes
"""A PEM file's path, or its contents as bytes."""

# jobd answers up to --max-response-bytes (16 MiB by default) and takes
# requests up to --max-message-bytes (4 MiB): the client allows the same,
# so that a large result fails on the server's terms, with its message.
_CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", 16 * 1024 * 1024 + 64 * 1024),
    ("grpc.max_send_message_length", 4 * 1024 * 1024),
    # A connection that died without closing (a peer that vanished) is
    # noticed within 80 s instead of never, so a watch or a worker session
    # on it reconnects; jobd pings idle connections on the same schedule.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.max_pings_without_data", 0),
    # Each channel its own connection: gRPC otherwise shares connections
    # between channels to one address, and a new executor would inherit
    # another's connection backing off after jobd restarted (and fail fast
    # with its stale error instead of connecting).
    ("grpc.use_local_subchannel_pool", 1),
    # Back on a restarted jobd within a few seconds, not a minute or two.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 5_000),
)


@dataclass(frozen=True)
class Connection:
    """Resolved connection settings: build channels from it."""

    target: str
    """``host:port``, as gRPC wants it."""
    secure: bool
    token: str | None
    ca_cert: bytes | None
    client_cert: bytes | None
    client_key: bytes | None

    @classmethod
    def resolve(
        cls,
        address: str | None = None,
        *,
        token: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        ca_cert: PemSource | None = None,
        client_cert: PemSource | None = None,
        client_key: PemSource | None = None,
    ) -> Connection:
        """Settings from the arguments, falling back on the environment as jobctl does."""
        address = address or os.environ.get("JOBD_ADDR") or DEFAULT_ADDRESS
        target, secure = parse_address(address)
        if token is None:
            path = token_file or os.environ.get("JOBD_TOKEN_FILE")
            if path:
                token = read_token_file(Path(path))
            else:
                token = os.environ.get("JOBD_TOKEN") or None
        if token is not None:
            token = token.strip()
            if not token or any(c.isspace() or not c.isprintable() for c in token):
                raise ValueError("the bearer token must be one word of visible characters")
        ca = _pem(ca_cert if ca_cert is not None else os.environ.get("JOBD_CA_CERT"))
        cert = _pem(client_cert if client_cert is not None else os.environ.get("JOBD_CLIENT_CERT"))
        key = _pem(client_key if client_key is not None else os.environ.get("JOBD_CLIENT_KEY"))
        if (cert is None) != (key is None):
            raise ValueError("a client certificate needs its key, and a key its certificate")
        if not secure and (ca is not None or cert is not None):
            if ca_cert is not None or client_cert is not None:
                raise ValueError(
                    f"TLS settings were given for a plaintext address ({address}); use https://"
                )
            # From the environment only: a plaintext address wins, as in jobctl.
            ca = cert = key = None
        return cls(target, secure, token, ca, cert, key)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata every call sends (the bearer token, if any)."""
        if self.token is None:
            return ()
        return (("authorization", f"Bearer {self.token}"),)

    def channel(self, extra_options: Sequence[tuple[str, int | str]] = ()) -> grpc.Channel:
        """A new synchronous channel (its own HTTP/2 connection)."""
        options = [*_CHANNEL_OPTIONS, *extra_options]
        if self.secure:
            return grpc.secure_channel(self.target, self._credentials(), options=options)
        return grpc.insecure_channel(self.target, options=options)

    def aio_channel(self, extra_options: Sequence[tuple[str, int | str]] = ()) -> grpc.aio.Channel:
        """A new asyncio channel (its own HTTP/2 connection)."""
        import grpc.aio

        options = [*_CHANNEL_OPTIONS, *extra_options]
        if self.secure:
            return grpc.aio.secure_channel(self.target, self._credentials(), options=options)
        return grpc.aio.insecure_channel(self.target, options=options)

    def _credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_cert,
            private_key=self.client_key,
            certificate_chain=self.client_cert,
        )


def job_service(channel: Any) -> Any:
    """The generated ``JobService`` stub on ``channel`` (sync or asyncio)."""
    from jobd.v1 import jobd_pb2_grpc

    return jobd_pb2_grpc.JobServiceStub(channel)  # type: ignore[no-untyped-call]


def worker_service(channel: Any) -> Any:
    """The generated ``WorkerService`` stub on ``channel``."""
    from jobd.v1 import worker_pb2_grpc

    return worker_pb2_grpc.WorkerServiceStub(channel)  # type: ignore[no-untyped-call]


def aio_eof() -> Any:
    """``grpc.aio.EOF``, which the type stubs do not declare."""
    import grpc.aio

    return getattr(grpc.aio, "EOF")  # noqa: B009 (absent from the type stubs)


def parse_address(address: str) -> tuple[str, bool]:
    """``(host:port, secure)`` for an address as jobctl takes it."""
    address = address.strip()
    if "://" not in address:
        address = "http://" + address
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"jobd address {address!r}: the scheme must be http:// or https://")
    if not parts.hostname:
        raise ValueError(f"jobd address {address!r} has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"jobd address {address!r}: give only scheme://host:port")
    try:
        port = parts.port
    except ValueError as err:
        raise ValueError(f"jobd address {address!r}: {err}") from None
    host = parts.hostname
    if ":" in host:  # IPv6
        host = f"[{host}]"
    return f"{host}:{port or 50051}", parts.scheme == "https"


def read_token_file(path: Path) -> str:
    """The first word of the first line of ``path`` that is not blank or a comment."""
    try:
        text = path.read_text()
    except OSError as err:
        raise ValueError(f"cannot read the token file {path}: {err.strerror}") from None
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            return line.split()[0]
    raise ValueError(f"the token file {path} holds no token")


def _pem(source: PemSource | None) -> bytes | None:
    if source is None or source == "":
        return None
    if isinstance(source, bytes):
        return source
    path = Path(source)
    try:
        return path.read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror}") from None
