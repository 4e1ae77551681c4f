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
        ("[train]\nimage = 'raw'\n", "image must be one or more of norm, residual, brightness"),
        ("[ingest]\nshard_size = 0\n", r"bad.toml: ingest.shard_size must be in \[1, 100000\], got 0$"),
        ("[train]\nepochs = -3\n", r"bad.toml: train.epochs must be >= 1, got -3$"),
        ("[train.augment]\nzoom = 1.0\n", r"train.augment.zoom must be in \[0, 1\), got 1.0"),
        ("[reprocess]\nthreshold = 0\n", r"reprocess.threshold must be in \(0, 1\], got 0"),
        ("[prepare]\ncloudy_fraction = 1.5\n", r"prepare.cloudy_fraction must be in \[0, 1\], got 1.5"),
        ("[ingest]\nshape = [512, 0]\n", r"ingest.shape must be >= 1, got 0"),
        ("[tune]\npruner = 'always'\n", r"tune.pruner must be one of median, hyperband, none, got 'always'"),
        ("[cluster.slurm]\njobs = 0\n", r"cluster.slurm.jobs must be >= 1, got 0"),
        ("[lock]\nheartbeat = 900.0\n", r"lock: LockConfig.heartbeat \(900.0\) must be less than stale_after"),
    ],
)
def test_bad_configs_name_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_command_line_values_are_checked_and_named():
    with pytest.raises(ConfigError, match=r"^command line: ingest.shard_size must be in \[1, 100000\], got -5$"):
        load_config(None, {"ingest.shard_size": -5})
    with pytest.raises(ConfigError, match=r"^command line: train.epochs must be >= 1, got -3$"):
        load_config(JOBS / "default.toml", {"train.epochs": -3})


def test_ranges_are_declared_by_field_metadata_for_any_dataclass():
    from dataclasses import dataclass, field

    from cirrus_batch.config import from_dict, ranged

    @dataclass
    class Thing:
        n: int = field(default=1, metadata={"range": (1, None)})
        f: float = ranged(0.5, 0.0, 1.0, strict="both")
        kind: str = field(default="a", metadata={"choices": ("a", "b")})
        free: float = 0.0

    assert from_dict(Thing, {"n": 3, "f": 0.1, "kind": "b", "free": -9.0}) == Thing(3, 0.1, "b", -9.0)
    for data, message in [({"n": 0}, r"^thing.n must be >= 1, got 0$"), ({"f": 1.0}, r"thing.f must be in \(0, 1\)"),
                          ({"kind": "c"}, "thing.kind must be one of a, b, got 'c'")]:  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            from_dict(Thing, data, "thing")
    with pytest.raises(ValueError, match=r"IngestConfig.clevel must be in \[0, 9\], got 12"):  # direct use too
        IngestConfig(clevel=12)


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
