"""meshproxy: a service-mesh sidecar data-plane proxy that speaks Istio's resource YAML."""

__version__ = "0.1.0"
