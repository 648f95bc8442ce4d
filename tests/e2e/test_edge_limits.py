"""Edge limits, each through a real Envoy with the rendered config and short limits: body size (413), header size
and count (431), slow headers (408 and closed), idle connections (closed), and the per-address connection budget
(with the real limiter service). Slow bodies and a non-streaming answer longer than the stream idle timeout need a
gateway behind the edge: tests/e2e/test_edge_tls.py, on a whole mesh."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from control.envoy_config import EdgeConfig, EdgeSettings
from control.process import free_port
from tests.fixtures.edge import Edge, read_until_closed, running_edge
from tests.fixtures.limiter import LimiterProcess, RedisProcess

BODY_LIMIT = 64 * 1024
LIMITS = EdgeSettings(
    max_request_body_bytes=BODY_LIMIT,
    max_request_headers_kb=8,
    max_request_headers_count=50,
    request_headers_timeout_s=1.0,
    request_body_timeout_s=2.0,
    idle_timeout_s=1.0,
    stream_idle_timeout_s=2.0,
    per_ip_connection_budget=False,
)
CHAT = "/v1/chat/completions"


@pytest.fixture
def edge(tmp_path: Path) -> Iterator[Edge]:
    """Envoy with short limits; no gateway (nor limiter) listens behind it, so a request that passes every limit is
    answered 503 by Envoy, and one that does not is refused before any upstream is tried."""
    config = EdgeConfig(gateways=(("127.0.0.1", free_port()),), limiter=("127.0.0.1", free_port()), edge=LIMITS)
    with running_edge(config, tmp_path) as running:
        yield running


def chat_body(size: int) -> bytes:
    """A chat request of exactly `size` bytes."""
    empty = json.dumps({"model": "auto", "messages": [{"role": "user", "content": ""}]}).encode()
    body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": "a" * (size - len(empty))}]})
    assert len(body) == size
    return body.encode()


def openai_error(reply: httpx.Response) -> dict[str, object]:
    assert reply.headers["content-type"] == "application/json", reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == "invalid_request_error"
    return error  # type: ignore[no-any-return]


def test_oversized_body_is_413_before_the_gateway(edge: Edge) -> None:
    headers = {"content-type": "application/json"}
    at_limit = httpx.post(edge.url + CHAT, content=chat_body(BODY_LIMIT), headers=headers, timeout=10)
    assert at_limit.status_code == 503, "a body at the limit passes the edge (to the missing gateway)"

    over = httpx.post(edge.url + CHAT, content=chat_body(BODY_LIMIT + 1), headers=headers, timeout=10)
    assert over.status_code == 413, over.text
    error = openai_error(over)
    assert error["code"] == "request_too_large" and str(BODY_LIMIT) in str(error["message"])

    # Without a content-length (chunked), the limit holds as the body streams in.
    def chunks() -> Iterator[bytes]:
        body = chat_body(4 * BODY_LIMIT)
        for i in range(0, len(body), 8192):
            yield body[i : i + 8192]

    chunked = httpx.post(edge.url + CHAT, content=chunks(), headers=headers, timeout=10)
    assert chunked.status_code == 413, chunked.text
    assert edge.stat("http.edge.downstream_rq_5xx") == 1, "only the request at the limit reached for an upstream"


def test_oversized_headers_are_431(edge: Edge) -> None:
    small = httpx.get(edge.url + "/v1/models", headers={"x-pad": "a" * 4000}, timeout=10)
    assert small.status_code == 503, "headers under the limit pass the edge"

    large = httpx.get(edge.url + "/v1/models", headers={"x-pad": "a" * 9000}, timeout=10)
    assert large.status_code == 431, large.text
    assert openai_error(large)["code"] == "request_headers_too_large"
    assert "8 KiB" in large.json()["error"]["message"]

    many = httpx.get(edge.url + "/v1/models", headers={f"x-pad-{i}": "a" for i in range(60)}, timeout=10)
    assert many.status_code == 431, many.text
    assert openai_error(many)["code"] == "request_headers_too_large"


def test_slow_headers_are_cut_at_the_headers_timeout(edge: Edge) -> None:
    """A slowloris client dribbling one header byte every 0.1 s is answered 408 and disconnected once
    request_headers_timeout_s (1 s) has passed, however steadily it sends."""
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: edge\r\n" + b"x-slow: " + b"a" * 200
    with socket.create_connection(("127.0.0.1", edge.port)) as sock:
        started = time.monotonic()
        sock.settimeout(0.1)
        received = b""
        for byte in request:
            try:
                sock.sendall(bytes([byte]))
                received = sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            break
        rest, _ = read_until_closed(sock, 5)
        elapsed = time.monotonic() - started
    reply = received + rest
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert b'"code":"request_timeout"' in reply
    assert 0.9 <= elapsed < 4.0, f"cut after {elapsed:.2f}s; the headers timeout is 1 s"
    assert edge.stat("http.edge.downstream_rq_header_timeout") == 1


def test_idle_connection_is_closed(edge: Edge) -> None:
    """After its last answer, a keep-alive connection is closed after idle_timeout_s (1 s) plus Envoy's drain
    (drain_timeout, 5 s by default, the grace for a request already on its way)."""
    with socket.create_connection(("127.0.0.1", edge.port)) as sock:
        sock.sendall(b"GET /nothing-here HTTP/1.1\r\nHost: edge\r\n\r\n")
        received, elapsed = read_until_closed(sock, 15)
    assert received.startswith(b"HTTP/1.1 404"), received
    assert b"connection: close" not in received.lower(), "the answer itself kept the connection open"
    assert 0.9 <= elapsed < 10, f"closed after {elapsed:.2f}s"
    assert edge.stat("http.edge.downstream_cx_idle_timeout") == 1


def test_connection_timeouts_leave_busy_connections_alone(edge: Edge) -> None:
    """Requests one after another on one connection, each within the idle timeout, keep it open."""
    with httpx.Client(base_url=edge.url, timeout=10) as client:
        for _ in range(4):
            assert client.get("/nothing-here").status_code == 404
            time.sleep(0.5)
    assert edge.stat("http.edge.downstream_cx_total") == 1
    assert edge.stat("http.edge.downstream_cx_idle_timeout") == 0


PER_IP_POLICY = """
[tiers.free]
requests_per_hour = 100
[tiers.paid]
requests_per_hour = 100
[tiers.enterprise]
requests_per_hour = "unlimited"
[edge]
per_ip_per_minute = 4
"""


def test_per_ip_connection_budget(
    private_redis: RedisProcess, start_limiter: Callable[..., LimiterProcess], tmp_path: Path
) -> None:
    """Each new connection costs its client address one unit of the edge's per-minute budget at the limiter, as
    each request does. With 4 a minute: 3 connections are served, a 4th unit buys one request, and then a new
    connection is closed before it is read and a request on an open one is refused with 429."""
    limiter = start_limiter(private_redis.url, PER_IP_POLICY)
    config = EdgeConfig(
        gateways=(("127.0.0.1", free_port()),),
        limiter=("127.0.0.1", limiter.port),
        edge=EdgeSettings(per_ip_connection_budget=True),
    )
    with running_edge(config, tmp_path) as edge:
        opened = [socket.create_connection(("127.0.0.1", edge.port)) for _ in range(3)]
        try:
            deadline = time.monotonic() + 10
            while edge.stat("ratelimit.edge_connections.ok") < 3:
                assert time.monotonic() < deadline, edge.log_tail()
                time.sleep(0.05)
            first = opened[0]
            first.sendall(b"GET /v1/models HTTP/1.1\r\nHost: edge\r\n\r\n")
            first.settimeout(10)
            assert first.recv(65536).startswith(b"HTTP/1.1 503"), "the 4th unit: a request, to the missing gateway"

            with socket.create_connection(("127.0.0.1", edge.port)) as over:
                over.sendall(b"GET /v1/models HTTP/1.1\r\nHost: edge\r\n\r\n")
                received, elapsed = read_until_closed(over, 5)
            assert received == b"" and elapsed < 2, "over the budget: closed without an answer"
            assert edge.stat("ratelimit.edge_connections.cx_closed") == 1
            assert edge.stat("ratelimit.edge_connections.over_limit") == 1

            opened[1].sendall(b"GET /v1/models HTTP/1.1\r\nHost: edge\r\n\r\n")
            opened[1].settimeout(10)
            refused = opened[1].recv(65536)
            assert refused.startswith(b"HTTP/1.1 429"), refused
            assert b"retry-after:" in refused.lower()
        finally:
            for sock in opened:
                sock.close()

        # Fails open as the request limit does (failure_mode_deny false): without the limiter, connections are served.
        limiter.process.stop(grace=5)
        with socket.create_connection(("127.0.0.1", edge.port)) as sock:
            sock.sendall(b"GET /nothing-here HTTP/1.1\r\nHost: edge\r\nconnection: close\r\n\r\n")
            received, _ = read_until_closed(sock, 10)
        assert received.startswith(b"HTTP/1.1 404"), received


def test_unparseable_http1_request_is_a_400_not_a_5xx(edge: Edge) -> None:
    # A control byte in a header value: Envoy's HTTP/1 codec refuses it before any filter, route or local-reply
    # mapping runs, so this one answer is Envoy's plain-text "Bad Request" (docs/SECURITY.md), never a 5xx.
    host, port = edge.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Bad: a\x01b\r\nContent-Length: 0\r\n\r\n")
        raw, _ = read_until_closed(sock, limit_s=5)
    assert raw.startswith(b"HTTP/1.1 400 "), raw[:200]
    assert edge.stat("http.edge.downstream_rq_5xx") == 0
