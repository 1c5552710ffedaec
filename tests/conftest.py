import os

# Tests never touch the network: hub lookups must fail fast instead of hanging.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# The test models are tiny: a second thread only adds synchronisation (and on a busy machine, waiting).
torch.set_num_threads(1)
