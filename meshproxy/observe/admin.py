"""The admin endpoint (Envoy's paths): /ready, /stats/prometheus, /config_dump, /clusters."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, Protocol, cast
from urllib.parse import parse_qs

import h11
import re2

logger = logging.getLogger(__name__)
MAX_ADMIN_REQUEST = 16 * 1024


class AdminSource(Protocol):
    def is_ready(self) -> bool: ...
    def not_ready_reason(self) -> str: ...
    def config_dump(self) -> dict[str, Any]: ...
    def cluster_statuses(self) -> list[dict[str, Any]]: ...
    def certs(self) -> dict[str, Any]: ...
    def prometheus(self) -> bytes: ...
    def request_quit(self) -> None: ...
    def request_drain(self, inbound_only: bool) -> None: ...
    def listener_statuses(self) -> list[dict[str, Any]]: ...
    def server_info(self) -> dict[str, Any]: ...


Handler = Callable[[AdminSource, str], tuple[int, str, bytes]]


def _ready(src: AdminSource, query: str) -> tuple[int, str, bytes]:
    if src.is_ready():
        return 200, "text/plain", b"LIVE\n"
    return 503, "text/plain", f"NOT READY: {src.not_ready_reason()}\n".encode()


def _prom(src: AdminSource, query: str) -> tuple[int, str, bytes]:
    return 200, "text/plain; version=0.0.4; charset=utf-8", src.prometheus()


def _dump(src: AdminSource, query: str) -> tuple[int, str, bytes]:
    return 200, "application/json", json.dumps(src.config_dump(), indent=2, default=str).encode()


def _clusters(src: AdminSource, query: str) -> tuple[int, str, bytes]:
    clusters = src.cluster_statuses()
    if "format=json" in query:
        return (
            200,
            "application/json",
            json.dumps({"cluster_statuses": clusters}, indent=2).encode(),
        )
    lines = []
    for c in clusters:
        for h in c["host_statuses"]:
            for k, v in h.items():
                if k != "address":
                    lines.append(f"{c['name']}::{h['address']}::{k}::{v}")
    return 200, "text/plain", ("\n".join(lines) + "\n").encode()


def _stats(src: AdminSource, query: str) -> tuple[int, str, bytes]:
    """Envoy's plain /stats: one `name: value` line per counter and gauge (Istio's tagged
    names as `tag=value;...;name`), `?filter=REGEX` (RE2) and `?usedonly` as in Envoy."""
    params = parse_qs(query, keep_blank_values=True)
    pattern = params.get("filter", [""])[0]
    try:
        matcher = re2.compile(pattern) if pattern else None
    except re2.error as exc:
        return 400, "text/plain", f"invalid filter: {exc}\n".encode()
    used_only = "usedonly" in params
    lines = []
    for name, value in plain_stats(src.prometheus().decode()):
        if used_only and not value:
            continue
        if matcher is not None and not matcher.search(name):
            continue
        lines.append(f"{name}: {value:g}")
    return 200, "text/plain", ("\n".join(lines) + "\n").encode()


def plain_stats(text: str) -> list[tuple[str, float]]:
    """The Prometheus exposition as Envoy's plain stat names (histograms left out: Envoy
    prints them apart)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: list[tuple[str, float]] = []
    for family in text_string_to_metric_families(text):
        if family.type in ("histogram", "summary"):
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            labels = sample.labels
            if family.name.startswith("envoy_cluster_") and "cluster_name" in labels:
                stat = sample.name[len("envoy_cluster_") :]
                out.append((f"cluster.{labels['cluster_name']}.{stat}", sample.value))
                continue
            tags = "".join(f"{k}={v};" for k, v in sorted(labels.items()))
            out.append((f"{tags}{sample.name}", sample.value))
    return sorted(out)


def _listeners(src: AdminSource, query: str) -> tuple[int, str, bytes]:
    listeners = src.listener_statuses()
    if "format=json" in query:
        return (
            200,
            "application/json",
            json.dumps({"listener_statuses": listeners}, indent=2).encode(),
        )
    lines = [f"{item['name']}::{item['local_address']}" for item in listeners]
    return 200, "text/plain", ("\n".join(lines) + "\n").encode()


def _memory(src: AdminSource, query: str) -> tuple[int, str, bytes]:
    from meshproxy.observe.memory import memory_report

    values = parse_qs(query).get("top", ["25"])
    top = int(values[0]) if values[0].isdigit() else 25
    return 200, "application/json", json.dumps(memory_report(min(top, 500)), indent=2).encode()


def _server_info(src: AdminSource, query: str) -> tuple[int, str, bytes]:
    return 200, "application/json", json.dumps(src.server_info(), indent=2).encode()


LEVELS = ("trace", "debug", "info", "warning", "error", "critical", "off")
_PYTHON_LEVEL = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "off": logging.CRITICAL + 10,
}


def _logger_names() -> list[str]:
    names = ["meshproxy"]
    names += sorted(
        n
        for n in logging.Logger.manager.loggerDict
        if n.startswith("meshproxy.") and "." not in n[10:]
    )
    return names


def _logging(src: AdminSource, query: str) -> tuple[int, str, bytes]:
    """GET lists the loggers and their levels (Envoy's /logging)."""
    lines = ["active loggers:"]
    for name in _logger_names():
        level = logging.getLevelName(logging.getLogger(name).getEffectiveLevel()).lower()
        lines.append(f"  {name}: {level}")
    return 200, "text/plain", ("\n".join(lines) + "\n").encode()


def set_log_levels(query: str) -> tuple[int, bytes]:
    """POST /logging?level=L sets every logger, ?NAME=L one (meshproxy.proxy, ...), live."""
    params = parse_qs(query, keep_blank_values=True)
    if not params:
        return 400, b"usage: POST /logging?level=LEVEL or /logging?LOGGER=LEVEL\n"
    changes: list[tuple[logging.Logger, int]] = []
    for key, values in params.items():
        level = values[-1].lower()
        if level not in _PYTHON_LEVEL:
            return 400, f"unknown level {level!r} (one of {', '.join(LEVELS)})\n".encode()
        name = "meshproxy" if key == "level" else key
        if name not in _logger_names():
            return 404, f"unknown logger {name!r}\n".encode()
        changes.append((logging.getLogger(name), _PYTHON_LEVEL[level]))
    for logger_, level_ in changes:
        logger_.setLevel(level_)
        if logger_.name == "meshproxy":
            logging.getLogger().setLevel(level_)  # the handler's threshold, on the root
    return 200, b"OK\n"


def _certs(src: AdminSource, query: str) -> tuple[int, str, bytes]:
    return 200, "application/json", json.dumps(src.certs(), indent=2, default=str).encode()


# What `/` lists, as Envoy's admin home page does: every route with what it is for.
ROUTE_HELP: dict[str, str] = {
    "/": "this list",
    "/ready": "200 LIVE once config, listeners and (for mesh mTLS) certificates are in; 503 "
    "before, and while draining",
    "/healthz/ready": "the same (Istio's readiness path; also on the status port)",
    "/stats/prometheus": "metrics in Prometheus' text format (Istio's names and labels)",
    "/metrics": "the same",
    "/config_dump": "the active resources and settings, and the last good and failed reloads",
    "/clusters": "clusters, endpoints, health and counters (?format=json)",
    "/certs": "the workload identity: SPIFFE ID, validity, roots, last load error",
    "/stats": "counters and gauges as Envoy prints them (?filter=RE2, ?usedonly)",
    "/listeners": "listeners and their addresses (?format=json)",
    "/server_info": "version, state, uptime, build and settings (JSON)",
    "/memory": "RSS, objects by type and (with PYTHONTRACEMALLOC) the lines holding most "
    "memory (?top=N; JSON)",
    "/logging": "loggers and levels; POST ?level=LEVEL or ?LOGGER=LEVEL changes them",
    "/quitquitquit": "POST: exit promptly (no termination drain); also on the status port",
    "/drain_listeners": "POST ?inboundonly&graceful: stop accepting (inbound only) and close "
    "connections as their requests finish; the process keeps running",
}


def _home(src: AdminSource, query: str) -> tuple[int, str, bytes]:
    width = max(map(len, ROUTE_HELP))
    lines = [f"{path:<{width}}  {text}" for path, text in ROUTE_HELP.items()]
    return 200, "text/plain", ("meshproxy admin\n\n" + "\n".join(lines) + "\n").encode()


GET_ROUTES: dict[str, Handler] = {
    "/": _home,
    "/certs": _certs,
    "/stats": _stats,
    "/listeners": _listeners,
    "/server_info": _server_info,
    "/memory": _memory,
    "/logging": _logging,
    "/ready": _ready,
    "/healthz/ready": _ready,
    "/stats/prometheus": _prom,
    "/metrics": _prom,
    "/config_dump": _dump,
    "/clusters": _clusters,
}
POST_ROUTES = ("/quitquitquit", "/drain_listeners")


class AdminProtocol(asyncio.Protocol):
    def __init__(self, source: AdminSource, only: frozenset[str] | None = None) -> None:
        self.source = source
        self.only = only
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_ADMIN_REQUEST)
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        self._timer = asyncio.get_running_loop().call_later(30, transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self.conn.receive_data(data)
            while True:
                ev = self.conn.next_event()
                if ev is h11.NEED_DATA or ev is h11.PAUSED:
                    return
                if isinstance(ev, h11.Request):
                    self._handle(ev)
                    return
        except h11.RemoteProtocolError:
            self._respond(400, "text/plain", b"bad request\n")

    def _handle(self, req: h11.Request) -> None:
        target = req.target.decode("latin-1")
        path, _, query = target.partition("?")
        method = req.method.decode()
        if self.only is not None and path not in self.only:
            self._respond(404, "text/plain", b"not found\n")
            return
        if path == "/logging" and method == "POST":
            status, body = set_log_levels(query)
            self._respond(status, "text/plain", body)
            return
        if path in POST_ROUTES:
            if method != "POST":
                self._respond(405, "text/plain", b"use POST\n")
                return
            if not self._from_loopback():
                # The status port listens on all addresses; stopping the proxy is for the
                # pod's own containers (Istio's agent allows it from localhost only).
                self._respond(403, "text/plain", b"only from localhost\n")
                return
            if path == "/quitquitquit":
                self._respond(200, "text/plain", b"OK\n")
                self.source.request_quit()
            else:
                flags = parse_qs(query, keep_blank_values=True)
                self.source.request_drain("inboundonly" in flags)
                self._respond(200, "text/plain", b"OK\n")
            return
        handler = GET_ROUTES.get(path)
        if handler is None:
            self._respond(404, "text/plain", b"not found\n")
            return
        if method not in ("GET", "HEAD"):
            self._respond(405, "text/plain", b"use GET\n")
            return
        try:
            status, ctype, body = handler(self.source, query)
        except Exception:
            logger.exception("admin handler %s failed", path)
            status, ctype, body = 500, "text/plain", b"internal error\n"
        self._respond(status, ctype, body)

    def _from_loopback(self) -> bool:
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        if not peer:
            return False
        return ipaddress.ip_address(str(peer[0]).split("%")[0]).is_loopback

    def _respond(self, status: int, ctype: str, body: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        headers = [
            ("content-type", ctype),
            ("content-length", str(len(body))),
            ("connection", "close"),
        ]
        reason = HTTPStatus(status).phrase
        try:
            response = h11.Response(status_code=status, headers=headers, reason=reason)
            out = self.conn.send(response) or b""
            out += self.conn.send(h11.Data(data=body)) or b""
            out += self.conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            out = (
                f"HTTP/1.1 {status} {reason}\r\ncontent-length: {len(body)}\r\n"
                "connection: close\r\n\r\n"
            ).encode() + body
        self.transport.write(out)
        self.transport.close()


async def start_admin(
    source: AdminSource, host: str, port: int, only: frozenset[str] | None = None
) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: AdminProtocol(source, only), host, port, reuse_address=True
    )
