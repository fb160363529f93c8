"""The webhook certificate plan and the Lease decision, as pure functions of ``now``."""

from __future__ import annotations

import datetime as dt

from cryptography import x509

from mesh_operator.leader import LeaseRecord, decide, must_step_down
from mesh_operator.webhook_certs import (
    CA_LIFETIME,
    SERVING_LIFETIME,
    WebhookPki,
    plan_rotation,
    service_dns_names,
)

NAMES = service_dns_names("trellis-operator", "trellis-system")
T0 = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)


def bundle(pki: WebhookPki) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pki.ca_bundle)


def serving(pki: WebhookPki) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pki.tls_crt)


def test_a_fresh_certificate_names_the_service_and_chains_to_the_bundle() -> None:
    pki = plan_rotation(None, dns_names=NAMES, now=T0).pki
    leaf, (ca,) = serving(pki), bundle(pki)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == list(NAMES)
    leaf.verify_directly_issued_by(ca)
    assert leaf.not_valid_after_utc - T0 <= SERVING_LIFETIME


def test_nothing_changes_until_two_thirds_of_the_serving_life() -> None:
    pki = plan_rotation(None, dns_names=NAMES, now=T0).pki
    assert not plan_rotation(pki, dns_names=NAMES, now=T0 + dt.timedelta(days=19)).changed
    renewed = plan_rotation(pki, dns_names=NAMES, now=T0 + dt.timedelta(days=21))
    assert renewed.changed and "two thirds" in renewed.reason
    assert renewed.pki.ca_bundle == pki.ca_bundle  # same CA: the caBundle need not change
    assert serving(renewed.pki).serial_number != serving(pki).serial_number


def test_a_rotated_ca_overlaps_the_old_one_in_the_bundle_until_it_expires() -> None:
    pki = plan_rotation(None, dns_names=NAMES, now=T0).pki
    later = T0 + CA_LIFETIME * 0.7
    rotated = plan_rotation(pki, dns_names=NAMES, now=later).pki
    new_ca, old_ca = bundle(rotated)
    assert old_ca == bundle(pki)[0]
    serving(rotated).verify_directly_issued_by(new_ca)
    after_expiry = plan_rotation(rotated, dns_names=NAMES, now=T0 + CA_LIFETIME * 1.01)
    assert after_expiry.changed and bundle(after_expiry.pki) == [new_ca]


def test_changed_service_names_or_garbage_in_the_secret_reissue() -> None:
    pki = plan_rotation(None, dns_names=NAMES, now=T0).pki
    renamed = plan_rotation(pki, dns_names=("other.trellis-system.svc",), now=T0)
    assert renamed.changed and "names changed" in renamed.reason
    broken = WebhookPki(b"junk", pki.ca_key, pki.tls_crt, pki.tls_key)
    assert "could not be parsed" in plan_rotation(broken, dns_names=NAMES, now=T0).reason


def lease(holder: str | None, renewed: dt.datetime, duration: int = 15) -> LeaseRecord:
    return LeaseRecord(holder, renewed, renewed, duration, 2, "41")


def test_the_lease_is_created_renewed_taken_over_only_when_expired() -> None:
    created = decide(None, identity="a", now=T0, duration_seconds=15)
    assert created.action == "create" and created.record is not None
    assert created.record.holder == "a"
    renewed = decide(
        lease("a", T0), identity="a", now=T0 + dt.timedelta(seconds=5), duration_seconds=15
    )
    assert renewed.action == "renew" and renewed.record is not None
    assert renewed.record.resource_version == "41"  # optimistic concurrency on the write
    held = decide(
        lease("b", T0), identity="a", now=T0 + dt.timedelta(seconds=14), duration_seconds=15
    )
    assert held.action == "follow" and held.record is None
    taken = decide(
        lease("b", T0), identity="a", now=T0 + dt.timedelta(seconds=15), duration_seconds=15
    )
    assert taken.action == "acquire" and taken.record is not None
    assert taken.record.transitions == 3 and taken.record.holder == "a"


def test_a_lease_round_trips_through_its_api_form() -> None:
    record = lease("a", T0)
    obj = {"metadata": {"resourceVersion": "41"}, "spec": record.spec()}
    assert LeaseRecord.from_object(obj) == record


def test_a_leader_steps_down_before_a_follower_may_take_over() -> None:
    assert not must_step_down(T0, now=T0 + dt.timedelta(seconds=9), renew_deadline=10)
    assert must_step_down(T0, now=T0 + dt.timedelta(seconds=10), renew_deadline=10)
