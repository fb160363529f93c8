"""Defences of the Workload API that an adversarial probe found holding, kept holding.

All over the agent's real Unix socket with raw grpcio clients, the agent in-process with
an in-process CA behind it (``InProcessUpstream``: the CA's gRPC side has its own tests in
``tests/ca/server``). The security-header and attestation refusals and the oversized
request are in ``test_workload_api.py``; here: many streams from one client, the exact
message-size boundary, and one case per JWT-SVID attack through ValidateJWTSVID.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from cryptography.hazmat.primitives import hashes, hmac, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from ca import JwtAuthority, RootAuthority, SpiffeId, TrustBundle, TrustDomain
from ca.agent import Agent
from ca.agent.workload_api import MAX_REQUEST_BYTES
from ca.jwk import b64url
from ca.jwtsvid import MAX_TOKEN_BYTES
from ca.workload import HEADER_KEY, HEADER_VALUE, method_path, workload_pb2
from tests.ca.agent.conftest import WEB, LiveCa, entry, make_upstream, run, running_agent
from tests.ca.test_jwtsvid import P256_ORDER

HEADER = ((HEADER_KEY, HEADER_VALUE),)
pb = workload_pb2
PARTNER = TrustDomain("partner.org")
STREAMS = 200


def _x509_stream(channel: grpc.aio.Channel) -> Any:
    return channel.unary_stream(
        method_path("FetchX509SVID"),
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=pb.X509SVIDResponse.FromString,
    )(pb.X509SVIDRequest(), timeout=60, metadata=HEADER)


async def _validate(channel: grpc.aio.Channel, audience: str, token: str) -> Any:
    return await channel.unary_unary(
        method_path("ValidateJWTSVID"),
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=pb.ValidateJWTSVIDResponse.FromString,
    )(pb.ValidateJWTSVIDRequest(audience=audience, svid=token), timeout=10, metadata=HEADER)


# -- refusals on every method ---------------------------------------------------------------

METHODS: list[tuple[str, Any, Any, bool]] = [
    ("FetchX509SVID", pb.X509SVIDRequest(), pb.X509SVIDResponse, True),
    ("FetchX509Bundles", pb.X509BundlesRequest(), pb.X509BundlesResponse, True),
    ("FetchJWTBundles", pb.JWTBundlesRequest(), pb.JWTBundlesResponse, True),
    ("FetchJWTSVID", pb.JWTSVIDRequest(audience=["db"]), pb.JWTSVIDResponse, False),
    (
        "ValidateJWTSVID",
        pb.ValidateJWTSVIDRequest(audience="db", svid="a.b.c"),
        pb.ValidateJWTSVIDResponse,
        False,
    ),
]


async def _call_each_method(
    channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]
) -> dict[str, tuple[grpc.StatusCode, str]]:
    answers = {}
    for method, request, response_type, streaming in METHODS:
        kind = channel.unary_stream if streaming else channel.unary_unary
        call = kind(
            method_path(method),
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_type.FromString,
        )(request, timeout=10, metadata=metadata)
        try:
            if streaming:
                await call.read()
                call.cancel()
                answers[method] = (grpc.StatusCode.OK, "")
                continue
            await call
            answers[method] = (grpc.StatusCode.OK, "")
        except grpc.aio.AioRpcError as exc:
            answers[method] = (exc.code(), exc.details() or "")
    return answers


def test_every_method_refuses_a_call_without_the_security_header(
    live_ca: LiveCa, short_dir: Path
) -> None:
    async def main() -> dict[str, tuple[grpc.StatusCode, str]]:
        async with (
            running_agent(make_upstream(live_ca, [entry()]), short_dir) as agent,
            grpc.aio.insecure_channel(f"unix:{agent.config.socket_path}") as channel,
        ):
            return await _call_each_method(channel, (("workload.spiffe.io", "TRUE "),))

    answers = run(main())
    assert set(answers) == {m for m, *_ in METHODS}
    for method, (code, details) in answers.items():
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, code, details)
        assert "security header" in details, (method, details)


def test_every_method_refuses_a_caller_with_no_identity_on_this_node(
    live_ca: LiveCa, short_dir: Path
) -> None:
    # The only entry is for another uid: to this caller, bundles and validation are as
    # closed as SVIDs (allow_unauthenticated_verifiers is off by default).
    someone_else = entry(selectors=[f"unix:uid:{os.getuid() + 4242}"])

    async def main() -> dict[str, tuple[grpc.StatusCode, str]]:
        async with (
            running_agent(make_upstream(live_ca, [someone_else]), short_dir) as agent,
            grpc.aio.insecure_channel(f"unix:{agent.config.socket_path}") as channel,
        ):
            return await _call_each_method(channel, HEADER)

    for method, (code, details) in run(main()).items():
        assert code == grpc.StatusCode.PERMISSION_DENIED, (method, code, details)
        assert "no identity issued" in details, (method, details)


# -- many streams, message size -------------------------------------------------------------


def test_two_hundred_concurrent_svid_streams_from_one_client_are_all_served_and_a_new_caller_too(
    live_ca: LiveCa, short_dir: Path
) -> None:
    async def main() -> tuple[list[str], float | None, str]:
        async with (
            running_agent(make_upstream(live_ca, [entry()]), short_dir) as agent,
            grpc.aio.insecure_channel(f"unix:{agent.config.socket_path}") as channel,
        ):
            streams = [_x509_stream(channel) for _ in range(STREAMS)]
            try:
                firsts = await asyncio.wait_for(asyncio.gather(*(s.read() for s in streams)), 60)
                open_now = agent.metrics.registry.get_sample_value(
                    "trellis_agent_workload_api_streams"
                )
                # All 200 still open: a new caller on its own connection is served at once.
                async with grpc.aio.insecure_channel(
                    f"unix:{agent.config.socket_path}",
                    options=[("grpc.use_local_subchannel_pool", 1)],
                ) as fresh:
                    newcomer = _x509_stream(fresh)
                    late = await asyncio.wait_for(newcomer.read(), 10)
                    newcomer.cancel()
            finally:
                for stream in streams:
                    stream.cancel()
            ids = [m.svids[0].spiffe_id for m in firsts if m is not grpc.aio.EOF and m.svids]
            return ids, open_now, late.svids[0].spiffe_id

    ids, open_now, late = run(main(), timeout=120)
    assert ids == [WEB] * STREAMS
    assert open_now == STREAMS
    assert late == WEB


def test_a_request_one_byte_over_64_kib_is_resource_exhausted_and_the_agent_keeps_serving(
    live_ca: LiveCa, short_dir: Path
) -> None:
    """The limit is grpcio's receive limit (``MAX_REQUEST_BYTES``): a message of exactly
    the limit gets through to the handler (which refuses the token as too large, with its
    reason), one byte more never reaches it."""

    def request_of(size: int) -> pb.ValidateJWTSVIDRequest:
        request = pb.ValidateJWTSVIDRequest(audience="db", svid="")
        request.svid = "x" * (size - request.ByteSize() - 4)  # tag and 3-byte length
        assert request.ByteSize() == size
        return request

    async def main() -> tuple[Any, Any, int]:
        async with (
            running_agent(make_upstream(live_ca, [entry()]), short_dir) as agent,
            grpc.aio.insecure_channel(f"unix:{agent.config.socket_path}") as channel,
        ):
            answers = []
            for size in (MAX_REQUEST_BYTES, MAX_REQUEST_BYTES + 1):
                request = request_of(size)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await _validate(channel, request.audience, request.svid)
                answers.append((info.value.code(), info.value.details()))
            stream = _x509_stream(channel)
            served = await asyncio.wait_for(stream.read(), 10)
            stream.cancel()
            return answers[0], answers[1], len(served.svids)

    at_limit, over, served = run(main())
    assert at_limit[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert "[too-large]" in at_limit[1]
    assert over[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert served == 1


# -- JWT-SVID attacks through ValidateJWTSVID ---------------------------------------------


@dataclass(frozen=True)
class Keys:
    """Who can sign what: the agent's own JWT key, a federated partner's, an attacker's."""

    ours: JwtAuthority
    partner: JwtAuthority
    attacker: JwtAuthority
    now: dt.datetime


def _enc(value: Any) -> str:
    return b64url(json.dumps(value).encode())


def _es256(key: JwtAuthority, signing_input: str, *, high_s: bool = False) -> str:
    private = key.private_key
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    r, s = decode_dss_signature(private.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    s = min(s, P256_ORDER - s)
    if high_s:
        s = P256_ORDER - s
    return b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def _signed(key: JwtAuthority, header_json: str, claims_json: str) -> str:
    """Header and claims spelled verbatim (duplicate members survive), ES256-signed."""
    signing_input = f"{b64url(header_json.encode())}.{b64url(claims_json.encode())}"
    return f"{signing_input}.{_es256(key, signing_input)}"


def _claims(k: Keys, **over: Any) -> dict[str, Any]:
    start = int(k.now.timestamp())
    claims: dict[str, Any] = {"sub": WEB, "aud": "db", "iat": start, "exp": start + 300}
    claims.update(over)
    return {name: value for name, value in claims.items() if value is not None}


def _token(key: JwtAuthority, claims: dict[str, Any], **header: Any) -> str:
    head = {"alg": "ES256", "kid": key.key_id, "typ": "JWT", **header}
    head = {name: value for name, value in head.items() if value is not None}
    return _signed(key, json.dumps(head), json.dumps(claims))


def _valid(k: Keys) -> str:
    return k.ours.sign(WEB, ["db"], now=k.now).token


def _hs256_with_public_key(k: Keys) -> str:
    # The classic key-confusion attack: HMAC keyed with the verifier's public key PEM.
    secret = k.ours.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signing_input = f"{_enc({'alg': 'HS256', 'kid': k.ours.key_id})}.{_enc(_claims(k))}"
    mac = hmac.HMAC(secret, hashes.SHA256())
    mac.update(signing_input.encode())
    return f"{signing_input}.{b64url(mac.finalize())}"


def _tampered_claims(k: Keys) -> str:
    header, _, signature = _valid(k).split(".")
    admin = _claims(k, sub="spiffe://example.org/ns/default/sa/admin")
    return f"{header}.{_enc(admin)}.{signature}"


def _tampered_header(k: Keys) -> str:
    _, claims, signature = _valid(k).split(".")
    header = {"alg": "ES256", "kid": k.ours.key_id, "typ": "JWT", "x": 1}
    return f"{_enc(header)}.{claims}.{signature}"


def _truncated_signature(k: Keys) -> str:
    return _valid(k)[:-8]


def _duplicate_sub_appended(k: Keys) -> str:
    # A second "sub" appended to a genuine token's claims: a last-member-wins parser reads
    # the admin ID, a first-member-wins one the original; the signature covers neither.
    header, claims, signature = _valid(k).split(".")
    raw = base64.urlsafe_b64decode(claims + "==").decode()
    doubled = raw[:-1] + ',"sub":"spiffe://example.org/ns/default/sa/admin"}'
    return f"{header}.{b64url(doubled.encode())}.{signature}"


def _duplicate_alg_header(k: Keys) -> str:
    header = f'{{"alg":"ES256","kid":"{k.ours.key_id}","alg":"none"}}'
    return f"{b64url(header.encode())}.{_enc(_claims(k))}."


def _high_s_twin(k: Keys) -> str:
    token = _valid(k)
    signing_input, _, signature = token.rpartition(".")
    raw = base64.urlsafe_b64decode(signature + "==")
    twin = (P256_ORDER - int.from_bytes(raw[32:], "big")).to_bytes(32, "big")
    return f"{signing_input}.{b64url(raw[:32] + twin)}"


def _attacker_signs_under_our_kid(k: Keys) -> str:
    signing_input = f"{_enc({'alg': 'ES256', 'kid': k.ours.key_id})}.{_enc(_claims(k))}"
    return f"{signing_input}.{_es256(k.attacker, signing_input)}"


def _embedded_jwk(k: Keys) -> str:
    # CVE-2018-0114 style: the token carries the key that is to verify it.
    public = k.attacker.public_key
    assert isinstance(public, ec.EllipticCurvePublicKey)
    numbers = public.public_numbers()
    jwk = {
        "kty": "EC",
        "crv": "P-256",
        "x": b64url(numbers.x.to_bytes(32, "big")),
        "y": b64url(numbers.y.to_bytes(32, "big")),
    }
    return _token(k.attacker, _claims(k), jwk=jwk)


def _oversized(k: Keys) -> str:
    return _token(k.ours, _claims(k, pad="p" * MAX_TOKEN_BYTES))


# (name, forge, reason in the refusal's details)
ATTACKS: list[tuple[str, Callable[[Keys], str], str]] = [
    (
        "alg none, unsigned",
        lambda k: f"{_enc({'alg': 'none'})}.{_enc(_claims(k))}.",
        "unsupported-algorithm",
    ),
    ("HS256 keyed with our public key", _hs256_with_public_key, "unsupported-algorithm"),
    (
        "RS256 header over our EC key",
        lambda k: _token(k.ours, _claims(k), alg="RS256"),
        "key-mismatch",
    ),
    ("no kid", lambda k: _token(k.ours, _claims(k), kid=None), "unknown-key"),
    ("unknown kid", lambda k: _token(k.attacker, _claims(k)), "unknown-key"),
    (
        "kid of the federated partner for our ID",
        lambda k: _token(k.partner, _claims(k)),
        "unknown-key",
    ),
    ("attacker key under our kid", _attacker_signs_under_our_kid, "bad-signature"),
    (
        "expired",
        lambda k: _token(
            k.ours, _claims(k, iat=int(k.now.timestamp()) - 600, exp=int(k.now.timestamp()) - 1)
        ),
        "expired",
    ),
    (
        "not yet valid",
        lambda k: _token(
            k.ours, _claims(k, nbf=int(k.now.timestamp()) + 600, exp=int(k.now.timestamp()) + 900)
        ),
        "not-yet-valid",
    ),
    ("no exp", lambda k: _token(k.ours, _claims(k, exp=None)), "missing-expiry"),
    ("wrong audience", lambda k: _token(k.ours, _claims(k, aud="cache")), "wrong-audience"),
    ("no aud", lambda k: _token(k.ours, _claims(k, aud=None)), "missing-audience"),
    (
        "aud list without us",
        lambda k: _token(k.ours, _claims(k, aud=["cache", "dbx", "DB"])),
        "wrong-audience",
    ),
    (
        "subject in an untrusted trust domain",
        lambda k: _token(k.ours, _claims(k, sub="spiffe://evil.org/ns/default/sa/web")),
        "unknown-trust-domain",
    ),
    (
        "subject not a SPIFFE ID",
        lambda k: _token(k.ours, _claims(k, sub="https://example.org/web")),
        "bad-subject",
    ),
    ("tampered claims", _tampered_claims, "bad-signature"),
    ("tampered header", _tampered_header, "bad-signature"),
    ("truncated signature", _truncated_signature, "bad-signature"),
    ("empty signature", lambda k: _valid(k).rpartition(".")[0] + ".", "bad-signature"),
    ("high-S twin of a genuine signature", _high_s_twin, "non-canonical-signature"),
    ("four segments", lambda k: _valid(k) + ".e30", "malformed"),
    ("bad base64 in the header", lambda k: "*" + _valid(k), "malformed"),
    ("duplicate sub appended to genuine claims", _duplicate_sub_appended, "bad-signature"),
    ("duplicate alg ending in none", _duplicate_alg_header, "unsupported-algorithm"),
    ("crit header", lambda k: _token(k.ours, _claims(k), crit=["exp"]), "malformed"),
    (
        "jku to the attacker's keys",
        lambda k: _token(k.attacker, _claims(k), jku="https://attacker.test/jwks.json"),
        "unknown-key",
    ),
    (
        "x5u to the attacker's certificate",
        lambda k: _token(k.attacker, _claims(k), x5u="https://attacker.test/cert.pem"),
        "unknown-key",
    ),
    ("embedded jwk of the attacker", _embedded_jwk, "unknown-key"),
    ("typ of another token kind", lambda k: _token(k.ours, _claims(k), typ="at+jwt"), "malformed"),
    ("over 8 KiB", _oversized, "too-large"),
]


@dataclass(frozen=True)
class Served:
    socket: str
    keys: Keys


@pytest.fixture(scope="module")
def served_agent() -> Iterator[Served]:
    """One agent for every attack case, on its own event loop in a thread (cases share
    it: each is one unary call and changes nothing). Its caller's entry federates with
    partner.org, so the partner's JWT key is trusted, for partner.org subjects only."""
    now = dt.datetime.now(dt.UTC)
    td = TrustDomain("example.org")
    root = RootAuthority.create(td, now=now)
    ours, partner, attacker = (JwtAuthority.generate() for _ in range(3))
    bundle = TrustBundle(td, (root.certificate,)).with_jwt_authority(ours.key_id, ours.public_key)
    live = LiveCa(root, root.issue_intermediate("held", now=now), ours, bundle)
    partner_root = RootAuthority.create(PARTNER, now=now)
    partner_bundle = TrustBundle(
        PARTNER, (partner_root.certificate,), {partner.key_id: partner.public_key}
    )
    upstream = make_upstream(live, [replace(entry(), federates_with=(PARTNER,))])
    upstream.set_federated([partner_bundle])
    directory = Path(tempfile.mkdtemp(prefix="tr-held-"))
    loop = asyncio.new_event_loop()
    ready: asyncio.Future[Agent] = loop.create_future()
    stop = asyncio.Event()

    async def serve() -> None:
        async with running_agent(upstream, directory) as agent:
            while PARTNER not in agent.rotator.cache.federated:
                await asyncio.sleep(0.02)
            ready.set_result(agent)
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    try:
        agent = asyncio.run_coroutine_threadsafe(asyncio.wait_for(ready, 30), loop).result(40)
        yield Served(f"unix:{agent.config.socket_path}", Keys(ours, partner, attacker, now))
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        shutil.rmtree(directory, ignore_errors=True)


def _validate_sync(served: Served, token: str) -> tuple[grpc.StatusCode, str]:
    with grpc.insecure_channel(served.socket) as channel:
        call = channel.unary_unary(
            method_path("ValidateJWTSVID"),
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.ValidateJWTSVIDResponse.FromString,
        )
        try:
            answer = call(
                pb.ValidateJWTSVIDRequest(audience="db", svid=token), timeout=10, metadata=HEADER
            )
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
        return grpc.StatusCode.OK, answer.spiffe_id


def test_the_agent_validates_genuine_tokens_of_its_own_and_its_partners_trust_domain(
    served_agent: Served,
) -> None:
    # The control for every case below: the same agent and socket accept what is genuine.
    k = served_agent.keys
    assert _validate_sync(served_agent, _valid(k)) == (grpc.StatusCode.OK, WEB)
    theirs = "spiffe://partner.org/ns/shop/sa/client"
    token = k.partner.sign(SpiffeId(theirs), ["db"], now=k.now).token
    assert _validate_sync(served_agent, token) == (grpc.StatusCode.OK, theirs)


@pytest.mark.parametrize(
    ("forge", "reason"), [(f, r) for _, f, r in ATTACKS], ids=[name for name, _, _ in ATTACKS]
)
def test_a_forged_or_broken_jwt_svid_is_invalid_argument_naming_the_reason(
    served_agent: Served, forge: Callable[[Keys], str], reason: str
) -> None:
    code, details = _validate_sync(served_agent, forge(served_agent.keys))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert f"[{reason}]" in details, details


def test_a_token_signed_by_a_key_rotated_out_of_the_bundle_is_refused_once_the_agent_has_it(
    live_ca: LiveCa, short_dir: Path
) -> None:
    retired = JwtAuthority.generate()
    both = live_ca.bundle.with_jwt_authority(retired.key_id, retired.public_key)

    async def main() -> tuple[str, tuple[grpc.StatusCode, str]]:
        upstream = make_upstream(live_ca, [entry()])
        upstream.set_bundle(both)
        async with (
            running_agent(upstream, short_dir) as agent,
            grpc.aio.insecure_channel(f"unix:{agent.config.socket_path}") as channel,
        ):
            cache = agent.rotator.cache

            async def until(check: Callable[[], bool]) -> None:
                while not check():
                    await asyncio.sleep(0.02)

            def holds_retired() -> bool:
                return cache.bundle is not None and retired.key_id in cache.bundle.jwt_authorities

            await asyncio.wait_for(until(holds_retired), 10)
            token = retired.sign(WEB, ["db"], now=dt.datetime.now(dt.UTC)).token
            before = (await _validate(channel, "db", token)).spiffe_id
            upstream.set_bundle(live_ca.bundle)  # the CA rotated the key out (or banned it)
            await asyncio.wait_for(until(lambda: not holds_retired()), 10)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _validate(channel, "db", token)
            return before, (info.value.code(), info.value.details() or "")

    before, (code, details) = run(main())
    assert before == WEB
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "[unknown-key]" in details
