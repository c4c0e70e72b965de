"""Shared test setup: the hypothesis profiles and the basic store fixtures.

Fixture names are specific (repo, lmdb_env, memory_kv, ...) because daemon, cluster and
mount fixtures will be added to this file later.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from castore.config import Config
from castore.repo import Repo
from castore.store.lmdb import LmdbEnv
from castore.store.memory import MemoryKv

# "ci" is the default: bounded examples, no deadline (LMDB commits fsync, and this machine has
# two cores). Hypothesis is not derandomized: a failure prints the falsifying example and a
# @reproduce_failure blob. Pick another profile with --hypothesis-profile=dev (or =thorough).
settings.register_profile(
    "ci", deadline=None, max_examples=25, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", parent=settings.get_profile("ci"), max_examples=10)
settings.register_profile("thorough", parent=settings.get_profile("ci"), max_examples=1000)
settings.load_profile("ci")


@pytest.fixture
def repo_config(tmp_path: Path) -> Config:
    """A config rooted in tmp_path/home; the environment is ignored (env={})."""
    return Config.load(tmp_path / "home", env={})


@pytest.fixture
def repo(repo_config: Config) -> Iterator[Repo]:
    """A fresh repository on real LMDB under tmp_path."""
    r = Repo.init(repo_config)
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def lmdb_env(tmp_path: Path) -> Iterator[LmdbEnv]:
    """A bare LMDB environment (all castore sub-databases) under tmp_path/lmdb."""
    env = LmdbEnv(tmp_path / "lmdb")
    try:
        yield env
    finally:
        env.close()


@pytest.fixture
def memory_kv() -> MemoryKv:
    return MemoryKv()


@pytest.fixture(scope="module")
def mounted(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
            ) -> Iterator[object]:
    """One drive (a `castore daemon --mount` process) for a whole test module: starting one
    costs seconds. Stopped and unmounted when the module is done."""
    from fuse_helpers import drive
    name = request.module.__name__.rpartition(".")[2].removeprefix("test_")
    with drive(tmp_path_factory.mktemp(name)) as d:
        yield d


@pytest.fixture
def here(mounted: object, request: pytest.FixtureRequest) -> Path:
    """A fresh directory on the module's drive, named after the test."""
    d = mounted.path(request.node.name[:100])  # type: ignore[attr-defined]
    d.mkdir()
    return d
