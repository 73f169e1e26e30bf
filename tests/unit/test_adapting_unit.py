"""Methods that adapt the encoder (issue 18): which parameters count as an encoder's tail (split from
tests/cli/test_adapting.py)."""

from __future__ import annotations


def test_tail_parameters_find_the_last_blocks_and_the_head():
    """The trunk's last block and what comes after it, on the real architectures the methods adapt: timm
    EfficientNet-Lite0 (stages, then conv_head/bn2), an open_clip ViT (its proj is a direct parameter of the visual
    tower, beside input-side embeddings that must stay frozen) and its text tower, and the bundled MiniLM (a
    sentence-transformers model is itself a Sequential)."""
    import open_clip
    import timm

    from hica_bench.adapting import tail_parameters
    from hica_bench_encoders.openclip_encoders import text_tower
    from hica_bench_encoders.text import build_text

    names = lambda module, blocks=1: [n for n, _ in tail_parameters(module, blocks)]  # noqa: E731
    effnet = names(timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0))
    assert effnet[0].startswith("blocks.6.") and effnet[-3:] == ["conv_head.weight", "bn2.weight", "bn2.bias"]
    clip = open_clip.create_model("ViT-S-32-alt")
    visual = names(clip.visual)
    assert "proj" in visual and {"ln_post.weight", "ln_post.bias"} <= set(visual)
    assert not {"class_embedding", "positional_embedding", "conv1.weight"} & set(visual)
    assert {n.split(".")[2] for n in visual if n.startswith("transformer.")} == {"11"}
    text = names(text_tower(clip))
    assert "text_projection" in text and "ln_final.weight" in text and "positional_embedding" not in text
    minilm = names(build_text("minilm", "cpu").module)
    assert minilm and all(".encoder.layer.5." in n or ".pooler." in n for n in minilm)
    assert len(names(clip.visual, 0)) == len(list(clip.visual.parameters()))  # blocks=0: everything
