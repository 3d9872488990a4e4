"""Config loading: every error class names file, document, resource and field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from meshproxy.config.loader import load_snapshot
from meshproxy.config.snapshot import L7, ListenerKind, Resolution
from meshproxy.errors import ConfigError

REPO = Path(__file__).resolve().parents[3]

SE = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews.shop.svc.cluster.local]
  addresses: [10.0.0.5]
  ports: [{number: 9080, name: http, protocol: HTTP}, {number: 9090, name: tcp-db}]
  resolution: STATIC
  endpoints:
  - {address: 10.1.0.1, labels: {version: v1}}
  - {address: 10.1.0.2, labels: {version: v2}, ports: {http: 19080}}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""


def write(tmp_path: Path, text: str, name: str = "mesh.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def issues_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_snapshot(path)
    return [str(i) for i in info.value.issues]


# config/kubernetes holds manifests (its ConfigMap's mesh YAML is checked on its own).
@pytest.mark.parametrize(
    "example", sorted(p.name for p in (REPO / "config").iterdir() if p.name != "kubernetes")
)
def test_every_example_config_validates(example: str) -> None:
    snapshot = load_snapshot(REPO / "config" / example)
    assert snapshot.listeners


def test_valid_config_compiles_clusters_and_routes(tmp_path: Path) -> None:
    snap = load_snapshot(write(tmp_path, SE))
    assert set(snap.clusters) >= {
        "outbound|9080||reviews.shop.svc.cluster.local",
        "outbound|9080|v1|reviews.shop.svc.cluster.local",
        "outbound|9080|v2|reviews.shop.svc.cluster.local",
        "outbound|9090||reviews.shop.svc.cluster.local",
    }
    v2 = snap.clusters["outbound|9080|v2|reviews.shop.svc.cluster.local"]
    assert [(e.address, e.port) for e in v2.endpoints] == [("10.1.0.2", 19080)]
    assert v2.resolution is Resolution.STATIC
    http = snap.outbound_binding("10.0.0.5", 9080)
    assert http is not None and http.protocol is L7.HTTP
    tcp = snap.outbound_binding("10.0.0.5", 9090)
    assert tcp is not None and tcp.protocol is L7.TCP
    assert tcp.tcp_cluster == "outbound|9090||reviews.shop.svc.cluster.local"
    kinds = {spec.kind for spec in snap.listeners}
    assert kinds == {ListenerKind.OUTBOUND_CAPTURE, ListenerKind.INBOUND_CAPTURE}


def test_dangling_subset_is_reported_like_istio_users_expect(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        SE
        + """
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 50
    - destination: {host: reviews, subset: v3}
      weight: 50
""",
    )
    [issue] = issues_of(path)
    assert issue.startswith(f"{path}:")
    assert "document 3" in issue
    assert (
        "VirtualService reviews: spec.http[0].route[1].destination.subset: "
        'no subset "v3" in DestinationRule reviews'
    ) in issue


def test_unknown_field_suggests_the_right_one(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        SE
        + """
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews}
    timout: 3s
""",
    )
    [issue] = issues_of(path)
    assert 'spec.http[0].timout: unknown field (did you mean "timeout"?)' in issue
    line = path.read_text().splitlines().index("    timout: 3s") + 1
    assert issue.startswith(f"{path}:{line} document 3:")  # the line of the misspelt key


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        (
            "kind: VirtualServic\n",
            "unknown kind 'VirtualServic' (did you mean \"VirtualService\"?)",
        ),
        ("kind: ServiceEntry\napiVersion: networking.istio.io/v2\n", "needs apiVersion"),
        (
            "kind: ServiceEntry\napiVersion: networking.istio.io/v1\nspec: {hosts: [a.b]}\n",
            "metadata.name: required field is missing",
        ),
    ],
)
def test_header_errors(tmp_path: Path, snippet: str, expected: str) -> None:
    path = write(
        tmp_path,
        snippet
        + ("metadata: {name: x}\n" if "metadata" not in snippet and "spec" not in snippet else ""),
    )
    assert any(expected in i for i in issues_of(path))


def test_wrong_types_and_bad_values_are_all_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: bad}
spec:
  hosts: "not-a-list"
  ports: [{number: 70000, name: http}]
  resolution: STATICK
""",
    )
    issues = issues_of(path)
    text = "\n".join(issues)
    assert "spec.hosts: expected a list" in text
    assert "spec.ports[0].number: must be at most 65535" in text
    assert "spec.resolution: must be one of" in text and 'did you mean "STATIC"' in text
    assert len(issues) >= 3


def test_dangling_host_and_duplicate_resources(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        SE
        + """
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: shop}
spec:
  hosts: [ratings]
  http:
  - route:
    - destination: {host: reveiws}
""",
    )
    text = "\n".join(issues_of(path))
    assert "duplicate DestinationRule shop/reviews" in text
    assert (
        "destination.host: no ServiceEntry declares host 'reveiws.shop.svc.cluster.local'"
    ) in text
    assert 'did you mean "reviews.shop.svc.cluster.local"' in text


def test_bad_durations_and_regexes(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        SE
        + """
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {regex: "(unclosed"}}]
    route: [{destination: {host: reviews}}]
    timeout: 10 seconds
  # Valid for Python's re, not for RE2 (Istio's and Envoy's regex engine):
  - match: [{uri: {regex: '(a)\\1'}}, {headers: {x-a: {regex: "(?=x)x"}}}]
    route: [{destination: {host: reviews}}]
""",
    )
    text = "\n".join(issues_of(path))
    assert "spec.http[0].match[0].uri.regex: invalid regular expression" in text
    assert "spec.http[0].timeout: expected a duration" in text
    assert (
        "spec.http[1].match[0].uri.regex: invalid regular expression (RE2 syntax): "
        "invalid escape sequence: \\1" in text
    ), text
    assert "spec.http[1].match[1].headers.x-a.regex: invalid regular expression" in text, text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: [1, 2\n", "invalid YAML"),
        ("a: !!python/object/apply:os.system [id]\n", "is not allowed"),
        (
            "a: &a [1,1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
            "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
            "e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]\n",
            "alias bomb",
        ),
        ("- just\n- a list\n", "a resource must be a mapping"),
    ],
)
def test_unsafe_or_broken_yaml_is_rejected(tmp_path: Path, text: str, expected: str) -> None:
    assert any(expected in i for i in issues_of(write(tmp_path, text)))


def test_an_oversized_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """Catalog K03: a 50 MB file is not parsed (nor read): the cap is 8 MiB per file."""
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as f:
        f.truncate(50 * 1024 * 1024)  # sparse: NUL bytes, not YAML, never looked at
    write(tmp_path, "apiVersion: networking.istio.io/v1\n", "other.yaml")
    issues = issues_of(tmp_path)
    assert any("huge.yaml" in i and "larger than 8388608 bytes" in i for i in issues), issues


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("{action: CUSTOM, provider: {name: x}}", "CUSTOM (external authorization) is not"),
        ("{rules: [{from: [{source: {requestPrincipals: ['*']}}]}]}", "RequestAuthentication"),
        ("{rules: [{when: [{key: 'request.auth.claims[iss]', values: [a]}]}]}", "JWT claims"),
        ("{rules: [{when: [{key: source.nmespace, values: [a]}]}]}", "did you mean"),
        ("{rules: [{from: [{source: {ipBlocks: [10.0.0.0/33]}}]}]}", "not an IP address"),
        ("{rules: [{to: [{operation: {ports: [http]}}]}]}", "not a port number"),
    ],
)
def test_security_policies_fail_closed_on_what_cannot_be_checked(
    tmp_path: Path, spec: str, expected: str
) -> None:
    """Ignoring part of a policy would open what it meant to close: such policies are errors."""
    path = write(
        tmp_path,
        f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: p}}
spec: {spec}
""",
    )
    assert any(expected in i for i in issues_of(path)), issues_of(path)


def test_directory_reads_visible_yaml_only(tmp_path: Path) -> None:
    (tmp_path / "..2025_01_01").mkdir()
    write(tmp_path / "..2025_01_01", "kind: Broken\n", "x.yaml")
    write(tmp_path, SE, "mesh.yaml")
    (tmp_path / "notes.txt").write_text("not yaml: [")
    snap = load_snapshot(tmp_path)
    assert "outbound|9080|v1|reviews.shop.svc.cluster.local" in snap.clusters


def test_proxy_config_defaults_follow_istio(tmp_path: Path) -> None:
    snap = load_snapshot(write(tmp_path, SE))
    s = snap.settings
    assert (s.proxy_admin_port, s.proxy_listen_port, s.proxy_inbound_listen_port) == (
        15000,
        15001,
        15006,
    )
    assert s.connect_timeout == 10.0 and not snap.registry_only
    assert snap.clusters["outbound|9080||reviews.shop.svc.cluster.local"].lb.value == (
        "LEAST_REQUEST"
    )


def test_port_clash_between_listener_and_admin(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
apiVersion: meshproxy.io/v1alpha1
kind: ProxyConfig
metadata: {name: p}
spec: {proxyAdminPort: 15001}
""",
    )
    assert any("already used by proxyAdminPort" in i for i in issues_of(path))


def test_headers_with_underscores_action_is_checked(tmp_path: Path) -> None:
    assert load_snapshot(write(tmp_path, SE)).settings.headers_with_underscores_action == (
        "DROP_HEADER"
    )
    path = write(
        tmp_path,
        """
apiVersion: meshproxy.io/v1alpha1
kind: ProxyConfig
metadata: {name: p}
spec: {headersWithUnderscoresAction: DROP_HEADERS}
""",
    )
    (issue,) = [i for i in issues_of(path) if "headersWithUnderscoresAction" in i]
    assert "must be one of" in issue and 'did you mean "DROP_HEADER"' in issue, issue


def test_prometheus_port_follows_istio() -> None:
    """15090 on a capturing sidecar, off for explicit-listener proxies, statsPort wins."""
    from meshproxy.config.resources import ProxySettings

    assert ProxySettings().prometheus_port == 15090
    assert ProxySettings(interception_mode="NONE").prometheus_port == 0
    assert ProxySettings(interception_mode="NONE", stats_port=9999).prometheus_port == 9999
    assert ProxySettings(stats_port=0).prometheus_port == 0


TELEMETRY_BASE = """
apiVersion: meshproxy.io/v1alpha1
kind: ProxyConfig
metadata: {name: p, namespace: shop}
spec:
  namespace: shop
  labels: {app: cart}
  accessLogFile: /dev/stdout
  extensionProviders:
  - name: file
    envoyFileAccessLog: {path: /tmp/a.log}
  - name: otel
    opentelemetry: {service: collector, port: 4317}
  defaultProviders: {accessLogging: [file], tracing: [otel]}
"""


def test_telemetry_levels_override_field_by_field(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        TELEMETRY_BASE
        + """---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh, namespace: istio-system}
spec:
  tracing: [{randomSamplingPercentage: 10}]
  accessLogging: [{filter: {expression: "response.code >= 500"}}]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: cart, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  tracing: [{disableSpanReporting: true}]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: other, namespace: shop}
spec:
  selector: {matchLabels: {app: other}}
  accessLogging: [{disabled: true}]
""",
    )
    snapshot = load_snapshot(path)
    tracing = snapshot.tracing
    assert tracing is not None and tracing.provider_name == "otel"
    assert (tracing.sampling_percent, tracing.disable_span_reporting) == (10.0, True)
    assert [(s.path, s.filter) for s in snapshot.access_logs] == [
        ("/dev/stdout", None),
        ("/tmp/a.log", "response.code >= 500"),
    ]


def test_telemetry_disabled_turns_provider_logs_off(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        TELEMETRY_BASE
        + """---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: quiet, namespace: shop}
spec:
  accessLogging: [{disabled: true}]
""",
    )
    assert [s.path for s in load_snapshot(path).access_logs] == ["/dev/stdout"]


def test_telemetry_providers_must_exist_and_fit_their_section(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        TELEMETRY_BASE
        + """---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: t, namespace: shop}
spec:
  tracing: [{providers: [{name: file}]}]
  accessLogging: [{providers: [{name: otel}]}, {providers: [{name: fiel}]}]
""",
    )
    text = "\n".join(issues_of(path))
    assert "spec.tracing[0].providers[0].name: provider 'file' is envoyFileAccessLog" in text
    assert "spec.accessLogging[0].providers[0].name: provider 'otel' is opentelemetry" in text
    assert "spec.accessLogging[1].providers[0].name: no extension provider 'fiel'" in text
    assert 'did you mean "file"' in text


def test_a_load_notes_the_bytes_it_read_as_the_fingerprint_would(tmp_path: Path) -> None:
    """The runtime keeps the fingerprint of what a reload loaded (taken while reading), and
    compares later looks with it: both must use one formula, CRLF files and files past the
    size cap included, or every event would reload (or a change would be missed)."""
    import hashlib

    from meshproxy.config.source import fingerprint, read_sources

    write(tmp_path, SE)
    (tmp_path / "crlf.yaml").write_bytes(b"# a comment\r\n# another\r\n")
    read = hashlib.sha256()
    load_snapshot(tmp_path, read)
    assert read.digest() == fingerprint(tmp_path)
    with open(tmp_path / "huge.yaml", "wb") as f:
        f.truncate(9 * 1024 * 1024)  # past the cap: noted by its size, never read
    read = hashlib.sha256()
    read_sources(tmp_path, read)
    assert read.digest() == fingerprint(tmp_path)
    (tmp_path / "crlf.yaml").write_bytes(b"# a comment\r\n# changed\r\n")
    assert read.digest() != fingerprint(tmp_path)
