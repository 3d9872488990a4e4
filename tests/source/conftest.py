"""Tests of the source tree itself: they need the checkout (CI's first pass), not an install."""

from tests.integration.conftest import echo_server, make_mesh

__all__ = ["echo_server", "make_mesh"]
