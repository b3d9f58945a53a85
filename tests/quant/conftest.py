"""Quantization tests run single-threaded: GPTQ's column loop is thousands of small ops, which intra-op threads on a
shared 2-core machine slow down by up to 100x (measured), and the bundle comparisons run with one thread too."""

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
