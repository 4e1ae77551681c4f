"""Job configs: defaults, files, overrides, and clear errors for wrong keys and types."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cirrus_batch.config import IngestConfig, load_config
from cirrus_batch.errors import ConfigError

JOBS = Path(__file__).parent.parent / "jobs"


def test_defaults_and_precedence(tmp_path):
    assert load_config().ingest == IngestConfig()
    path = tmp_path / "job.toml"
    path.write_text("[ingest]\nshard_size = 200\n[cluster]\nkind = 'tcp://10.0.0.1:8786'\n")
    cfg = load_config(path, {"cluster.kind": "local", "ingest.clevel": None})
    assert cfg.ingest.shard_size == 200  # file over default
    assert cfg.cluster.kind == "local"  # command line over file
    assert cfg.ingest.clevel == IngestConfig().clevel  # unset option falls through


def test_a_nested_table_starts_from_its_own_defaults(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text("[train.unet]\nbase_channels = 8\n[train.classifier]\ndepth = 3\n")
    train = load_config(path).train
    defaults = load_config().train
    assert train.unet == dataclasses.replace(defaults.unet, base_channels=8)  # the U-Net's, not NetConfig()'s
    assert train.unet.flip_average and train.unet.dropout == 0.0
    assert train.classifier == dataclasses.replace(defaults.classifier, depth=3) and not train.classifier.flip_average


@pytest.mark.parametrize("job", sorted(JOBS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_job_configs_load(job):
    load_config(job)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[ingest]\nshardsize = 3\n", "unknown key.*'shardsize'.*valid keys: shard_size"),
        ("[ingets]\n", "unknown key.*'ingets'"),
        ("[ingest]\nshard_size = 'big'\n", "ingest.shard_size: expected int"),
        ("[ingest]\nheader_keys = 'EXPTIME'\n", "expected a list"),
        ("[ingest\n", "not valid TOML"),
        ("[train]\nimage = 'raw'\n", "train: image must be one of norm, residual, got 'raw'"),
    ],
)
def test_bad_configs_name_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nope.toml")


def test_absolute_url_makes_relative_local_paths_absolute(tmp_path, monkeypatch):
    from cirrus_batch.config import absolute_url

    monkeypatch.chdir(tmp_path)
    assert absolute_url("sqlite:///mlflow.db") == f"sqlite:///{tmp_path}/mlflow.db"
    assert absolute_url("journal:optuna.log") == f"journal:{tmp_path}/optuna.log"
    for url in ("sqlite:////abs/x.db", "sqlite:///:memory:", "postgresql+psycopg2://u@h/db", "http://127.0.0.1:5000"):
        assert absolute_url(url) == url
