"""HiCA's encoder stage 1 on the default pair's text encoder (split from tests/cli/test_adapting.py)."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.mark.slow
def test_hica_encoder_stage1_fine_tunes_a_copy_of_minilm_on_the_descriptor_corpus():
    """The default pair's text encoder (MiniLM through sentence-transformers) can be fine-tuned: its copy's
    embeddings of the corpus move, the frozen encoder's do not."""
    import copy

    import torch

    from hica_bench.adapting import tail_parameters
    from hica_bench_encoders.text import build_text
    from hica_bench_hica.encoder_stage1 import train_text
    from hica_bench_hica.method import HiCAEncoder

    frozen = build_text("minilm", "cpu")
    corpus = ["a malignant breast lesion", "irregular margins", "a normal breast", "homogeneous tissue"]
    before = frozen.encode(corpus)
    tuned = copy.deepcopy(frozen)
    module = tuned.module
    module.requires_grad_(False)
    named = tail_parameters(module, 1)
    train_text(HiCAEncoder(stage1_epochs=3, stage1_text_lr=1e-3).options, tuned, named, corpus,
               [0, 0, 1, 1], torch)
    assert not np.allclose(tuned.encode(corpus), before, atol=1e-4)
    np.testing.assert_array_equal(frozen.encode(corpus), before)
    assert not any(p.requires_grad for p in module.parameters())
