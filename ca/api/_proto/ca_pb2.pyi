# mypy: disable-error-code="type-arg"
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class X509SVID(_message.Message):
    __slots__ = ("spiffe_id", "cert_chain", "expires_at")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    CERT_CHAIN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    cert_chain: _containers.RepeatedScalarFieldContainer[bytes]
    expires_at: int
    def __init__(self, spiffe_id: _Optional[str] = ..., cert_chain: _Optional[_Iterable[bytes]] = ..., expires_at: _Optional[int] = ...) -> None: ...

class Bundle(_message.Message):
    __slots__ = ("trust_domain", "spiffe_bundle_json", "x509_authorities", "sequence", "federated")
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_BUNDLE_JSON_FIELD_NUMBER: _ClassVar[int]
    X509_AUTHORITIES_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    FEDERATED_FIELD_NUMBER: _ClassVar[int]
    trust_domain: str
    spiffe_bundle_json: bytes
    x509_authorities: _containers.RepeatedScalarFieldContainer[bytes]
    sequence: int
    federated: _containers.RepeatedCompositeFieldContainer[Bundle]
    def __init__(self, trust_domain: _Optional[str] = ..., spiffe_bundle_json: _Optional[bytes] = ..., x509_authorities: _Optional[_Iterable[bytes]] = ..., sequence: _Optional[int] = ..., federated: _Optional[_Iterable[_Union[Bundle, _Mapping]]] = ...) -> None: ...

class JoinTokenAttestation(_message.Message):
    __slots__ = ("token",)
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    token: str
    def __init__(self, token: _Optional[str] = ...) -> None: ...

class K8sPsatAttestation(_message.Message):
    __slots__ = ("token",)
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    token: str
    def __init__(self, token: _Optional[str] = ...) -> None: ...

class AttestAgentRequest(_message.Message):
    __slots__ = ("join_token", "k8s_psat", "csr")
    JOIN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    K8S_PSAT_FIELD_NUMBER: _ClassVar[int]
    CSR_FIELD_NUMBER: _ClassVar[int]
    join_token: JoinTokenAttestation
    k8s_psat: K8sPsatAttestation
    csr: bytes
    def __init__(self, join_token: _Optional[_Union[JoinTokenAttestation, _Mapping]] = ..., k8s_psat: _Optional[_Union[K8sPsatAttestation, _Mapping]] = ..., csr: _Optional[bytes] = ...) -> None: ...

class AttestAgentResponse(_message.Message):
    __slots__ = ("node_name", "svid", "bundle", "max_batch")
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    SVID_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    svid: X509SVID
    bundle: Bundle
    max_batch: int
    def __init__(self, node_name: _Optional[str] = ..., svid: _Optional[_Union[X509SVID, _Mapping]] = ..., bundle: _Optional[_Union[Bundle, _Mapping]] = ..., max_batch: _Optional[int] = ...) -> None: ...

class RenewAgentRequest(_message.Message):
    __slots__ = ("csr",)
    CSR_FIELD_NUMBER: _ClassVar[int]
    csr: bytes
    def __init__(self, csr: _Optional[bytes] = ...) -> None: ...

class RenewAgentResponse(_message.Message):
    __slots__ = ("svid", "bundle", "max_batch")
    SVID_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    svid: X509SVID
    bundle: Bundle
    max_batch: int
    def __init__(self, svid: _Optional[_Union[X509SVID, _Mapping]] = ..., bundle: _Optional[_Union[Bundle, _Mapping]] = ..., max_batch: _Optional[int] = ...) -> None: ...

class X509SVIDRequest(_message.Message):
    __slots__ = ("entry_id", "csr")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    CSR_FIELD_NUMBER: _ClassVar[int]
    entry_id: str
    csr: bytes
    def __init__(self, entry_id: _Optional[str] = ..., csr: _Optional[bytes] = ...) -> None: ...

class BatchNewX509SVIDRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[X509SVIDRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[X509SVIDRequest, _Mapping]]] = ...) -> None: ...

class BatchNewX509SVIDResponse(_message.Message):
    __slots__ = ("svids",)
    SVIDS_FIELD_NUMBER: _ClassVar[int]
    svids: _containers.RepeatedCompositeFieldContainer[X509SVID]
    def __init__(self, svids: _Optional[_Iterable[_Union[X509SVID, _Mapping]]] = ...) -> None: ...

class StreamX509SVIDsRequest(_message.Message):
    __slots__ = ("id", "batch")
    ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    id: int
    batch: BatchNewX509SVIDRequest
    def __init__(self, id: _Optional[int] = ..., batch: _Optional[_Union[BatchNewX509SVIDRequest, _Mapping]] = ...) -> None: ...

class StreamX509SVIDsResponse(_message.Message):
    __slots__ = ("id", "code", "reason", "detail", "svids")
    ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    SVIDS_FIELD_NUMBER: _ClassVar[int]
    id: int
    code: int
    reason: str
    detail: str
    svids: _containers.RepeatedCompositeFieldContainer[X509SVID]
    def __init__(self, id: _Optional[int] = ..., code: _Optional[int] = ..., reason: _Optional[str] = ..., detail: _Optional[str] = ..., svids: _Optional[_Iterable[_Union[X509SVID, _Mapping]]] = ...) -> None: ...

class NewJWTSVIDRequest(_message.Message):
    __slots__ = ("entry_id", "audience")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    entry_id: str
    audience: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, entry_id: _Optional[str] = ..., audience: _Optional[_Iterable[str]] = ...) -> None: ...

class NewJWTSVIDResponse(_message.Message):
    __slots__ = ("spiffe_id", "token", "expires_at")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    token: str
    expires_at: int
    def __init__(self, spiffe_id: _Optional[str] = ..., token: _Optional[str] = ..., expires_at: _Optional[int] = ...) -> None: ...

class Entry(_message.Message):
    __slots__ = ("entry_id", "spiffe_id", "selectors", "x509_svid_ttl_seconds", "jwt_svid_ttl_seconds", "dns_names", "federates_with", "nodes", "hint")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    SELECTORS_FIELD_NUMBER: _ClassVar[int]
    X509_SVID_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    JWT_SVID_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DNS_NAMES_FIELD_NUMBER: _ClassVar[int]
    FEDERATES_WITH_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    HINT_FIELD_NUMBER: _ClassVar[int]
    entry_id: str
    spiffe_id: str
    selectors: _containers.RepeatedScalarFieldContainer[str]
    x509_svid_ttl_seconds: int
    jwt_svid_ttl_seconds: int
    dns_names: _containers.RepeatedScalarFieldContainer[str]
    federates_with: _containers.RepeatedScalarFieldContainer[str]
    nodes: _containers.RepeatedScalarFieldContainer[str]
    hint: str
    def __init__(self, entry_id: _Optional[str] = ..., spiffe_id: _Optional[str] = ..., selectors: _Optional[_Iterable[str]] = ..., x509_svid_ttl_seconds: _Optional[int] = ..., jwt_svid_ttl_seconds: _Optional[int] = ..., dns_names: _Optional[_Iterable[str]] = ..., federates_with: _Optional[_Iterable[str]] = ..., nodes: _Optional[_Iterable[str]] = ..., hint: _Optional[str] = ...) -> None: ...

class FetchEntriesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FetchEntriesResponse(_message.Message):
    __slots__ = ("entries", "revision", "max_batch", "workload_key_type")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_KEY_TYPE_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[Entry]
    revision: str
    max_batch: int
    workload_key_type: str
    def __init__(self, entries: _Optional[_Iterable[_Union[Entry, _Mapping]]] = ..., revision: _Optional[str] = ..., max_batch: _Optional[int] = ..., workload_key_type: _Optional[str] = ...) -> None: ...

class WatchBundleRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchSTEKRingsRequest(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: str
    def __init__(self, node: _Optional[str] = ...) -> None: ...

class STEK(_message.Message):
    __slots__ = ("key_id", "key", "not_before", "not_after")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    key_id: bytes
    key: bytes
    not_before: float
    not_after: float
    def __init__(self, key_id: _Optional[bytes] = ..., key: _Optional[bytes] = ..., not_before: _Optional[float] = ..., not_after: _Optional[float] = ...) -> None: ...

class STEKRing(_message.Message):
    __slots__ = ("spiffe_id", "active", "previous", "next", "rotation_seconds", "ech_keys")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    NEXT_FIELD_NUMBER: _ClassVar[int]
    ROTATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ECH_KEYS_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    active: STEK
    previous: _containers.RepeatedCompositeFieldContainer[STEK]
    next: STEK
    rotation_seconds: float
    ech_keys: _containers.RepeatedCompositeFieldContainer[ECHKey]
    def __init__(self, spiffe_id: _Optional[str] = ..., active: _Optional[_Union[STEK, _Mapping]] = ..., previous: _Optional[_Iterable[_Union[STEK, _Mapping]]] = ..., next: _Optional[_Union[STEK, _Mapping]] = ..., rotation_seconds: _Optional[float] = ..., ech_keys: _Optional[_Iterable[_Union[ECHKey, _Mapping]]] = ...) -> None: ...

class ECHKey(_message.Message):
    __slots__ = ("config_id", "public_key", "private_key", "public_name", "not_before", "not_after")
    CONFIG_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_KEY_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_NAME_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    config_id: int
    public_key: bytes
    private_key: bytes
    public_name: str
    not_before: float
    not_after: float
    def __init__(self, config_id: _Optional[int] = ..., public_key: _Optional[bytes] = ..., private_key: _Optional[bytes] = ..., public_name: _Optional[str] = ..., not_before: _Optional[float] = ..., not_after: _Optional[float] = ...) -> None: ...

class ECHPublicConfig(_message.Message):
    __slots__ = ("spiffe_id", "keys")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    keys: _containers.RepeatedCompositeFieldContainer[ECHKey]
    def __init__(self, spiffe_id: _Optional[str] = ..., keys: _Optional[_Iterable[_Union[ECHKey, _Mapping]]] = ...) -> None: ...

class STEKRings(_message.Message):
    __slots__ = ("rings", "ech_public")
    RINGS_FIELD_NUMBER: _ClassVar[int]
    ECH_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    rings: _containers.RepeatedCompositeFieldContainer[STEKRing]
    ech_public: _containers.RepeatedCompositeFieldContainer[ECHPublicConfig]
    def __init__(self, rings: _Optional[_Iterable[_Union[STEKRing, _Mapping]]] = ..., ech_public: _Optional[_Iterable[_Union[ECHPublicConfig, _Mapping]]] = ...) -> None: ...
