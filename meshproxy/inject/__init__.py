"""`meshproxy inject`: add the sidecar to Kubernetes workloads, as `istioctl kube-inject`."""
