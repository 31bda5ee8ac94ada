"""Fleet simulation and benchmarks: many simulated devices running the real agent code against a
real broker and the real coordinator."""

from fleet._broker import EmbeddedBroker, MosquittoBroker, start_broker
from fleet._sim import RunResult, SimConfig, build_fleet, run_rule
from fleet._traces import DeviceTrace, FleetProfile, Intervals, SimClock, generate_fleet

__all__ = [
    "DeviceTrace",
    "EmbeddedBroker",
    "FleetProfile",
    "Intervals",
    "MosquittoBroker",
    "RunResult",
    "SimClock",
    "SimConfig",
    "build_fleet",
    "generate_fleet",
    "run_rule",
    "start_broker",
]
