"""The upstreams list has one grammar: the injector accepts exactly the annotations the
sidecar's ``--upstreams`` accepts, passes them on in canonical form, and the sidecar reads
the same entries back."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import FieldError
from mesh_operator.injection import (
    SIDECAR_NAME,
    InjectorConfig,
    UpstreamError,
    plan_injection,
)
from mesh_operator.injection import parse_upstreams as injector_parse
from meshapi.upstreams import Upstream, parse_upstreams, render_upstreams
from sidecar.config import Address, ConfigError, parse_upstreams_flag

_labels = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,10}[a-z0-9])?", fullmatch=True)
_services = st.one_of(
    st.lists(_labels, min_size=1, max_size=4).map(".".join),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)
_ports = st.integers(1, 65535)


@st.composite
def _upstream_lists(draw: st.DrawFn) -> tuple[Upstream, ...]:
    locals_ = draw(st.lists(_ports, min_size=1, max_size=5, unique=True))
    return tuple(Upstream(draw(_services), draw(_ports), local) for local in locals_)


@settings(max_examples=200, deadline=None)
@given(_upstream_lists())
def test_rendered_upstreams_parse_back_to_the_same_entries(entries: tuple[Upstream, ...]) -> None:
    assert parse_upstreams(render_upstreams(entries), "upstreams") == entries


@settings(max_examples=200, deadline=None)
@given(_upstream_lists())
def test_canonical_text_renders_back_unchanged(entries: tuple[Upstream, ...]) -> None:
    canonical = render_upstreams(entries)
    assert render_upstreams(parse_upstreams(canonical, "upstreams")) == canonical


def test_blanks_and_leading_zeros_are_not_canonical_and_go() -> None:
    entries = parse_upstreams(" api.default:08080=9001 ,, [::1]:443=09002 ", "upstreams")
    assert entries == (("api.default", 8080, 9001), ("::1", 443, 9002))
    assert render_upstreams(entries) == "api.default:8080=9001,[::1]:443=9002"


def _sidecar_args(annotation: str) -> list[str]:
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "app", "annotations": {"trellis.dev/upstreams": annotation}},
        "spec": {"containers": [{"name": "app", "image": "app"}]},
    }
    patch = plan_injection(pod, InjectorConfig()).patch
    containers = next(op["value"] for op in patch if op["path"] == "/spec/initContainers")
    (sidecar,) = [c for c in containers if c["name"] == SIDECAR_NAME]
    return list(sidecar["args"])


def test_the_injector_passes_the_annotation_on_as_the_flag_the_sidecar_reads_back() -> None:
    args = _sidecar_args(" api.default:8080=9001, [fd00::7]:5432=9002 ")
    (flag,) = [a.removeprefix("--upstreams=") for a in args if a.startswith("--upstreams=")]
    assert flag == "api.default:8080=9001,[fd00::7]:5432=9002"
    api, db = parse_upstreams_flag(flag, 15008)
    assert (api.listen, api.target, api.endpoints) == (
        Address("127.0.0.1", 9001),
        "api.default:8080",
        (Address("api.default", 15008),),
    )
    assert (db.listen, db.target, db.endpoints) == (
        Address("127.0.0.1", 9002),
        "[fd00::7]:5432",
        (Address("fd00::7", 15008),),
    )


# Inputs the two sides used to judge differently (the sidecar took hosts the injector
# refused, the injector took names no resolver does), and the plain cases.
AGREED: list[tuple[str, str | None]] = [
    ("api.default:8080=9001", None),
    ("10.0.0.7:80=9001", None),
    ("[::1]:8080=9001", None),
    ("Api.default:8080=9001", "lowercase DNS name"),
    ("api_v2.default:8080=9001", "lowercase DNS name"),
    ("a..b:80=9001", "lowercase DNS name"),
    ("a.-b:80=9001", "lowercase DNS name"),
    (f"{'a' * 64}.default:80=9001", "lowercase DNS name"),
    ("[not-v6]:80=9001", "bracketed IPv6"),
    ("api:8080", "SERVICE:PORT=LOCAL_PORT"),
    ("api:8080=", "SERVICE:PORT=LOCAL_PORT"),
    (":8080=9001", "SERVICE:PORT=LOCAL_PORT"),
    ("api:8080=123456", "SERVICE:PORT=LOCAL_PORT"),
    (f"api:{'9' * 5000}=1", "SERVICE:PORT=LOCAL_PORT"),
    ("a:70000=1", "1-65535"),
    ("a:80=0", "1-65535"),
    ("a:1=9001,b:2=9001", "used twice"),
    (" , ", "empty"),
]


def _injector_verdict(text: str) -> list[tuple[int, str]] | str:
    """What the injector makes of an annotation: (local port, CONNECT target) per entry, or
    its refusal."""
    try:
        entries = injector_parse(text)
    except UpstreamError as exc:
        return str(exc)
    return [(local, str(Address(service, port))) for service, port, local in entries]


def _sidecar_verdict(text: str) -> list[tuple[int, str]] | str:
    try:
        entries = parse_upstreams_flag(text, 15008)
    except ConfigError as exc:
        return str(exc)
    return [(u.listen.port, u.target) for u in entries]


@pytest.mark.parametrize(("text", "words"), AGREED)
def test_the_injector_and_the_sidecar_accept_and_refuse_the_same_upstreams(
    text: str, words: str | None
) -> None:
    injector, sidecar = _injector_verdict(text), _sidecar_verdict(text)
    if words is None:
        assert injector == sidecar
        assert not isinstance(sidecar, str)
    else:
        assert isinstance(injector, str) and words in injector
        assert isinstance(sidecar, str) and words in sidecar


def test_each_side_names_its_own_source_with_the_same_index() -> None:
    with pytest.raises(UpstreamError) as injector:
        injector_parse("api:80=9001,,Api:80=9002")
    with pytest.raises(ConfigError) as sidecar:
        parse_upstreams_flag("api:80=9001,,Api:80=9002", 15008)
    assert injector.value.field == "trellis.dev/upstreams[2]"
    assert sidecar.value.field == "--upstreams[2]"


def test_an_error_names_the_entry_that_is_wrong() -> None:
    with pytest.raises(FieldError) as caught:
        parse_upstreams("a:1=9001, b:2=9002, c:3=9001", "trellis.dev/upstreams")
    assert caught.value.field == "trellis.dev/upstreams[2]"
    assert "local port 9001 is used twice" in caught.value.reason
    assert "'a:1=9001'" in caught.value.reason
