import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # test helpers (oracle, hubserver) import by name


@pytest.fixture(autouse=True, scope="session")
def private_conversion_cache(tmp_path_factory):
    """gpt2load's conversion cache in a folder of the test session's own (CLI subprocesses inherit it), never
    the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("GPT2LOAD_CACHE_DIR", str(tmp_path_factory.mktemp("gpt2load-cache")))
    mp.delenv("GPT2LOAD_NO_CACHE", raising=False)
    yield
    mp.undo()


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread for the whole suite: the test models are small, and OpenMP threads contending on a
    busy 2-core machine turn millisecond calls into seconds. Subprocesses get OMP_NUM_THREADS=1 likewise.
    GPT2LOAD_TEST_THREADS=default keeps torch's own thread count, so CI also runs the numerics multi-threaded."""
    if os.environ.get("GPT2LOAD_TEST_THREADS") == "default":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
