"""Snapshot size: today's weights + full ONNX against a per-spec template + weights per version.

    python -m fedasync_iot.bench.snapshot [--repeats 30] [--steps 40] [--seeds 3] [--json OUT]

Per model kind (logistic 64x10 and MLPs 64-32-10, 64-64-32-10 on digits; a linear regressor on
64 synthetic features), all in one run on this machine:

- bytes of today's snapshot (`encode_snapshot` with the full ONNX export), of the template (graph
  plus bindings JSON, sent once per spec), and of a weights-only snapshot frame with float32,
  float16 and int8 weights (int8 with one scale for the whole vector, "int8/v", or one per
  binding, "int8/b"); each with its ratio to today's. The weights-only frames are today's frame
  with ``onnx_len = 0`` and the body re-encoded (int8 scales counted as JSON in the header);
- building an onnxruntime session from the template + weights against from the full export,
  alternated, median of the per-pair ratios (so drift of a shared machine cancels);
- the coordinator's cost per version: `export_onnx` against `encode_snapshot` of the weights
  alone, alternated likewise;
- parity: max |probability| difference, template + float32 weights against the full export;
- held-out accuracy (R^2 for the regressor) of the device's inference path (template session)
  with float32, float16 and int8 weights, and the max |probability| difference each costs;
- training from a quantised base: seeded FedAsync runs (10 devices, Dirichlet 0.5 label skew,
  mixing weight 0.5; one partition and device order per seed) in which each device receives the
  quantised weights, trains one epoch and sends ``delta = trained - received``, which the
  coordinator adds to its float32 model. The held-out score of the coordinator's model at the
  end (mean over seeds, and the mean paired difference to the float32 run of the same seed),
  and per step the delta the device would have sent from the float32 base:
  ``bias = delta_q - delta_f``, reported as ``|bias| / |delta_f|`` and as its cosine with ``-e``,
  where ``e = received - float32`` is the quantisation error. A positive cosine means the device
  spends part of its step undoing ``e``, a correction the coordinator then applies to a model
  that never had ``e``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedasync_iot.models import (
    Binding,
    Dataset,
    ModelSpec,
    OnnxModel,
    OnnxTemplate,
    Snapshot,
    build_model,
    dirichlet_partition,
    encode_snapshot,
    export_onnx,
    export_template,
    load_digits,
    make_synthetic,
)

ENCODINGS = ("float32", "float16", "int8/v", "int8/b")
SEED = 0
FEDASYNC_MIX = 0.5
N_DEVICES = 10


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    spec: ModelSpec
    epochs: int


DIGITS_CLASSES = tuple(range(10))
CASES = (
    Case("logistic 64x10", ModelSpec(kind="logistic", n_features=64, classes=DIGITS_CLASSES), 10),
    Case("mlp 64-32-10", ModelSpec(kind="mlp", n_features=64, classes=DIGITS_CLASSES,
                                   hidden=(32,), learning_rate=0.05), 40),
    Case("mlp 64-64-32-10", ModelSpec(kind="mlp", n_features=64, classes=DIGITS_CLASSES,
                                      hidden=(64, 32), learning_rate=0.05), 40),
    Case("linear 64", ModelSpec(kind="linear", n_features=64), 10),
)


# --------------------------------------------------------------------------- quantisation


def _int8(x: NDArray[np.float32]) -> tuple[NDArray[np.float32], float]:
    """Symmetric int8 as the update encoder does it: q = rint(x / s), s = max|x| / 127."""
    scale = float(np.abs(x).max()) / 127
    if scale == 0:
        return np.zeros_like(x), 0.0
    q = np.clip(np.rint(x.astype(np.float64) / scale), -127, 127)
    return (q * scale).astype(np.float32), scale


def quantised(w: NDArray[np.float32], encoding: str, bindings: tuple[Binding, ...]
              ) -> tuple[NDArray[np.float32], list[float]]:
    """What a device holds after receiving `w` as `encoding`, and the int8 scales sent."""
    if encoding == "float32":
        return w.copy(), []
    if encoding == "float16":
        return w.astype(np.float16).astype(np.float32), []
    if encoding == "int8/v":
        out, scale = _int8(w)
        return out, [scale]
    out = np.empty_like(w)
    scales = []
    for b in bindings:
        out[b.offset:b.offset + b.length], scale = _int8(w[b.offset:b.offset + b.length])
        scales.append(scale)
    return out, scales


def _frame_bytes(spec: ModelSpec, w: NDArray[np.float32], onnx: bytes, encoding: str,
                 bindings: tuple[Binding, ...]) -> int:
    base = len(encode_snapshot(Snapshot(version=1234, spec=spec, weights=w, onnx=onnx,
                                        created_at=1.8e9, metrics={"accuracy": 0.9})))
    if encoding == "float32":
        return base
    per_value = 2 if encoding == "float16" else 1
    _, scales = quantised(w, encoding, bindings)
    extra = len(json.dumps({"scales": scales})) if scales else 0
    return base - (4 - per_value) * w.size + extra


# --------------------------------------------------------------------------- measurements


def _data(case: Case) -> tuple[Dataset, Dataset]:
    if case.spec.is_classifier:
        return load_digits(seed=SEED)
    ds = make_synthetic(n_samples=2000, n_features=case.spec.n_features, seed=SEED,
                        task="regression")
    return ds.subset(np.arange(1500)), ds.subset(np.arange(1500, 2000))


def _score(model: OnnxModel, test: Dataset) -> float:
    """Held-out accuracy, or R^2 for the regressor."""
    if model.is_classifier:
        return float(np.mean(model.predict(test.X) == test.y))
    pred = model.predict(test.X).astype(np.float64)
    y = test.y.astype(np.float64)
    return float(1 - np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2))


def _out(model: OnnxModel, X: NDArray[np.float32]) -> NDArray[np.float32]:
    return model.predict_proba(X) if model.is_classifier else model.predict(X)


def _alternate(a: Callable[[], object], b: Callable[[], object], repeats: int
               ) -> tuple[float, float, float]:
    """Median seconds of a and of b, and the median of the per-pair ratios b / a."""
    a(), b()  # warm-up: first-call costs (imports, allocator) belong to neither
    ta, tb, ratios = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a()
        t1 = time.perf_counter()
        b()
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
        ratios.append((t2 - t1) / (t1 - t0))
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios)


def _fedasync(case: Case, template: OnnxTemplate, train: Dataset, test: Dataset, encoding: str,
              steps: int, seed: int) -> dict[str, float]:
    """A seeded FedAsync run whose devices receive quantised weights (module docstring)."""
    spec = case.spec
    coordinator = build_model(spec)
    # Start from a model a few epochs in, as a fleet mid-training would be, not from version 0
    # (the logistic model's zeros quantise exactly).
    coordinator.partial_fit(train.X[:300], train.y[:300], epochs=2)
    w = coordinator.get_params_vector()
    labels = train.y if spec.is_classifier else (train.y > np.median(train.y)).astype(np.int64)
    shards = dirichlet_partition(labels, N_DEVICES, alpha=0.5, seed=seed, min_size=20)
    order = np.random.default_rng(seed).integers(0, N_DEVICES, size=steps)
    device = build_model(spec)
    rel, cos = [], []
    for d in order:
        received, _ = quantised(w, encoding, template.bindings)
        X, y = train.X[shards[d]], train.y[shards[d]]
        device.set_params_vector(received)  # also resets the shuffle stream: same batches below
        delta_q = device.partial_fit(X, y).get_params_vector() - received
        if encoding != "float32":
            device.set_params_vector(w)
            delta_f = device.partial_fit(X, y).get_params_vector() - w
            bias = (delta_q - delta_f).astype(np.float64)
            e = (received - w).astype(np.float64)
            rel.append(float(np.linalg.norm(bias) / np.linalg.norm(delta_f)))
            if np.linalg.norm(bias) > 0 and np.linalg.norm(e) > 0:
                cos.append(float(bias @ -e / (np.linalg.norm(bias) * np.linalg.norm(e))))
        w = (w + FEDASYNC_MIX * delta_q).astype(np.float32)
    # The coordinator's own float32 model: what a systematic error in the merge would damage.
    model = OnnxModel.from_template(template.graph, template.bindings_json(), w)
    return {"score": _score(model, test),
            "bias_rel": statistics.mean(rel) if rel else 0.0,
            "bias_cos": statistics.mean(cos) if cos else 0.0}


def measure(case: Case, repeats: int, steps: int, seeds: int) -> dict[str, Any]:
    spec = case.spec
    train, test = _data(case)
    adapter = build_model(spec).partial_fit(train.X, train.y, epochs=case.epochs)
    w = adapter.get_params_vector()
    full = export_onnx(adapter)
    template = export_template(adapter)
    bindings = template.bindings
    graph, bindings_js = template.graph, template.bindings_json()

    r: dict[str, Any] = {"case": case.name, "n_params": int(w.size),
                         "n_bindings": len(bindings)}
    r["bytes_today"] = _frame_bytes(spec, w, full, "float32", bindings)
    r["bytes_template"] = len(graph) + len(json.dumps(bindings_js))
    for enc in ENCODINGS:
        r[f"bytes_{enc}"] = _frame_bytes(spec, w, b"", enc, bindings)
        r[f"ratio_{enc}"] = r[f"bytes_{enc}"] / r["bytes_today"]

    full_model = OnnxModel(full)
    tpl_model = OnnxModel.from_template(graph, bindings_js, w)
    reference = _out(full_model, test.X)
    r["parity_max_diff"] = float(np.abs(_out(tpl_model, test.X) - reference).max())
    r["labels_equal"] = bool(np.array_equal(full_model.predict(test.X),
                                            tpl_model.predict(test.X)))

    build_full, build_tpl, build_ratio = _alternate(
        lambda: OnnxModel(full), lambda: OnnxModel.from_template(graph, bindings_js, w), repeats)
    r.update(build_full_ms=build_full * 1e3, build_template_ms=build_tpl * 1e3,
             build_ratio=build_ratio)
    export_s, weights_s, export_ratio = _alternate(
        lambda: export_onnx(adapter),
        lambda: encode_snapshot(Snapshot(version=1, spec=spec, weights=w)), repeats)
    r.update(export_onnx_ms=export_s * 1e3, encode_weights_ms=weights_s * 1e3,
             encode_over_export=export_ratio)

    for enc in ENCODINGS:
        received, _ = quantised(w, enc, bindings)
        model = OnnxModel.from_template(graph, bindings_js, received)
        r[f"score_{enc}"] = _score(model, test)
        r[f"max_diff_{enc}"] = float(np.abs(_out(model, test.X) - reference).max())
        r[f"max_weight_err_{enc}"] = float(np.abs(received - w).max())
    fed = {enc: [_fedasync(case, template, train, test, enc, steps, seed)
                 for seed in range(seeds)] for enc in ENCODINGS}
    for enc, runs in fed.items():
        r[f"fed_score_{enc}"] = statistics.mean(f["score"] for f in runs)
        r[f"fed_delta_{enc}"] = statistics.mean(
            f["score"] - f32["score"] for f, f32 in zip(runs, fed["float32"], strict=True))
        r[f"fed_bias_rel_{enc}"] = statistics.mean(f["bias_rel"] for f in runs)
        r[f"fed_bias_cos_{enc}"] = statistics.mean(f["bias_cos"] for f in runs)
    return r


# --------------------------------------------------------------------------- report


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    head = [title for title, _, _ in columns]
    body = [[format(row[key], fmt) for _, key, fmt in columns] for row in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = [" | ".join(h.rjust(wd) for h, wd in zip(head, widths, strict=True))]
    lines.append("-+-".join("-" * wd for wd in widths))
    lines += [" | ".join(c.rjust(wd) for c, wd in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)


def report(rows: list[dict[str, Any]]) -> str:
    sizes = [("model", "case", ""), ("params", "n_params", "d"), ("today B", "bytes_today", "d"),
             ("template B (once)", "bytes_template", "d")]
    for enc in ENCODINGS:
        sizes += [(f"{enc} B", f"bytes_{enc}", "d"), ("/today", f"ratio_{enc}", ".3f")]
    speed = [("model", "case", ""), ("parity max diff", "parity_max_diff", ".1e"),
             ("labels equal", "labels_equal", ""),
             ("build full ms", "build_full_ms", ".2f"),
             ("build template ms", "build_template_ms", ".2f"),
             ("template/full", "build_ratio", ".2f"),
             ("export_onnx ms", "export_onnx_ms", ".2f"),
             ("weights-only ms", "encode_weights_ms", ".3f"),
             ("weights/export", "encode_over_export", ".4f")]
    quality = [("model", "case", "")]
    for enc in ENCODINGS:
        quality += [(f"{enc} score", f"score_{enc}", ".4f"),
                    ("max diff", f"max_diff_{enc}", ".1e")]
    fed = [("model", "case", "")]
    for enc in ENCODINGS:
        fed += [(f"{enc} score", f"fed_score_{enc}", ".4f")]
        if enc != "float32":
            fed += [("-f32", f"fed_delta_{enc}", "+.4f"),
                    ("|bias|/|d|", f"fed_bias_rel_{enc}", ".3f"),
                    ("cos(bias,-e)", f"fed_bias_cos_{enc}", "+.2f")]
    return "\n\n".join([
        "Bytes per snapshot (weights-only frames: today's frame without the ONNX)",
        _table(rows, sizes),
        "Session build and coordinator export per version (medians, ratios per pair)",
        _table(rows, speed),
        "Device inference from quantised weights (score: accuracy, R^2 for linear; max diff: "
        "max |proba or prediction| difference to the float32 full export)",
        _table(rows, quality),
        "FedAsync with quantised bases: the coordinator's float32 model after the run (mean over "
        "seeds; -f32: paired difference), the bias of each delta",
        _table(rows, fed),
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=30, help="timed pairs per measurement")
    p.add_argument("--steps", type=int, default=40, help="FedAsync steps per encoding")
    p.add_argument("--seeds", type=int, default=3, help="FedAsync runs per encoding")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.steps < 1 or args.seeds < 1:
        p.error("--repeats, --steps and --seeds must be positive")
    rows = [measure(case, args.repeats, args.steps, args.seeds) for case in CASES]
    print(report(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
