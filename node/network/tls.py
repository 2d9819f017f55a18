"""DICOM TLS contexts (PS3.15 Annex B.1, TLS 1.2 or later) for the SCP and the export SCU.

Every file setting is loaded here when the node starts, so a missing file, an unreadable key or a
key that does not belong to the certificate is refused with a :class:`ConfigError` that names the
setting, before anything listens.
"""

from __future__ import annotations

import ssl
from typing import Any

from ..config import Config, ConfigError

__all__ = ["server_context", "client_context", "peer_certificate"]


def _where(config: Config, key: str) -> str:
    return config.sources.get(key, "default")


def _base(config: Config, purpose: ssl.Purpose) -> ssl.SSLContext:
    context = ssl.create_default_context(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    tls = config.tls
    if tls.certificate is not None:
        for key in ("certificate", "key"):
            path = getattr(tls, key)
            if not path.is_file():
                raise ConfigError(f"tls.{key}: no such file: {path} (from {_where(config, 'tls.' + key)})")
            try:
                path.open("rb").close()
            except OSError as exc:
                raise ConfigError(f"tls.{key}: cannot read {path}: {exc.strerror or exc}"
                                  f" (from {_where(config, 'tls.' + key)})") from None
        try:
            context.load_cert_chain(str(tls.certificate), str(tls.key))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"tls.key: cannot load {tls.key} with certificate {tls.certificate}"
                              f" (not PEM, encrypted, or not the certificate's key): {exc}"
                              f" (from {_where(config, 'tls.key')})") from None
    if tls.ca is not None:
        if not tls.ca.is_file():
            raise ConfigError(f"tls.ca: no such file: {tls.ca} (from {_where(config, 'tls.ca')})")
        try:
            context.load_verify_locations(cafile=str(tls.ca))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"tls.ca: cannot load CA certificates from {tls.ca}: {exc}"
                              f" (from {_where(config, 'tls.ca')})") from None
    return context


def server_context(config: Config) -> ssl.SSLContext:
    """The TLS port's context.

    With ``tls.require_client_certificate`` the handshake itself refuses a caller without a valid
    certificate. Otherwise, with a CA, a certificate is asked for but optional (and checked when
    given), so that :meth:`node.scp.StorageSCP` can refuse the peers that must present one.
    """
    context = _base(config, ssl.Purpose.CLIENT_AUTH)
    if config.tls.require_client_certificate:
        context.verify_mode = ssl.CERT_REQUIRED
    elif config.tls.ca is not None:
        context.verify_mode = ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(config: Config) -> ssl.SSLContext:
    """The export SCU's context: the destination is verified against ``tls.ca`` (or the system's
    CAs without one) and its host name or IP address; the node's certificate is presented."""
    context = _base(config, ssl.Purpose.SERVER_AUTH)
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def peer_certificate(assoc: Any) -> dict | None:
    """The verified certificate an association's peer presented, ``None`` on a plain connection
    and ``{}`` over TLS without one."""
    transport = getattr(getattr(assoc, "dul", None), "socket", None)
    sock = getattr(transport, "socket", None)
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        return sock.getpeercert() or {}
    except (ValueError, OSError):
        return {}
