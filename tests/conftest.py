import os

# Before torch loads (see instdisc.cli._tune_runtime).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Keep the 2-core CI machine from oversubscribing when tests spawn processes.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Decoded-image caches of the tests go to a temporary folder, never to ~/.cache."""
    if "INSTDISC_CACHE" not in os.environ:
        os.environ["INSTDISC_CACHE"] = str(tmp_path_factory.mktemp("instdisc-cache"))
    yield


@pytest.fixture()
def one_thread():
    """Training in the test process with one thread: the numbers do not depend on thread scheduling,
    and two such tests can share the 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
