"""Workload identity loading: SPIFFE IDs, expiry, and clear errors for broken files."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from meshproxy.security.ca import issue_workload, make_root, write_workload
from meshproxy.security.certwatch import IdentityManager
from meshproxy.security.identity import CertError, CertFiles, load_identity
from meshproxy.security.spiffe import SpiffeError, SpiffeId, spiffe_of

ID = SpiffeId.workload("cluster.local", "shop", "reviews")


def files(d: Path) -> CertFiles:
    return CertFiles(d / "cert-chain.pem", d / "key.pem", d / "root-cert.pem")


def issue(d: Path, ttl: dt.timedelta = dt.timedelta(hours=1), **kw: object) -> None:
    root = make_root("cluster.local", dt.timedelta(days=1))
    cert, key = issue_workload(root, ID, ttl, **kw)  # type: ignore[arg-type]
    write_workload(d, cert, key, [root.cert])


def test_spiffe_ids() -> None:
    assert str(ID) == "spiffe://cluster.local/ns/shop/sa/reviews"
    assert (ID.namespace, ID.service_account, ID.principal) == (
        "shop",
        "reviews",
        "cluster.local/ns/shop/sa/reviews",
    )
    for bad in ("http://x/y", "spiffe://UPPER/ns/a", "spiffe://td/ns/../sa/x", "spiffe://td/a//b"):
        with pytest.raises(SpiffeError):
            SpiffeId.parse(bad)
    assert spiffe_of({"subjectAltName": (("URI", str(ID)),)}) == ID
    assert spiffe_of({"subjectAltName": (("URI", str(ID)), ("URI", str(ID)))}) is None


def test_load_identity(tmp_path: Path) -> None:
    issue(tmp_path)
    ident = load_identity(files(tmp_path))
    assert ident.spiffe_id == ID and not ident.expired and ident.roots == 1
    assert ident.client_context(("h2",)) is ident.client_context(("h2",))  # cached


def test_expired_certificate_is_loaded_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    start = dt.datetime.now(dt.UTC) - dt.timedelta(hours=3)
    issue(tmp_path, dt.timedelta(hours=1), not_before=start)
    ident = load_identity(files(tmp_path))
    assert ident.expired
    assert "expired" in caplog.text


def test_broken_files_are_named_and_the_last_good_identity_stays(tmp_path: Path) -> None:
    issue(tmp_path)
    manager = IdentityManager(files(tmp_path))
    assert manager.load() and manager.current is not None
    good = manager.current
    other = tmp_path / "other"
    issue(other)
    (tmp_path / "key.pem").write_bytes((other / "key.pem").read_bytes())
    assert not manager.load()
    assert manager.current is good and "does not match" in (manager.last_error or "")
    (tmp_path / "cert-chain.pem").write_text("not a certificate")
    assert not manager.load()
    assert "cert-chain.pem" in (manager.last_error or "")
    issue(tmp_path)
    (tmp_path / "root-cert.pem").unlink()
    with pytest.raises(CertError, match=r"root-cert\.pem"):
        load_identity(files(tmp_path))
