"""Shared fixtures."""

import pytest
import torch
from hub_server import StandInHub


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The suite's models are tiny: one intra-op thread beats OpenMP hand-offs, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def hub():
    """A fresh stand-in of the Hugging Face Hub HTTP API on 127.0.0.1 (see hub_server.py)."""
    server = StandInHub().start()
    yield server
    server.stop()
