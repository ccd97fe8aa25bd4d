"""The supervisor cluster and directory fixtures, reused: a real cluster for Prometheus."""

from tests.integration.directory.conftest import start_directory
from tests.integration.supervisor.conftest import make_cluster

__all__ = ["make_cluster", "start_directory"]
