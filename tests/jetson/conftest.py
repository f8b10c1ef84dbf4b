import os

import pytest

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture
def fixture_root():
    return lambda name: os.path.join(FIXTURES, name)
