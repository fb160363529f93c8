"""SPIFFE IDs and trust domains, parsed and canonicalised at construction.

A ``SpiffeId`` is ``spiffe://<trust-domain><path>`` (SPIFFE-ID standard §2). Values of
these types are always valid and canonical, so code past the edge never re-checks a raw
string. Canonicalisation is limited to what RFC 3986 already makes case-insensitive: the
scheme and the host (trust domain) are lowercased; the path is case-sensitive and kept as
given. Everything else the standard forbids is rejected with the rule that was broken.
"""

from __future__ import annotations

import string
from typing import Final

__all__ = ["MAX_SPIFFE_ID_LENGTH", "SpiffeId", "SpiffeIdError", "TrustDomain"]

SCHEME: Final = "spiffe"
PREFIX: Final = "spiffe://"
# SPIFFE-ID §2.3: implementations MUST support 2048 bytes; the host is limited to 255.
MAX_SPIFFE_ID_LENGTH: Final = 2048
MAX_TRUST_DOMAIN_LENGTH: Final = 255

_TRUST_DOMAIN_CHARS: Final = frozenset(string.ascii_lowercase + string.digits + ".-_")
_PATH_SEGMENT_CHARS: Final = frozenset(string.ascii_letters + string.digits + ".-_")


class SpiffeIdError(ValueError):
    """A string is not a valid SPIFFE ID or trust domain; ``rule`` names the broken rule."""

    def __init__(self, rule: str, value: str, detail: str) -> None:
        self.rule = rule
        self.value = value
        shown = value if len(value) <= 80 else value[:77] + "..."
        super().__init__(f"invalid SPIFFE ID {shown!r}: {detail} [{rule}]")


def _check_trust_domain(name: str, original: str) -> str:
    if not name:
        raise SpiffeIdError("missing-trust-domain", original, "trust domain is empty")
    if len(name) > MAX_TRUST_DOMAIN_LENGTH:
        raise SpiffeIdError(
            "trust-domain-too-long",
            original,
            f"trust domain exceeds {MAX_TRUST_DOMAIN_LENGTH} bytes",
        )
    if "@" in name:
        raise SpiffeIdError("userinfo-not-allowed", original, "userinfo must not be set")
    if ":" in name:
        raise SpiffeIdError(
            "port-not-allowed", original, "port (and the ':' delimiter) must not be set"
        )
    canonical = name.lower() if name.isascii() else name
    bad = sorted(set(canonical) - _TRUST_DOMAIN_CHARS)
    if bad:
        raise SpiffeIdError(
            "bad-trust-domain-char",
            original,
            f"trust domain may only contain a-z, 0-9, '.', '-', '_' (found {bad[0]!r})",
        )
    return canonical


def _check_path(path: str, original: str) -> str:
    if not path:
        return ""
    if "?" in path:
        raise SpiffeIdError("query-not-allowed", original, "a query component is not allowed")
    if "#" in path:
        raise SpiffeIdError("fragment-not-allowed", original, "a fragment component is not allowed")
    if not path.startswith("/"):
        raise SpiffeIdError("path-not-absolute", original, "path must start with '/'")
    segments = path[1:].split("/")
    for index, segment in enumerate(segments):
        if segment == "":
            if index == len(segments) - 1:
                raise SpiffeIdError("trailing-slash", original, "path must not end with '/'")
            raise SpiffeIdError("empty-segment", original, "path segments must not be empty")
        if segment in (".", ".."):
            raise SpiffeIdError("dot-segment", original, "path segments must not be '.' or '..'")
        bad = sorted(set(segment) - _PATH_SEGMENT_CHARS)
        if bad:
            raise SpiffeIdError(
                "bad-path-segment-char",
                original,
                f"path segments may only contain letters, digits, '.', '-', '_' (found {bad[0]!r})",
            )
    return path


class TrustDomain:
    """A SPIFFE trust domain name, e.g. ``example.org``.

    Accepts a bare name or a SPIFFE ID (``spiffe://example.org/x`` gives ``example.org``).
    """

    __slots__ = ("_name",)
    _name: str

    def __init__(self, name_or_id: str | TrustDomain) -> None:
        if isinstance(name_or_id, TrustDomain):
            self._name = name_or_id._name
            return
        if not isinstance(name_or_id, str):
            raise TypeError("trust domain must be a str")
        if "://" in name_or_id:
            self._name = SpiffeId(name_or_id).trust_domain.name
            return
        if "/" in name_or_id:
            raise SpiffeIdError(
                "bad-trust-domain-char", name_or_id, "trust domain must not contain '/'"
            )
        self._name = _check_trust_domain(name_or_id, name_or_id)

    @property
    def name(self) -> str:
        return self._name

    def id_string(self) -> str:
        """The SPIFFE ID of the trust domain itself (no path): ``spiffe://example.org``."""
        return PREFIX + self._name

    def spiffe_id(self, path: str = "") -> SpiffeId:
        return SpiffeId(PREFIX + self._name + path)

    def __str__(self) -> str:
        return self._name

    def __repr__(self) -> str:
        return f"TrustDomain({self._name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrustDomain) and other._name == self._name

    def __hash__(self) -> int:
        return hash(("TrustDomain", self._name))

    def __lt__(self, other: TrustDomain) -> bool:
        return self._name < other._name


class SpiffeId:
    """A canonical SPIFFE ID. Hashable, comparable, ``str()`` gives the URI."""

    __slots__ = ("_path", "_trust_domain", "_uri")
    _trust_domain: TrustDomain
    _path: str
    _uri: str

    def __init__(self, uri: str | SpiffeId) -> None:
        if isinstance(uri, SpiffeId):
            self._trust_domain, self._path, self._uri = uri._trust_domain, uri._path, uri._uri
            return
        if not isinstance(uri, str):
            raise TypeError("SPIFFE ID must be a str")
        if not uri:
            raise SpiffeIdError("empty", uri, "SPIFFE ID is empty")
        if len(uri.encode("utf-8", "surrogatepass")) > MAX_SPIFFE_ID_LENGTH:
            raise SpiffeIdError("too-long", uri, f"SPIFFE ID exceeds {MAX_SPIFFE_ID_LENGTH} bytes")
        scheme, sep, rest = uri.partition("://")
        if not sep or scheme.lower() != SCHEME:
            raise SpiffeIdError("wrong-scheme", uri, "scheme must be 'spiffe://'")
        authority, slash, path = rest.partition("/")
        path = slash + path
        for marker, rule, what in (
            ("?", "query-not-allowed", "query"),
            ("#", "fragment-not-allowed", "fragment"),
        ):
            if marker in authority:
                raise SpiffeIdError(rule, uri, f"a {what} component is not allowed")
        trust_domain = TrustDomain.__new__(TrustDomain)
        trust_domain._name = _check_trust_domain(authority, uri)
        self._trust_domain = trust_domain
        self._path = _check_path(path, uri)
        self._uri = PREFIX + trust_domain._name + self._path

    @classmethod
    def from_parts(cls, trust_domain: TrustDomain | str, path: str) -> SpiffeId:
        return cls(PREFIX + TrustDomain(trust_domain).name + path)

    @property
    def trust_domain(self) -> TrustDomain:
        return self._trust_domain

    @property
    def path(self) -> str:
        return self._path

    def member_of(self, trust_domain: TrustDomain) -> bool:
        return self._trust_domain == trust_domain

    def is_under(self, prefix: SpiffeId) -> bool:
        """Whether this ID is ``prefix`` or below it, by whole path segments.

        ``spiffe://td/ns/web`` covers ``spiffe://td/ns/web/x`` but not ``.../ns/webhook``;
        a bare trust domain ID covers every ID of that domain.
        """
        if self._trust_domain != prefix._trust_domain:
            return False
        base = prefix._path
        return not base or self._path == base or self._path.startswith(base + "/")

    def __str__(self) -> str:
        return self._uri

    def __repr__(self) -> str:
        return f"SpiffeId({self._uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SpiffeId) and other._uri == self._uri

    def __hash__(self) -> int:
        return hash(("SpiffeId", self._uri))

    def __lt__(self, other: SpiffeId) -> bool:
        return self._uri < other._uri
