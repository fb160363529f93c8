"""``SigningStream``: one ``StreamX509SVIDs`` call carrying many signing requests.

A message on the stream costs the CA about a third of a unary ``BatchNewX509SVID`` call
(``bench/ca_server.py``); ``CaClient`` keeps one open and falls back to unary calls for a
CA without the method.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc
import grpc.aio

from ca.api._proto import ca_pb2
from ca.api.convert import SERVICE
from ca.api.errors import CaError

__all__ = ["SigningStream"]


class SigningStream:
    """One ``StreamX509SVIDs`` call: requests go out with IDs, a reader task matches the
    answers to them. Once the call ends, every unanswered request fails with its status
    and the stream is ``broken``: the client opens a new one for the next request."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._call: Any = channel.stream_stream(
            f"/{SERVICE}/StreamX509SVIDs",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=ca_pb2.StreamX509SVIDsResponse.FromString,
        )()
        self._waiting: dict[int, asyncio.Future[ca_pb2.StreamX509SVIDsResponse]] = {}
        self._next_id = 1
        self._write_lock = asyncio.Lock()
        self._retired = False
        self.broken: CaError | None = None
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def request(
        self, batch: ca_pb2.BatchNewX509SVIDRequest, timeout: float
    ) -> ca_pb2.StreamX509SVIDsResponse:
        if self.broken is not None:
            raise self.broken
        loop = asyncio.get_running_loop()
        request_id, self._next_id = self._next_id, self._next_id + 1
        answer: asyncio.Future[ca_pb2.StreamX509SVIDsResponse] = loop.create_future()
        self._waiting[request_id] = answer
        deadline = loop.call_later(timeout, self._expire, request_id)
        try:
            async with self._write_lock:
                if self.broken is not None:  # broke while this request waited to be written
                    raise self.broken
                await self._call.write(ca_pb2.StreamX509SVIDsRequest(id=request_id, batch=batch))
            return await answer
        except grpc.aio.AioRpcError as exc:  # the write found the call over
            raise self._break(CaError(exc.code(), exc.details() or "")) from exc
        except (grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            raise self._break(
                CaError(grpc.StatusCode.UNAVAILABLE, f"signing stream closed: {exc}")
            ) from exc
        finally:
            deadline.cancel()
            self._waiting.pop(request_id, None)
            if answer.done() and not answer.cancelled():
                answer.exception()  # failed by _break; raised here in another form if at all
            if self._retired and not self._waiting:
                self._finish()

    def _expire(self, request_id: int) -> None:
        answer = self._waiting.pop(request_id, None)
        if answer is None or answer.done():
            return
        answer.set_exception(
            CaError(grpc.StatusCode.DEADLINE_EXCEEDED, "no answer on the signing stream")
        )
        # The CA answers a stream's requests in order, so the ones behind this would wait
        # just as long: give up on the stream, and let the next request open another.
        self._abandon(CaError(grpc.StatusCode.UNAVAILABLE, "the signing stream stalled"))

    def retire(self) -> None:
        """Take no new requests; end the call once the ones in flight are answered."""
        self._retired = True
        if not self._waiting:
            self._finish()

    def _finish(self) -> None:
        if self.broken is None:
            self._break(CaError(grpc.StatusCode.UNAVAILABLE, "signing stream retired"))
            task = asyncio.get_running_loop().create_task(self._done_writing())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _done_writing(self) -> None:
        async with self._write_lock:
            with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
                await self._call.done_writing()  # unless the call is already over

    def cancel(self) -> None:
        self._abandon(CaError(grpc.StatusCode.CANCELLED, "the client has been closed"))

    def _abandon(self, error: CaError) -> None:
        self._break(error)
        self._call.cancel()
        self._reader.cancel()

    def _break(self, error: CaError) -> CaError:
        if self.broken is None:
            self.broken = error
        for answer in self._waiting.values():
            if not answer.done():
                answer.set_exception(self.broken)
        self._waiting.clear()
        return self.broken

    async def _read(self) -> None:
        try:
            while True:
                message = await self._call.read()
                if message is grpc.aio.EOF:
                    self._break(
                        CaError(grpc.StatusCode.UNAVAILABLE, "the CA ended the signing stream")
                    )
                    return
                answer = self._waiting.get(message.id)
                if answer is not None and not answer.done():
                    answer.set_result(message)
        except grpc.aio.AioRpcError as exc:
            self._break(CaError(exc.code(), exc.details() or ""))
        except asyncio.CancelledError:
            self._break(CaError(grpc.StatusCode.CANCELLED, "the client has been closed"))
            raise
