"""A method that takes its time, for the executor tests (``hica-bench -p slow_methods``): ``sleepy`` writes the pid
of the process fitting it to ``pid_dir`` (so a test can kill that worker mid-cell), sleeps ``seconds``, then predicts
the nearest class mean. A genuine third-party-style plugin (public interfaces only)."""

import os
import time
from pathlib import Path

import numpy as np

from hica_bench import hookimpl
from hica_bench.interfaces import PluginSpec


class Sleepy:
    needs = frozenset({"image_features"})

    def __init__(self, seconds: float = 1.0, pid_dir: str = "", cpus: float = 0.0) -> None:
        self.seconds, self.pid_dir = seconds, pid_dir
        if cpus:
            self.resources = {"num_cpus": cpus}  # what one cell needs under --executor ray

    def fit(self, task):
        if self.pid_dir:
            Path(self.pid_dir).mkdir(parents=True, exist_ok=True)
            (Path(self.pid_dir) / f"{os.getpid()}-k{task.k}-s{task.seed}").write_text(str(os.getpid()))
        time.sleep(self.seconds)
        x = task.support_features.astype(np.float64)
        self.means_ = np.stack([x[task.support_labels == c].mean(axis=0) for c in range(task.n_classes)])
        return self

    def predict_proba(self, features):
        distances = ((features[:, None, :] - self.means_[None]) ** 2).sum(-1)
        logits = -(distances - distances.min(axis=1, keepdims=True)) / max(distances.std(), 1e-9)
        proba = np.exp(logits)
        return proba / proba.sum(axis=1, keepdims=True)


class Spin:
    """A fit that costs CPU, not wall time: ``rounds`` least-squares solves on the support features (benchmarks)."""

    needs = frozenset({"image_features"})

    def __init__(self, rounds: int = 200) -> None:
        self.rounds = rounds

    def fit(self, task):
        x = task.support_features.astype(np.float64)
        y = np.eye(task.n_classes)[task.support_labels]
        rng = np.random.default_rng(task.seed)
        for _ in range(self.rounds):
            w = rng.normal(size=(x.shape[1], 64))
            h = np.tanh(x @ w / np.sqrt(x.shape[1]))
            self.w_, self.beta_ = w, np.linalg.lstsq(h, y, rcond=None)[0]
        return self

    def predict_proba(self, features):
        h = np.tanh(features.astype(np.float64) @ self.w_ / np.sqrt(features.shape[1]))
        logits = h @ self.beta_
        proba = np.exp(logits - logits.max(axis=1, keepdims=True))
        return proba / proba.sum(axis=1, keepdims=True)


@hookimpl
def hica_bench_methods():
    return [PluginSpec("method", "sleepy", "sleeps, then nearest class mean (executor tests)", Sleepy),
            PluginSpec("method", "spin", "CPU-bound fit (executor benchmarks)", Spin)]
