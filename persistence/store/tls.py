"""TLS to MySQL/MariaDB: the SSL context the settings ask for, what a live connection
negotiated, and which connection errors are TLS failures that need an operator.

With ``database.ssl_ca`` set, every connection carries an :class:`ssl.SSLContext`
built here, which PyMySQL uses as it is: TLS is required (a server without it
is refused, never talked to in plain text), the certificate chain is always
verified against the CA, and the host name too unless
``database.ssl_verify_identity`` is false. The context is built here rather
than from PyMySQL's ``ssl_*`` arguments because these couple the two checks:
with ``ssl_verify_identity=False`` PyMySQL also stops verifying the chain
unless ``ssl_verify_cert`` is given as well, so "skip the host name" would
silently become "accept any certificate".

Without ``database.ssl_ca`` the connection arguments carry no TLS option and
PyMySQL (1.2+) encrypts whenever the server offers TLS, without verifying
anything, and speaks plain text otherwise. Either way :meth:`DatabaseTls.observe`
asks the server what each probe connection negotiated, so ``/health`` tells
the truth rather than the configuration.

Threading contract: a :class:`DatabaseTls` may be used from any thread;
``_lock`` guards the observed state. Contexts are built anew for each pool
and each probe connection (renewed certificate files are picked up then);
an SSL context itself is safe to share between the connections of a pool.
"""

from __future__ import annotations

import logging
import ssl
import threading
from dataclasses import dataclass
from typing import Any

from persistence.config import DatabaseSettings

log = logging.getLogger(__name__)

# What the server says about the TLS of the session (empty values: plain text).
STATUS_QUERY = "SHOW SESSION STATUS WHERE Variable_name IN ('Ssl_version', 'Ssl_cipher')"
# PyMySQL's error for a failed connect (CR_CONN_HOST_ERROR); a TLS failure during the
# handshake arrives as this code with the ssl exception as its original_exception.
_CONNECT_FAILED = 2003
# Handshakes cut short by the network or a restarting server: worth retrying.
_TRANSIENT_SSL = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)


class TlsSetupError(Exception):
    """The CA, certificate or key file of ``database.ssl_*`` cannot be used (any more)."""


@dataclass(frozen=True)
class TlsState:
    """The TLS of one connection, as the server reported it.

    ``enabled`` is None when unknown: no connection was made, or the server did not say.
    ``verified``: the server's certificate chain was checked against
    ``database.ssl_ca``; ``identity``: its host name was checked too.
    """

    enabled: bool | None
    verified: bool
    identity: bool
    version: str | None = None
    cipher: str | None = None

    def describe(self) -> str:
        if self.enabled is None:
            return "TLS state unknown"
        if not self.enabled:
            return "plain text, no TLS"
        if not self.verified:
            trust = "certificate NOT verified"
        elif self.identity:
            trust = "certificate and host name verified"
        else:
            trust = "certificate verified, host name NOT checked"
        return f"TLS {self.version} {self.cipher}, {trust}"


_UNKNOWN = TlsState(enabled=None, verified=False, identity=False)


class DatabaseTls:
    """The TLS of one store's MySQL connections: the policy of the settings, and the
    state the last probe connection negotiated. See the module docstring."""

    def __init__(self, settings: DatabaseSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._state = _UNKNOWN
        self._logged: TlsState | None = None

    @property
    def required(self) -> bool:
        """TLS with a verified certificate chain, or no connection at all."""
        return bool(self.settings.ssl_ca)

    def connect_args(self) -> dict[str, Any]:
        """PyMySQL ``connect()`` arguments: ``ssl`` with a fresh context when required."""
        return {"ssl": self.context()} if self.required else {}

    def context(self) -> ssl.SSLContext:
        """A client context verifying the chain (always) and the host name (if asked)."""
        s = self.settings
        try:
            context = ssl.create_default_context(cafile=s.ssl_ca)
            context.check_hostname = s.ssl_verify_identity
            context.verify_mode = ssl.CERT_REQUIRED
            # Python 3.13 turns on strict X.509 checks that the certificates MySQL generates
            # for itself fail; PyMySQL turns them off for the same reason.
            context.verify_flags &= ~ssl.VERIFY_X509_STRICT
            if s.ssl_cert:
                context.load_cert_chain(s.ssl_cert, s.ssl_key or None, password=_no_password)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise TlsSetupError(
                f"the TLS files of database.ssl_ca, ssl_cert, ssl_key cannot be used: {reason}"
            ) from exc
        return context

    def observe(self, conn: Any) -> TlsState:
        """Ask the server over ``conn`` (a new PyMySQL connection) what TLS it negotiated,
        and keep the answer for :meth:`status`; the driver's errors propagate."""
        cur = conn.cursor()
        try:
            cur.execute(STATUS_QUERY)
            status = {str(name).lower(): str(value or "") for name, value in cur.fetchall()}
        finally:
            cur.close()
        if "ssl_cipher" not in status:
            state = _UNKNOWN
        elif status["ssl_cipher"]:
            state = TlsState(
                enabled=True,
                verified=self.required,
                identity=self.required and self.settings.ssl_verify_identity,
                version=status.get("ssl_version") or None,
                cipher=status["ssl_cipher"],
            )
        else:
            state = TlsState(enabled=False, verified=False, identity=False)
        self._keep(state)
        return state

    def observe_failure(self) -> None:
        """A connection could not be made: nothing is known of the TLS until the next one."""
        with self._lock:
            self._state = _UNKNOWN

    def state(self) -> TlsState:
        with self._lock:
            return self._state

    def status(self) -> dict[str, Any]:
        """The ``tls`` object of ``/health``."""
        state = self.state()
        return {
            "required": self.required,
            "enabled": state.enabled,
            "verified": state.verified,
            "identity": state.identity,
            "version": state.version,
            "cipher": state.cipher,
        }

    def _keep(self, state: TlsState) -> None:
        with self._lock:
            self._state = state
            changed = state != self._logged
            self._logged = state
        if changed:
            # Logged when it changes only (the probe runs every few seconds): at start, and
            # when the server's TLS configuration changes under a running service.
            level = logging.INFO if state.verified else logging.WARNING
            advice = "" if self.required else " (database.ssl_ca would require verified TLS)"
            log.log(level, "database connection: %s%s", state.describe(), advice)


def _no_password() -> str:
    # Without a callback OpenSSL would prompt for the key's password on the terminal.
    raise TlsSetupError("the private key of database.ssl_cert is encrypted")


def needs_operator(exc: BaseException) -> bool:
    """Whether ``exc``, raised while connecting, is a TLS failure that waiting cannot cure:
    a certificate that does not verify, a host name that does not match, no common
    protocol or cipher, a client certificate refused, unusable TLS files.

    A handshake cut short (the server restarting, the network) is not one of them.
    """
    if isinstance(exc, TlsSetupError):
        return True
    code = exc.args[0] if exc.args else None
    if code != _CONNECT_FAILED:
        return False
    cause = getattr(exc, "original_exception", None) or exc.__context__
    return isinstance(cause, ssl.SSLError) and not isinstance(cause, _TRANSIENT_SSL)
