"""hica-bench datasets from your own images: see :mod:`hica_bench_folder.plugin`."""
