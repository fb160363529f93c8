"""Verifying X509-SVID chains against trust bundles (X509-SVID standard §5).

Why not ``cryptography.x509.verification`` alone: its path builder refuses any chain whose
CA carries a URI name constraint ("unsupported name constraint"), and URI constraints are
exactly what stops a cluster intermediate from minting identities for another trust domain
(X509-SVID §4.2). So Trellis walks the (short) SPIFFE path itself: every signature is still
checked by ``Certificate.verify_directly_issued_by`` (OpenSSL underneath); what is written
here is only the RFC 5280 bookkeeping: validity windows, cA/keyCertSign, pathLen, critical
extensions and URI/DNS name constraints.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.x509.oid import ExtensionOID

from ca.spiffeid import SpiffeId, TrustDomain
from ca.x509svid import SvidError, check_leaf, check_signing_certificate

__all__ = ["MAX_PATH_DEPTH", "VerificationError", "VerifiedSvid", "verify_x509_svid"]

MAX_PATH_DEPTH = 5

_KNOWN_CRITICAL = frozenset(
    {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        ExtensionOID.NAME_CONSTRAINTS,
        ExtensionOID.POLICY_CONSTRAINTS,
        ExtensionOID.CERTIFICATE_POLICIES,
    }
)


class VerificationError(ValueError):
    """A chain does not verify. ``reason`` is one of: expired, not-yet-valid, unknown-ca,
    unknown-trust-domain, bad-signature, name-constraint-violation, path-too-long,
    unsupported-critical-extension, unsupported-name-constraint, or an X509-SVID rule."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(f"{detail} [{reason}]")


@dataclass(frozen=True, slots=True)
class VerifiedSvid:
    """Proof that a chain verified: only ``verify_x509_svid`` builds one."""

    spiffe_id: SpiffeId
    path: tuple[x509.Certificate, ...]  # leaf, intermediates, trust anchor


BundleLookup = (
    Mapping[TrustDomain, Sequence[x509.Certificate]]
    | Callable[[TrustDomain], Sequence[x509.Certificate] | None]
)


def _roots_for(
    bundles: BundleLookup, trust_domain: TrustDomain
) -> Sequence[x509.Certificate] | None:
    if callable(bundles):
        return bundles(trust_domain)
    return bundles.get(trust_domain)


def _check_time(cert: x509.Certificate, now: dt.datetime, what: str) -> None:
    if now < cert.not_valid_before_utc:
        raise VerificationError(
            "not-yet-valid", f"{what} is not valid before {cert.not_valid_before_utc}"
        )
    if now > cert.not_valid_after_utc:
        raise VerificationError("expired", f"{what} expired at {cert.not_valid_after_utc}")


def _check_critical(cert: x509.Certificate, what: str) -> None:
    try:
        extensions = list(cert.extensions)
    except ValueError as exc:
        raise VerificationError("malformed-extension", f"{what}: {exc}") from exc
    for ext in extensions:
        if ext.critical and ext.oid not in _KNOWN_CRITICAL:
            raise VerificationError(
                "unsupported-critical-extension",
                f"{what} has unknown critical extension {ext.oid.dotted_string}",
            )


def _signed_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(issuer)
    except (ValueError, InvalidSignature, TypeError, UnsupportedAlgorithm):
        return False
    return True


def _host_matches(host: str, constraint: str) -> bool:
    # RFC 5280 §4.2.1.10: ".example.com" matches subdomains only; "example.com" the host only
    # (for URIs) or the host and its subdomains (for DNS names, handled by the caller).
    host, constraint = host.lower(), constraint.lower()
    if constraint.startswith("."):
        return host.endswith(constraint)
    return host == constraint


def _dns_matches(name: str, constraint: str) -> bool:
    name, constraint = name.lower().rstrip("."), constraint.lower().rstrip(".")
    if not constraint:
        return True
    return name == constraint or name.endswith("." + constraint.lstrip("."))


def _check_name_constraints(
    ca: x509.Certificate, spiffe_id: SpiffeId, dns_names: Iterable[str], what: str
) -> None:
    try:
        nc = ca.extensions.get_extension_for_oid(ExtensionOID.NAME_CONSTRAINTS).value
    except x509.ExtensionNotFound:
        return
    assert isinstance(nc, x509.NameConstraints)
    permitted = list(nc.permitted_subtrees or ())
    excluded = list(nc.excluded_subtrees or ())
    for name in permitted + excluded:
        if not isinstance(name, x509.UniformResourceIdentifier | x509.DNSName):
            raise VerificationError(
                "unsupported-name-constraint", f"{what} has a {type(name).__name__} name constraint"
            )
    host = spiffe_id.trust_domain.name
    uri_permitted = [n.value for n in permitted if isinstance(n, x509.UniformResourceIdentifier)]
    uri_excluded = [n.value for n in excluded if isinstance(n, x509.UniformResourceIdentifier)]
    if uri_permitted and not any(_host_matches(host, c) for c in uri_permitted):
        raise VerificationError(
            "name-constraint-violation",
            f"{spiffe_id} is outside {what}'s permitted URI subtrees {uri_permitted}",
        )
    if any(_host_matches(host, c) for c in uri_excluded):
        raise VerificationError("name-constraint-violation", f"{spiffe_id} is excluded by {what}")
    dns_permitted = [n.value for n in permitted if isinstance(n, x509.DNSName)]
    dns_excluded = [n.value for n in excluded if isinstance(n, x509.DNSName)]
    for dns in dns_names:
        if dns_permitted and not any(_dns_matches(dns, c) for c in dns_permitted):
            raise VerificationError(
                "name-constraint-violation", f"DNS name {dns} not permitted by {what}"
            )
        if any(_dns_matches(dns, c) for c in dns_excluded):
            raise VerificationError(
                "name-constraint-violation", f"DNS name {dns} excluded by {what}"
            )


def _path_length(cert: x509.Certificate) -> int | None:
    bc = cert.extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS).value
    assert isinstance(bc, x509.BasicConstraints)
    return bc.path_length


def verify_x509_svid(
    chain: Sequence[x509.Certificate], bundles: BundleLookup, *, now: dt.datetime
) -> VerifiedSvid:
    """Verify ``chain`` (leaf first, then untrusted intermediates) against the bundle of the
    leaf's trust domain; return the SPIFFE ID and the path that was built."""
    if not chain:
        raise VerificationError("missing-certificate", "no certificate presented")
    leaf = chain[0]
    try:
        spiffe_id = check_leaf(leaf)
    except SvidError as exc:
        raise VerificationError(exc.rule, f"leaf: {exc}") from exc
    roots = _roots_for(bundles, spiffe_id.trust_domain)
    if not roots:
        raise VerificationError(
            "unknown-trust-domain", f"no trust bundle for {spiffe_id.trust_domain}"
        )
    _check_time(leaf, now, "leaf")
    _check_critical(leaf, "leaf")
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names: list[str] = list(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        dns_names = []

    path = [leaf]
    candidates = list(chain[1:])
    current = leaf
    for depth in range(MAX_PATH_DEPTH):
        anchor = next(
            (r for r in roots if r.subject == current.issuer and _signed_by(current, r)), None
        )
        if anchor is not None:
            issuer, is_anchor = anchor, True
        else:
            found = next(
                (c for c in candidates if c.subject == current.issuer and _signed_by(current, c)),
                None,
            )
            if found is None:
                raise VerificationError(
                    "unknown-ca",
                    f"no trusted issuer for {current.subject.rfc4514_string() or 'leaf'}",
                )
            issuer, is_anchor = found, False
            candidates.remove(found)
        what = f"CA {issuer.subject.rfc4514_string()}"
        try:
            check_signing_certificate(issuer)
        except SvidError as exc:
            raise VerificationError(exc.rule, f"{what}: {exc}") from exc
        _check_time(issuer, now, what)
        _check_critical(issuer, what)
        limit = _path_length(issuer)
        if limit is not None and depth > limit:
            raise VerificationError(
                "path-too-long", f"{what} allows {limit} intermediates below it"
            )
        _check_name_constraints(issuer, spiffe_id, dns_names, what)
        path.append(issuer)
        if is_anchor:
            return VerifiedSvid(spiffe_id, tuple(path))
        current = issuer
    raise VerificationError(
        "path-too-long", f"no trust anchor within {MAX_PATH_DEPTH} certificates"
    )
