"""Worker discovery through leases in Redis (or Valkey): a worker started with
`--register redis://HOST:PORT` announces its address and role under a key that expires
unless the worker renews it; a router started with `--discover redis://HOST:PORT` lists
the live keys every second and adds or retires workers as they come and go. Scaling a pool
(a Kubernetes StatefulSet, more Ray actors, one more `baton worker` by hand) then needs no
router restart and no new worker list.

Layout: `baton:discovery:<address>` holds the worker's registration as JSON, with a TTL of
`lease_seconds`; the set `baton:discovery` names every address that has registered, so a
router reads the live ones in two commands (SMEMBERS, MGET) whatever else the database
holds (the prefix index's millions of block keys, which a SCAN would walk). Expiry is
Redis's own clock, so workers' and routers' clocks may disagree. A worker that stops
cleanly deletes its key at once; one that dies vanishes when its lease runs out, and the
router that notices drops it from the set."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import asdict, dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

MEMBERS = "baton:discovery"
ROLES = ("prefill", "decode", "both")


def lease_key(address: str) -> str:
    return f"{MEMBERS}:{address}"


@dataclass(frozen=True)
class Registration:
    address: str  # host:port of the worker's gRPC server, as routers should dial it
    role: str  # prefill | decode | both (aggregated: serves as a decode worker)
    # Its lease: a router keeps a worker that still answers this long after its lease
    # vanished (Redis restarted empty; the worker renews within a third of it).
    lease_seconds: float = 10.0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role {self.role!r}: one of {', '.join(ROLES)}")

    @property
    def pool(self) -> str:
        """The router pool it joins: an aggregated worker decodes (and prefills locally)."""
        return "prefill" if self.role == "prefill" else "decode"


class Registrar:
    """The worker's side: keeps its lease alive until `deregister`. Losing Redis does
    not stop the worker; it renews again once Redis is back."""

    def __init__(self, url: str, registration: Registration) -> None:
        if registration.lease_seconds < 1:
            raise ValueError(f"lease of {registration.lease_seconds}s: at least 1s")
        self.r = aioredis.from_url(url, socket_timeout=2.0)
        self.registration = registration
        self._task: asyncio.Task | None = None

    async def renew(self) -> None:
        value = json.dumps(asdict(self.registration))
        async with self.r.pipeline(transaction=False) as p:
            p.set(lease_key(self.registration.address), value,
                  px=int(self.registration.lease_seconds * 1000))
            p.sadd(MEMBERS, self.registration.address)
            await p.execute()

    async def register(self) -> None:
        """Start renewing the lease (the worker's on-ready hook). Redis may come up after
        the worker (one helm install starts both): the renewal loop keeps trying, and
        logs while it cannot."""
        self._task = asyncio.create_task(self._renew_loop())
        log.info("registering %s for discovery", self.registration)

    async def _renew_loop(self) -> None:
        # Three renewals a lease: one lost round trip does not let the lease lapse.
        down = False
        while True:
            try:
                await self.renew()
                if down:
                    log.info("discovery: registered again with %s", self.registration)
                down = False
            except (OSError, RedisError) as e:
                if not down:
                    log.warning("discovery: cannot renew the lease of %s: %s",
                                self.registration.address, e)
                down = True
            await asyncio.sleep(self.registration.lease_seconds / 3)

    async def deregister(self) -> None:
        """Leave at once (a clean stop): routers stop sending new requests here."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            async with self.r.pipeline(transaction=False) as p:
                p.delete(lease_key(self.registration.address))
                p.srem(MEMBERS, self.registration.address)
                await p.execute()
        except (OSError, RedisError) as e:
            log.warning("discovery: could not deregister %s (its lease will run out): %s",
                        self.registration.address, e)
        await self.r.aclose()


class Discovery:
    """The router's side: the workers whose leases are live."""

    def __init__(self, url: str) -> None:
        self.r = aioredis.from_url(url, socket_timeout=2.0)
        # Drops an address from the set only if its lease is still gone: the worker may
        # have renewed since the MGET (atomic on the server, so no renewal slips between).
        self._prune = self.r.register_script(
            "if redis.call('EXISTS', KEYS[1]) == 0 then "
            "return redis.call('SREM', KEYS[2], ARGV[1]) end return 0")

    async def live(self) -> list[Registration]:
        """Raises OSError / RedisError while Redis is unreachable (the caller keeps the
        workers it knows meanwhile)."""
        addresses = sorted(a.decode() for a in await self.r.smembers(MEMBERS))
        if not addresses:
            return []
        values = await self.r.mget([lease_key(a) for a in addresses])
        live, expired = [], []
        for address, value in zip(addresses, values):
            if value is None:
                expired.append(address)
                continue
            try:
                live.append(Registration(**json.loads(value)))
            except (ValueError, TypeError) as e:
                log.warning("discovery: ignoring %s's registration %r: %s", address, value, e)
        for address in expired:
            await self._prune(keys=[lease_key(address), MEMBERS], args=[address])
        return live

    async def close(self) -> None:
        await self.r.aclose()
