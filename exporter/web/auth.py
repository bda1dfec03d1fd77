"""Basic auth and the request rate limit of a web config file, checked on the event loop.

bcrypt runs in worker threads, a few at a time, so a flood of wrong passwords costs at most
that many cores and never stalls the event loop; a scraper whose credentials were verified
once is answered from a cache and never waits behind the flood.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping

import bcrypt

AUTH_REALM = "primeintellect-build-exporter"
# bcrypt checks running at once; the rest wait their turn.
BCRYPT_CONCURRENCY = 2
# bcrypt reads only the first 72 bytes of a password; Go's bcrypt ignores the rest too.
_BCRYPT_MAX_PASSWORD = 72
# Weight of the newest measurement in the running estimate of the slowest check.
_ESTIMATE_WEIGHT = 0.2


class RateLimiter:
    """A token bucket over all requests: ``burst`` at once, then one per ``interval``."""

    def __init__(self, interval: float, burst: int) -> None:
        self.interval = interval
        self.burst = burst
        self._tokens = float(burst)
        self._updated = time.monotonic()

    def allow(self) -> bool:
        """Take a token if one is left."""
        now = time.monotonic()
        elapsed = now - self._updated
        self._tokens = min(float(self.burst), self._tokens + elapsed / self.interval)
        self._updated = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


class BasicAuth:
    """Checks ``Authorization: Basic`` credentials against the configured bcrypt hashes.

    A refusal, for a wrong password or an unknown user, takes as long as a check at the
    highest configured cost, so timing tells nothing about which users exist or their costs.
    """

    def __init__(self, users: Mapping[str, bytes]) -> None:
        self._users = dict(users)
        cost = max(int(hashed[4:6]) for hashed in self._users.values())
        started = time.perf_counter()
        self._dummy_hash = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(rounds=cost))
        # How long a check at the highest cost takes here; refined by every such check.
        self._slowest_check = time.perf_counter() - started
        self._slowest_cost = cost
        # Verified credentials are remembered as keyed digests: memory never holds a
        # password, not even a fast hash of one.
        self._digest_key = secrets.token_bytes(32)
        self._verified: dict[tuple[str, bytes], bytes] = {}
        self._slots = asyncio.Semaphore(BCRYPT_CONCURRENCY)

    @property
    def users(self) -> frozenset[str]:
        return frozenset(self._users)

    async def authorized(self, authorization: str | None) -> bool:
        """True when the ``Authorization`` header names a user with the right password."""
        credentials = parse_basic_credentials(authorization)
        if credentials is None:
            return False
        user, password = credentials
        stored = self._users.get(user)
        digest = hmac.new(self._digest_key, password, hashlib.sha256).digest()
        if stored is not None:
            remembered = self._verified.get((user, stored))
            if remembered is not None and hmac.compare_digest(remembered, digest):
                return True
        hashed = self._dummy_hash if stored is None else stored
        async with self._slots:
            right, took = await asyncio.to_thread(_timed_check, password, hashed)
        if int(hashed[4:6]) == self._slowest_cost:
            self._slowest_check += _ESTIMATE_WEIGHT * (took - self._slowest_check)
        if right and stored is not None:
            self._verified[(user, stored)] = digest
            return True
        # Sleeping holds no thread and no bcrypt slot.
        await asyncio.sleep(max(0.0, self._slowest_check - took))
        return False


def _timed_check(password: bytes, hashed: bytes) -> tuple[bool, float]:
    started = time.perf_counter()
    try:
        right = bcrypt.checkpw(password[:_BCRYPT_MAX_PASSWORD], hashed)
    except ValueError:
        right = False
    return right, time.perf_counter() - started


def parse_basic_credentials(authorization: str | None) -> tuple[str, bytes] | None:
    """User and password of an ``Authorization: Basic`` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    if not colon:
        return None
    # Undecodable bytes cannot name a configured user; they still cost a bcrypt check.
    return user.decode("utf-8", errors="surrogateescape"), password
