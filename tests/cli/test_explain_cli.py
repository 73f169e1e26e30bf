"""``hica-bench explain``: bad input is one line, before anything is encoded or fitted (split from
tests/system/test_explain.py)."""

from __future__ import annotations

import pytest

from conftest import invoke


@pytest.mark.parametrize("args, message", [
    (["--images", "0"], "--images must be >= 1, got 0"),
    (["--indices", "999"], "--indices 999 is outside the test split (0 to 155)"),
    (["--images", "2", "--indices", "1"], "give --images or --indices, not both"),
    (["--encoder", "effnet-lite0-minilm,open-clip"], "explain explains one cell: --encoder takes one name, got 2 "
                                                     "(effnet-lite0-minilm,open-clip)"),
])
def test_explain_bad_input_is_one_line(medmnist_root, default_encoder_cache, tmp_path, args, message):
    code, _, err = invoke("explain", "--dataset", "breastmnist", "--method", "prototype", "--k", "1", "--seed", "0",
                          *args, "--data-root", medmnist_root, "--cache-dir", default_encoder_cache, "--out", tmp_path)
    assert code == 2 and err.strip().splitlines() == [f"hica-bench: error: {message}"]
