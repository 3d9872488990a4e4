"""Keep the workload identity current as its files change (rotation without a restart)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

from watchfiles import awatch

from meshproxy.config.resources import ProxySettings
from meshproxy.security.identity import CertError, CertFiles, WorkloadIdentity, load_identity

logger = logging.getLogger(__name__)
# watchfiles logs every batch of file events at INFO ("1 change detected"): a line per
# ConfigMap swap or log write in a watched directory, saying nothing the reload log does not.
logging.getLogger("watchfiles.main").setLevel(logging.WARNING)

RESCAN_MS = 1000


def files_of(settings: ProxySettings) -> CertFiles:
    return CertFiles(
        Path(settings.cert_chain), Path(settings.private_key), Path(settings.root_cert)
    )


def _digest(files: CertFiles) -> str:
    h = hashlib.sha256()
    for p in (files.cert_chain, files.private_key, files.root_cert):
        try:
            h.update(p.read_bytes())
        except OSError:
            h.update(b"missing")
    return h.hexdigest()


class IdentityManager:
    """`current` is the identity new handshakes use; None until files load successfully."""

    def __init__(
        self,
        files: CertFiles,
        on_update: Callable[[], None] | None = None,
        wanted: Callable[[], bool] = lambda: True,
    ) -> None:
        self.files = files
        self._on_update = on_update
        self._wanted = wanted  # whether the config uses mesh mTLS (else a missing cert is fine)
        self.current: WorkloadIdentity | None = None
        self.last_error: str | None = None
        self.reloads_ok = 0
        self.reloads_failed = 0
        self._digest = ""

    def load(self) -> bool:
        """Load the files if they changed; on failure keep the identity in use."""
        ok = self._load()
        if self._on_update is not None:
            self._on_update()
        return ok

    def _load(self) -> bool:
        digest = _digest(self.files)
        if digest == self._digest:
            return self.current is not None
        self._digest = digest
        try:
            identity = load_identity(self.files)
        except CertError as exc:
            self.last_error = str(exc)
            self.reloads_failed += 1
            if self.current is not None:
                level = logging.ERROR
            elif not any(f.exists() for f in (self.files.cert_chain, self.files.private_key)):
                # No certificate at all: not a fault, and the files are watched, so mTLS
                # starts when they appear. Said only where the config uses mesh mTLS (not
                # for a standalone proxy or the demo).
                level = logging.INFO if self._wanted() else logging.DEBUG
            else:
                level = logging.WARNING
            logger.log(
                level,
                "workload certificate not loaded: %s%s",
                exc,
                "; keeping the previous one"
                if self.current is not None
                else "; mesh mTLS is off until it loads",
            )
            return False
        self.current = identity
        self.last_error = None
        self.reloads_ok += 1
        logger.info(
            "workload certificate loaded: %s, valid until %s",
            identity.spiffe_id,
            identity.not_after.isoformat(),
        )
        return True

    async def watch(self, stop: asyncio.Event) -> None:
        """Reload on any change in the certificate directories (inotify, and a look at the
        files every RESCAN_MS). Directories that do not exist yet are looked for once a
        second until one does."""
        while not (dirs := [d for d in self.files.directories if d.is_dir()]):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            if stop.is_set():
                return
        self.load()  # what was written since start-up, before the watch below starts
        async for changes in awatch(
            *dirs,
            debounce=200,
            step=50,
            stop_event=stop,
            rust_timeout=RESCAN_MS,
            yield_on_timeout=True,
        ):
            # Every RESCAN_MS without an event the files are read and compared too: files
            # written between the last load and the watch being set up raise no event, and
            # must not leave mesh mTLS off until the next rotation.
            if not changes and _digest(self.files) == self._digest:
                continue
            try:
                self.load()
            except Exception:  # never let a rotation take the proxy down
                logger.exception("certificate reload failed unexpectedly")

    def describe(self) -> dict[str, object]:
        return {
            "current": self.current.describe() if self.current else None,
            "last_error": self.last_error,
            "reloads": {"ok": self.reloads_ok, "error": self.reloads_failed},
        }
