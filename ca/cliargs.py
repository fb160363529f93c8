"""Argument types of the identity values every command line takes (see ``core.cliargs``)."""

from __future__ import annotations

from ca.keys import KeyAlgorithm
from ca.spiffeid import SpiffeId, TrustDomain
from core.cliargs import argument_type

__all__ = ["key_algorithm", "spiffe_id", "trust_domain"]

key_algorithm = argument_type(KeyAlgorithm.parse)
spiffe_id = argument_type(SpiffeId)
trust_domain = argument_type(TrustDomain)
