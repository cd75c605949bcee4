import pytest

from tests.slurm.cluster import PACKAGES, Cluster, missing_binaries


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
