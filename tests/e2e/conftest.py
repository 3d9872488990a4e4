"""Network-namespace fixtures for the e2e tests (defined in pods.py and capture_pod.py, and
shared with tests/robustness, which imports them from there)."""

from tests.e2e.capture_pod import pod
from tests.e2e.pods import netns, netns_pair

__all__ = ["netns", "netns_pair", "pod"]
