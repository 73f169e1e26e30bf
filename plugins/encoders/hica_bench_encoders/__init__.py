"""hica-bench encoder pairs: the offline default (EfficientNet-Lite0 + MiniLM), OpenCLIP, BiomedCLIP, timm.

Registered through the ``hica_bench`` entry point (:mod:`hica_bench_encoders.plugin`); heavy libraries
(torch, timm, open_clip, transformers) are imported only when a pair is built.
"""

__version__ = "0.1.0"
