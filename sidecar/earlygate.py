"""`EarlyStream`: the inbound handler of a stream whose CONNECT arrived in TLS 0-RTT data.

0-RTT bytes may be a replay (RFC 8446 §8). The engine already admits each ticket's early
data once, inside a short window, at the replica that issued it; this handler is the
application layer of RFC 8470 on top. It stands in front of the stream until the early
data has said what it is (`earlydata.EarlyGate`):

* complete requests with safe methods: the app is dialled and gets them with
  ``Early-Data: 1`` at once, before the client's Finished (§5.1), which is the point of
  0-RTT; the handler then passes the stream through to the `Bridge`;
* anything else, or a request still incomplete when the early data ends: ``425 Too
  Early`` on the stream (§5.2) before a byte reaches the app; the calling sidecar sends
  the request again once its handshake is complete;
* no early byte at all (the CONNECT alone was early): the stream goes on as any other,
  its bytes being 1-RTT.

Early bytes after requests already served are a second burst no Trellis client sends:
the stream is reset rather than let them reach the app unmarked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .bridge import Bridge
from .earlydata import EarlyGate, Incomplete, Serve, TooEarly
from .h2tunnel import ErrorCode
from .metrics import Metrics
from .session import Session

__all__ = ["EarlyStream"]


class EarlyStream:
    """The `StreamHandler` of one early stream (see the module docstring)."""

    def __init__(
        self,
        session: Session,
        stream_id: int,
        metrics: Metrics,
        *,
        forward: Callable[[], Bridge],
        too_early: Callable[[str], None],
    ) -> None:
        self._session = session
        self._stream_id = stream_id
        self._metrics = metrics
        self._forward = forward
        self._too_early = too_early
        self._gate = EarlyGate()
        self._flow = 0  # flow-control credit of the bytes held
        self._ended = False
        self.bridge: Bridge | None = None
        self.refused = False
        session.on_early_end(self._early_over)

    # --- the verdict -------------------------------------------------------------------

    def _serve(self, verdict: Serve) -> None:
        self._metrics.early_data_requests.labels(decision="served").inc(len(verdict.methods))
        bridge = self.bridge = self._forward()
        flow, self._flow = self._flow, 0
        bridge.stream_data(verdict.data, flow)
        if self._ended:
            bridge.stream_end()

    def _refuse(self, reason: str) -> None:
        if self.refused:
            return
        self.refused = True
        self._metrics.early_data_requests.labels(decision="too_early").inc()
        flow, self._flow = self._flow, 0
        if flow:
            self._session.ack(self._stream_id, flow)  # held bytes the app never gets
        if self.bridge is None:
            self._too_early(reason)
            return
        # Already answered 200: all that is left is to cut the stream.
        self._session.reset(self._stream_id, ErrorCode.CANCEL)
        self.bridge.stream_reset(ErrorCode.CANCEL, False)

    def _early_over(self) -> None:
        if self.refused or self.bridge is not None:
            return
        verdict = self._gate.end()
        if isinstance(verdict, TooEarly):
            self._refuse(verdict.reason)
        elif verdict is None:
            # Only the CONNECT came early: the request bytes are 1-RTT, no replay.
            self.bridge = self._forward()
            if self._ended:
                self.bridge.stream_end()

    # --- StreamHandler ---------------------------------------------------------------------

    def stream_response(self, status: int, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        pass  # inbound streams get no response from the peer

    def stream_data(self, data: bytes | memoryview, flow_length: int) -> None:
        if self.refused:
            self._session.ack(self._stream_id, flow_length)
            return
        if not self._session.receiving_early:
            if self.bridge is not None:
                self.bridge.stream_data(data, flow_length)
            return
        self._flow += flow_length
        verdict = self._gate.feed(data)
        if isinstance(verdict, Incomplete):
            return
        if isinstance(verdict, TooEarly):
            self._refuse(verdict.reason)
        elif self.bridge is None:
            self._serve(verdict)

    def stream_end(self) -> None:
        self._ended = True
        if self.bridge is not None and not self.refused:
            self.bridge.stream_end()

    def stream_reset(self, code: int, retryable: bool) -> None:
        if self.bridge is not None:
            self.bridge.stream_reset(code, retryable)

    def stream_drained(self) -> None:
        if self.bridge is not None:
            self.bridge.stream_drained()

    def session_paused(self, paused: bool) -> None:
        if self.bridge is not None:
            self.bridge.session_paused(paused)
