"""Triton replicas found by DNS: names re-resolved on a timer, every address one replica, added and removed live.

A Kubernetes headless Service answers one A record per ready pod, so `triton-qwen.llmesh.svc:8001` names the
variant's replicas. A name that does not exist (NXDOMAIN: a headless Service with no ready pod) means no replicas; a
lookup that fails (timeout, SERVFAIL) keeps the last answer, so a DNS hiccup never empties the pool. Static URLs
are replicas too and never leave.

Plain logic: the resolver, the replica factory and what to tell about changes are passed in; no gRPC here.
PoolMembership applies the changes to the router's ReplicaPool; embeddings follow through their own listener.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from llmesh.addresses import host_port, parse_host_port
from router.replicas import Replica, ReplicaPool, ReplicaState

log = logging.getLogger(__name__)


class LookupFailed(Exception):
    """The name could not be resolved now (timeout, server failure); try again later."""


class Resolver(Protocol):
    async def resolve(self, host: str, port: int) -> list[str]:
        """The `ip:port` of every address of `host` ([] when the name does not exist); LookupFailed otherwise."""
        ...


class SystemResolver:
    """The host's resolver (getaddrinfo: /etc/resolv.conf, the cluster DNS in Kubernetes). It caches nothing, so each
    refresh sees the current records (their TTL is the DNS server's business)."""

    async def resolve(self, host: str, port: int) -> list[str]:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
                return []
            raise LookupFailed(f"{host}: {exc.strerror}") from exc
        return sorted({host_port(str(info[4][0]), port) for info in infos})


@dataclass(frozen=True)
class DnsName:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_names(value: str, flag: str) -> list[DnsName]:
    """ "triton-a.ns.svc:8001,triton-b:8001" -> names; ValueError naming `flag` when one lacks a port."""
    names = []
    for item in (v.strip() for v in value.split(",")):
        if not item:
            continue
        try:
            host, port = parse_host_port(item)
        except ValueError as exc:
            raise ValueError(f"{flag}: {item!r} is not NAME:PORT ({exc})") from None
        names.append(DnsName(host, port))
    return names


@dataclass(frozen=True)
class ReplicaGroup:
    """Replicas of one kind: fixed URLs and DNS names, each address found a replica with these flags."""

    urls: tuple[str, ...] = ()
    names: tuple[DnsName, ...] = ()
    dedicated: bool = False
    fallback: bool = False


@dataclass(frozen=True)
class Member:
    url: str
    dedicated: bool
    fallback: bool


class MembershipListener(Protocol):
    async def added(self, member: Member) -> None: ...

    async def removed(self, member: Member) -> None: ...


class ReplicaDiscovery:
    """Keeps the listeners' replicas equal to what the groups name now. `refresh` resolves every name once."""

    def __init__(
        self,
        groups: Sequence[ReplicaGroup],
        resolver: Resolver,
        listeners: Iterable[MembershipListener],
    ) -> None:
        self._groups = list(groups)
        self._resolver = resolver
        self._listeners = list(listeners)
        self._members: dict[str, Member] = {}
        # The last good answer per name: kept when a lookup fails.
        self._last: dict[DnsName, list[str]] = {}

    @property
    def members(self) -> dict[str, Member]:
        return dict(self._members)

    @property
    def uses_dns(self) -> bool:
        return any(group.names for group in self._groups)

    async def refresh(self) -> None:
        wanted: dict[str, Member] = {}
        for group in self._groups:
            urls = list(group.urls)
            for name in group.names:
                try:
                    self._last[name] = await self._resolver.resolve(name.host, name.port)
                except LookupFailed as exc:
                    log.warning("DNS lookup of %s failed (%s); keeping its last %d replicas", name, exc,
                                len(self._last.get(name, [])))  # fmt: skip
                urls += self._last.get(name, [])
            for url in urls:
                # A replica named by two groups keeps the first (local before fallback, as the groups are listed).
                wanted.setdefault(url, Member(url, group.dedicated, group.fallback))
        for url, member in list(self._members.items()):
            if wanted.get(url) != member:
                del self._members[url]
                await self._notify(member, joined=False)
        for url, member in wanted.items():
            if url not in self._members:
                self._members[url] = member
                await self._notify(member, joined=True)

    async def _notify(self, member: Member, joined: bool) -> None:
        for listener in self._listeners:
            try:
                await (listener.added(member) if joined else listener.removed(member))
            except Exception:  # one listener's failure must not stop the others or the refresh loop
                log.exception("replica membership listener failed on %s", member.url)

    async def run(self, interval_s: float) -> None:
        """Refresh forever, every `interval_s` (the first refresh is the caller's, before serving)."""
        while True:
            await asyncio.sleep(interval_s)
            await self.refresh()


class ClosableReplica(Replica, Protocol):
    async def close(self) -> None: ...


class PoolMembership:
    """Applies membership changes to the replica pool: a new replica is probed before it takes work; a removed one
    leaves rotation at once and is closed once the requests still on it are done (or after `retire_after_s`)."""

    def __init__(
        self,
        pool: ReplicaPool,
        make_replica: Callable[[str], ClosableReplica],
        variants: Sequence[str],
        retire_after_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._make = make_replica
        self._variants = list(variants)
        self._retire_after_s = retire_after_s
        self._clock = clock
        self._replicas: dict[str, ClosableReplica] = {}
        self._retiring: set[asyncio.Task[None]] = set()

    async def added(self, member: Member) -> None:
        replica = self._make(member.url)
        self._replicas[member.url] = replica
        state = ReplicaState(replica, dedicated=member.dedicated, fallback=member.fallback)
        self._pool.add(state, self._variants)
        await self._pool.probe_one(state, self._variants)

    async def removed(self, member: Member) -> None:
        state = self._pool.remove(member.url)
        replica = self._replicas.pop(member.url, None)
        if replica is None:
            return
        task = asyncio.create_task(self._retire(state, replica))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, state: ReplicaState | None, replica: ClosableReplica) -> None:
        deadline = self._clock() + self._retire_after_s
        while state is not None and state.outstanding > 0 and self._clock() < deadline:
            await asyncio.sleep(0.2)
        await replica.close()

    async def close(self) -> None:
        """Shutdown: every replica closed, retiring ones at once."""
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        for replica in self._replicas.values():
            await replica.close()
        self._replicas.clear()
