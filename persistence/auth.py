"""Bearer-token authentication of the API (``service.auth_tokens``).

Knows nothing of Flask: :meth:`BearerTokens.check` takes the value of an
``Authorization`` header and says whether it carries one of the configured
tokens. Several tokens may be configured at once, so that a token can be
rotated: list the new one next to the old, move the clients, drop the old.

The comparison takes the same time whichever token matches, or how much of
one: each configured token is compared, every time, through
:func:`hmac.compare_digest` of SHA-256 digests (equal lengths, so not even
a token's length leaks), and no comparison stops the others.

Tokens are never logged, echoed or put in an error message.

Threading contract: immutable once built; :meth:`BearerTokens.check` may be
called from any number of threads.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
from collections.abc import Iterable

log = logging.getLogger(__name__)


class Verdict(enum.Enum):
    """What an ``Authorization`` header proves."""

    #: It carries a configured token (or no token is configured).
    ALLOWED = "allowed"
    #: No bearer token at all: no header, an empty one, or another scheme.
    MISSING = "missing"
    #: A bearer token that is not one of the configured tokens.
    INVALID = "invalid"


class BearerTokens:
    """The configured tokens (their digests), and the check of one request's header."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._digests = tuple(_digest(token) for token in tokens)

    @property
    def required(self) -> bool:
        """Whether requests need a token (some are configured)."""
        return bool(self._digests)

    def __len__(self) -> int:
        """How many tokens are accepted."""
        return len(self._digests)

    def check(self, authorization: str | None) -> Verdict:
        """The verdict on an ``Authorization`` header value (None: no header)."""
        if not self._digests:
            return Verdict.ALLOWED
        scheme, _, credentials = (authorization or "").strip().partition(" ")
        token = credentials.strip()
        if scheme.lower() != "bearer" or not token:
            return Verdict.MISSING
        sent = _digest(token)
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(sent, digest)
        return Verdict.ALLOWED if matched else Verdict.INVALID


def log_policy(tokens: BearerTokens) -> None:
    """Say at start whether the API needs a token; warn when it is open to anyone."""
    if tokens.required:
        log.info(
            "bearer-token auth on: %d token(s) accepted (service.auth_tokens); "
            "GET / and GET /health stay open",
            len(tokens),
        )
    else:
        log.warning(
            "the API is open: service.auth_tokens is empty, so anyone who reaches the port "
            "may post records, flush, and read /stats and /metrics"
        )


def _digest(token: str) -> bytes:
    # surrogatepass: whatever text a header carries encodes, so any token compares.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
