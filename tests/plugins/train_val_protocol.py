"""A third party's evaluation protocol, loaded with ``hica-bench -p train_val_protocol``: the support set plus a fixed
number of validation images per class from the *rest of the train split* (never the val split), drawn by the core's
public rules; the search scored on them. Public interfaces only."""

from hica_bench import hookimpl, protocol
from hica_bench.interfaces import Episode, Option, PluginSpec


class TrainValidation:
    title = "train-val"

    def __init__(self, per_class: int = 2) -> None:
        self.per_class = per_class

    def check(self, labels, n_classes, shots, dataset, class_names):
        protocol.check_shots(list(shots), labels["train"], n_classes, dataset, list(class_names))
        protocol.check_validation(list(shots), labels, n_classes, dataset, self.per_class, "train", list(class_names))

    def episode(self, labels, n_classes, k, seed, dataset):
        where, validation = protocol.sample_validation(labels, n_classes, k, seed, dataset, self.per_class, "train")
        return Episode(protocol.sample_support(labels["train"], n_classes, k, seed, dataset), validation, where,
                       "validation")


@hookimpl
def hica_bench_protocols():
    return [PluginSpec("protocol", "train-val", "validation images from the rest of train (tests)", TrainValidation,
                       {"per_class": Option(low=1)})]
