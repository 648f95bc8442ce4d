"""The network-namespace lab (tests/fixtures/netns.py) that multi-host and multi-region tests build on: hosts reach
each other within and across regions, the root namespace is left alone, DNS answers and follows updates, cut links
black-hole traffic, the delay relay adds its latency, and nothing outlives the lab."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.fixtures import netns
from tests.fixtures.netns import ETC_NETNS, NETNS_DIR, Host, HostProcess, Lab

pytestmark = pytest.mark.netns

# Registers the fixture in this module (until tests/conftest.py lists tests.fixtures.netns as a plugin).
netlab = netns.netlab

# Echoes each connection's bytes back; "bye" makes it close that connection. Prints one line per closed connection.
ECHO = """
import socket, sys, threading
def serve(conn):
    with conn:
        while (data := conn.recv(65536)):
            conn.sendall(data)
            if data.endswith(b"bye"):
                break
    print("closed", flush=True)
server = socket.create_server((sys.argv[1], int(sys.argv[2])), backlog=256)
while True:
    threading.Thread(target=serve, args=(server.accept()[0],), daemon=True).start()
"""

ECHO_CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as conn:
    conn.sendall(sys.argv[3].encode())
    print(conn.recv(100).decode())
"""

# Prints `<time.time()> <sorted addresses of NAME>` every 20 ms for DURATION seconds, through the system resolver.
RESOLVE_LOOP = """
import socket, sys, time
name, end = sys.argv[1], time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    try:
        found = sorted({info[4][0] for info in socket.getaddrinfo(name, 80, socket.AF_INET, socket.SOCK_STREAM)})
    except socket.gaierror:
        found = []
    print(time.time(), ",".join(found), flush=True)
    time.sleep(0.02)
"""

# A gRPC server with the standard health service, SERVING.
GRPC_SERVER = """
import sys
from concurrent import futures
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
server = grpc.server(futures.ThreadPoolExecutor(8))
servicer = health.HealthServicer()
servicer.set("", health_pb2.HealthCheckResponse.SERVING)
health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
server.add_insecure_port(sys.argv[1])
server.start()
server.wait_for_termination()
"""

# Many concurrent unary calls, multiplexed as HTTP/2 streams on one channel; prints `<statuses> <seconds>`.
GRPC_CLIENT = """
import sys, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
channel = grpc.insecure_channel(sys.argv[1], options=[("grpc.enable_http_proxy", 0)])
stub = health_pb2_grpc.HealthStub(channel)
stub.Check(health_pb2.HealthCheckRequest(), timeout=10)  # connected
started = time.monotonic()
calls = [stub.Check.future(health_pb2.HealthCheckRequest(), timeout=10) for _ in range(int(sys.argv[2]))]
statuses = {health_pb2.HealthCheckResponse.ServingStatus.Name(call.result().status) for call in calls}
print(",".join(sorted(statuses)), time.monotonic() - started)
"""

PORT = 8000


def start_echo(host: Host, port: int = PORT) -> HostProcess:
    proc = host.popen([sys.executable, "-c", ECHO, host.ip, str(port)])
    host.wait_port(port, proc=proc)
    return proc


def round_trip(sock: socket.socket, payload: bytes = b"ping") -> float:
    started = time.monotonic()
    sock.sendall(payload)
    received = b""
    while len(received) < len(payload):
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-echo"
        received += chunk
    assert received == payload
    return time.monotonic() - started


def connect_outcome(host: Host, ip: str, port: int, timeout: float) -> str:
    """'connected', 'timeout' (packets dropped) or the error's name (e.g. ConnectionRefusedError: an RST)."""
    try:
        host.connect(ip, port, timeout=timeout).close()
    except TimeoutError:
        return "timeout"
    except OSError as error:
        return f"{type(error).__name__}({error.errno})"
    return "connected"


def root_namespace() -> dict[str, set[str]]:
    """The root namespace's interfaces, addresses and routes."""

    def lines(*args: str) -> list[str]:
        return subprocess.run(["ip", "-o", *args], capture_output=True, text=True, check=True).stdout.splitlines()

    return {
        "links": {line.split(":")[1].strip().split("@")[0] for line in lines("link")},
        "addrs": {" ".join(line.split()[1:4]) for line in lines("addr")},
        "routes": set(lines("route")) | set(lines("-6", "route")),
    }


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def leftovers(tag: str) -> list[str]:
    found = [name for name in os.listdir(NETNS_DIR) if name.startswith(tag)] if NETNS_DIR.is_dir() else []
    found += [str(entry) for entry in ETC_NETNS.glob(f"{tag}*")] if ETC_NETNS.is_dir() else []
    found += [str(entry) for entry in Path(tempfile.gettempdir()).glob(f"{tag}*")]
    found += [link for link in root_namespace()["links"] if link.startswith(tag)]
    return found


@pytest.fixture(autouse=True)
def _usable() -> None:
    if (reason := netns.unusable_reason()) is not None:
        if os.environ.get("CI"):
            pytest.fail(f"netns lab unusable on CI: {reason}")
        pytest.skip(reason)


def test_hosts_reach_each_other_and_root_namespace_is_untouched() -> None:
    before = root_namespace()
    with Lab(regions=("a", "b")) as lab:
        a1, a2, b1 = lab.add_host("a1", "a"), lab.add_host("a2", "a"), lab.add_host("b1", "b")
        assert a1.ip.startswith("198.18.1.") and b1.ip.startswith("198.18.2.")
        start_echo(a1)
        # Through `ip netns exec`: programs in the same region and across the region link.
        for client in (a2, b1):
            assert client.run([sys.executable, "-c", ECHO_CLIENT, a1.ip, str(PORT), client.name]).stdout.strip() == (
                client.name
            )
        # And from this process, with sockets made inside a namespace.
        with b1.connect(a1.ip, PORT) as conn:
            round_trip(conn)
        during = root_namespace()
    after = root_namespace()
    for state in (during, after):
        assert state == before
        assert not any("198.18." in line for line in state["addrs"] | state["routes"])
    assert not leftovers(lab.tag)


def test_dns_serves_multiple_records_and_updates_quickly(netlab: Lab) -> None:
    dns_host, a1, a2, b1 = (netlab.add_host(*spec) for spec in (("dns", "a"), ("a1", "a"), ("a2", "a"), ("b1", "b")))
    netlab.start_dns(dns_host)
    late = netlab.add_host("late", "b")  # hosts added after the server get it in resolv.conf too
    assert f"nameserver {dns_host.ip}" in (ETC_NETNS / late.namespace / "resolv.conf").read_text()
    name = "triton.lab.test"
    netlab.dns_set(name, [a1.ip, a2.ip])
    lookup = f"import socket; print(sorted({{i[4][0] for i in socket.getaddrinfo({name!r}, 80, socket.AF_INET)}}))"
    assert late.run([sys.executable, "-c", lookup]).stdout.strip() == str(sorted([a1.ip, a2.ip]))

    watcher = b1.popen([sys.executable, "-c", RESOLVE_LOOP, name, "6"])
    deadline = time.monotonic() + 10
    while not watcher.output().strip() and time.monotonic() < deadline:
        time.sleep(0.02)
    changes = []  # (records, seconds from dns_set to the first lookup in b1 that returned them)
    for records in ([b1.ip], [a1.ip, a2.ip, b1.ip], []):
        started = time.time()
        netlab.dns_set(name, records)
        want = ",".join(sorted(records))
        while True:
            seen = [line.split(" ") for line in watcher.output().splitlines()]
            hits = [float(stamp) for stamp, *found in seen if float(stamp) > started and found == [want]]
            if hits:
                changes.append((records, hits[0] - started))
                break
            assert time.monotonic() < deadline, f"{records} not resolved in b1:\n{watcher.output()[-2000:]}"
            time.sleep(0.02)
    print(f"DNS change -> getaddrinfo in another namespace: {[(r, round(s, 3)) for r, s in changes]}")
    assert all(seconds < 1.5 for _, seconds in changes), changes


def test_cut_link_black_holes_traffic_until_restored(netlab: Lab) -> None:
    a1, a2, b1 = netlab.add_host("a1", "a"), netlab.add_host("a2", "a"), netlab.add_host("b1", "b")
    start_echo(a1)
    closed_port = PORT + 1
    assert connect_outcome(a2, a1.ip, closed_port, 2) == "ConnectionRefusedError(111)"  # reachable: an RST
    established = a2.connect(a1.ip, PORT, timeout=1)
    round_trip(established)

    a1.cut_link()
    established.sendall(b"queued")
    with pytest.raises(TimeoutError):  # not reset: the bytes wait in a2's retransmit queue
        established.recv(100)
    assert connect_outcome(a2, a1.ip, PORT, 1.5) == "timeout"
    assert connect_outcome(a2, a1.ip, closed_port, 1) == "timeout"  # no RST from a closed port either
    assert connect_outcome(a1, a2.ip, closed_port, 1) == "timeout"  # and the cut host cannot get out

    a1.restore_link()
    established.settimeout(10)
    started = time.monotonic()
    assert established.recv(100) == b"queued"  # TCP retransmission delivers it
    print(f"established connection resumed {time.monotonic() - started:.2f}s after restore_link")
    assert connect_outcome(a2, a1.ip, PORT, 2) == "connected"
    established.close()

    cross = b1.connect(a1.ip, PORT, timeout=1)
    netlab.cut_region_link()
    assert connect_outcome(b1, a1.ip, PORT, 1.5) == "timeout"
    assert connect_outcome(a2, a1.ip, PORT, 2) == "connected"  # inside region a all still works
    cross.sendall(b"x")
    with pytest.raises(TimeoutError):
        cross.recv(1)
    netlab.restore_region_link()
    assert connect_outcome(b1, a1.ip, PORT, 2) == "connected"
    cross.settimeout(10)
    assert cross.recv(1) == b"x"
    cross.close()


def test_delay_relay_adds_latency_and_relays_transparently(netlab: Lab) -> None:
    a1, wan, b1 = netlab.add_host("a1", "a"), netlab.add_host("wan", "b"), netlab.add_host("b1", "b")
    echo = start_echo(a1)
    delay = 0.05
    relay = netlab.add_relay(wan, 7000, a1.ip, PORT, delay)

    with b1.connect(a1.ip, PORT) as direct:
        direct_rtt = min(round_trip(direct) for _ in range(5))
    with b1.connect(relay.ip, relay.port) as conn:
        rtts = [round_trip(conn) for _ in range(5)]
        # Order and integrity of a large transfer in flight both ways at once.
        blob = os.urandom(2 * 1024 * 1024)
        sender = threading.Thread(target=conn.sendall, args=(blob,))
        sender.start()
        received = bytearray()
        while len(received) < len(blob):
            received += conn.recv(1 << 20)
        sender.join()
        assert received == blob
    print(f"RTT direct {direct_rtt * 1000:.2f} ms, through relay (delay {delay}s) {[round(r, 4) for r in rtts]}")
    assert direct_rtt < 0.02
    assert min(rtts) >= 2 * delay
    assert statistics.median(rtts) < 2 * delay + 0.1  # generous: a loaded CI machine schedules late

    # Many connections at once: they overlap instead of queueing behind each other.
    results: list[float] = []

    def client(index: int) -> None:
        with b1.connect(relay.ip, relay.port, timeout=10) as sock:
            results.extend(round_trip(sock, f"client {index} round {n}".encode()) for n in range(3))

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    assert len(results) == 120 and min(results) >= 2 * delay
    assert elapsed < 2.0, f"40 connections x 3 round trips took {elapsed:.2f}s (serialised would be 12s)"

    # Closing either side closes the other: the server's close reaches the client as EOF...
    with b1.connect(relay.ip, relay.port) as conn:
        conn.sendall(b"bye")
        assert conn.recv(10) == b"bye"
        assert conn.recv(10) == b""
    # ...and the client's close reaches the server.
    closed = echo.output().count("closed")
    b1.connect(relay.ip, relay.port).close()
    deadline = time.monotonic() + 3
    while echo.output().count("closed") <= closed:
        assert time.monotonic() < deadline, "the relay did not pass the client's close on"
        time.sleep(0.02)


def test_delay_relay_carries_grpc(netlab: Lab) -> None:
    a1, wan, b1 = netlab.add_host("a1", "a"), netlab.add_host("wan", "b"), netlab.add_host("b1", "b")
    server = a1.popen([sys.executable, "-c", GRPC_SERVER, f"{a1.ip}:{PORT}"])
    a1.wait_port(PORT, proc=server)
    relay = netlab.add_relay(wan, 7000, a1.ip, PORT, 0.05)
    done = b1.run([sys.executable, "-c", GRPC_CLIENT, f"{relay.ip}:{relay.port}", "50"], timeout=60)
    statuses, seconds = done.stdout.split()
    print(f"50 concurrent gRPC calls on one channel through the relay: {float(seconds):.3f}s")
    assert statuses == "SERVING"
    # One round trip of delay each, overlapping: far below 50 x 0.1 s.
    assert 0.1 <= float(seconds) < 1.0


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_everything_is_removed_on_error_interrupt_and_from_dead_runs() -> None:
    # Leftovers of a run whose process is gone (a SIGKILLed pytest): a namespace with a process in it, its
    # /etc/netns dir, its temp dir.
    stale = f"lmt{_dead_pid()}a"
    subprocess.run(["ip", "netns", "add", f"{stale}-sw"], check=True)
    (ETC_NETNS / f"{stale}-sw").mkdir(parents=True, exist_ok=True)
    stale_dir = tempfile.mkdtemp(prefix=f"{stale}-")
    orphan = subprocess.Popen(["ip", "netns", "exec", f"{stale}-sw", "sleep", "300"], start_new_session=True)

    pids: list[int] = []
    with pytest.raises(RuntimeError, match="test body failed"), Lab(regions=("a", "b", "c")) as lab:
        assert not leftovers(stale), "the stale sweep left things behind"
        orphan.wait(5)
        a1, b1, c1 = lab.add_host("a1", "a"), lab.add_host("b1", "b"), lab.add_host("c1", "c")
        lab.start_dns(a1)
        lab.dns_set("x.lab.test", [b1.ip])
        start_echo(b1)
        lab.add_relay(c1, 7000, b1.ip, PORT, 0.01)
        c1.popen(["bash", "-c", "sleep 300 & sleep 300 & wait"])
        # A process that ignores SIGTERM, and one that left its process group.
        b1.popen(["bash", "-c", "trap '' TERM; sleep 300 & wait"])
        b1.popen(["setsid", "sleep", "300"])
        time.sleep(0.3)
        for namespace in (lab.switch_ns, *(host.namespace for host in lab.hosts.values())):
            pids += netns._pids_in(namespace)
        assert len(pids) >= 8 and leftovers(lab.tag)
        raise RuntimeError("test body failed")
    assert not leftovers(lab.tag)
    deadline = time.monotonic() + 3
    while (alive := [pid for pid in pids if running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive, f"processes left running: {alive}"
    assert not Path(stale_dir).exists()

    with pytest.raises(KeyboardInterrupt), Lab() as lab:
        lab.add_host("a1").popen(["sleep", "300"])
        raise KeyboardInterrupt
    assert not leftovers(lab.tag)
