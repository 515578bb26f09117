"""Test certificates made with the ``openssl`` command: CAs, and certificates they sign.

Each certificate is valid for two days, with an EC P-256 key (quick to make)
and the extensions a strict verifier asks for (key usage, key identifiers).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class CertSet:
    """What the TLS tests use.

    - ``ca``: the CA that signs the others; ``other_ca``: an unrelated one;
    - ``server``: for 127.0.0.1 and localhost; ``wrong_host``: for
      db.example.invalid only; both signed by ``ca``;
    - ``client``: a client certificate signed by ``ca``.
    """

    ca: KeyPair
    other_ca: KeyPair
    server: KeyPair
    wrong_host: KeyPair
    client: KeyPair


def openssl_or_skip() -> str:
    """The openssl command; without it the test skips (fails under CI=true)."""
    path = shutil.which("openssl")
    if path is None:
        reason = "the openssl command is not installed; it makes the test certificates"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    return path


def _run(*args: str, cwd: Path) -> None:
    subprocess.run([openssl_or_skip(), *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_ca(directory: Path, name: str) -> KeyPair:
    """A self-signed CA certificate."""
    pair = KeyPair(directory / f"{name}.pem", directory / f"{name}-key.pem")
    _run(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-days", "2", "-subj", f"/CN=persistence test {name}",
        "-keyout", str(pair.key), "-out", str(pair.cert),
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    return pair


def make_self_signed(directory: Path, name: str, alt_names: str) -> KeyPair:
    """A self-signed server certificate for ``alt_names`` (e.g. ``IP:127.0.0.1``), its own
    trust anchor."""
    pair = KeyPair(directory / f"{name}.pem", directory / f"{name}-key.pem")
    _run(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-days", "2", "-subj", f"/CN=persistence test {name}",
        "-keyout", str(pair.key), "-out", str(pair.cert),
        "-addext", f"subjectAltName={alt_names}",
        "-addext", "basicConstraints=critical,CA:FALSE",
        "-addext", "keyUsage=critical,digitalSignature",
        "-addext", "extendedKeyUsage=serverAuth",
        cwd=directory,
    )  # fmt: skip
    return pair


def make_leaf(
    directory: Path, name: str, ca: KeyPair, *, alt_names: str = "", client: bool = False
) -> KeyPair:
    """A certificate signed by ``ca``: a server's (``alt_names``, e.g. ``IP:127.0.0.1``)
    or, with ``client``, a client's."""
    pair = KeyPair(directory / f"{name}.pem", directory / f"{name}-key.pem")
    csr = directory / f"{name}.csr"
    extensions = directory / f"{name}.ext"
    lines = [
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature,keyEncipherment",
        f"extendedKeyUsage={'clientAuth' if client else 'serverAuth'}",
        "subjectKeyIdentifier=hash",
        "authorityKeyIdentifier=keyid",
    ]
    if alt_names:
        lines.append(f"subjectAltName={alt_names}")
    extensions.write_text("\n".join(lines) + "\n", encoding="ascii")
    _run(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-subj", f"/CN=persistence test {name}", "-keyout", str(pair.key), "-out", str(csr),
        cwd=directory,
    )  # fmt: skip
    _run(
        "x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
        "-CAcreateserial", "-days", "2", "-extfile", str(extensions), "-out", str(pair.cert),
        cwd=directory,
    )  # fmt: skip
    return pair


def make_test_certs(directory: Path) -> CertSet:
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca(directory, "ca")
    return CertSet(
        ca=ca,
        other_ca=make_ca(directory, "other-ca"),
        server=make_leaf(directory, "server", ca, alt_names="IP:127.0.0.1,DNS:localhost"),
        wrong_host=make_leaf(directory, "wrong-host", ca, alt_names="DNS:db.example.invalid"),
        client=make_leaf(directory, "client", ca, client=True),
    )
