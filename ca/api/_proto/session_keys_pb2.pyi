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
    __slots__ = ("spiffe_id", "active", "previous", "next", "rotation_seconds")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    NEXT_FIELD_NUMBER: _ClassVar[int]
    ROTATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    active: STEK
    previous: _containers.RepeatedCompositeFieldContainer[STEK]
    next: STEK
    rotation_seconds: float
    def __init__(self, spiffe_id: _Optional[str] = ..., active: _Optional[_Union[STEK, _Mapping]] = ..., previous: _Optional[_Iterable[_Union[STEK, _Mapping]]] = ..., next: _Optional[_Union[STEK, _Mapping]] = ..., rotation_seconds: _Optional[float] = ...) -> None: ...

class STEKRingResponse(_message.Message):
    __slots__ = ("rings",)
    RINGS_FIELD_NUMBER: _ClassVar[int]
    rings: _containers.RepeatedCompositeFieldContainer[STEKRing]
    def __init__(self, rings: _Optional[_Iterable[_Union[STEKRing, _Mapping]]] = ...) -> None: ...
