"""Configuration: a frozen dataclass loaded once, from HOME/config.toml and CASTORE_* variables.

The environment is read here only, never at import time.
"""
from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from castore.errors import ConfigError


@dataclass(frozen=True)
class Config:
    home: Path
    compression_level: int = 1         # zstd level; 0 turns compression off
    map_size: int = 1 << 40            # initial LMDB map; grows on demand
    rpc_timeout: float = 30.0          # seconds, for unary calls
    stream_timeout: float = 3600.0     # seconds, for streamed transfers
    max_message: int = 16 << 20        # bytes, both directions
    # cluster mode (castore daemon --listen); empty listen: a single peer, no peer service
    listen: str = ""                   # HOST:PORT of the mutual-TLS peer service
    join: str = ""                     # HOST:PORT of a seed (else the one in the token)
    token: str = ""                    # join token from `castore invite`
    zone: str = ""                     # failure domain; default: this machine's hostname
    capacity: int = 0                  # bytes offered (placement weight); 0: the disk size
    redundancy: int = 3                # R, fixed when the cluster is created
    down_out_interval: float = 600.0   # seconds dead before a peer's data is re-replicated
    probe_interval: float = 1.0        # SWIM protocol period, seconds
    reconcile_interval: float = 60.0   # seconds between routine repair passes
    settle_seconds: float = 1.0        # wait after a membership change before repairing
    max_repair_transfers: int = 2      # concurrent repair transfers per peer
    metrics: str = ""                  # HOST:PORT for Prometheus metrics; empty: off

    @property
    def store_path(self) -> Path:
        return self.home / "store"

    @property
    def journal_path(self) -> Path:
        return self.home / "close.journal"

    @property
    def socket_path(self) -> Path:
        return self.home / "castore.sock"

    @property
    def state_path(self) -> Path:
        return self.home / "daemon.json"

    @classmethod
    def load(cls, home: str | os.PathLike[str] | None = None,
             env: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        env = os.environ if env is None else env
        raw_home = home or env.get("CASTORE_HOME") or "~/.castore"
        root = Path(raw_home).expanduser().absolute()
        values: dict[str, Any] = {}
        cfg_file = root / "config.toml"
        if cfg_file.exists():
            try:
                values.update(tomllib.loads(cfg_file.read_text()))
            except (tomllib.TOMLDecodeError, OSError) as exc:
                raise ConfigError(f"{cfg_file}: {exc}") from None
        known = {f.name: f for f in fields(cls) if f.name != "home"}
        for name in known:
            var = "CASTORE_" + name.upper()
            if var in env:
                values[name] = env[var]
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - set(known)
        if unknown:
            raise ConfigError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
        typed: dict[str, Any] = {}
        for name, value in values.items():
            kind = type(getattr(cls, name))
            try:
                typed[name] = kind(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{name} must be {kind.__name__}, got {value!r}") from None
        cfg = cls(home=root, **typed)
        if not 0 <= cfg.compression_level <= 22:
            raise ConfigError("compression_level must be 0 (off) to 22")
        return cfg

    def with_(self, **changes: Any) -> Config:
        return replace(self, **changes)
