"""bench/fleet_brokers.py's reading of a run (no broker, no simulation): session setup, merge
rate, restart recovery, the ratio to Mosquitto and the table, on a tiny synthetic run."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest

from fedasync_iot.bench._brokers import js_delta, nats_request
from fedasync_iot.bench.fleet_brokers import (
    js_table,
    ratios,
    read_arrivals,
    read_json,
    read_metrics,
    recovery,
    sim_command,
    summarize_cell,
    table,
)
from fedasync_iot.bench.fleet_brokers import main as bench_main

HEADER = ("time_s,sim_hours,version,accuracy,loss,accepted,buffered,rejected,online,connected,"
          "eligible,training,aborted,rss_mb,cpu_percent\n")
# t: connected, accepted; the broker restarts at 4.5 s: connections drop, come back at 7 s
ROWS = [(1.0, 20, 0), (2.0, 70, 0), (3.0, 95, 3), (4.0, 100, 8), (5.0, 10, 9), (6.0, 60, 9),
        (7.0, 96, 12), (8.0, 99, 20)]


def _write_run(tmp_path: Path) -> Path:
    run = tmp_path / "fedasync"
    run.mkdir()
    (run / "metrics.csv").write_text(HEADER + "".join(
        f"{t},0.1,{a},{'' if a == 0 else 0.9},0.3,{a},0,0,110,{c},5,1,0,100.0,50.0\n"
        for t, c, a in ROWS))
    arrivals = [(2.5, "accepted"), (2.9, "rejected"), (6.5, "accepted")]
    (run / "updates.csv").write_text("device_id,sim_s,outcome,reason\n" + "".join(
        f"sim-{i},{t * 960},{o},\n" for i, (t, o) in enumerate(arrivals)))
    (run / "run.json").write_text(json.dumps({
        "resent": 4, "duplicates": 5, "peak_rss_mb": 400.0, "wall_s": 30.0,
        "ack_latency_ms": {"n": 19, "p50": 398.107, "p90": 1000.0, "p99": 1584.89},
        "coordinator_ack_ms": {"n": 20, "p50": 25.0, "p90": 100.0, "p99": 250.0}}))
    (run / "summary.json").write_text(json.dumps({"updates_accepted": 20, "updates_rejected": 1,
                                                  "scale": 960.0, "final_metric": 0.91,
                                                  "traffic": {
                                                      "devices": {"uplink": {"status": {
                                                          "messages": 300}},
                                                          "downlink": {"ack": {"messages": 15}}},
                                                      "coordinator": {"sent": {"ack": {
                                                          "messages": 25}}}}}))
    return run


def test_summarize_a_run(tmp_path: Path) -> None:
    run = _write_run(tmp_path)
    rows = read_metrics(run / "metrics.csv")
    assert len(rows) == 8 and rows[0]["connected"] == 20 and "accuracy" not in rows[0]
    arrivals = read_arrivals(run / "updates.csv", 960.0)
    assert arrivals == [(2.5, "accepted"), (2.9, "rejected"), (6.5, "accepted")]
    cell = summarize_cell(rows, read_json(run / "run.json"), read_json(run / "summary.json"),
                          arrivals, rss_before=10 * 1024 * 1024, rss_peak=30 * 1024 * 1024)
    # 90% of the peak (100) is first connected at 3 s: 95 sessions in 3 s
    assert cell["connected_peak"] == 100 and cell["setup_s"] == 3.0
    assert cell["sessions_per_s"] == 31.7
    assert cell["setup_online_s"] == 4.0  # 100 of the 110 online
    assert cell["merged"] == 20 and cell["merged_per_s"] == 2.5 and cell["first_merge_s"] == 2.5
    assert cell["duplicates"] == 5 and cell["dup_per_merged"] == 0.25 and cell["resent"] == 4
    assert (cell["status_msgs"], cell["acks_received"], cell["acks_sent"]) == (300, 15, 25)
    assert cell["ack_p99_ms"] == 1584.89 and cell["coord_ack_p50_ms"] == 25.0
    assert cell["kb_per_device"] == round(20 * 1024 / 100, 1)
    back = recovery(rows, arrivals, began=4.5, ended=5.2)
    assert back["connected_before"] == 100 and back["connected_low"] == 10
    # dropped below 95 at 5 s, 96 >= 95 again at 7 s: 2.5 s after the restart began
    assert back["back_s"] == 2.5 and back["merging_resumed"]
    assert back["merged_after_restart"] == 1 and back["first_merge_after_s"] == 1.3
    never = recovery(rows[:6], arrivals[:2], began=4.5, ended=5.2)
    assert never["back_s"] is None and not never["merging_resumed"]

    cells = [{"broker": "mosquitto", "mode": "sessionless", "devices": 100, "restart_at": None,
              **cell},
             {"broker": "nats", "mode": "sessionless", "devices": 100, "restart_at": None,
              **cell, "merged_per_s": 1.0},
             {"broker": "rabbitmq", "mode": "sessionless", "devices": 100, "skipped": "absent"}]
    assert ratios(cells) == [{"devices": 100, "mode": "sessionless", "broker": "nats",
                              "merged_per_s": 1.0, "mosquitto_merged_per_s": 2.5,
                              "ratio": 0.4}]
    text = table(cells)
    assert text.count("\n") == 4 and "| nats | sessionless | 100 | 100 |" in text
    assert "skipped: absent" in text and "0.4 / 1.6" in text  # ack p50 / p99 in seconds

    # --reread: the figures again from a kept cell (named <broker>-<mode>-<N>)
    run.rename(tmp_path / "nats-sessionless-100")
    saved = tmp_path / "series.json"
    saved.write_text(json.dumps({"rows": [{"broker": "nats", "mode": "sessionless",
                                           "devices": 100, "rss_before_mb": 10.0,
                                           "rss_peak_mb": 30.0, "restart_began_s": 4.5,
                                           "restart_took_s": 0.7}]}))
    assert bench_main(["--reread", str(saved), "--keep", str(tmp_path), "--json",
                       str(tmp_path / "again.json")]) == 0
    again = read_json(tmp_path / "again.json")["rows"][0]
    assert again["merged"] == 20 and again["kb_per_device"] == 204.8 and again["back_s"] == 2.5


def test_missing_files_and_the_command(tmp_path: Path) -> None:
    assert read_metrics(tmp_path / "none.csv") == [] and read_json(tmp_path / "none") == {}
    cell = summarize_cell([], {}, {}, [])
    assert cell["connected_peak"] == 0 and cell["merged"] == 0 and cell["setup_s"] is None

    class Args:
        workers, duration, seed, log_level = 2, 60.0, 1, "WARNING"

    cmd = sim_command(Args(), n=10, mode="persistent",  # type: ignore[arg-type]
                      urls=["mqtt://127.0.0.1:1", "mqtt://127.0.0.1:2"], out=tmp_path)
    assert cmd[cmd.index("--broker") + 1] == "mqtt://127.0.0.1:1,mqtt://127.0.0.1:2"
    assert cmd[cmd.index("--session") + 1] == "persistent" and "--clock" in cmd


def test_refuses_unknown_brokers() -> None:
    with pytest.raises(SystemExit):
        bench_main(["--brokers", "kafka"])


def test_jetstream_counters_over_the_nats_protocol() -> None:
    """nats_request speaks just enough of the NATS client protocol: a fake server replies to the
    request's inbox; js_delta and js_table turn two readings into the run's growth."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def serve() -> None:
        conn, _ = srv.accept()
        with conn, conn.makefile("rb") as f:
            conn.sendall(b'INFO {"server_id":"x"}\r\n')
            while not (line := f.readline()).startswith(b"PUB"):
                pass
            inbox = line.split()[2].decode()
            f.readline()  # the (empty) payload
            body = b'{"api":{"total":12,"errors":1}}'
            conn.sendall(b"PING\r\n" + f"MSG {inbox} 1 {len(body)}\r\n".encode() + body
                         + b"\r\n")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    assert nats_request(port, "$JS.API.INFO", timeout=5) == {"api": {"total": 12, "errors": 1}}
    t.join(5)
    srv.close()
    grew = js_delta({"js_api_total": 10, "js_sess_writes": 5, "js_sess_msgs": 3},
                    {"js_api_total": 110, "js_sess_writes": 25, "js_sess_msgs": 1,
                     "js_rmsgs_writes": 7})
    assert grew == {"js_api_total": 100, "js_sess_writes": 20, "js_sess_msgs": 1,
                    "js_rmsgs_writes": None}
    text = js_table([{"broker": "nats", "mode": "sessionless", "devices": 10, "merged": 50,
                      **grew}, {"broker": "mosquitto", "mode": "sessionless", "devices": 10}])
    assert "| nats | sessionless | 10 | 100 | - | 20 |" in text and text.endswith("| 2.0 |")
