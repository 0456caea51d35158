"""A fixture for tests made of many small CPU ops: one intra-op thread for the test's duration.

Tiny convolutions gain nothing from a second thread, and on a CPU shared with other jobs extra
threads only oversubscribe it. Use it with ``pytestmark = pytest.mark.usefixtures("one_intra_op_thread")``
after ``from single_thread import one_intra_op_thread``.
"""

import pytest
import torch


@pytest.fixture
def one_intra_op_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
