"""The demo services ``trellis up`` and ``bench/mesh.py`` put behind sidecars.

* ``echo`` — an HTTP/1.1 server (asyncio protocol, keep-alive): ``POST``/``PUT`` answer
  with the request body, ``GET /bytes/N`` with N bytes, ``POST /sink`` reads and discards
  a body of any size (for bulk throughput), ``GET /metrics`` its own counters.
* ``load`` — an HTTP/1.1 load generator: keep-alive connections, open-loop pacing (each
  latency is measured from the request's *intended* send time, so a stalled server cannot
  hide its stall by slowing the client: no coordinated omission), bodies checked byte for
  byte against what was sent, errors counted by kind.
* ``wire`` — the small HTTP/1.1 message codec both share (sans-I/O).

Run them as ``trellis demo echo`` and ``trellis demo load`` (see ``trellis.demo.cli``).
"""

from trellis.demo.echo import EchoServer, EchoStats, start_echo_server
from trellis.demo.load import LoadConfig, LoadGenerator, LoadReport, bulk_upload

__all__ = [
    "EchoServer",
    "EchoStats",
    "LoadConfig",
    "LoadGenerator",
    "LoadReport",
    "bulk_upload",
    "start_echo_server",
]
