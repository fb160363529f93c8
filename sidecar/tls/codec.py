"""Wire codec: a pull `Buffer` for parsing and a push `Writer` for building.

Every length-prefixed vector is parsed with `pull_block`, which raises `decode_error`
when the vector overruns its container or leaves trailing bytes (RFC 8446 §3.4,
§4: "a message that cannot be parsed ... MUST terminate the connection with a
decode_error alert").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from .alerts import AlertDescription, TLSError


def _decode_error(reason: str) -> TLSError:
    return TLSError(AlertDescription.decode_error, reason)


class Buffer:
    """A read cursor over immutable bytes."""

    __slots__ = ("_data", "_end", "_pos")

    def __init__(self, data: bytes | memoryview) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._end = len(self._data)

    @property
    def position(self) -> int:
        return self._pos

    def eof(self) -> bool:
        return self._pos >= self._end

    def remaining(self) -> int:
        return self._end - self._pos

    def pull_bytes(self, length: int) -> bytes:
        end = self._pos + length
        if end > self._end:
            raise _decode_error("truncated")
        value = bytes(self._data[self._pos : end])
        self._pos = end
        return value

    def pull_rest(self) -> bytes:
        return self.pull_bytes(self._end - self._pos)

    def pull_uint8(self) -> int:
        if self._pos >= self._end:
            raise _decode_error("truncated")
        value = self._data[self._pos]
        self._pos += 1
        return value

    def pull_uint16(self) -> int:
        return int.from_bytes(self.pull_bytes(2), "big")

    def pull_uint24(self) -> int:
        return int.from_bytes(self.pull_bytes(3), "big")

    def pull_uint32(self) -> int:
        return int.from_bytes(self.pull_bytes(4), "big")

    def pull_vector(self, length_size: int, minimum: int = 0, maximum: int | None = None) -> bytes:
        """An opaque vector `<minimum..maximum>` with a `length_size`-byte length prefix."""
        length = int.from_bytes(self.pull_bytes(length_size), "big")
        if length < minimum or (maximum is not None and length > maximum):
            raise _decode_error("vector length out of range")
        return self.pull_bytes(length)

    def pull_block(self, length_size: int) -> _PullBlock:
        """Scope parsing to a length-prefixed block; trailing bytes are a decode_error.

        Used as `with buf.pull_block(2) as length: ...` (a class, not a generator:
        this is on every handshake's hot path).
        """
        length = int.from_bytes(self.pull_bytes(length_size), "big")
        end = self._pos + length
        if end > self._end:
            raise _decode_error("block overruns its container")
        block = _PullBlock(self, self._end, end, length)
        self._end = end
        return block

    def expect_end(self) -> None:
        if self._pos != self._end:
            raise _decode_error("trailing bytes after message")


class _PullBlock:
    __slots__ = ("_buf", "_end", "_length", "_outer_end")

    def __init__(self, buf: Buffer, outer_end: int, end: int, length: int) -> None:
        self._buf = buf
        self._outer_end = outer_end
        self._end = end
        self._length = length

    def __enter__(self) -> int:
        return self._length

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        buf = self._buf
        buf._end = self._outer_end
        if exc_type is None and buf._pos != self._end:
            raise _decode_error("trailing bytes in block")


class Writer:
    """An append-only byte builder with back-patched length prefixes."""

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data = bytearray()

    def data(self) -> bytes:
        return bytes(self._data)

    def push_bytes(self, value: bytes) -> None:
        self._data += value

    def push_uint8(self, value: int) -> None:
        self._data.append(value)

    def push_uint16(self, value: int) -> None:
        self._data += value.to_bytes(2, "big")

    def push_uint24(self, value: int) -> None:
        self._data += value.to_bytes(3, "big")

    def push_uint32(self, value: int) -> None:
        self._data += value.to_bytes(4, "big")

    def push_vector(self, length_size: int, value: bytes) -> None:
        self._data += len(value).to_bytes(length_size, "big")
        self._data += value

    @contextmanager
    def push_block(self, length_size: int) -> Iterator[None]:
        start = len(self._data)
        self._data += bytes(length_size)
        yield
        length = len(self._data) - start - length_size
        self._data[start : start + length_size] = length.to_bytes(length_size, "big")
