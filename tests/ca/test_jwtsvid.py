"""JWT-SVIDs: signing, validation, and every way a token can be refused."""

from __future__ import annotations

import base64
import datetime as dt
import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import grpc
import grpc.aio
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from ca import (
    JwtAuthority,
    JwtSvidError,
    KeyAlgorithm,
    RootAuthority,
    TrustBundle,
    TrustDomain,
    validate_jwt_svid,
)
from ca.jwk import b64url, jwk_thumbprint
from ca.jwtsvid import _ORDERS, CLOCK_SKEW_LEEWAY, MAX_JSON_DEPTH, MAX_TOKEN_BYTES
from ca.keys import PublicKey
from ca.workload import HEADER_KEY, HEADER_VALUE, method_path, workload_pb2
from tests.ca.agent.conftest import LiveCa, entry, make_upstream, run, running_agent

WEB = "spiffe://example.org/ns/default/sa/web"
TD = TrustDomain("example.org")


@pytest.fixture(scope="module")
def authority() -> JwtAuthority:
    return JwtAuthority.generate()


def keys_for(*authorities: JwtAuthority, td: TrustDomain = TD):  # type: ignore[no-untyped-def]
    table = {a.key_id: a.public_key for a in authorities}

    def lookup(trust_domain: TrustDomain) -> Mapping[str, PublicKey] | None:
        return table if trust_domain == td else None

    return lookup


def forge(header: dict, claims: dict, signature: bytes = b"x") -> str:  # type: ignore[type-arg]
    enc = lambda v: b64url(json.dumps(v).encode())  # noqa: E731
    return f"{enc(header)}.{enc(claims)}.{b64url(signature)}"


def test_signed_token_validates_with_es256_kid_and_default_five_minutes(
    authority: JwtAuthority, now: dt.datetime
) -> None:
    svid = authority.sign(WEB, ["db"], now=now)
    header = json.loads(base64.urlsafe_b64decode(svid.token.split(".")[0] + "=="))
    assert header == {"alg": "ES256", "kid": authority.key_id, "typ": "JWT"}
    assert svid.expiry == now + dt.timedelta(minutes=5)
    validated = validate_jwt_svid(svid.token, "db", keys_for(authority), now=now)
    assert str(validated.spiffe_id) == WEB
    assert validated.audience == ("db",)
    assert validated.claims["iat"] == int(now.timestamp())


def test_kid_is_the_rfc7638_thumbprint(authority: JwtAuthority) -> None:
    assert authority.key_id == jwk_thumbprint(authority.public_key)
    assert len(authority.key_id) == 43


def test_multiple_audiences_are_a_list(authority: JwtAuthority, now: dt.datetime) -> None:
    svid = authority.sign(WEB, ["db", "cache"], now=now)
    assert validate_jwt_svid(svid.token, "cache", keys_for(authority), now=now).audience == (
        "db",
        "cache",
    )


def test_expired_token_is_refused(authority: JwtAuthority, now: dt.datetime) -> None:
    token = authority.sign(WEB, ["db"], now=now).token
    with pytest.raises(JwtSvidError) as info:
        validate_jwt_svid(token, "db", keys_for(authority), now=now + dt.timedelta(minutes=5))
    assert info.value.reason == "expired"


def test_wrong_audience_is_refused(authority: JwtAuthority, now: dt.datetime) -> None:
    token = authority.sign(WEB, ["db"], now=now).token
    with pytest.raises(JwtSvidError) as info:
        validate_jwt_svid(token, "cache", keys_for(authority), now=now)
    assert info.value.reason == "wrong-audience"


def test_audience_is_required_when_signing(authority: JwtAuthority, now: dt.datetime) -> None:
    with pytest.raises(JwtSvidError) as info:
        authority.sign(WEB, [], now=now)
    assert info.value.reason == "missing-audience"


def test_unknown_key_and_foreign_trust_domain_are_refused(
    authority: JwtAuthority, now: dt.datetime
) -> None:
    token = authority.sign(WEB, ["db"], now=now).token
    with pytest.raises(JwtSvidError) as info:
        validate_jwt_svid(token, "db", keys_for(JwtAuthority.generate()), now=now)
    assert info.value.reason == "unknown-key"
    with pytest.raises(JwtSvidError) as info:
        validate_jwt_svid(token, "db", keys_for(authority, td=TrustDomain("other.test")), now=now)
    assert info.value.reason == "unknown-trust-domain"


def test_tampered_claims_fail_the_signature(authority: JwtAuthority, now: dt.datetime) -> None:
    header, claims, sig = authority.sign(WEB, ["db"], now=now).token.split(".")
    decoded = json.loads(base64.urlsafe_b64decode(claims + "=="))
    decoded["sub"] = "spiffe://example.org/ns/default/sa/admin"
    tampered = f"{header}.{b64url(json.dumps(decoded).encode())}.{sig}"
    with pytest.raises(JwtSvidError) as info:
        validate_jwt_svid(tampered, "db", keys_for(authority), now=now)
    assert info.value.reason == "bad-signature"


@pytest.mark.parametrize("alg", ["none", "HS256", "", None])
def test_alg_none_and_hmac_are_refused(
    alg: str | None, authority: JwtAuthority, now: dt.datetime
) -> None:
    token = forge(
        {"alg": alg, "kid": authority.key_id}, {"sub": WEB, "aud": "db", "exp": 2**40}, b""
    )
    with pytest.raises(JwtSvidError) as info:
        validate_jwt_svid(token, "db", keys_for(authority), now=now)
    assert info.value.reason == "unsupported-algorithm"


@pytest.mark.parametrize(
    "token",
    ["", "a.b", "a.b.c.d", "!!!.???.***", forge({"alg": "ES256"}, [], b"")],  # type: ignore[arg-type]
)
def test_malformed_tokens_are_refused(
    token: str, authority: JwtAuthority, now: dt.datetime
) -> None:
    with pytest.raises(JwtSvidError) as info:
        validate_jwt_svid(token, "db", keys_for(authority), now=now)
    assert info.value.reason == "malformed"


def test_oversized_token_is_refused_before_decoding(
    authority: JwtAuthority, now: dt.datetime
) -> None:
    with pytest.raises(JwtSvidError) as info:
        validate_jwt_svid("a" * (MAX_TOKEN_BYTES + 1), "db", keys_for(authority), now=now)
    assert info.value.reason == "too-large"


def test_subject_must_be_a_spiffe_id(authority: JwtAuthority, now: dt.datetime) -> None:
    token = forge(
        {"alg": "ES256", "kid": authority.key_id}, {"sub": "web", "aud": "db", "exp": 2**40}
    )
    with pytest.raises(JwtSvidError) as info:
        validate_jwt_svid(token, "db", keys_for(authority), now=now)
    assert info.value.reason == "bad-subject"


def test_key_of_the_wrong_type_for_alg_is_refused(
    authority: JwtAuthority, now: dt.datetime
) -> None:
    token = forge(
        {"alg": "RS256", "kid": authority.key_id}, {"sub": WEB, "aud": "db", "exp": 2**40}
    )
    with pytest.raises(JwtSvidError) as info:
        validate_jwt_svid(token, "db", keys_for(authority), now=now)
    assert info.value.reason == "key-mismatch"


def test_rs256_and_ps256_tokens_from_other_issuers_validate(now: dt.datetime) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    kid = "rsa-1"
    claims = {"sub": WEB, "aud": ["db"], "exp": int(now.timestamp()) + 60}
    for alg, pad in (
        ("RS256", padding.PKCS1v15()),
        ("PS256", padding.PSS(padding.MGF1(hashes.SHA256()), 32)),
    ):
        enc = lambda v: b64url(json.dumps(v).encode())  # noqa: E731
        signing_input = f"{enc({'alg': alg, 'kid': kid})}.{enc(claims)}"
        signature = key.sign(signing_input.encode(), pad, hashes.SHA256())
        token = f"{signing_input}.{b64url(signature)}"
        lookup = lambda td: {kid: key.public_key()}  # noqa: E731
        assert str(validate_jwt_svid(token, "db", lookup, now=now).spiffe_id) == WEB


def test_jwt_authority_refuses_non_ecdsa_keys() -> None:
    with pytest.raises(ValueError):
        JwtAuthority.from_key(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    assert JwtAuthority.from_key(ec.generate_private_key(ec.SECP384R1())).algorithm == "ES384"


# -- what an adversarial probe sent (issue 12) ----------------------------------------------


def sign_raw(authority: JwtAuthority, claims_json: str) -> str:
    """A token whose claims are ``claims_json`` verbatim, validly signed by ``authority``
    (so every refusal below is about the claims, not the signature)."""
    header = b64url(json.dumps({"alg": "ES256", "kid": authority.key_id}).encode())
    signing_input = f"{header}.{b64url(claims_json.encode())}"
    key = authority.private_key
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    s = min(s, P256_ORDER - s)
    return f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def claims_with(now: dt.datetime, **raw: str) -> str:
    """Claims JSON with the given members spelled exactly as given (``NaN``, ``1e300``)."""
    members = {
        "sub": json.dumps(WEB),
        "aud": '"db"',
        "exp": str(int(now.timestamp()) + 60),
        **raw,
    }
    return "{" + ",".join(f'"{name}":{value}' for name, value in members.items()) + "}"


P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


@pytest.mark.parametrize(
    "exp", ["1e300", "1e400", "Infinity", "-Infinity", "NaN", "1" + "0" * 400, "true", "-1"]
)
def test_an_absurd_expiry_is_refused_with_a_reason_not_an_overflow(
    exp: str, authority: JwtAuthority, now: dt.datetime
) -> None:
    token = sign_raw(authority, claims_with(now, exp=exp))
    with pytest.raises(JwtSvidError) as info:
        validate_jwt_svid(token, "db", keys_for(authority), now=now)
    assert info.value.reason in ("bad-claim", "malformed")


def test_a_future_nbf_is_refused_beyond_the_clock_skew_leeway(
    authority: JwtAuthority, now: dt.datetime
) -> None:
    start = int(now.timestamp())
    later = sign_raw(authority, claims_with(now, nbf=str(start + 45), exp=str(start + 300)))
    with pytest.raises(JwtSvidError) as info:
        validate_jwt_svid(later, "db", keys_for(authority), now=now)
    assert info.value.reason == "not-yet-valid"
    assert dt.timedelta(seconds=45) > CLOCK_SKEW_LEEWAY
    # Within the leeway (a validator's clock a little behind the issuer's) it is accepted,
    # and once nbf has passed, of course.
    skewed = sign_raw(authority, claims_with(now, nbf=str(start + 10)))
    assert str(validate_jwt_svid(skewed, "db", keys_for(authority), now=now).spiffe_id) == WEB
    assert validate_jwt_svid(later, "db", keys_for(authority), now=now + dt.timedelta(minutes=1))


@pytest.mark.parametrize(
    ("member", "value", "reason"),
    [
        ("iat", "{start_plus_hour}", "issued-in-future"),
        ("iat", "true", "bad-claim"),
        ("nbf", "false", "bad-claim"),
        ("nbf", '"0"', "bad-claim"),
        ("nbf", "null", "bad-claim"),
        ("exp", "true", "bad-claim"),
    ],
)
def test_time_claims_of_the_wrong_type_or_from_the_future_are_refused(
    member: str, value: str, reason: str, authority: JwtAuthority, now: dt.datetime
) -> None:
    value = value.format(start_plus_hour=int(now.timestamp()) + 3600)
    exp = {"exp": str(int(now.timestamp()) + 7200)} if member != "exp" else {}
    token = sign_raw(authority, claims_with(now, **exp, **{member: value}))
    with pytest.raises(JwtSvidError) as info:
        validate_jwt_svid(token, "db", keys_for(authority), now=now)
    assert info.value.reason == reason


def test_the_high_s_twin_of_a_valid_signature_is_refused(
    authority: JwtAuthority, now: dt.datetime
) -> None:
    token = authority.sign(WEB, ["db"], now=now).token
    signing_input, _, signature = token.rpartition(".")
    raw = base64.urlsafe_b64decode(signature + "==")
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    twin = (P256_ORDER - s).to_bytes(32, "big")
    # The twin is a valid ECDSA signature of the same bytes: the attack is real ...
    public_key = authority.public_key
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    public_key.verify(
        encode_dss_signature(r, P256_ORDER - s), signing_input.encode(), ec.ECDSA(hashes.SHA256())
    )
    malleated = f"{signing_input}.{b64url(raw[:32] + twin)}"
    assert malleated != token
    # ... and only one of the two strings is accepted for the token.
    assert validate_jwt_svid(token, "db", keys_for(authority), now=now)
    with pytest.raises(JwtSvidError) as info:
        validate_jwt_svid(malleated, "db", keys_for(authority), now=now)
    assert info.value.reason == "non-canonical-signature"


@pytest.mark.parametrize("algorithm", [KeyAlgorithm.P256, KeyAlgorithm.P384])
def test_trellis_signs_only_low_s_so_strict_validators_accept_its_tokens(
    algorithm: KeyAlgorithm, now: dt.datetime
) -> None:
    signer = JwtAuthority.generate(algorithm)
    size = 32 if algorithm is KeyAlgorithm.P256 else 48
    order = _ORDERS["secp256r1" if size == 32 else "secp384r1"]
    # ECDSA's s is uniform: 48 signatures all low-S by chance is a 2**-48 event.
    for index in range(48):
        token = signer.sign(WEB, [f"aud-{index}"], now=now).token
        raw = base64.urlsafe_b64decode(token.rpartition(".")[2] + "==")
        assert int.from_bytes(raw[size:], "big") <= order // 2
        validate_jwt_svid(token, f"aud-{index}", keys_for(signer), now=now)


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 2900])
def test_deeply_nested_json_is_refused_as_malformed_not_a_recursion_error(
    depth: int, authority: JwtAuthority, now: dt.datetime
) -> None:
    nested = "[" * depth + "]" * depth
    token = sign_raw(authority, claims_with(now, deep=nested))
    assert len(token) <= MAX_TOKEN_BYTES
    with pytest.raises(JwtSvidError) as info:
        validate_jwt_svid(token, "db", keys_for(authority), now=now)
    assert info.value.reason == "malformed"
    assert "nests deeper" in str(info.value)


def test_the_agent_answers_invalid_argument_with_the_reason_for_an_absurd_expiry(
    tmp_path: Path,
) -> None:
    """ValidateJWTSVID over the agent's real Workload API socket (agent in-process, CA
    in-process behind it, client raw grpcio): a refusal is INVALID_ARGUMENT naming the
    reason, never UNKNOWN from an exception the handler did not expect."""
    now = dt.datetime.now(dt.UTC)
    root = RootAuthority.create(TD, now=now)
    jwt = JwtAuthority.generate()
    bundle = TrustBundle(TD, (root.certificate,)).with_jwt_authority(jwt.key_id, jwt.public_key)
    live = LiveCa(root, root.issue_intermediate("jwt-tests", now=now), jwt, bundle)
    socket_dir = Path(tempfile.mkdtemp(prefix="tr-jwt-"))
    tokens = {exp: sign_raw(jwt, claims_with(now, exp=exp)) for exp in ("1e300", "Infinity", "NaN")}

    async def main() -> dict[str, tuple[grpc.StatusCode, str]]:
        answers = {}
        async with (
            running_agent(make_upstream(live, [entry()]), socket_dir) as agent,
            grpc.aio.insecure_channel(f"unix:{agent.config.socket_path}") as channel,
        ):
            validate = channel.unary_unary(
                method_path("ValidateJWTSVID"),
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=workload_pb2.ValidateJWTSVIDResponse.FromString,
            )
            for exp, token in tokens.items():
                request = workload_pb2.ValidateJWTSVIDRequest(audience="db", svid=token)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await validate(request, timeout=10, metadata=((HEADER_KEY, HEADER_VALUE),))
                answers[exp] = (info.value.code(), info.value.details() or "")
        return answers

    try:
        answers = run(main())
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)
    for exp, (code, details) in answers.items():
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (exp, code, details)
        assert "[bad-claim]" in details or "[malformed]" in details, (exp, details)
