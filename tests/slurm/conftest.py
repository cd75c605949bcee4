import pytest

from tests.slurm.cluster import PACKAGES, Cluster, TwoNodeCluster, missing_binaries
from tests.slurm.jobs import fresh_checkout


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A private single-node SLURM cluster, or a skip naming the packages to install."""
    missing = missing_binaries()
    if missing:
        pytest.skip(f"no SLURM here ({', '.join(missing)} missing): `apt-get install {PACKAGES}` "
                    "(.ci/run installs them; make test never installs system packages)")
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def two_node_cluster(tmp_path_factory):
    """A private two-node SLURM cluster in network namespaces, or a skip naming what is missing."""
    missing = missing_binaries()
    if missing:
        pytest.skip(f"no SLURM here ({', '.join(missing)} missing): `apt-get install {PACKAGES}`")
    why = TwoNodeCluster.available()
    if why:
        pytest.skip(f"no two-node cluster here: {why}")
    cluster = TwoNodeCluster(tmp_path_factory.mktemp("slurm2"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def checkout(tmp_path_factory):
    """A fresh copy of the repository (what a clone has), sharing .venv: every SLURM job runs from it."""
    return fresh_checkout(tmp_path_factory.mktemp("checkout") / "npp")
