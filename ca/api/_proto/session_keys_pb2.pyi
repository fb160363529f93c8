# mypy: disable-error-code="type-arg"
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WatchSTEKRingRequest(_message.Message):
    __slots__ = ("spiffe_id",)
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    def __init__(self, spiffe_id: _Optional[str] = ...) -> None: ...

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

class STEKRingResponse(_message.Message):
    __slots__ = ("rings", "ech_public")
    RINGS_FIELD_NUMBER: _ClassVar[int]
    ECH_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    rings: _containers.RepeatedCompositeFieldContainer[STEKRing]
    ech_public: _containers.RepeatedCompositeFieldContainer[ECHPublicConfig]
    def __init__(self, rings: _Optional[_Iterable[_Union[STEKRing, _Mapping]]] = ..., ech_public: _Optional[_Iterable[_Union[ECHPublicConfig, _Mapping]]] = ...) -> None: ...
