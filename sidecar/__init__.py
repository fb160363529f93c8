"""Trellis data plane: the sidecar.

`sidecar.tls` is Trellis's own sans-I/O TLS 1.3 engine (see its module docstring).
"""
