"""Registration entries: which workloads get which SPIFFE ID, on which nodes.

An entry maps a set of *selectors* (facts an agent can establish about a calling process)
to a SPIFFE ID. A workload matches an entry when it carries **every** selector of the entry
(SPIRE's semantics: more selectors = a narrower entry). An entry also says which nodes may
obtain its SVIDs; the CA refuses (PERMISSION_DENIED) an agent asking for any other entry.

Selectors, written ``type:name:value``::

    unix:uid:1000            unix:gid:1000            unix:path:/usr/bin/app
    k8s:ns:default           k8s:sa:web               k8s:pod-label:app:web
    k8s:node-name:node-a

The YAML document (local mode; the operator feeds the same values from CRDs)::

    entries:
      - id: web                       # optional; default derived from spiffe_id + selectors
        spiffe_id: spiffe://example.org/ns/default/sa/web
        selectors: [unix:uid:1000]
        nodes: [node-a, node-b]       # or `node: node-a`, or `nodes: ["*"]` for every node
        ttl: 1h                       # X509-SVID TTL (default 1h, at most 24h)
        jwt_ttl: 5m                   # JWT-SVID TTL (default 5m)
        dns_names: [web.default.svc]
        federates_with: [partner.org]
        hint: internal                # optional label sent with the SVID (Workload API
                                      # X509SVID.hint): tells a workload's SVIDs apart

An entry without ``nodes``/``node`` is accepted only if a ``k8s:node-name`` selector pins
it to one node; leaving the scope implicit would hand every node every identity.

Everything here is pure: values in, values out. ``YamlFileEntrySource`` is the only part
that touches the file system, and it polls only when asked to (``refresh``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from ca.jwtsvid import DEFAULT_JWT_SVID_TTL, MAX_JWT_SVID_TTL
from ca.spiffeid import SpiffeId, SpiffeIdError, TrustDomain
from ca.x509svid import DEFAULT_X509_SVID_TTL, MAX_X509_SVID_TTL
from core.durations import parse_duration
from core.errors import yaml_problem
from core.labels import is_label_key, is_label_value

__all__ = [
    "ALL_NODES",
    "RESERVED_DNS_NAMES",
    "RESERVED_PATH_PREFIX",
    "SELECTOR_KINDS",
    "EntryError",
    "EntrySet",
    "EntrySource",
    "FileStamp",
    "RegistrationEntry",
    "Selector",
    "StaticEntrySource",
    "YamlFileEntrySource",
    "file_stamp",
    "load_entries_file",
    "parse_entries",
    "parse_entries_yaml",
    "parse_selector",
]

ALL_NODES = "*"
# The CA server's own certificate carries this DNS name; clients expect it (see client.py),
# so no workload entry may request it.
RESERVED_DNS_NAMES = frozenset({"trellis-ca"})
# Agents (/trellis/agent/NODE, which the CA takes as NODE's attested agent) and CAs live
# here; an entry for such an ID would let a workload act as an agent.
RESERVED_PATH_PREFIX = "/trellis/"
MAX_ENTRIES_BYTES = 16 * 1024 * 1024
# SPIRE allows 1,024; a hint is a short label ("internal", "external"), not a document.
MAX_HINT_CHARS = 128

# (type, name) -> whether the value has an inner "key:value" part
SELECTOR_KINDS: Mapping[tuple[str, str], str] = {
    ("unix", "uid"): "a numeric user id",
    ("unix", "gid"): "a numeric group id",
    ("unix", "path"): "an absolute executable path",
    ("k8s", "ns"): "a namespace name",
    ("k8s", "sa"): "a service account name",
    ("k8s", "pod-label"): "key:value",
    ("k8s", "node-name"): "a node name",
}
_K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_NODE_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,251}[A-Za-z0-9])?$")
_DNS_LABEL = re.compile(r"^(\*|[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?)$")
_ENTRY_ID = re.compile(r"^[A-Za-z0-9][-A-Za-z0-9_.]{0,127}$")


class EntryError(ValueError):
    """A selector or entry document is malformed; the message names where and why."""


@dataclass(frozen=True, slots=True, order=True)
class Selector:
    """One fact about a workload, e.g. ``Selector("unix", "uid", "1000")``."""

    type: str
    name: str
    value: str

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{self.value}"


def parse_selector(text: str) -> Selector:
    """Parse and validate ``type:name:value`` (``k8s:pod-label:key:value`` keeps its colon)."""
    if not isinstance(text, str):
        raise EntryError(f"selector must be a string, not {type(text).__name__}")
    parts = text.split(":", 2)
    if len(parts) != 3:
        raise EntryError(f"selector {text!r} must look like type:name:value (e.g. unix:uid:1000)")
    kind, name, value = parts
    if (kind, name) not in SELECTOR_KINDS:
        known = ", ".join(f"{t}:{n}" for t, n in SELECTOR_KINDS)
        raise EntryError(f"selector {text!r}: unknown kind {kind}:{name} (known: {known})")
    what = SELECTOR_KINDS[(kind, name)]
    ok: bool
    if name in ("uid", "gid"):
        ok = value.isascii() and value.isdigit() and int(value) < 2**32
    elif name == "path":
        ok = value.startswith("/") and "\x00" not in value and len(value) <= 4096
    elif name == "pod-label":
        key, sep, label = value.partition(":")
        ok = bool(sep) and is_label_key(key) and is_label_value(label)
    elif name == "node-name":
        ok = bool(_NODE_NAME.match(value))
    else:  # ns, sa: DNS-1123 names
        ok = bool(_K8S_NAME.match(value)) and len(value) <= 253
    if not ok:
        raise EntryError(f"selector {text!r}: the value must be {what}")
    return Selector(kind, name, value)


def _check_node_name(value: str, where: str) -> str:
    if value != ALL_NODES and not _NODE_NAME.match(value):
        raise EntryError(f"{where}: {value!r} is not a node name (or '*' for every node)")
    return value


def _check_dns_name(value: str, where: str) -> str:
    labels = value.rstrip(".").split(".")
    if (
        not value
        or len(value) > 253
        or not all(_DNS_LABEL.match(label) for label in labels)
        or "*" in labels[1:]
    ):
        raise EntryError(f"{where}: {value!r} is not a DNS name")
    if value.lower() in RESERVED_DNS_NAMES:
        raise EntryError(f"{where}: {value!r} is reserved for the CA server's own certificate")
    return value.lower()


@dataclass(frozen=True)
class RegistrationEntry:
    """One registration entry; build with ``RegistrationEntry.create`` or ``parse_entries``."""

    entry_id: str
    spiffe_id: SpiffeId
    selectors: frozenset[Selector]
    nodes: frozenset[str] = frozenset()
    x509_svid_ttl: dt.timedelta = DEFAULT_X509_SVID_TTL
    jwt_svid_ttl: dt.timedelta = DEFAULT_JWT_SVID_TTL
    dns_names: tuple[str, ...] = ()
    federates_with: tuple[TrustDomain, ...] = ()
    hint: str = ""

    @classmethod
    def create(
        cls,
        spiffe_id: SpiffeId | str,
        selectors: Iterable[Selector | str],
        *,
        nodes: Iterable[str] = (),
        entry_id: str | None = None,
        x509_svid_ttl: dt.timedelta = DEFAULT_X509_SVID_TTL,
        jwt_svid_ttl: dt.timedelta = DEFAULT_JWT_SVID_TTL,
        dns_names: Iterable[str] = (),
        federates_with: Iterable[TrustDomain | str] = (),
        hint: str = "",
    ) -> RegistrationEntry:
        """Validate and build an entry (raises ``EntryError`` naming the broken rule)."""
        try:
            sid = SpiffeId(spiffe_id)
        except SpiffeIdError as exc:
            raise EntryError(f"spiffe_id: {exc}") from exc
        if not sid.path:
            raise EntryError(f"spiffe_id: {sid} has no path; workload IDs need one")
        if sid.path.startswith(RESERVED_PATH_PREFIX):
            raise EntryError(
                f"spiffe_id: {sid} is under {RESERVED_PATH_PREFIX}, reserved for agents and CAs"
            )
        parsed = frozenset(s if isinstance(s, Selector) else parse_selector(s) for s in selectors)
        if not parsed:
            raise EntryError("selectors: an entry needs at least one selector")
        node_set = frozenset(_check_node_name(n, "nodes") for n in nodes)
        pinned = [s.value for s in parsed if s.type == "k8s" and s.name == "node-name"]
        if not node_set and not pinned:
            raise EntryError(
                "nodes: say which nodes may obtain this identity "
                "(nodes: [NAME, ...], or nodes: ['*'] for every node)"
            )
        for ttl, limit, what in (
            (x509_svid_ttl, MAX_X509_SVID_TTL, "ttl"),
            (jwt_svid_ttl, MAX_JWT_SVID_TTL, "jwt_ttl"),
        ):
            if ttl <= dt.timedelta(0) or ttl > limit:
                raise EntryError(f"{what}: {ttl} must be positive and at most {limit}")
        dns = tuple(_check_dns_name(d, "dns_names") for d in dns_names)
        try:
            federated = tuple(TrustDomain(t) for t in federates_with)
        except SpiffeIdError as exc:
            raise EntryError(f"federates_with: {exc}") from exc
        if sid.trust_domain in federated:
            raise EntryError(f"federates_with: {sid.trust_domain} is the entry's own domain")
        if entry_id is None:
            entry_id = _derived_id(sid, parsed)
        elif not _ENTRY_ID.match(entry_id):
            raise EntryError(
                f"id: {entry_id!r} must be 1-128 characters of letters, digits, '-', '_', '.'"
            )
        _check_hint(hint)
        return cls(
            entry_id, sid, parsed, node_set, x509_svid_ttl, jwt_svid_ttl, dns, federated, hint
        )

    def matches(self, workload_selectors: Iterable[Selector]) -> bool:
        """True if the workload carries every selector of this entry."""
        have = (
            workload_selectors
            if isinstance(workload_selectors, frozenset | set)
            else set(workload_selectors)
        )
        return self.selectors <= have

    def runs_on(self, node: str) -> bool:
        """True if an agent on ``node`` may obtain this entry's SVIDs."""
        if ALL_NODES in self.nodes or node in self.nodes:
            return True
        if self.nodes:
            return False
        return any(
            s.type == "k8s" and s.name == "node-name" and s.value == node for s in self.selectors
        )

    def to_dict(self) -> dict[str, Any]:
        """The YAML/JSON form that ``parse_entries`` reads back."""
        doc: dict[str, Any] = {
            "id": self.entry_id,
            "spiffe_id": str(self.spiffe_id),
            "selectors": sorted(str(s) for s in self.selectors),
            "ttl": f"{int(self.x509_svid_ttl.total_seconds())}s",
            "jwt_ttl": f"{int(self.jwt_svid_ttl.total_seconds())}s",
        }
        if self.nodes:
            doc["nodes"] = sorted(self.nodes)
        if self.dns_names:
            doc["dns_names"] = list(self.dns_names)
        if self.federates_with:
            doc["federates_with"] = [t.name for t in self.federates_with]
        if self.hint:
            doc["hint"] = self.hint
        return doc


def _check_hint(hint: str) -> None:
    # A label for people and workload code to choose between SVIDs (SPIFFE Workload API,
    # X509SVID.hint); it is not part of the SVID, so a change re-issues nothing.
    if not isinstance(hint, str):
        raise EntryError("hint: expected a string")
    if len(hint) > MAX_HINT_CHARS:
        raise EntryError(f"hint: {len(hint)} characters; at most {MAX_HINT_CHARS}")
    if not hint.isprintable() or hint != hint.strip():
        raise EntryError(
            f"hint: {hint[:40]!r} must be printable, without leading or trailing spaces"
        )


def _derived_id(spiffe_id: SpiffeId, selectors: frozenset[Selector]) -> str:
    material = "\n".join([str(spiffe_id), *sorted(str(s) for s in selectors)])
    return "e-" + hashlib.sha256(material.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class EntrySet:
    """An immutable snapshot of the entries, indexed for the CA's and the agent's lookups."""

    entries: tuple[RegistrationEntry, ...] = ()
    _by_id: Mapping[str, RegistrationEntry] = field(init=False, repr=False, compare=False)
    _revision: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_id: dict[str, RegistrationEntry] = {}
        for entry in self.entries:
            if entry.entry_id in by_id:
                raise EntryError(f"entry id {entry.entry_id!r} is used twice")
            by_id[entry.entry_id] = entry
        object.__setattr__(self, "_by_id", by_id)
        digest = hashlib.sha256()
        for entry in sorted(self.entries, key=lambda e: e.entry_id):
            digest.update(repr(entry.to_dict()).encode())
        object.__setattr__(self, "_revision", digest.hexdigest()[:16])

    @property
    def revision(self) -> str:
        """Equal for equal entry sets; changes whenever an entry changes."""
        return self._revision

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[RegistrationEntry]:
        return iter(self.entries)

    def get(self, entry_id: str) -> RegistrationEntry | None:
        return self._by_id.get(entry_id)

    def for_node(self, node: str) -> tuple[RegistrationEntry, ...]:
        """The entries an agent on ``node`` may obtain SVIDs for."""
        return tuple(e for e in self.entries if e.runs_on(node))

    def matching(self, workload_selectors: Iterable[Selector]) -> tuple[RegistrationEntry, ...]:
        """The entries whose selectors the workload all carries (the agent's lookup)."""
        have = frozenset(workload_selectors)
        return tuple(e for e in self.entries if e.matches(have))


def _duration_field(raw: Any, default: dt.timedelta, where: str) -> dt.timedelta:
    if raw is None:
        return default
    if isinstance(raw, bool):
        raise EntryError(f"{where}: expected a duration like 1h or 300s")
    if isinstance(raw, int):
        return dt.timedelta(seconds=raw)
    if not isinstance(raw, str):
        raise EntryError(f"{where}: expected a duration like 1h or 300s")
    try:
        return parse_duration(raw)
    except ValueError as exc:
        raise EntryError(f"{where}: {exc}") from exc


def _string_list(raw: Any, where: str) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, str):
        return [raw]
    if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
        raise EntryError(f"{where}: expected a list of strings")
    return list(raw)


_FIELDS = frozenset(
    {
        "id",
        "spiffe_id",
        "selectors",
        "node",
        "nodes",
        "ttl",
        "jwt_ttl",
        "dns_names",
        "federates_with",
        "hint",
    }
)


def _parse_entry(raw: Any, where: str, trust_domain: TrustDomain | None) -> RegistrationEntry:
    if not isinstance(raw, dict):
        raise EntryError(f"{where}: expected a mapping with spiffe_id, selectors, nodes")
    unknown = sorted(str(k) for k in raw if k not in _FIELDS)
    if unknown:
        raise EntryError(f"{where}: unknown field(s) {', '.join(unknown)}")
    if "spiffe_id" not in raw:
        raise EntryError(f"{where}: spiffe_id is required")
    if not isinstance(raw["spiffe_id"], str):
        raise EntryError(f"{where}.spiffe_id: expected a string")
    entry_id = raw.get("id")
    if entry_id is not None and not isinstance(entry_id, str):
        raise EntryError(f"{where}.id: expected a string")
    selectors: list[Selector] = []
    for index, text in enumerate(_string_list(raw.get("selectors"), f"{where}.selectors")):
        try:
            selectors.append(parse_selector(text))
        except EntryError as exc:
            raise EntryError(f"{where}.selectors[{index}]: {exc}") from exc
    nodes = _string_list(raw.get("nodes"), f"{where}.nodes") + _string_list(
        raw.get("node"), f"{where}.node"
    )
    try:
        entry = RegistrationEntry.create(
            raw["spiffe_id"],
            selectors,
            nodes=nodes,
            entry_id=entry_id,
            x509_svid_ttl=_duration_field(raw.get("ttl"), DEFAULT_X509_SVID_TTL, f"{where}.ttl"),
            jwt_svid_ttl=_duration_field(
                raw.get("jwt_ttl"), DEFAULT_JWT_SVID_TTL, f"{where}.jwt_ttl"
            ),
            dns_names=_string_list(raw.get("dns_names"), f"{where}.dns_names"),
            federates_with=_string_list(raw.get("federates_with"), f"{where}.federates_with"),
            hint=raw.get("hint", ""),
        )
    except EntryError as exc:
        if str(exc).startswith(where):
            raise
        raise EntryError(f"{where}.{exc}") from exc
    if trust_domain is not None and entry.spiffe_id.trust_domain != trust_domain:
        raise EntryError(
            f"{where}.spiffe_id: {entry.spiffe_id} is outside trust domain {trust_domain}"
        )
    return entry


def parse_entries(
    document: Any, *, trust_domain: TrustDomain | None = None, source: str = "entries"
) -> EntrySet:
    """Build an ``EntrySet`` from a decoded document ``{"entries": [...]}`` (or a bare list).

    With ``trust_domain`` every entry must belong to it. Errors name the offending entry,
    e.g. ``entries.yaml: entries[2].selectors[0]: selector 'unix:uid:x': ...``.
    """
    if document is None:
        items: Sequence[Any] = []
    elif isinstance(document, dict):
        extra = sorted(str(k) for k in document if k != "entries")
        if extra:
            raise EntryError(f"{source}: unknown top-level field(s) {', '.join(extra)}")
        items = document.get("entries") or []
    else:
        items = document
    if not isinstance(items, list):
        raise EntryError(f"{source}: 'entries' must be a list")
    try:
        entries = tuple(
            _parse_entry(raw, f"entries[{index}]", trust_domain) for index, raw in enumerate(items)
        )
        return EntrySet(entries)
    except EntryError as exc:
        raise EntryError(f"{source}: {exc}") from exc


def parse_entries_yaml(
    text: str | bytes, *, trust_domain: TrustDomain | None = None, source: str = "entries"
) -> EntrySet:
    """Parse the YAML entry document (see the module docstring)."""
    if len(text) > MAX_ENTRIES_BYTES:
        raise EntryError(f"{source}: {len(text)} bytes exceeds the limit of {MAX_ENTRIES_BYTES}")
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise EntryError(f"{source}: not valid YAML: {yaml_problem(exc)}") from exc
    except RecursionError as exc:
        # PyYAML composes nested collections recursively: a few kilobytes of "[" reach the
        # interpreter's limit. Refused like any broken file, not raised past the reloader.
        raise EntryError(f"{source}: nested too deeply") from exc
    return parse_entries(document, trust_domain=trust_domain, source=source)


def load_entries_file(path: Path, *, trust_domain: TrustDomain | None = None) -> EntrySet:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise EntryError(f"{path}: cannot read: {exc.strerror}") from exc
    return parse_entries_yaml(data, trust_domain=trust_domain, source=str(path))


class EntrySource(Protocol):
    """Where the CA gets its entries: a YAML file in local mode, CRDs via the operator.

    ``current()`` must be cheap (it is called on every request) and always return the last
    good snapshot; ``refresh(now)`` is called periodically by the server and returns an
    ``EntryError`` if the source is currently unreadable (the old snapshot stays in force).
    """

    def current(self) -> EntrySet: ...

    def refresh(self, now: float) -> EntryError | None: ...


class StaticEntrySource:
    """A fixed (or programmatically replaced) entry set: tests and the operator's feed."""

    def __init__(self, entries: EntrySet | Iterable[RegistrationEntry] = ()) -> None:
        self._entries = entries if isinstance(entries, EntrySet) else EntrySet(tuple(entries))

    def current(self) -> EntrySet:
        return self._entries

    def replace(self, entries: EntrySet) -> None:
        self._entries = entries

    def refresh(self, now: float) -> EntryError | None:
        return None


FileStamp = tuple[int, int, int]


def file_stamp(path: Path) -> FileStamp | None:
    """(mtime, size, inode) of ``path``, or None if it cannot be read: what changes when a
    file is rewritten in place or replaced by a rename, which the reloaders compare."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class YamlFileEntrySource:
    """Entries from a YAML file, re-read when its mtime, size or inode changes.

    The first load raises ``EntryError`` (a server must not start on a broken file); later
    reloads that fail keep the previous snapshot and report the error from ``refresh``.
    """

    def __init__(self, path: Path, *, trust_domain: TrustDomain | None = None) -> None:
        self.path = path
        self._trust_domain = trust_domain
        self._stamp = file_stamp(self.path)
        self._entries = load_entries_file(path, trust_domain=trust_domain)
        self.reloads = 0

    def current(self) -> EntrySet:
        return self._entries

    def refresh(self, now: float) -> EntryError | None:
        stamp = file_stamp(self.path)
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        try:
            entries = load_entries_file(self.path, trust_domain=self._trust_domain)
        except EntryError as exc:
            return exc
        if entries.revision != self._entries.revision:
            self._entries = entries
            self.reloads += 1
        return None
