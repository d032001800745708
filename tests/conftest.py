"""Shared fixtures: a tiny simulated sky written as raw shards (session-scoped).

The simulated sky needs the real CWW templates in ../shared/data/templates (or
$OMNISKY_SHARED_DATA); without them, tests that use these fixtures skip.
"""
import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two OpenMP threads made the small convs
    of the tokenizer tests 10-20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _require_templates():
    from omnisky.shards.sed import shared_data_dir
    try:
        return shared_data_dir()
    except FileNotFoundError as e:
        pytest.skip(f"simulated sky unavailable: {e}")


@pytest.fixture(scope="session")
def shared_data():
    """The shared data folder (templates, real samples); the test skips without it."""
    return _require_templates()


@pytest.fixture(scope="session")
def sky_config():
    """A 24-object SkyConfig (seed 7, 32 x 32 stamps)."""
    _require_templates()
    from omnisky.shards.sky import SkyConfig
    return SkyConfig(n=24, seed=7, image_size=32)


@pytest.fixture(scope="session")
def sky_shards(tmp_path_factory, sky_config):
    """Directory of raw shards (3 shards of 8 objects) + manifest from `sky_config`."""
    from omnisky.shards.cli import run_simulate
    out = tmp_path_factory.mktemp("sky_raw")
    run_simulate(sky_config, out, shard_size=8, workers=1, progress=False)
    return out
