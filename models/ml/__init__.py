"""The model side of the shared core: scikit-learn adapters, ONNX export and inference, datasets
and the privacy accountant's arithmetic.

Everything here loads on first use (`fedasync_iot.models` re-exports it lazily): scikit-learn
costs ~90 MB and most of a second, which an idle agent on a 512 MB board should not pay. The
rest of `models/` (wire format, config, MQTT, signing) never imports this package.
"""
