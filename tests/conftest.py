"""Shared fixtures."""

import pytest
from hub_server import StandInHub


@pytest.fixture
def hub():
    """A fresh stand-in of the Hugging Face Hub HTTP API on 127.0.0.1 (see hub_server.py)."""
    server = StandInHub().start()
    yield server
    server.stop()
