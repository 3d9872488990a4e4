"""The process: load config, run listeners and admin, swap snapshots live, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

from meshproxy import __version__
from meshproxy._tasks import spawn
from meshproxy.buildinfo import describe, interpreted_build_warning
from meshproxy.codec.h1 import resolve_codec_name
from meshproxy.codec.h1_limits import Limits
from meshproxy.collector import without_collection
from meshproxy.config.loader import load_snapshot
from meshproxy.config.snapshot import ListenerKind, ListenerSpec, Snapshot
from meshproxy.config.source import fingerprint
from meshproxy.config.watch import watch_config
from meshproxy.errors import ConfigError
from meshproxy.observe.accesslog import AccessLogError, AccessLogs, LogWriter, open_access_logs
from meshproxy.observe.admin import start_admin
from meshproxy.observe.metrics import MeshMetrics
from meshproxy.observe.tracing import Tracing
from meshproxy.observe.workload import encode as encode_peer_metadata
from meshproxy.observe.workload import encode_id as encode_peer_metadata_id
from meshproxy.observe.workload import local_workload
from meshproxy.overload import OverloadMonitor
from meshproxy.proxy.context import ProxyContext
from meshproxy.proxy.listener import Listener
from meshproxy.security.certwatch import IdentityManager, files_of
from meshproxy.upstream.cluster import ClusterManager, PoolSettings
from meshproxy.workers import (
    WorkerRole,
    collect_counters,
    report_counters,
    signal_children,
    wait_children,
)

logger = logging.getLogger(__name__)


def _limits(snapshot: Snapshot) -> Limits:
    s = snapshot.settings
    return Limits(max_header_bytes=s.max_request_headers_kb * 1024, max_headers=s.max_headers_count)


class Runtime:
    def __init__(
        self,
        config_path: Path,
        snapshot: Snapshot,
        role: WorkerRole | None = None,
        loaded_fingerprint: bytes | None = None,
    ) -> None:
        """`loaded_fingerprint`: load_snapshot's digest of the bytes `snapshot` came from
        (else the files are looked at now, which a change since the load would hide)."""
        self.config_path = config_path
        self.role = role or WorkerRole(0, 1, [], None)
        s = snapshot.settings
        self.metrics = MeshMetrics(namespace=s.namespace)
        codec = resolve_codec_name(s.http1_codec)
        limits = _limits(snapshot)
        self.clusters = ClusterManager(PoolSettings(codec, limits, s.trust_domain))
        self.metrics.cluster_counters = self.clusters.counters
        self.clusters.reconcile(snapshot.clusters, PoolSettings(codec, limits, s.trust_domain))
        self.ctx = ProxyContext(snapshot, self.clusters, self.metrics, limits, codec)
        self.listeners: dict[tuple[str, int], Listener] = {}
        self._log_writers: dict[str, LogWriter] = {}  # open access-log files, by path
        self.access_log: AccessLogs | None = open_access_logs(
            snapshot.access_logs, self.metrics.log_counts, self._log_writers
        )
        self.ready = False
        self.started_at = time.time()
        self.last_good = {"version": snapshot.version, "time": time.time()}
        self.last_failed: dict[str, Any] | None = None
        self._stop = asyncio.Event()
        self._quit_now = False
        self._quit_event = asyncio.Event()  # /quitquitquit or a second signal: stop waiting
        self._draining_inbound = False  # /drain_listeners?inboundonly or SIGTERM (a sidecar)
        self._servers: list[asyncio.Server] = []
        self._reload_lock = asyncio.Lock()
        self._fingerprint = (
            fingerprint(config_path) if loaded_fingerprint is None else loaded_fingerprint
        )
        self.metrics.config_reloaded(True, snapshot.version)
        self.identity = IdentityManager(
            files_of(s), self._publish_identity, lambda: self.ctx.snapshot.uses_mesh_mtls()
        )
        self.identity.load()
        self.clusters.identity = lambda: self.ctx.identity

    def _publish_identity(self) -> None:
        """A (re)load happened: new handshakes use what is current now."""
        current = self.identity.current
        self.ctx.identity = current
        self.metrics.cert_state(
            current.not_after.timestamp() if current else None,
            self.identity.reloads_ok,
            self.identity.reloads_failed,
        )
        self._publish_workload()

    def _publish_workload(self) -> None:
        """This workload's facts for metrics and for the metadata sent to mesh peers."""
        settings = self.ctx.snapshot.settings
        current = self.ctx.identity
        spiffe = current.spiffe_id if current is not None else None
        local = local_workload(settings, str(spiffe) if spiffe is not None else "")
        self.metrics.set_local(local)
        self.ctx.peer_metadata = encode_peer_metadata(local, settings.labels)
        self.ctx.peer_metadata_id = encode_peer_metadata_id(local)
        self._publish_tracing()

    def _publish_tracing(self) -> None:
        """The snapshot's tracing at work: the export pipeline is rebuilt only when its
        provider or this workload's service name changed (sampling and tags apply in place)."""
        config = self.ctx.snapshot.tracing
        local = self.metrics.local
        current = self.ctx.tracing
        if config is None:
            self.ctx.tracing = None
        elif current is not None and current.same_as(config, local.service_name):
            current.with_config(config)
            return
        else:
            try:
                self.ctx.tracing = Tracing(
                    config, local.service_name, local.namespace, self.metrics.span_counts
                )
            except Exception as exc:  # the SDK refusing its OTEL_* environment, say
                logger.error("tracing is off: its exporter could not be set up: %s", exc)
                self.ctx.tracing = None
        if current is not None:  # flushing blocks: not on the event loop
            threading.Thread(target=current.shutdown, name="trace-flush", daemon=True).start()

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        snap = self.ctx.snapshot
        self.metrics.loop_lag.start(asyncio.get_running_loop())
        await self._start_listeners(snap.listeners)
        s = snap.settings
        if self.role.index != 0:
            self.ready = True
            logger.info("worker %d ready: %d listeners", self.role.index, len(self.listeners))
            return
        self._servers.append(await start_admin(self, s.admin_bind, s.proxy_admin_port))
        if s.status_port and s.status_port != s.proxy_admin_port:
            self._servers.append(
                await start_admin(
                    self,
                    "0.0.0.0",
                    s.status_port,
                    only=frozenset({"/healthz/ready", "/quitquitquit"}),
                )
            )
        stats_port = s.prometheus_port
        if stats_port and stats_port not in (s.proxy_admin_port, s.status_port):
            only = frozenset({"/stats/prometheus"})
            self._servers.append(await start_admin(self, "0.0.0.0", stats_port, only=only))
        self.ready = True
        for w in snap.warnings:
            logger.warning("%s", w)
        build_warning = interpreted_build_warning()
        if build_warning is not None:
            logger.warning("%s", build_warning)
        logger.info(
            "meshproxy %s ready: config version %d, %d listeners, %d clusters, codec %s, "
            "hot path %s, %d worker(s)",
            __version__,
            snap.version,
            len(self.listeners),
            len(snap.clusters),
            self.ctx.codec,
            describe(),
            self.role.count,
        )

    async def _start_listeners(self, specs: tuple[ListenerSpec, ...]) -> None:
        started: list[Listener] = []
        try:
            for spec in specs:
                if spec.key in self.listeners or self._drained(spec):
                    continue
                listener = Listener(self.ctx, spec, self.access_log)
                await listener.start(reuse_port=self.role.reuse_port)
                started.append(listener)
        except OSError:
            for listener in started:
                await listener.close()
            raise
        for listener in started:
            self.listeners[listener.spec.key] = listener
            logger.info(
                "listening on %s:%d (%s, %s)",
                listener.spec.address,
                listener.spec.port,
                listener.spec.name,
                listener.spec.kind.value,
            )

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT or /quitquitquit, then drain; returns the exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._signal)
        watcher = spawn(
            watch_config(self.config_path, self.reload, stop=self._stop), name="config-watch"
        )
        await asyncio.sleep(0)  # the watcher registers its inotify watch at its first step
        await self.start()
        await self.reload()  # an edit made before the watch existed (no-op when unchanged)
        cert_watcher = spawn(self.identity.watch(self._stop), name="cert-watch")
        role = self.role
        overload = spawn(OverloadMonitor(self.ctx, role.count).run(self._stop), name="overload")
        workers = [
            spawn(collect_counters(self.metrics, c), name="worker-counters") for c in role.children
        ]
        if role.report_to is not None:
            workers.append(
                spawn(report_counters(self.metrics, role.report_to, self._stop), name="report")
            )
        await self._stop.wait()
        # Every worker drains at once: each holds its own copy of the listeners.
        signal_children(role.children, signal.SIGKILL if self._quit_now else signal.SIGTERM)
        await self._termination_drain()
        if self._quit_now:
            signal_children(role.children, signal.SIGKILL)  # /quitquitquit during the wait
        watcher.cancel()
        cert_watcher.cancel()
        overload.cancel()
        await self.drain()
        if role.children:
            settings = self.ctx.snapshot.settings
            grace = settings.termination_drain_duration + settings.drain_duration + 5
            await wait_children(role.children, grace)
        for task in workers:
            if role.report_to is not None and not task.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(task), 2)  # the final report
            task.cancel()
        return 0

    def _signal(self) -> None:
        if self._stop.is_set():
            self._quit_now = True  # a second signal: exit without waiting
            self._quit_event.set()
            return
        settings = self.ctx.snapshot.settings
        if self._is_sidecar():
            logger.info(
                "signal received: inbound drains, outbound serves the app for %.1fs "
                "(terminationDrainDuration), then up to %.1fs for connections to finish",
                settings.termination_drain_duration,
                settings.drain_duration,
            )
        else:
            logger.info("signal received: draining for up to %.1fs", settings.drain_duration)
        self._stop.set()

    def _is_sidecar(self) -> bool:
        """Capture listeners: an app beside us still calls out while its pod terminates."""
        return any(
            spec.kind is ListenerKind.OUTBOUND_CAPTURE for spec in self.ctx.snapshot.listeners
        )

    async def _termination_drain(self) -> None:
        """Istio's sidecar shutdown: inbound drains (no new connections or streams; replies
        say Connection: close or GOAWAY) while outbound keeps serving the app, for
        terminationDrainDuration; then everything drains. /quitquitquit skips it."""
        wait = self.ctx.snapshot.settings.termination_drain_duration
        if self._quit_now or not self._is_sidecar() or wait <= 0:
            return
        await self.drain_listeners(inbound_only=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._quit_event.wait(), wait)

    async def drain_listeners(self, inbound_only: bool) -> None:
        """Envoy's /drain_listeners: stop accepting (on inbound listeners only, if asked),
        and let open connections finish what they are doing, then close. Not undone by a
        reload; the process keeps running."""
        self.ready = False
        if inbound_only:
            self._draining_inbound = True
        else:
            self.ctx.draining = True
        for key, listener in list(self.listeners.items()):
            if not inbound_only or listener.spec.kind.inbound:
                del self.listeners[key]
                await listener.close()
        for conn in list(self.ctx.connections):
            if conn.inbound or not inbound_only:
                conn.close_idle()

    async def drain(self) -> None:
        await self.drain_listeners(inbound_only=False)
        deadline = time.monotonic() + self.ctx.snapshot.settings.drain_duration
        while self.ctx.connections and time.monotonic() < deadline and not self._quit_now:
            await asyncio.sleep(0.05)
        for server in self._servers:
            server.close()
        self.clusters.close()
        writers = list(self._log_writers.values())
        self._log_writers.clear()
        for writer in writers:
            writer.close()  # what is queued is written, then the file closes
        for writer in writers:  # the process exits without waiting for threads (cli.cmd_run)
            await asyncio.to_thread(writer.wait_closed, 5.0)
        tracing, self.ctx.tracing = self.ctx.tracing, None
        if tracing is not None:  # the spans still queued go out (the SDK bounds the wait)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.to_thread(tracing.shutdown), 10)
        logger.info("drained; %d connections left open", len(self.ctx.connections))

    # -- live reload -----------------------------------------------------------------------
    async def reload(self) -> bool:
        """Load the config again; apply it if valid, else keep the last good one."""
        async with self._reload_lock:
            if await asyncio.to_thread(fingerprint, self.config_path) == self._fingerprint:
                return True  # an event elsewhere in the directory: nothing of ours changed
            # The fingerprint kept is of the bytes loaded, not of the look above: in a storm
            # of swaps the files can change between the two, and a fingerprint of content
            # that was never applied would make the last swap look applied.
            read = hashlib.sha256()
            try:
                snapshot = await asyncio.to_thread(
                    without_collection, lambda: load_snapshot(self.config_path, read)
                )
            except ConfigError as exc:
                self._fingerprint = read.digest()
                self._reject([str(i) for i in exc.issues])
                return False
            except Exception as exc:  # never let a reload take the proxy down
                self._fingerprint = read.digest()
                self._reject([f"{type(exc).__name__}: {exc}"])
                return False
            self._fingerprint = read.digest()
            try:
                await self.apply(snapshot)
            except AccessLogError as exc:
                self._reject([str(exc)])
                return False
            except OSError as exc:
                self._reject([f"cannot bind a listener: {exc}"])
                return False
            return True

    def _close_writers(self, paths: set[str]) -> None:
        """Close access-log writers by path, unless a later reload took them up again."""
        in_use = {s.writer.path for s in self.access_log.sinks} if self.access_log else set()
        for path in paths - in_use:
            writer = self._log_writers.pop(path, None)
            if writer is not None:
                writer.close()

    def _reject(self, errors: list[str]) -> None:
        self.last_failed = {"time": time.time(), "errors": errors}
        self.metrics.config_reloaded(False, self.ctx.snapshot.version)
        logger.error(
            "config rejected, keeping version %d:\n  %s",
            self.ctx.snapshot.version,
            "\n  ".join(errors),
        )

    async def apply(self, snapshot: Snapshot) -> None:
        old = self.ctx.snapshot
        old_log = self.access_log
        known = set(self._log_writers)
        if snapshot.access_logs != old.access_logs:
            # May raise (a path that cannot be opened): nothing is swapped yet.
            self.access_log = open_access_logs(
                snapshot.access_logs, self.metrics.log_counts, self._log_writers
            )
        try:
            await self._start_listeners(snapshot.listeners)  # may raise: nothing swapped yet
        except OSError:
            self.access_log = old_log
            self._close_writers(set(self._log_writers) - known)  # opened for this one only
            raise
        codec = resolve_codec_name(snapshot.settings.http1_codec)
        limits = _limits(snapshot)
        await self.clusters.reconcile_gradually(
            snapshot.clusters, PoolSettings(codec, limits, snapshot.settings.trust_domain)
        )
        self.ctx.codec = codec
        self.ctx.limits = limits
        self.ctx.snapshot = snapshot  # the swap: new streams see the new config from here on
        self._publish_workload()
        self.ctx.rate_limiters.retain(set(snapshot.rate_limits))
        wanted = {spec.key: spec for spec in snapshot.listeners}
        for key, listener in list(self.listeners.items()):
            if key in wanted:
                listener.update(wanted[key])
                listener.access_log = self.access_log  # new connections log where it says
            else:
                await listener.close()
                del self.listeners[key]
        in_use = {s.writer.path for s in self.access_log.sinks} if self.access_log else set()
        if set(self._log_writers) - in_use:
            # Connections opened before this reload still log to the old files for a while.
            grace = snapshot.settings.drain_duration + 1
            unused = set(self._log_writers) - in_use
            asyncio.get_running_loop().call_later(grace, self._close_writers, unused)
        self.last_good = {"version": snapshot.version, "time": time.time()}
        self.metrics.config_reloaded(True, snapshot.version)
        for w in snapshot.warnings:
            logger.warning("%s", w)
        logger.info("config version %d applied (was %d)", snapshot.version, old.version)

    def _drained(self, spec: ListenerSpec) -> bool:
        """A listener that a drain closed: a reload must not open it again."""
        return self.ctx.draining or (self._draining_inbound and spec.kind.inbound)

    # -- AdminSource -----------------------------------------------------------------------
    def is_ready(self) -> bool:
        """Istio's readiness: config loaded, listeners bound, and the workload certificate
        loaded wherever mesh mTLS needs it; never while draining."""
        if not self.ready or self.ctx.draining or self._draining_inbound:
            return False
        return self.ctx.identity is not None or not self.ctx.snapshot.requires_mesh_mtls()

    def not_ready_reason(self) -> str:
        if self.ctx.draining or self._draining_inbound:
            return "draining"
        if not self.ready:
            return "starting"
        return "no workload certificate loaded (mesh mTLS needs one)"

    def prometheus(self) -> bytes:
        return self.metrics.render()

    def request_quit(self) -> None:
        self._quit_now = True
        self._quit_event.set()
        self._stop.set()

    def request_drain(self, inbound_only: bool) -> None:
        spawn(self.drain_listeners(inbound_only), name="drain-listeners")

    def config_dump(self) -> dict[str, Any]:
        snap = self.ctx.snapshot
        return {
            "version": snap.version,
            "meshproxy_version": __version__,
            "config_path": str(self.config_path),
            "last_good_reload": self.last_good,
            "last_failed_reload": self.last_failed,
            "settings": {k: getattr(snap.settings, k) for k in snap.settings.__slots__},
            "listeners": [
                {
                    "name": spec.name,
                    "kind": spec.kind.value,
                    "address": f"{spec.address}:{spec.port}",
                }
                for spec in snap.listeners
            ],
            "clusters": sorted(snap.clusters),
            "resources": {k: json.loads(v) for k, v in snap.source.items()},
            "warnings": list(snap.warnings),
        }

    def listener_statuses(self) -> list[dict[str, Any]]:
        specs = [listener.spec for listener in self.listeners.values()]
        return [
            {"name": s.name, "local_address": f"{s.address}:{s.port}", "kind": s.kind.value}
            for s in specs
        ]

    def server_info(self) -> dict[str, Any]:
        settings = self.ctx.snapshot.settings
        draining = self.ctx.draining or self._draining_inbound
        state = "DRAINING" if draining else ("LIVE" if self.ready else "PRE_INITIALIZING")
        identity = self.ctx.identity
        spiffe = identity.spiffe_id if identity is not None else None
        return {
            "version": __version__,
            "state": state,
            "hot_path": describe(),
            "uptime_current_epoch": f"{time.time() - self.started_at:.0f}s",
            "config_version": self.ctx.snapshot.version,
            "command_line_options": {
                "config_path": str(self.config_path),
                "concurrency": self.role.count,
                "drain_time_s": settings.drain_duration,
            },
            "node": {
                "id": self.ctx.peer_metadata_id.decode("latin-1"),
                "workload": self.metrics.local.workload,
                "namespace": settings.namespace,
                "identity": str(spiffe) if spiffe is not None else None,
                "cluster": settings.cluster_id,
            },
        }

    def certs(self) -> dict[str, Any]:
        return self.identity.describe()

    def cluster_statuses(self) -> list[dict[str, Any]]:
        out = []
        for name, cluster in sorted(self.clusters.clusters.items()):
            out.append(
                {
                    "name": name,
                    "lb_policy": cluster.spec.lb.value,
                    "circuit_breakers": cluster.breaker.as_dict(),
                    "host_statuses": [h.as_dict() for h in cluster.all_hosts()],
                }
            )
        return out


async def run_proxy(config_path: Path) -> int:
    snapshot = load_snapshot(config_path)
    runtime = Runtime(config_path, snapshot)
    return await runtime.run()
