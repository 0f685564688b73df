import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models are faster on one thread (thread start-up costs more than their matmuls), and the machine's few
    cores are shared with other test processes; restored afterwards so other test folders are unaffected."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
