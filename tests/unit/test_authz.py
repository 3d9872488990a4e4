"""AuthorizationPolicy semantics (Istio's), and path normalization against bypasses."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshproxy.codec.path import PathNormalization, normalize_target
from meshproxy.config.loader import load_snapshot
from meshproxy.errors import ConfigError, ProtocolError
from meshproxy.security.authz import Authorizer, AuthzRequest, string_match
from tests.unit.config.test_loader import write

PROXY = """
apiVersion: meshproxy.io/v1alpha1
kind: ProxyConfig
metadata: {name: p}
spec: {namespace: shop, labels: {app: reviews}}
"""
WEB = "cluster.local/ns/web/sa/frontend"
ADMIN = "cluster.local/ns/ops/sa/admin"


def authorizer(tmp_path: Path, *policies: str) -> Authorizer:
    docs = [PROXY]
    for i, spec in enumerate(policies):
        ns, _, body = spec.partition("|") if "|" in spec else ("shop", "", spec)
        docs.append(
            f"---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            f"metadata: {{name: p{i}, namespace: {ns}}}\nspec: {body}\n"
        )
    snap = load_snapshot(write(tmp_path, "\n".join(docs)))
    assert snap.authz is not None
    return snap.authz


def http(principal: str = WEB, method: str = "GET", path: str = "/", **kw: object) -> AuthzRequest:
    headers = kw.pop("headers", {})
    return AuthzRequest(
        principal,
        str(kw.pop("ip", "10.0.0.7")),
        int(kw.pop("port", 9080)),  # type: ignore[call-overload]
        method=method,
        host=str(kw.pop("host", "reviews.shop:9080")),
        path=path,
        headers=lambda n: _lines(headers.get(n)),  # type: ignore[union-attr]
    )


def _lines(value: str | list[str] | None) -> list[str]:
    """A test header: one value, several lines (a list), or absent."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else value


def tcp(principal: str = WEB, port: int = 5432, ip: str = "10.0.0.7") -> AuthzRequest:
    return AuthzRequest(principal, ip, port)


@pytest.mark.parametrize(
    ("pattern", "value", "ok"),
    [
        ("/a", "/a", True),
        ("/a", "/a/", False),
        ("/a/*", "/a/b", True),
        ("*/b", "/a/b", True),
        ("*", "", False),
        ("*", "x", True),
        ("/a*", "/ab", True),
    ],
)
def test_string_match(pattern: str, value: str, ok: bool) -> None:
    assert string_match(pattern, value) is ok


def test_no_policy_no_authorizer(tmp_path: Path) -> None:
    assert load_snapshot(write(tmp_path, PROXY)).authz is None


def test_empty_allow_policy_denies_everything(tmp_path: Path) -> None:
    a = authorizer(tmp_path, "{}")
    assert not a.check(http()).allowed and not a.check(tcp()).allowed


def test_deny_first_then_allow(tmp_path: Path) -> None:
    a = authorizer(
        tmp_path,
        "{action: DENY, rules: [{to: [{operation: {paths: [/admin/*]}}]}]}",
        f"{{rules: [{{from: [{{source: {{principals: [{WEB}, {ADMIN}]}}}}]}}]}}",
    )
    assert a.check(http(path="/reviews")).allowed
    assert not a.check(http(path="/admin/x", principal=ADMIN)).allowed  # DENY wins
    assert not a.check(http(principal="")).allowed  # plaintext: no principal, no ALLOW
    d = a.check(http(path="/admin/x"))
    assert d.policy == "shop/p0"


def test_fields_and_not_fields(tmp_path: Path) -> None:
    a = authorizer(
        tmp_path,
        "{rules: [{from: [{source: {namespaces: [web], notPrincipals: ['*/sa/blocked']}}],"
        " to: [{operation: {methods: [GET], notPaths: [/private*], hosts: [reviews.shop]}}],"
        " when: [{key: 'request.headers[x-team]', values: [blue, 'gr*']}]}]}",
    )
    ok = {"headers": {"x-team": "green"}}
    assert a.check(http(**ok)).allowed
    assert not a.check(http(method="POST", **ok)).allowed
    assert not a.check(http(path="/private/x", **ok)).allowed
    assert not a.check(http(principal="cluster.local/ns/web/sa/blocked", **ok)).allowed
    assert not a.check(http(principal=ADMIN, **ok)).allowed  # namespace ops
    assert not a.check(http()).allowed  # header absent
    assert not a.check(http(host="other.shop", **ok)).allowed
    assert a.check(http(host="REVIEWS.shop", **ok)).allowed  # hosts fold case


def test_repeated_headers_never_slip_past_deny_nor_widen_allow(tmp_path: Path) -> None:
    """Catalog B07: every reading of a repeated header (Envoy's joined list, each line, each
    element) can trigger a DENY; an ALLOW needs the joined list, and no element may be a
    not-value."""
    deny = authorizer(
        tmp_path,
        "{action: DENY, rules: [{when: [{key: 'request.headers[x-role]', values: [admin]}]},"
        " {when: [{key: 'request.headers[x-tier]', notValues: [gold]}]}]}",
    )

    def allowed(**headers: str | list[str]) -> bool:
        return deny.check(http(headers={"x-tier": "gold", **headers})).allowed

    assert allowed(**{"x-role": "user"})
    for role in (["user", "admin"], ["admin", "user"], "user,admin", "user , admin", "admin"):
        assert not allowed(**{"x-role": role}), role
    assert not allowed(**{"x-tier": ["gold", "tin"]})  # the tin reading is denied
    (tmp_path / "allow").mkdir()
    allow = authorizer(
        tmp_path / "allow",
        "{rules: [{when: [{key: 'request.headers[x-role]', values: [user]},"
        " {key: 'request.headers[x-tier]', notValues: [tin]}]}]}",
    )
    assert allow.check(http(headers={"x-role": "user"})).allowed
    assert not allow.check(http(headers={"x-role": ["user", "admin"]})).allowed
    assert not allow.check(http(headers={"x-role": "user", "x-tier": ["gold", "tin"]})).allowed
    assert not allow.check(http(headers={"x-role": "user", "x-tier": "gold,tin"})).allowed
    assert allow.check(http(headers={"x-role": "user", "x-tier": "gold"})).allowed


def test_ip_blocks_and_ports(tmp_path: Path) -> None:
    a = authorizer(
        tmp_path,
        "{rules: [{from: [{source: {ipBlocks: [10.0.0.0/24], notIpBlocks: [10.0.0.99]}}],"
        " to: [{operation: {ports: ['5432']}}]}]}",
    )
    assert a.check(tcp()).allowed
    assert not a.check(tcp(ip="10.0.1.1")).allowed
    assert not a.check(tcp(ip="10.0.0.99")).allowed
    assert not a.check(tcp(port=5433)).allowed


def test_tcp_ignores_http_rules_as_istio(tmp_path: Path) -> None:
    # ALLOW with an HTTP-only field never admits TCP; DENY drops the HTTP-only parts.
    allow = authorizer(tmp_path, "{rules: [{to: [{operation: {methods: [GET]}}]}]}")
    assert not allow.check(tcp()).allowed
    assert allow.check(http()).allowed
    deny = authorizer(
        tmp_path,
        "{action: DENY, rules: [{to: [{operation: {paths: [/x], ports: ['5432']}}]}]}",
    )
    assert not deny.check(tcp()).allowed  # more restrictive, never less
    assert deny.check(tcp(port=6379)).allowed


def test_audit_never_decides(tmp_path: Path) -> None:
    a = authorizer(tmp_path, "{action: AUDIT, rules: [{}]}")
    d = a.check(http())
    assert d.allowed and d.audited


def test_selector_and_root_namespace(tmp_path: Path) -> None:
    a = authorizer(
        tmp_path,
        "{selector: {matchLabels: {app: ratings}}, action: DENY, rules: [{}]}",  # not us
        "istio-system|{action: DENY, rules: [{to: [{operation: {paths: [/mesh-deny]}}]}]}",
    )
    assert a.check(http()).allowed
    assert not a.check(http(path="/mesh-deny")).allowed


@pytest.mark.parametrize(
    ("target", "normalized"),
    [
        (b"/admin", b"/admin"),
        (b"/public/../admin", b"/admin"),
        (b"/public/%2e%2e/admin", b"/admin"),
        (b"/%61dmin?x=/../y", b"/admin?x=/../y"),
        (b"//admin//x", b"/admin/x"),
        (b"/./admin/.", b"/admin/"),
        (b"/a/b/../../../admin", b"/admin"),
        (b"/admin%3f", b"/admin%3F"),  # reserved stays encoded (canonical upper case)
        (b"\\admin", b"/admin"),
        # A '//', '%' or '/.' only in the query takes the exact path and leaves it as it is.
        (b"/a?next=http://x//%2F/./y", b"/a?next=http://x//%2F/./y"),
        (b"/a.b/c?q=1", b"/a.b/c?q=1"),
        # A fragment is stripped, query and all behind it.
        (b"/admin#x", b"/admin"),
        (b"/a?q=1#f?g", b"/a?q=1"),
        (b"/public/..#/x", b"/"),
    ],
)
def test_path_normalization(target: bytes, normalized: bytes) -> None:
    assert normalize_target(target, PathNormalization.MERGE_SLASHES) == normalized


def test_escaped_slashes_rejected_or_decoded() -> None:
    with pytest.raises(ProtocolError):
        normalize_target(b"/public%2F..%2Fadmin", PathNormalization.MERGE_SLASHES)
    decoded = normalize_target(b"/public%2F..%2Fadmin", PathNormalization.DECODE_AND_MERGE_SLASHES)
    assert decoded == b"/admin"
    assert normalize_target(b"//a", PathNormalization.BASE) == b"//a"
    assert normalize_target(b"//a#/../b", PathNormalization.NONE) == b"//a"  # in every mode


@given(st.lists(st.sampled_from(["a", "..", ".", "", "%2e", "%2E%2e", "b%41"]), max_size=8))
def test_normalized_paths_are_stable_and_dot_free(segments: list[str]) -> None:
    target = ("/" + "/".join(segments)).encode()
    once = normalize_target(target, PathNormalization.MERGE_SLASHES)
    assert normalize_target(once, PathNormalization.MERGE_SLASHES) == once
    assert b"/../" not in once + b"/" and b"/./" not in once + b"/"
    assert b"%2e" not in once.lower()


def test_path_templates_match_whole_segments(tmp_path: Path) -> None:
    a = authorizer(
        tmp_path,
        "{action: DENY, rules: [{to: [{operation: {paths: ['/api/{*}/admin', '/static/{**}']}}]}]}",
    )
    for denied in ("/api/1/admin", "/api/*/admin", "/api/%2A/admin", "/static/a/b", "/static/"):
        assert not a.check(http(path=denied)).allowed, denied
    for allowed in ("/api//admin", "/api/1/2/admin", "/api/1/admins", "/static", "/staticx/a"):
        assert a.check(http(path=allowed)).allowed, allowed


def test_not_paths_take_templates_too(tmp_path: Path) -> None:
    a = authorizer(
        tmp_path, "{action: ALLOW, rules: [{to: [{operation: {notPaths: ['/internal/{**}']}}]}]}"
    )
    assert a.check(http(path="/public")).allowed
    assert not a.check(http(path="/internal/x/y")).allowed


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("/a/{**}/b", "{**} must be the last operator"),
        ("/a{*}", "an operator is a whole segment"),
        ("/a/*/{*}", "cannot also use the '*'"),
        ("/a/{id}", "an operator is a whole segment"),
    ],
)
def test_invalid_path_templates_are_config_errors(tmp_path: Path, path: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        authorizer(
            tmp_path, f"{{action: DENY, rules: [{{to: [{{operation: {{paths: ['{path}']}}}}]}}]}}"
        )
    assert problem in str(err.value) and "paths[0]" in str(err.value)


def test_path_parameters_and_host_forms_cannot_slip_past_a_deny(tmp_path: Path) -> None:
    a = authorizer(
        tmp_path,
        "{action: DENY, rules: [{to: [{operation: {paths: [/admin, /admin/*]}}]},"
        " {to: [{operation: {hosts: [blocked.test]}}]}]}",
    )
    for path in ("/admin;jsessionid=1", "/admin;/x", "/admin;a=b/y;c"):
        assert not a.check(http(path=path)).allowed, path
    assert a.check(http(path="/public;jsessionid=1")).allowed
    for host in ("BLOCKED.test", "blocked.test.", "blocked.test:80", "Blocked.Test.:8080"):
        assert not a.check(http(host=host)).allowed, host
    assert a.check(http(host="blocked.test.evil")).allowed
