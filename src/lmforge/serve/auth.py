"""API keys and per-key rate limits.

Keys come from the command line (``--api-key KEY``, repeatable, as vLLM's flag), a file (one
a line; blank lines and ``#`` comments ignored) and/or the environment variable
``LMFORGE_API_KEYS`` (comma-separated). A request presents one as
``Authorization: Bearer KEY``. Every configured key is compared, in constant time, on
SHA-256 digests (so neither the length nor the position of a near-match leaks through
timing). A key is known to the rest of the server only by its position (``key-3``): keys
are never logged.

Rate limits are token buckets, one per key (per client address when no keys are set):
``rate`` requests a minute on average, at most ``burst`` at once. A refused request is
told how many seconds to wait (``Retry-After``). Failed logins use the same buckets per
client address (each failure takes a token; an empty bucket refuses before comparing).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import threading
import time
from pathlib import Path

from ..errors import ConfigError

ENV_VAR = "LMFORGE_API_KEYS"
MIN_KEY_LENGTH = 8


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class ApiKeys:
    """The configured keys; empty means the API is open (no authentication)."""

    def __init__(self, keys: list[str]) -> None:
        for k in keys:
            if len(k) < MIN_KEY_LENGTH:
                raise ConfigError(f"an API key is shorter than {MIN_KEY_LENGTH} characters; use long random keys")
            if any(c.isspace() for c in k):
                raise ConfigError("an API key contains whitespace")
        self._digests = [_digest(k) for k in dict.fromkeys(keys)]

    @classmethod
    def load(cls, key_file: str | None = None, env: dict[str, str] | None = None,
             keys_given: list[str] | None = None) -> ApiKeys:
        env = os.environ if env is None else env
        keys: list[str] = [k.strip() for k in keys_given or []]
        if key_file:
            path = Path(key_file)
            if not path.is_file():
                raise ConfigError(f"API key file not found: {path}")
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"API key file {path} cannot be read: {e}") from None
            file_keys = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
            if not file_keys:
                raise ConfigError(f"API key file {path} holds no keys")
            keys += file_keys
        keys += [k.strip() for k in env.get(ENV_VAR, "").split(",") if k.strip()]
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def check(self, presented: str | None) -> str | None:
        """The key's name (``key-N``) if ``presented`` is a configured key, else None.
        Every key is compared whatever matches, so the time does not depend on which one."""
        if presented is None:
            return None
        d = _digest(presented)
        found = None
        for i, k in enumerate(self._digests):
            if hmac.compare_digest(d, k) and found is None:
                found = f"key-{i}"
        return found


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header, else None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class RateLimiter:
    """Token buckets keyed by caller: ``rate_per_min`` requests a minute, ``burst`` at once."""

    def __init__(self, rate_per_min: float, burst: int | None = None, max_callers: int = 100_000) -> None:
        if rate_per_min < 0:
            raise ConfigError(f"the rate limit must be >= 0 requests a minute, got {rate_per_min}")
        self.rate = rate_per_min / 60.0  # tokens a second
        self.burst = float(burst if burst is not None else max(1, math.ceil(rate_per_min / 6)))
        if self.burst < 1:
            raise ConfigError(f"the rate-limit burst must be at least 1, got {burst}")
        self.max_callers = max_callers
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, last time)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def wait(self, caller: str, now: float | None = None) -> float:
        """Seconds until ``caller`` has a token (0 if it has one now); takes nothing."""
        if not self.enabled:
            return 0.0
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.get(caller, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def acquire(self, caller: str, now: float | None = None) -> float:
        """0 if the request may go now (a token is taken), else the seconds until it may."""
        if not self.enabled:
            return 0.0
        now = time.monotonic() if now is None else now
        with self._lock:
            if len(self._buckets) >= self.max_callers:  # forget the callers idle the longest
                for k in sorted(self._buckets, key=lambda c: self._buckets[c][1])[: self.max_callers // 2]:
                    del self._buckets[k]
            tokens, last = self._buckets.get(caller, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[caller] = (tokens - 1.0, now)
                return 0.0
            self._buckets[caller] = (tokens, now)
            return (1.0 - tokens) / self.rate
