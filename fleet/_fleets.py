"""The fleet a run simulates: the synthetic one, or a user's own from a fleet file."""

from __future__ import annotations

from pathlib import Path

from fedasync_iot.fleet._fleetfile import load_fleet, parse_fleet_file
from fedasync_iot.fleet._sim import Fleet, SimConfig, synthetic_fleet


def build_fleet(config: SimConfig) -> Fleet:
    """The devices, their data and the held-out set: a pure function of the config (and, with
    ``fleet_file``, of the files it names)."""
    if config.fleet_file is not None:
        return load_fleet(parse_fleet_file(Path(config.fleet_file)), config)
    return synthetic_fleet(config)
