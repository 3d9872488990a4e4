"""The integration fixtures (a real `meshproxy run` and real upstreams), shared here."""

from tests.integration.conftest import codec, echo_server, make_mesh

__all__ = ["codec", "echo_server", "make_mesh"]
