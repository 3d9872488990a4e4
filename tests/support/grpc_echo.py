"""A real grpcio server with raw-bytes methods (no protobuf needed) for proxy tests.

Service `test.Echo`: Unary echoes; ServerStream sends the request N times (N = its length);
ClientStream joins what it got; Bidi echoes each message; Slow sleeps (cancellation is
recorded); Fail aborts with PERMISSION_DENIED and a message; Flaky answers UNAVAILABLE to
its first N calls (N = the request as a number), then echoes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

from tests.support.proxy import free_port


class EchoService:
    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.seen_metadata: list[dict[str, str]] = []
        self.flaky_calls = 0

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.seen_metadata.append({k: str(v) for k, v in context.invocation_metadata()})
        return b"echo:" + request

    def server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for i in range(len(request)):
            yield b"%d:" % i + request

    def client_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return b"|".join(requests)

    def bidi(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for r in requests:
            yield r.upper()

    def slow(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if not context.is_active():
                self.cancelled.set()
                return b""
            time.sleep(0.02)
        return b"late"

    def flaky(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.flaky_calls += 1
        if self.flaky_calls <= int(request):
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return b"ok:" + request

    def fail(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "not you: ünïcode")
        return b""


class GrpcEchoServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.service = EchoService()
        self._server: Any = None

    def start(self) -> GrpcEchoServer:
        s = self.service
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(s.unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(s.server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(s.client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(s.bidi),
            "Slow": grpc.unary_unary_rpc_method_handler(s.slow),
            "Fail": grpc.unary_unary_rpc_method_handler(s.fail),
            "Flaky": grpc.unary_unary_rpc_method_handler(s.flaky),
        }
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("test.Echo", handlers),)
        )
        server.add_insecure_port(f"127.0.0.1:{self.port}")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None)
