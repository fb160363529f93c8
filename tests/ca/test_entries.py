"""Registration entries and selectors: parsing, matching, node scope, reload on change."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest

from ca import SpiffeId, TrustDomain
from ca.entries import (
    EntryError,
    EntrySet,
    RegistrationEntry,
    Selector,
    StaticEntrySource,
    YamlFileEntrySource,
    parse_entries_yaml,
    parse_selector,
)

from .server.conftest import ENTRIES_YAML


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unix:uid:1000", Selector("unix", "uid", "1000")),
        ("unix:gid:0", Selector("unix", "gid", "0")),
        ("unix:path:/usr/bin/app", Selector("unix", "path", "/usr/bin/app")),
        ("k8s:ns:default", Selector("k8s", "ns", "default")),
        ("k8s:sa:web-frontend", Selector("k8s", "sa", "web-frontend")),
        ("k8s:pod-label:app:web", Selector("k8s", "pod-label", "app:web")),
        (
            "k8s:pod-label:app.kubernetes.io/name:web",
            Selector("k8s", "pod-label", "app.kubernetes.io/name:web"),
        ),
        ("k8s:pod-label:tier:", Selector("k8s", "pod-label", "tier:")),
        ("k8s:node-name:node-a", Selector("k8s", "node-name", "node-a")),
    ],
)
def test_valid_selectors_parse_and_print_back(text: str, expected: Selector) -> None:
    assert parse_selector(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("unix:uid", "type:name:value"),
        ("unix:uid:abc", "numeric user id"),
        ("unix:uid:-1", "numeric user id"),
        ("unix:uid:99999999999", "numeric user id"),
        ("unix:path:relative/app", "absolute"),
        ("k8s:ns:Default", "namespace"),
        ("k8s:pod-label:app", "key:value"),
        ("k8s:pod-label::web", "key:value"),
        ("docker:image:nginx", "unknown kind"),
        ("k8s:namespace:default", "unknown kind"),
    ],
)
def test_malformed_selectors_are_refused_with_the_rule_named(text: str, complaint: str) -> None:
    with pytest.raises(EntryError, match=complaint):
        parse_selector(text)


def test_entry_matches_only_workloads_carrying_all_its_selectors() -> None:
    entry = RegistrationEntry.create(
        "spiffe://example.org/ns/default/sa/web",
        ["k8s:ns:default", "k8s:sa:web"],
        nodes=["*"],
    )
    have = {parse_selector(s) for s in ("k8s:ns:default", "k8s:sa:web", "k8s:pod-label:a:b")}
    assert entry.matches(have)
    assert not entry.matches({parse_selector("k8s:ns:default")})
    entries = EntrySet((entry,))
    assert entries.matching(have) == (entry,)
    assert entries.matching(set()) == ()


def test_node_scope_is_explicit_a_wildcard_or_pinned_by_a_node_name_selector() -> None:
    listed = RegistrationEntry.create("spiffe://example.org/a", ["unix:uid:1"], nodes=["n1"])
    wildcard = RegistrationEntry.create("spiffe://example.org/b", ["unix:uid:1"], nodes=["*"])
    pinned = RegistrationEntry.create("spiffe://example.org/c", ["k8s:node-name:n2"])
    assert listed.runs_on("n1") and not listed.runs_on("n2")
    assert wildcard.runs_on("anything")
    assert pinned.runs_on("n2") and not pinned.runs_on("n1")
    entries = EntrySet((listed, wildcard, pinned))
    assert [e.spiffe_id.path for e in entries.for_node("n2")] == ["/b", "/c"]
    with pytest.raises(EntryError, match="which nodes"):
        RegistrationEntry.create("spiffe://example.org/d", ["unix:uid:1"])


def test_yaml_document_parses_into_typed_entries() -> None:
    entries = parse_entries_yaml(ENTRIES_YAML, trust_domain=TrustDomain("example.org"))
    web = entries.get("web")
    assert web is not None
    assert web.spiffe_id == SpiffeId("spiffe://example.org/ns/default/sa/web")
    assert web.selectors == frozenset({Selector("unix", "uid", "1000")})
    assert web.dns_names == ("web.default.svc",)
    assert web.x509_svid_ttl == dt.timedelta(hours=1)
    assert web.jwt_svid_ttl == dt.timedelta(minutes=5)
    assert [e.entry_id for e in entries.for_node("node-a")] == ["web", "everywhere"]


def test_entries_round_trip_through_their_dict_form_with_the_same_revision() -> None:
    import yaml

    entries = parse_entries_yaml(ENTRIES_YAML)
    again = parse_entries_yaml(yaml.safe_dump({"entries": [e.to_dict() for e in entries]}))
    assert again.revision == entries.revision
    assert again == entries


def test_ids_default_to_a_stable_digest_of_spiffe_id_and_selectors() -> None:
    doc = "entries: [{spiffe_id: spiffe://example.org/w, selectors: [unix:uid:1], nodes: [n]}]"
    a, b = parse_entries_yaml(doc), parse_entries_yaml(doc)
    assert a.entries[0].entry_id == b.entries[0].entry_id
    assert a.entries[0].entry_id.startswith("e-")


@pytest.mark.parametrize(
    ("document", "complaint"),
    [
        ("entries: [", "not valid YAML"),
        ("entries: {a: 1}", "'entries' must be a list"),
        ("entriez: []", "unknown top-level field"),
        ("entries: [7]", r"entries\[0\]: expected a mapping"),
        ("entries: [{selectors: [unix:uid:1], nodes: [n]}]", "spiffe_id is required"),
        (
            "entries: [{spiffe_id: 'spiffe://Example.org/x', selectors: [unix:uid:1], nodes: [n],"
            " colour: red}]",
            "unknown field",
        ),
        (
            "entries: [{spiffe_id: 'spiffe://example.org/x/../y', selectors: [unix:uid:1],"
            " nodes: [n]}]",
            r"entries\[0\]\.spiffe_id",
        ),
        (
            "entries: [{spiffe_id: 'spiffe://example.org/x', selectors: [unix:uid:x], nodes: [n]}]",
            r"entries\[0\]\.selectors\[0\]",
        ),
        (
            "entries: [{spiffe_id: 'spiffe://example.org/x', selectors: [], nodes: [n]}]",
            "at least one selector",
        ),
        (
            "entries: [{spiffe_id: 'spiffe://example.org/x', selectors: [unix:uid:1], nodes: [n],"
            " ttl: 48h}]",
            "at most",
        ),
        (
            "entries: [{spiffe_id: 'spiffe://example.org/x', selectors: [unix:uid:1], nodes: [n],"
            " ttl: soon}]",
            r"entries\[0\]\.ttl",
        ),
        (
            "entries: [{spiffe_id: 'spiffe://other.org/x', selectors: [unix:uid:1], nodes: [n]}]",
            "outside trust domain example.org",
        ),
        (
            "entries: [{spiffe_id: 'spiffe://example.org/trellis/agent/n', selectors: [unix:uid:1],"
            " nodes: [n]}]",
            "reserved",
        ),
        (
            "entries: [{spiffe_id: 'spiffe://example.org/x', selectors: [unix:uid:1], nodes: [n],"
            " dns_names: [trellis-ca]}]",
            "reserved",
        ),
        (
            "entries: [{id: a, spiffe_id: 'spiffe://example.org/x', selectors: [unix:uid:1],"
            " nodes: [n]}, {id: a, spiffe_id: 'spiffe://example.org/y', selectors: [unix:uid:2],"
            " nodes: [n]}]",
            "used twice",
        ),
    ],
)
def test_malformed_entry_documents_fail_with_a_clear_location(
    document: str, complaint: str
) -> None:
    with pytest.raises(EntryError, match=complaint) as refused:
        parse_entries_yaml(document, trust_domain=TrustDomain("example.org"), source="e.yaml")
    assert str(refused.value).startswith("e.yaml: ")


def test_yaml_file_source_reloads_on_change_and_keeps_the_last_good_set(tmp_path: Path) -> None:
    path = tmp_path / "entries.yaml"
    path.write_text(ENTRIES_YAML)
    source = YamlFileEntrySource(path)
    first = source.current()
    assert source.refresh(0.0) is None and source.current() is first

    path.write_text(ENTRIES_YAML.replace("node-a]", "node-a, node-c]"))
    os.utime(path, ns=(1, 1))  # an mtime change even within one clock tick
    assert source.refresh(0.0) is None
    assert source.current().revision != first.revision
    assert source.current().get("web") is not None
    assert source.current().get("web").runs_on("node-c")  # type: ignore[union-attr]

    good = source.current()
    path.write_text("entries: [{spiffe_id: 12}]")
    error = source.refresh(0.0)
    assert isinstance(error, EntryError) and "entries[0].spiffe_id" in str(error)
    assert source.current() is good


def test_a_broken_file_at_start_is_an_error_not_an_empty_entry_set(tmp_path: Path) -> None:
    path = tmp_path / "entries.yaml"
    path.write_text("entries: [{spiffe_id: spiffe://example.org/x, selectors: [nope]}]")
    with pytest.raises(EntryError, match=r"entries\.yaml: entries"):
        YamlFileEntrySource(path)
    with pytest.raises(EntryError, match="cannot read"):
        YamlFileEntrySource(tmp_path / "missing.yaml")


def test_static_source_is_replaceable_for_the_operator_feed() -> None:
    source = StaticEntrySource()
    assert len(source.current()) == 0
    source.replace(parse_entries_yaml(ENTRIES_YAML))
    assert len(source.current()) == 3


_HINT_ENTRY = "entries: [{id: a, spiffe_id: 'spiffe://example.org/x', selectors: [unix:uid:1], nodes: [n], hint: %s}]"  # noqa: E501


def test_a_hint_parses_round_trips_and_changes_the_revision() -> None:
    with_hint = parse_entries_yaml(_HINT_ENTRY % "'internal mTLS'")
    (entry,) = with_hint.entries
    assert entry.hint == "internal mTLS"
    assert EntrySet((RegistrationEntry.create(**_create_args(entry)),)).revision == (
        with_hint.revision
    )
    assert parse_entries_yaml(_HINT_ENTRY % "''").entries[0].hint == ""
    assert parse_entries_yaml(_HINT_ENTRY % "other").revision != with_hint.revision
    without = parse_entries_yaml(_HINT_ENTRY.replace(", hint: %s", ""))
    assert without.entries[0].hint == "" and "hint" not in without.entries[0].to_dict()


def _create_args(entry: RegistrationEntry) -> dict[str, object]:
    doc = entry.to_dict()
    return {
        "spiffe_id": doc["spiffe_id"],
        "selectors": doc["selectors"],
        "nodes": doc["nodes"],
        "entry_id": doc["id"],
        "hint": doc["hint"],
    }


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        ("17", "hint: expected a string"),
        ("[a, b]", "hint: expected a string"),
        ("'" + "h" * 129 + "'", "hint: 129 characters; at most 128"),
        ('"two\\nlines"', "must be printable"),
        ('"bell\\a"', "must be printable"),
        ('"\\u200binvisible"', "must be printable"),
        ("' padded'", "without leading or trailing spaces"),
    ],
)
def test_a_bad_hint_is_refused_naming_the_entry(value: str, complaint: str) -> None:
    with pytest.raises(EntryError) as refused:
        parse_entries_yaml(_HINT_ENTRY % value, source="e.yaml")
    message = str(refused.value)
    assert message.startswith("e.yaml: entries[0].hint: ") and complaint in message
    assert "\n" not in message
