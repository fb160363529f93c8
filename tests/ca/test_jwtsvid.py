"""JWT-SVIDs: signing, validation, and every way a token can be refused."""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Mapping

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from ca import JwtAuthority, JwtSvidError, TrustDomain, validate_jwt_svid
from ca.jwk import b64url, jwk_thumbprint
from ca.jwtsvid import MAX_TOKEN_BYTES
from ca.keys import PublicKey

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
