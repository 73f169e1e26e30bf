"""The baselines the few-shot VLM literature reports, registered under the ``hica_bench`` entry point. Each family
module declares its own specs next to its classes; this module only collects them.

On frozen image features (all in the default suite, ``hica-bench run`` without ``--methods``): zero-shot, linear
probe, nearest class mean (:mod:`.frozen`), kNN (:mod:`.knn`), Tip-Adapter, Tip-Adapter-F, CLIP-Adapter, LP++
(:mod:`.adapters`) and CoOp (:mod:`.coop`). Named explicitly: the concept bottleneck (:mod:`.concepts`; aligned pairs
only, its concepts from a descriptor generator) and the two that adapt the encoder and predict through it,
fine-tuning (LP-FT, :mod:`.finetune`: about a minute per 20-shot cell on 2 CPU cores) and CLIP-LoRA
(:mod:`.clip_lora`). Every module here imports torch only inside functions, so loading the registry stays light.
"""

from __future__ import annotations

from hica_bench import hookimpl
from hica_bench.interfaces import PluginSpec
from hica_bench_baselines import adapters, clip_lora, concepts, coop, finetune, frozen, knn


@hookimpl
def hica_bench_methods() -> list[PluginSpec]:
    return [*frozen.SPECS, *knn.SPECS, *adapters.SPECS, *coop.SPECS, *concepts.SPECS, *finetune.SPECS, *clip_lora.SPECS]
