"""Every shipped config under launch/ loads into its typed config (unknown keys are errors), and
every tokenizer config builds its model: a config out of step with the code fails here, not at
the start of a user's run."""
from pathlib import Path

import pytest

from omnisky.config import load_config
from omnisky.shards.sky import SkyConfig
from omnisky.train.fm import TrainFMConfig
from omnisky.train.tokenizer import TokenizerTrainConfig, build_tokenizer

LAUNCH = Path(__file__).resolve().parents[1] / "launch"


@pytest.mark.parametrize("path", sorted((LAUNCH / "tokenizers").glob("*.yaml")), ids=lambda p: p.name)
def test_tokenizer_configs_build(path):
    cfg = load_config(TokenizerTrainConfig, path)
    tok = build_tokenizer(cfg)
    assert tok.vocab_size > 1 and (cfg.kind == "scalar" or tok.n_tokens > 0)


@pytest.mark.parametrize("path", sorted((LAUNCH / "fm").glob("*.yaml")), ids=lambda p: p.name)
def test_fm_configs_load(path):
    cfg = load_config(TrainFMConfig, path)
    assert cfg.steps > 0 and cfg.model.dim > 0


@pytest.mark.parametrize("path", sorted((LAUNCH / "sky").glob("*.yaml")), ids=lambda p: p.name)
def test_sky_configs_load(path):
    assert load_config(SkyConfig, path).n > 0
