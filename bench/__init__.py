"""Runnable benchmarks, each ``python -m bench.<name>``: coordinator ingest (`ingest`), the
agent's footprint (`agent`), participation accounting (`participation`), snapshot encodings
(`snapshot`), communication cost (`traffic`), the memory soak (`soak`), the merge rules'
robustness across fleet speeds (`robustness`, deterministic and in process) and issue 22's
straggler fleet as a fleet file for `fedasync-sim` (`stragglers`)."""
