import pytest

from tests.multinode.world import World, check


@pytest.fixture(scope="session")
def world():
    """One two-node Ray world (tests/multinode/world.py) for every test that needs it; stopped at the end."""
    reason = check()
    if reason:
        pytest.skip(reason)
    with World() as w:
        yield w
