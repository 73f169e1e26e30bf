"""Methods that adapt the encoder (issue 18) under the Ray executor: the same numbers as in process (split from
tests/cli/test_adapting.py, whose ``run`` helper it uses)."""

from __future__ import annotations

import numpy as np
import pytest

from test_adapting import run


@pytest.mark.slow
def test_an_adapting_method_under_ray_matches_in_process(medmnist_root, tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'hica-bench[ray]')")
    import ray

    reference = run(medmnist_root, tmp_path / "cache", tmp_path / "in-process", "--encoder", "torch-pixels",
                    "--methods", "shift,reveal")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        remote = run(medmnist_root, tmp_path / "cache-ray", tmp_path / "ray", "--encoder", "torch-pixels",
                     "--methods", "shift,reveal", "--executor", "ray")
    finally:
        ray.shutdown()
    for label in ("shift", "reveal"):
        assert remote[label]["metrics"] == reference[label]["metrics"]
        assert remote[label]["fit_info"] == reference[label]["fit_info"]
    assert remote["shift"]["adapted_encoder"] == reference["shift"]["adapted_encoder"]
    assert np.isfinite(remote["shift"]["timings"]["adapted_encode_s"])
