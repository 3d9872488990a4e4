"""`meshproxy inject -f FILE|-`: Kubernetes YAML in, the same YAML with sidecars out.

Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob and Pod (also inside a List) get
the sidecar in their pod template; every other document passes through unchanged, and a
workload injected before is left as it is, so injecting twice changes nothing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from meshproxy import __version__
from meshproxy.inject.pod import InjectError, InjectOptions, inject_pod

TEMPLATE_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job")
DEFAULT_IMAGE = f"meshproxy:{__version__}"


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-f", "--filename", required=True, help="the workload YAML to inject ('-' reads stdin)"
    )
    parser.add_argument("-o", "--output", help="write here instead of stdout")
    parser.add_argument("--image", default=DEFAULT_IMAGE, help="the meshproxy image")
    parser.add_argument(
        "--config-map",
        default="meshproxy",
        help="the ConfigMap holding the pod's mesh YAML (mounted at /etc/meshproxy)",
    )
    parser.add_argument(
        "--certs-secret",
        default="meshproxy-certs-{serviceAccount}",
        help="the Secret with cert-chain.pem, key.pem, root-cert.pem (mounted at /etc/certs); "
        "{serviceAccount} is the pod's service account",
    )
    parser.add_argument(
        "--hold-application-until-proxy-starts",
        action="store_true",
        help="the default for pods whose proxy.istio.io/config annotation does not say",
    )
    parser.set_defaults(func=run)


def pod_templates(
    doc: dict[str, Any], where: str
) -> Iterator[tuple[dict[str, Any], dict[str, Any], str]]:
    """(metadata, spec, where) of each pod template in a document."""
    kind = doc.get("kind")
    if kind == "List":
        for i, item in enumerate(doc.get("items") or []):
            if isinstance(item, dict):
                yield from pod_templates(item, f"{where} items[{i}]")
        return
    name = f"{where} {kind}/{(doc.get('metadata') or {}).get('name', '?')}"
    if kind == "Pod":
        yield _meta(doc, name), _spec(doc, name), name
    elif kind in TEMPLATE_KINDS:
        template = _mapping(_spec(doc, name), "template", name)
        yield _meta(template, name), _spec(template, name), name
    elif kind == "CronJob":
        job = _mapping(_spec(doc, name), "jobTemplate", name)
        template = _mapping(_spec(job, name), "template", name)
        yield _meta(template, name), _spec(template, name), name


def _mapping(parent: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = parent.get(key)
    if not isinstance(value, dict):
        raise InjectError(f"{where}: {key} is missing or not a mapping")
    return value


def _spec(parent: dict[str, Any], where: str) -> dict[str, Any]:
    return _mapping(parent, "spec", where)


def _meta(parent: dict[str, Any], where: str) -> dict[str, Any]:
    meta = parent.get("metadata")
    if meta is None:
        meta = parent["metadata"] = {}
    if not isinstance(meta, dict):
        raise InjectError(f"{where}: metadata is not a mapping")
    return meta


def inject_text(text: str, opts: InjectOptions, source: str) -> tuple[str, int]:
    """The injected YAML and how many pod templates got a sidecar."""
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise InjectError(f"{source}: not YAML: {exc}") from None
    injected = 0
    for index, doc in enumerate(docs):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise InjectError(f"{source}: document {index + 1} is not a mapping")
        for meta, spec, where in pod_templates(doc, f"{source}: document {index + 1}"):
            injected += inject_pod(meta, spec, opts, where)
    out = yaml.safe_dump_all([d for d in docs if d is not None], sort_keys=False)
    return out, injected


def run(args: argparse.Namespace) -> int:
    try:
        if args.filename == "-":
            text, source = sys.stdin.read(), "<stdin>"
        else:
            text, source = Path(args.filename).read_text(), args.filename
    except (OSError, UnicodeDecodeError) as exc:
        print(f"meshproxy inject: cannot read {args.filename}: {exc}", file=sys.stderr)
        return 1
    opts = InjectOptions(
        image=args.image,
        config_map=args.config_map,
        certs_secret=args.certs_secret,
        hold_application=args.hold_application_until_proxy_starts,
    )
    try:
        out, injected = inject_text(text, opts, source)
    except InjectError as exc:
        print(f"meshproxy inject: {exc}", file=sys.stderr)
        return 1
    if args.output:
        try:
            Path(args.output).write_text(out)
        except OSError as exc:
            print(f"meshproxy inject: cannot write {args.output}: {exc}", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(out)
    print(f"meshproxy inject: {injected} pod template(s) injected", file=sys.stderr)
    return 0
