"""Istio's TCP metadata exchange between two real sidecars over mTLS, and against a peer that
speaks it from the protocol's own definition (an Envoy stand-in built here with protobuf,
not with meshproxy's code): frames never reach the applications, each side's TCP series
name the other workload, a peer without the exchange passes through, a broken frame closes
only its own connection."""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from google.protobuf import any_pb2, struct_pb2

from tests.integration.test_mtls import CLIENT_ID, SERVER_ID, ca
from tests.support.metrics import scrape, value
from tests.support.proxy import (
    ProxyProcess,
    egress_sidecar,
    free_port,
    proxy_config_yaml,
    service_entry,
    wait_for,
)

MAGIC = 0x3D230467


@dataclass
class TcpPair:
    tmp: Path
    client: ProxyProcess
    server: ProxyProcess
    out_port: int  # the client sidecar's egress for db.test (TCP)
    in_port: int  # the server sidecar's inbound TCP port (STRICT)


def _certs(tmp: Path) -> str:
    files = f"certChain: {tmp}/cert-chain.pem, privateKey: {tmp}/key.pem"
    return f"{{{files}, rootCert: {tmp}/root-cert.pem}}"


@pytest.fixture
def tcp_pair(tmp_path: Path, echo_server: int) -> Iterator[TcpPair]:
    ca("init", "--dir", str(tmp_path / "ca"))
    for name, spiffe in (("client", CLIENT_ID), ("server", SERVER_ID)):
        out = str(tmp_path / name)
        ca("issue", "--ca", str(tmp_path / "ca"), "--spiffe-id", spiffe, "--out", out)
    s_admin, c_admin, in_port, out_port = (free_port() for _ in range(4))
    (tmp_path / "scfg").mkdir()
    (tmp_path / "scfg" / "mesh.yaml").write_text(
        proxy_config_yaml(
            s_admin,
            labels="{app: db, version: v3}",
            workloadName="db-wl",
            certificates=_certs(tmp_path / "server"),
        )
        + f"""apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: istio-system}}
spec: {{mtls: {{mode: STRICT}}}}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: default}}
spec:
  ingress:
  - {{port: {{number: {in_port}, protocol: TCP, name: tcp-db}}, bind: 127.0.0.1,
     captureMode: NONE, defaultEndpoint: "127.0.0.1:{echo_server}"}}
"""
    )
    (tmp_path / "ccfg").mkdir()
    (tmp_path / "ccfg" / "mesh.yaml").write_text(
        proxy_config_yaml(
            c_admin,
            labels="{app: api, version: v1}",
            workloadName="api-wl",
            certificates=_certs(tmp_path / "client"),
        )
        + service_entry("db.test", out_port, [in_port], "TCP")
        + "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: db}\n"
        "spec: {host: db.test, trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}}\n---\n"
        + egress_sidecar(out_port, protocol="TCP")
    )
    server = ProxyProcess(tmp_path / "scfg", s_admin, tmp_path / "server.log")
    client = ProxyProcess(tmp_path / "ccfg", c_admin, tmp_path / "client.log")
    try:
        server.wait_ready()
        client.wait_ready()
        yield TcpPair(tmp_path, client, server, out_port, in_port)
    finally:
        client.terminate()
        server.terminate()


def echo(port: int, payload: bytes) -> bytes:
    """Send and read the echo back. (Not by half-closing: TLS here cannot carry a half-close,
    so a client's FIN closes the mTLS hop.)"""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        out = b""
        while len(out) < len(payload) and (chunk := s.recv(65536)):
            out += chunk
    return out


def test_two_sidecars_exchange_and_name_each_other(tcp_pair: TcpPair) -> None:
    payload = bytes(range(256)) * 64
    assert echo(tcp_pair.out_port, payload) == payload  # no frame reached either app
    peer = dict(
        source_workload="api-wl",
        source_app="api",
        source_version="v1",
        source_principal=CLIENT_ID,
        destination_workload="db-wl",
        destination_app="db",
        destination_version="v3",
        destination_principal=SERVER_ID,
    )

    def closed(proxy: ProxyProcess, reporter: str) -> float | None:
        samples = scrape(proxy.admin)
        return value(samples, "istio_tcp_connections_closed_total", reporter=reporter, **peer)

    assert wait_for(lambda: closed(tcp_pair.client, "source") == 1)
    assert wait_for(lambda: closed(tcp_pair.server, "destination") == 1)
    samples = scrape(tcp_pair.server.admin)
    name = "istio_tcp_received_bytes_total"
    assert value(samples, name, reporter="destination", **peer) == len(payload)  # app bytes only
    samples = scrape(tcp_pair.client.admin)
    assert value(samples, "istio_tcp_sent_bytes_total", **peer) == len(payload)


def _envoy_frame(fields: dict[str, str], node_id: str) -> bytes:
    """The frame as Istio's metadata_exchange filter writes it, from protobuf alone."""
    data = struct_pb2.Struct()
    metadata = data.fields["x-envoy-peer-metadata"].struct_value
    for key, text in fields.items():
        metadata.fields[key].string_value = text
    metadata.fields["LABELS"].struct_value.fields["app"].string_value = "envoy-app"
    data.fields["x-envoy-peer-metadata-id"].string_value = node_id
    wrapped = any_pb2.Any(
        type_url="type.googleapis.com/google.protobuf.Struct", value=data.SerializeToString()
    ).SerializeToString()
    return struct.pack("!II", MAGIC, len(wrapped)) + wrapped


def _mesh_client(pair: TcpPair) -> ssl.SSLSocket:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(pair.tmp / "client" / "root-cert.pem")
    ctx.load_cert_chain(pair.tmp / "client" / "cert-chain.pem", pair.tmp / "client" / "key.pem")
    ctx.set_alpn_protocols(["istio-peer-exchange", "istio"])
    raw = socket.create_connection(("127.0.0.1", pair.in_port), timeout=10)
    tls = ctx.wrap_socket(raw, server_hostname="outbound_.1_._.db.test")
    assert tls.selected_alpn_protocol() == "istio-peer-exchange"
    return tls


def _read_exact(s: ssl.SSLSocket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        assert chunk, f"closed after {len(out)} of {n} bytes"
        out += chunk
    return out


def _read_frame(s: ssl.SSLSocket) -> struct_pb2.Struct:
    magic, length = struct.unpack("!II", _read_exact(s, 8))
    assert magic == MAGIC
    wrapped = any_pb2.Any.FromString(_read_exact(s, length))
    assert wrapped.type_url == "type.googleapis.com/google.protobuf.Struct"
    return struct_pb2.Struct.FromString(wrapped.value)


def test_an_envoy_peer_reads_our_frame_and_we_read_its(tcp_pair: TcpPair) -> None:
    with _mesh_client(tcp_pair) as s:
        s.sendall(
            _envoy_frame(
                {"NAMESPACE": "shop", "WORKLOAD_NAME": "envoy-wl", "CLUSTER_ID": "east"},
                "sidecar~10.0.0.1~envoy-wl-abc.shop~shop.svc.cluster.local",
            )
            + b"hello"
        )
        theirs = _read_frame(s)  # the server sidecar's frame comes first
        assert _read_exact(s, 5) == b"hello"
    metadata = theirs.fields["x-envoy-peer-metadata"].struct_value.fields
    assert metadata["WORKLOAD_NAME"].string_value == "db-wl"
    assert metadata["NAMESPACE"].string_value == "default"
    labels = metadata["LABELS"].struct_value.fields
    assert labels["app"].string_value == "db"
    assert theirs.fields["x-envoy-peer-metadata-id"].string_value.startswith("sidecar~")
    series = dict(
        reporter="destination",
        source_workload="envoy-wl",
        source_workload_namespace="shop",
        source_app="envoy-app",
        source_cluster="east",
    )
    assert wait_for(
        lambda: (
            value(scrape(tcp_pair.server.admin), "istio_tcp_connections_closed_total", **series)
            == 1
        )
    )


def test_a_peer_without_the_exchange_passes_through(tcp_pair: TcpPair) -> None:
    """It negotiated the ALPN but writes no frame: its bytes reach the app as they came."""
    with _mesh_client(tcp_pair) as s:
        s.sendall(b"\x3d\x23plain bytes")  # even starting like the magic
        _read_frame(s)
        assert _read_exact(s, 13) == b"\x3d\x23plain bytes"
    series = dict(reporter="destination", source_workload="unknown", source_principal=CLIENT_ID)
    assert wait_for(
        lambda: (
            value(scrape(tcp_pair.server.admin), "istio_tcp_connections_closed_total", **series)
            == 1
        )
    )


def test_a_broken_frame_closes_its_connection_only(tcp_pair: TcpPair) -> None:
    with _mesh_client(tcp_pair) as s:
        s.sendall(struct.pack("!II", MAGIC, 1 << 30) + b"x" * 64)  # a 1 GiB frame announced
        _read_frame(s)
        try:
            assert s.recv(16) == b""
        except (ConnectionResetError, ssl.SSLError):
            pass
    with _mesh_client(tcp_pair) as s:
        s.sendall(struct.pack("!II", MAGIC, 3) + b"\xff\xff\xff")  # not an Any
        _read_frame(s)
        try:
            assert s.recv(16) == b""
        except (ConnectionResetError, ssl.SSLError):
            pass
    assert echo(tcp_pair.out_port, b"still fine") == b"still fine"
    flagged = value(
        scrape(tcp_pair.server.admin), "istio_tcp_connections_closed_total", response_flags="DPE"
    )
    assert flagged == 2
