import pytest

from tests.slurm.cluster import PACKAGES, Cluster, TwoNodeCluster, missing_binaries
from tests.slurm.jobs import fresh_checkout


def _started(cluster):
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _skip_without_slurm(hint: str = "") -> None:
    missing = missing_binaries()
    if missing:
        pytest.skip(f"no SLURM here ({', '.join(missing)} missing): `apt-get install {PACKAGES}`{hint}")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A private single-node SLURM cluster, or a skip naming the packages to install."""
    _skip_without_slurm(" (.ci/run installs them; make test never installs system packages)")
    yield from _started(Cluster(tmp_path_factory.mktemp("slurm")))


@pytest.fixture(scope="session")
def two_node_cluster(tmp_path_factory):
    """A private two-node SLURM cluster in network namespaces, or a skip naming what is missing."""
    _skip_without_slurm()
    why = TwoNodeCluster.available()
    if why:
        pytest.skip(f"no two-node cluster here: {why}")
    yield from _started(TwoNodeCluster(tmp_path_factory.mktemp("slurm2")))


@pytest.fixture(scope="session")
def checkout(tmp_path_factory):
    """A fresh copy of the repository (what a clone has), sharing .venv: every SLURM job runs from it."""
    return fresh_checkout(tmp_path_factory.mktemp("checkout") / "npp")
