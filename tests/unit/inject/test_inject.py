"""`meshproxy inject`: every workload kind, Istio's annotations, idempotence, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
import yaml

from meshproxy.inject.command import inject_text
from meshproxy.inject.pod import InjectError, InjectOptions

OPTS = InjectOptions(image="meshproxy:test")
POD_SPEC = {"containers": [{"name": "app", "image": "app:1", "ports": [{"containerPort": 8080}]}]}


def workload(kind: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    template = {"metadata": {"labels": {"app": "x"}}, "spec": json.loads(json.dumps(POD_SPEC))}
    if annotations:
        template["metadata"]["annotations"] = annotations
    meta = {"name": "x", "namespace": "ns"}
    if kind == "Pod":
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {**meta, **template["metadata"]},
            "spec": template["spec"],
        }
    if kind == "CronJob":
        return {
            "apiVersion": "batch/v1",
            "kind": kind,
            "metadata": meta,
            "spec": {"schedule": "* * * * *", "jobTemplate": {"spec": {"template": template}}},
        }
    return {"apiVersion": "apps/v1", "kind": kind, "metadata": meta, "spec": {"template": template}}


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "Pod":
        return doc["spec"]
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def run_inject(*docs: dict[str, Any], opts: InjectOptions = OPTS) -> list[dict[str, Any]]:
    out, _ = inject_text(yaml.safe_dump_all(docs), opts, "test.yaml")
    return list(yaml.safe_load_all(out))


@pytest.mark.parametrize(
    "kind", ["Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod"]
)
def test_each_workload_kind_gets_init_sidecar_and_volumes(kind: str) -> None:
    (doc,) = run_inject(workload(kind))
    spec = pod_spec(doc)
    assert [c["name"] for c in spec["containers"]] == ["app", "istio-proxy"]
    (init,) = spec["initContainers"]
    assert init["name"] == "istio-init" and init["image"] == "meshproxy:test"
    assert init["args"][:2] == ["iptables", "--apply"]
    assert set(init["securityContext"]["capabilities"]["add"]) == {"NET_ADMIN", "NET_RAW"}
    proxy = spec["containers"][1]
    assert proxy["securityContext"]["runAsUser"] == 1337
    assert proxy["securityContext"]["runAsGroup"] == 1337
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    assert {"containerPort": 15090, "protocol": "TCP", "name": "http-envoy-prom"} in proxy["ports"]
    mounts = {m["name"]: m["mountPath"] for m in proxy["volumeMounts"]}
    assert mounts == {"meshproxy-config": "/etc/meshproxy", "istio-certs": "/etc/certs"}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["meshproxy-config"]["configMap"] == {"name": "meshproxy"}
    assert volumes["istio-certs"]["secret"]["secretName"] == "meshproxy-certs-default"
    assert "lifecycle" not in proxy


def test_other_kinds_pass_through_unchanged_and_twice_is_once() -> None:
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": 80}]},
    }
    once = run_inject(service, workload("Deployment"))
    assert once[0] == service
    twice = run_inject(*once)
    assert twice == once


def test_inject_false_and_host_network_are_left_alone() -> None:
    off = workload("Deployment", {"sidecar.istio.io/inject": "false"})
    labelled = workload("Deployment")
    labelled["spec"]["template"]["metadata"]["labels"]["sidecar.istio.io/inject"] = "false"
    host = workload("Pod")
    host["spec"]["hostNetwork"] = True
    for doc in (off, labelled, host):
        assert run_inject(doc) == [doc]


def test_traffic_annotations_become_iptables_flags() -> None:
    (doc,) = run_inject(
        workload(
            "Deployment",
            {
                "traffic.sidecar.istio.io/includeOutboundIPRanges": "10.96.0.0/12, 10.0.0.0/8",
                "traffic.sidecar.istio.io/excludeOutboundIPRanges": "169.254.169.254/32",
                "traffic.sidecar.istio.io/includeInboundPorts": "8080",
                "traffic.sidecar.istio.io/excludeInboundPorts": "9090",
                "traffic.sidecar.istio.io/excludeOutboundPorts": "5432,6379",
                "traffic.sidecar.istio.io/includeOutboundPorts": "3306",
            },
        )
    )
    args = pod_spec(doc)["initContainers"][0]["args"]
    flags = dict(zip(args[2::2], args[3::2], strict=True))
    assert flags == {
        "-p": "15001",
        "-z": "15006",
        "-u": "1337",
        "-m": "REDIRECT",
        "-i": "10.96.0.0/12,10.0.0.0/8",
        "-x": "169.254.169.254/32",
        "-b": "8080",
        "-d": "15090,15021,15020,9090",
        "-q": "3306",
        "-o": "5432,6379",
    }
    # What the init container will run is accepted by `meshproxy iptables` itself.
    out = subprocess.run(
        [sys.executable, "-m", "meshproxy", *[a for a in args if a != "--apply"]],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "-A ISTIO_OUTPUT -d 169.254.169.254/32 -j RETURN" in out.stdout.splitlines()


def test_hold_application_puts_the_proxy_first_with_a_wait_hook() -> None:
    held = workload(
        "Deployment", {"proxy.istio.io/config": "holdApplicationUntilProxyStarts: true"}
    )
    (doc,) = run_inject(held)
    first = pod_spec(doc)["containers"][0]
    assert first["name"] == "istio-proxy"
    assert first["lifecycle"]["postStart"]["exec"]["command"] == ["meshproxy", "wait"]
    (doc,) = run_inject(workload("Job"), opts=InjectOptions("i", hold_application=True))
    assert pod_spec(doc)["containers"][0]["name"] == "istio-proxy"
    # The pod's own annotation beats the default.
    off = workload("Job", {"proxy.istio.io/config": '{"holdApplicationUntilProxyStarts": false}'})
    (doc,) = run_inject(off, opts=InjectOptions("i", hold_application=True))
    assert pod_spec(doc)["containers"][0]["name"] == "app"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kind: Deployment\nspec: [1\n", "not YAML"),
        ("- a\n- b\n", "document 1 is not a mapping"),
        ("kind: Deployment\nmetadata: {name: d}\nspec: {}\n", "Deployment/d: template is missing"),
        ("kind: Pod\nmetadata: {name: p}\nspec: {containers: []}\n", "Pod/p: the pod has no"),
        (
            "kind: Pod\nmetadata: {name: p, annotations: {proxy.istio.io/config: '[1'}}\n"
            "spec: {containers: [{name: a}]}\n",
            "proxy.istio.io/config is not YAML",
        ),
    ],
)
def test_bad_input_is_a_clear_error(text: str, message: str) -> None:
    with pytest.raises(InjectError, match=message):
        inject_text(text, OPTS, "in.yaml")


def test_cli_reads_stdin_and_reports_errors_by_exit_code() -> None:
    def inject(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "meshproxy", "inject", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    out = inject("-f", "-", "--image", "reg/meshproxy:1", stdin=yaml.safe_dump(workload("Pod")))
    assert out.returncode == 0 and "1 pod template(s) injected" in out.stderr
    assert yaml.safe_load(out.stdout)["spec"]["containers"][1]["image"] == "reg/meshproxy:1"
    out = inject("-f", "-", stdin="kind: Pod\nspec: [\n")
    assert out.returncode == 1 and out.stderr.startswith("meshproxy inject: <stdin>: not YAML")
    assert out.stdout == ""
    out = inject("-f", "/nonexistent.yaml", stdin="")
    assert out.returncode == 1 and "cannot read /nonexistent.yaml" in out.stderr
