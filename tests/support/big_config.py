"""A generated config of many services, for load-time tests and benchmarks."""

from __future__ import annotations


def services_yaml(n: int) -> str:
    """n ServiceEntries with a VirtualService each; the odd ones are TCP, and their tcp[]
    route sends them to the next TCP service."""
    docs = []
    for i in range(n):
        proto = "TCP" if i % 2 else "HTTP"
        route = (
            f"  tcp: [{{route: [{{destination: {{host: s{(i + 2) % n}.example.internal}}}}]}}]"
            if i % 2
            else f"  http: [{{route: [{{destination: {{host: s{i}.example.internal}}}}]}}]"
        )
        docs.append(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n"
            f"metadata: {{name: s{i}}}\nspec:\n  hosts: [s{i}.example.internal]\n"
            f"  addresses: [10.{i // 250}.{i % 250}.1]\n"
            f"  ports: [{{number: 80, name: p, protocol: {proto}}}]\n  resolution: STATIC\n"
            f"  endpoints: [{{address: 10.200.{i // 250}.{i % 250}}}]\n---\n"
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
            f"metadata: {{name: s{i}}}\nspec:\n  hosts: [s{i}.example.internal]\n{route}\n"
        )
    return "---\n".join(docs)
