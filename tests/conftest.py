import os

# Tests never touch the network: hub lookups must fail fast instead of hanging.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# The test models are tiny: a second thread only adds synchronisation (and on a loaded 2-core machine an OpenMP
# barrier waiting for a descheduled thread makes every small op take milliseconds).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts on one thread, whatever a test before it set."""
    torch.set_num_threads(1)
    yield
