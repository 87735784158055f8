"""HTTP/2 with trailers for the conformance suite: a TLS upstream that records requests with
their trailers and answers with trailers, and a client that sends and reads them. Both use the
`h2` library (mitmproxy's own HTTP/2 stack), since common HTTP clients drop trailers.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.events
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from scenarios.procs import free_port

from .conformance_stack import UPSTREAM_BODY, Seen
from .servers import Stop, serving_in_a_thread

Pairs = list[tuple[str, str]]


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate and key for 127.0.0.1, written to `directory`."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _text(pairs: object) -> Pairs:
    return [(k.decode() if isinstance(k, bytes) else k, v.decode() if isinstance(v, bytes) else v)
            for k, v in pairs]  # type: ignore[attr-defined]


@dataclass
class _Stream:
    headers: Pairs
    body: bytes = b""
    trailers: Pairs = field(default_factory=list)


@dataclass
class H2Upstream:
    """An HTTP/2 server over TLS: records each request (headers, body, trailers) and answers
    200 with `UPSTREAM_BODY` and a trailer `x-upstream-trailer: yes`."""

    seen: list[Seen] = field(default_factory=list)
    port: int = 0

    def with_header(self, name: str, value: str) -> list[Seen]:
        return [s for s in list(self.seen) if s.header(name) == value]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        streams: dict[int, _Stream] = {}
        try:
            while data := await reader.read(65535):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        streams[event.stream_id] = _Stream(_text(event.headers))
                    elif isinstance(event, h2.events.DataReceived):
                        streams[event.stream_id].body += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length,
                                                       event.stream_id)
                    elif isinstance(event, h2.events.TrailersReceived):
                        streams[event.stream_id].trailers = _text(event.headers)
                    elif isinstance(event, h2.events.StreamEnded):
                        s = streams.pop(event.stream_id)
                        pseudo = dict(h for h in s.headers if h[0].startswith(":"))
                        self.seen.append(Seen(
                            pseudo.get(":method", ""), pseudo.get(":path", ""),
                            [h for h in s.headers if not h[0].startswith(":")],
                            s.body, s.trailers))
                        conn.send_headers(event.stream_id, [
                            (":status", "200"), ("x-upstream", "yes"),
                            ("content-type", "text/plain")])
                        conn.send_data(event.stream_id, UPSTREAM_BODY)
                        conn.send_headers(event.stream_id, [("x-upstream-trailer", "yes")],
                                          end_stream=True)
                writer.write(conn.data_to_send())
                await writer.drain()
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass
        finally:
            writer.close()

    @contextmanager
    def running(self) -> Iterator[H2Upstream]:
        with tempfile.TemporaryDirectory(prefix="h2-upstream-") as tmp:
            cert, key = self_signed(Path(tmp))
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(cert, key)
            context.set_alpn_protocols(["h2"])
            self.port = free_port()

            async def start() -> Stop:
                server = await asyncio.start_server(self._serve, "127.0.0.1", self.port,
                                                    ssl=context)

                async def stop() -> None:
                    server.close()
                    await server.wait_closed()
                return stop

            with serving_in_a_thread(start, "h2 upstream"):
                yield self


@dataclass
class H2Response:
    status: int
    headers: Pairs
    body: bytes
    trailers: Pairs

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)

    def trailer(self, name: str) -> str | None:
        return next((v for k, v in self.trailers if k == name), None)


def h2_request(port: int, method: str, path: str, headers: Pairs, body: bytes,
               trailers: Pairs, timeout: float = 5) -> H2Response:
    """One HTTP/2 request over TLS to 127.0.0.1:`port`, with request trailers."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        if sock.selected_alpn_protocol() != "h2":
            raise AssertionError(f"the proxy did not negotiate h2: {sock.selected_alpn_protocol()}")
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.send_headers(1, [(":method", method), (":path", path),
                              (":authority", f"127.0.0.1:{port}"), (":scheme", "https"),
                              *headers])
        conn.send_data(1, body, end_stream=not trailers)
        if trailers:
            conn.send_headers(1, trailers, end_stream=True)
        sock.sendall(conn.data_to_send())
        status, response_headers, data, response_trailers = 0, [], b"", []
        while True:
            chunk = sock.recv(65535)
            if not chunk:
                raise AssertionError("the proxy closed the connection before the response ended")
            for event in conn.receive_data(chunk):
                if isinstance(event, h2.events.ResponseReceived):
                    response_headers = _text(event.headers)
                    status = int(dict(response_headers)[":status"])
                elif isinstance(event, h2.events.DataReceived):
                    data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.TrailersReceived):
                    response_trailers = _text(event.headers)
                elif isinstance(event, h2.events.StreamReset):
                    raise AssertionError(f"the proxy reset the stream (error {event.error_code})")
                elif isinstance(event, h2.events.StreamEnded):
                    return H2Response(status, response_headers, data, response_trailers)
            sock.sendall(conn.data_to_send())
