"""The options of a client, checked once when the client is built."""

from __future__ import annotations

import math
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class ClientOptions:
    """How a client talks to the service. Immutable; shared by the async and sync clients.

    See docs/CLIENT.md for what each option does; ``__post_init__`` refuses
    values that cannot work, naming the option.
    """

    base_url: str = "http://localhost:8001"
    timeout: float = 2.0
    batch_size: int = 500
    linger: float = 0.5
    max_queue: int = 50_000
    max_batch_bytes: int = 1_048_576
    max_retries: int | None = None
    backoff_initial: float = 0.2
    backoff_max: float = 30.0
    close_timeout: float = 5.0
    token: str | None = None
    gzip: bool = False

    def __post_init__(self) -> None:
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            _refuse("base_url", self.base_url, "an http:// or https:// URL with a host")
        _positive("timeout", self.timeout)
        _at_least("batch_size", self.batch_size, 1)
        _non_negative("linger", self.linger)
        _at_least("max_queue", self.max_queue, 1)
        _at_least("max_batch_bytes", self.max_batch_bytes, 1)
        if self.max_retries is not None:
            _at_least("max_retries", self.max_retries, 0)
        _positive("backoff_initial", self.backoff_initial)
        _positive("backoff_max", self.backoff_max)
        if self.backoff_max < self.backoff_initial:
            _refuse("backoff_max", self.backoff_max, "at least backoff_initial")
        _non_negative("close_timeout", self.close_timeout)
        if self.token is not None and (
            not self.token or not self.token.isprintable() or any(c.isspace() for c in self.token)
        ):
            # A space or control character would break (or inject into) the header.
            _refuse("token", "<hidden>", "a non-empty string without spaces or control characters")


def _refuse(name: str, value: object, allowed: str) -> None:
    raise ValueError(f"{name} = {value!r}: must be {allowed}")


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        _refuse(name, value, "a number")
    return float(value)  # type: ignore[arg-type]


def _positive(name: str, value: object) -> None:
    if not 0 < _number(name, value) < math.inf:
        _refuse(name, value, "a finite number greater than 0")


def _non_negative(name: str, value: object) -> None:
    if not 0 <= _number(name, value) < math.inf:
        _refuse(name, value, "a finite number of at least 0")


def _at_least(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _refuse(name, value, f"an integer of at least {minimum}")
