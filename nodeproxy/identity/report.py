"""What ``/config_dump`` shows of an agent's or a waypoint's certificates."""

from __future__ import annotations

from datetime import datetime

from cryptography import x509

from nodeproxy.identity.manager import CertificateManager
from nodeproxy.identity.svid import load_pem_chain, uri_sans
from ztunnel_cfg.spiffe import SpiffeId


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _cert_entry(cert: x509.Certificate, role: str) -> dict[str, object]:
    return {
        "type": role,
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": format(cert.serial_number, "x"),
        "notBefore": cert.not_valid_before_utc.isoformat(),
        "notAfter": cert.not_valid_after_utc.isoformat(),
        "uriSans": uri_sans(cert),
    }


def certificates_document(certs: CertificateManager) -> list[dict[str, object]]:
    """One entry per identity: state, serial, validity, the chain (leaf first) and the roots."""
    bundle = certs.bundle
    roots = [_cert_entry(c, "Root") for c in bundle.roots] if bundle is not None else []
    out: list[dict[str, object]] = []
    for info in certs.snapshot():
        entry: dict[str, object] = {
            "identity": info.identity,
            "state": info.state,
            "serial": info.serial,
            "not_before": _iso(info.not_before),
            "not_after": _iso(info.not_after),
            "failures": info.failures,
            "last_error": info.last_error,
        }
        svid = certs.current(SpiffeId.parse(info.identity))
        chain: list[dict[str, object]] = []
        if svid is not None:
            parsed = load_pem_chain(svid.cert_chain_pem)
            chain = [_cert_entry(c, "Leaf" if i == 0 else "Intermediate")
                     for i, c in enumerate(parsed)]
        entry["chain"] = chain
        entry["roots"] = roots
        out.append(entry)
    return out
