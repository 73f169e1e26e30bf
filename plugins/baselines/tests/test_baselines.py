"""The few-shot VLM baselines (kNN, Tip-Adapter(-F), CLIP-Adapter, LP++, CoOp) on constructed feature sets
whose right answer is known, CoOp through real text towers (MiniLM, a random-init open_clip model), and the
CLI on real MedMNIST files.

The constructed sets: C unit-norm class directions in a 32-d space, support and test features scattered
around them, and a small real text encoder (a fixed embedding table per class name) that makes an aligned
pair whose class texts are informative, identical for every class, or misleading (each class's text leans
towards another class's images).
"""

import json

import numpy as np
import pytest

from conftest import hica_bench
from hica_bench.errors import NotApplicable
from hica_bench.interfaces import EncoderPair, FewShotTask
from hica_bench.registry import load_registry
from hica_bench_baselines.adapters import ClipAdapter, LPPlusPlus, TipAdapter, TipAdapterF
from hica_bench_baselines.coop import CoOp, PromptTower
from hica_bench_baselines.knn import KNN, auto_neighbours
from hica_bench_baselines.frozen import ZeroShot

NAMES = ["alpha cells", "beta cells", "gamma cells"]
C, D, K = 3, 32, 5
NEW_METHODS = ("knn", "tip-adapter", "tip-adapter-f", "clip-adapter", "lp++", "coop")


class TableText:
    """A real TextEncoder: each text maps to the table row of the class name it mentions."""

    identity = "test-table-text"

    def __init__(self, table):
        self.table = np.asarray(table, dtype=np.float32)
        self.embed_dim = self.table.shape[1]

    def encode(self, texts):
        return np.stack([self.table[[name in text for name in NAMES].index(True)] for text in texts])


_rng = np.random.default_rng(0)
_basis = np.linalg.qr(_rng.normal(size=(D, C + 1)))[0].T
DIRECTIONS, COMMON = _basis[:C], _basis[C]
TEXTS = {
    "informative": DIRECTIONS,
    "identical": np.tile(COMMON, (C, 1)),
    "misleading": COMMON + 0.05 * DIRECTIONS[[1, 2, 0]],
}


def clusters(directions, per_class, seed, noise=0.3):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(directions)), per_class)
    spread = noise * rng.normal(size=(len(labels), directions.shape[1])) / np.sqrt(directions.shape[1])
    return (directions[labels] + spread).astype(np.float32), labels


SUPPORT, TEST = clusters(DIRECTIONS, K, seed=1), clusters(DIRECTIONS, 40, seed=2)


def make_task(text="informative", seed=0, support=SUPPORT, k=K, aligned=True, encoders=None, names=None):
    features, labels = support
    if encoders is None:
        encoders = EncoderPair(image=None, text=TableText(TEXTS[text]), aligned=aligned)
    names = names or NAMES[: labels.max() + 1]
    return FewShotTask("toy", "multi-class", names, features, labels, np.arange(len(labels)), k, seed, encoders)


def accuracy(method, test=TEST):
    return float(np.mean(method.predict_proba(test[0]).argmax(1) == test[1]))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models: one intra-op thread spares OpenMP spin-waiting on a busy shared CPU (results do not depend
    on it); the previous setting is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TRAINED = {
    "knn": KNN, "tip-adapter": TipAdapter, "tip-adapter-f": TipAdapterF, "clip-adapter": ClipAdapter, "lp++": LPPlusPlus,
}


@pytest.mark.parametrize("name", TRAINED)
def test_well_separated_clusters_are_classified_perfectly(name):
    method = TRAINED[name]().fit(make_task())
    proba = method.predict_proba(TEST[0])
    assert proba.shape == (len(TEST[1]), C) and np.allclose(proba.sum(1), 1.0)
    assert accuracy(method) == 1.0


def test_zero_weight_on_the_support_equals_zero_shot():
    """Tip-Adapter(-F) with alpha = 0 and CLIP-Adapter with ratio 0 are exactly zero-shot, even after training."""
    task = make_task("misleading")
    zero_shot = ZeroShot().fit(task).predict_proba(TEST[0])
    assert accuracy(ZeroShot().fit(task)) < 0.2  # the misleading texts fool it (chance: 1/3)
    for method in (TipAdapter(alpha=0.0), TipAdapterF(alpha=0.0), ClipAdapter(ratio=0.0, epochs=5)):
        np.testing.assert_allclose(method.fit(task).predict_proba(TEST[0]), zero_shot, atol=1e-5)
    assert not np.allclose(TipAdapter().fit(task).predict_proba(TEST[0]), zero_shot, atol=1e-3)


def test_the_cache_and_lp_plus_plus_decide_when_class_texts_are_identical():
    task = make_task("identical")
    np.testing.assert_allclose(ZeroShot().fit(task).predict_proba(TEST[0]), 1 / C)  # no text information at all
    for method in (TipAdapter(), TipAdapterF(), LPPlusPlus()):
        assert accuracy(method.fit(task)) == 1.0


def test_tip_adapter_search_overrides_misleading_texts_by_leave_one_out():
    task = make_task("misleading")
    default = TipAdapter().fit(task)
    assert (default.alpha_, default.beta_) == (1.0, 5.5) and accuracy(default) < 0.2  # 100 x text logits dominate
    searched = TipAdapter(search=True).fit(task)
    assert searched.alpha_ > 1.0 and searched.alpha_ in TipAdapter.ALPHAS and searched.beta_ in TipAdapter.BETAS
    assert accuracy(searched) == 1.0
    one_shot = TipAdapter(search=True).fit(make_task("misleading", support=clusters(DIRECTIONS, 1, seed=3), k=1))
    assert (one_shot.alpha_, one_shot.beta_) == (1.0, 5.5)  # nothing to leave out at 1 shot: paper defaults


def test_fine_tuned_keys_and_the_adapter_learn_what_the_texts_get_wrong():
    task = make_task("misleading")
    tip_f = TipAdapterF().fit(task)  # paper defaults: 20 small AdamW steps
    assert len(tip_f.losses_) == 20 and tip_f.losses_[-1] < 0.8 * tip_f.losses_[0]
    assert not np.allclose(tip_f.keys_.numpy(), SUPPORT[0] / np.linalg.norm(SUPPORT[0], axis=1, keepdims=True))
    assert accuracy(TipAdapterF(lr=1e-2).fit(task)) == 1.0  # larger steps: the keys outvote the texts

    adapter = ClipAdapter().fit(task)
    assert len(adapter.losses_) == 200 and adapter.losses_[-1] < 0.6 * adapter.losses_[0]  # 5 shots: 200 epochs
    assert accuracy(ClipAdapter(lr=0.1).fit(task)) == 1.0


def test_lp_plus_plus_uses_the_papers_data_driven_steps_and_init():
    task = make_task("identical")
    method = LPPlusPlus().fit(task)
    x = SUPPORT[0] / np.linalg.norm(SUPPORT[0], axis=1, keepdims=True)
    text = TEXTS["identical"] / np.linalg.norm(TEXTS["identical"], axis=1, keepdims=True)
    assert method.lr_w_ == pytest.approx(4 * len(x) / np.linalg.eigvalsh(x.T @ x).max(), rel=1e-6)
    assert method.lr_alpha_ == pytest.approx(len(x) / (4 * ((x @ text.T) ** 2).sum(0).max()), rel=1e-6)
    assert method.alpha_init_ == pytest.approx(250 * (x @ text.T).mean(), rel=1e-6)
    assert len(method.losses_) == 300 and method.losses_[-1] < method.losses_[0]
    assert not np.allclose(method.alpha_.detach().numpy(), method.alpha_init_)  # alpha moved by its own steps


def test_knn_neighbour_count_and_nearest_neighbour_answer():
    assert [auto_neighbours(1, 2), auto_neighbours(5, 10), auto_neighbours(20, 40), auto_neighbours(20, 160)] == [1, 3, 5, 11]
    task = make_task(encoders=EncoderPair(image=None, text=None, aligned=False))  # any pair works, no text needed
    assert KNN().fit(task).neighbours_ == 3
    nearest = KNN(neighbours=1).fit(task)
    cosine = (TEST[0] / np.linalg.norm(TEST[0], axis=1, keepdims=True)) @ (
        SUPPORT[0] / np.linalg.norm(SUPPORT[0], axis=1, keepdims=True)).T
    np.testing.assert_array_equal(nearest.predict_proba(TEST[0]).argmax(1), SUPPORT[1][cosine.argmax(1)])


@pytest.mark.parametrize("name", ["tip-adapter-f", "clip-adapter", "lp++", "knn"])
def test_deterministic_under_a_fixed_seed(name):
    first = TRAINED[name]().fit(make_task("misleading", seed=3)).predict_proba(TEST[0])
    again = TRAINED[name]().fit(make_task("misleading", seed=3)).predict_proba(TEST[0])
    np.testing.assert_array_equal(first, again)
    if name == "clip-adapter":  # randomly initialised: another seed is another adapter
        other = ClipAdapter().fit(make_task("misleading", seed=4)).predict_proba(TEST[0])
        assert not np.allclose(first, other)


# --------------------------------------------------------------------------- CoOp through real text towers


def orthogonal_clusters(tower, seed, per_class):
    """Clusters orthogonal to the prompts' features at CoOp's initial context, so the untrained prompts tie."""
    import torch

    from hica_bench_baselines.common import generator

    with torch.no_grad():
        initial = tower(torch.randn(tower.n_ctx, tower.ctx_dim, generator=generator(seed)) * 0.02).numpy()
    span = np.linalg.qr(initial.T.astype(np.float64))[0]
    centres = np.random.default_rng(seed).normal(size=(len(initial), initial.shape[1]))
    centres -= centres @ span @ span.T
    return clusters(centres / np.linalg.norm(centres, axis=1, keepdims=True), per_class, seed + 1, noise=0.2)


@pytest.fixture(scope="module")
def open_clip_pair():
    from hica_bench_encoders.openclip_encoders import open_clip_pair

    return open_clip_pair("cpu", "ViT-S-32-alt", "random")  # random init (seed 0), aligned by construction


def test_coop_learns_prompts_through_minilm():
    import torch

    from hica_bench_encoders.text import HFMeanPoolText, build_text, minilm_path

    tower = PromptTower(build_text("minilm", "cpu"), ["benign", "malignant"], 16, "cpu")  # sentence-transformers
    assert tower.ctx_dim == 384
    plain_hf = PromptTower(HFMeanPoolText(str(minilm_path()), "cpu"), ["benign", "malignant"], 16, "cpu")
    ctx = torch.randn(16, 384, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the same MiniLM through transformers' AutoModel + mean pooling: the same prompt features
        via_st, via_hf = (torch.nn.functional.normalize(t(ctx), dim=1) for t in (tower, plain_hf))
    torch.testing.assert_close(via_st, via_hf, atol=1e-5, rtol=0)
    support = orthogonal_clusters(tower, seed=0, per_class=5)
    coop = CoOp(epochs=8).learn(tower, *support, k=5, seed=0)
    assert coop.losses_[0] == pytest.approx(np.log(2), abs=0.15)  # untrained prompts: about a coin toss
    assert coop.losses_[-1] < 0.5 * coop.losses_[0]
    assert accuracy(coop, support) == 1.0


def test_coop_fits_on_an_open_clip_pair_and_is_deterministic(open_clip_pair):
    tower = PromptTower(open_clip_pair.text, ["benign", "malignant"], 16, "cpu")
    assert tower.ctx_dim == 256
    support = orthogonal_clusters(tower, seed=0, per_class=5)
    task = make_task(support=support, encoders=open_clip_pair, names=["benign", "malignant"])
    model = open_clip_pair.modules["model"]
    parameters = {name: p.clone() for name, p in model.named_parameters()}
    coop = CoOp(epochs=5).fit(task)
    assert coop.losses_[-1] < 0.5 * coop.losses_[0]
    test = clusters(np.stack([support[0][support[1] == c].mean(0) for c in (0, 1)]), 20, seed=9, noise=0.1)
    assert accuracy(coop, test) == 1.0
    assert all(p.grad is None and p.equal(parameters[name]) for name, p in model.named_parameters())  # frozen, untouched

    once, again = CoOp(epochs=1).fit(task), CoOp(epochs=1).fit(task)
    np.testing.assert_array_equal(again.ctx_.numpy(), once.ctx_.numpy())
    other_seed = make_task(support=support, encoders=open_clip_pair, names=["benign", "malignant"], seed=1)
    assert not np.allclose(CoOp(epochs=1).fit(other_seed).ctx_.numpy(), once.ctx_.numpy())


def test_coop_without_a_text_tower_is_not_applicable():
    with pytest.raises(NotApplicable, match="text tower"):
        CoOp().fit(make_task())
    with pytest.raises(NotApplicable, match="aligned"):
        CoOp().fit(make_task(aligned=False))


# --------------------------------------------------------------------------- the CLI


@pytest.mark.slow
def test_registered_and_run_by_the_cli_knn_ok_aligned_methods_not_applicable(medmnist_root, tmp_path):
    specs = load_registry().specs("method")
    assert all(specs[name].distribution == "hica-bench-baselines" for name in NEW_METHODS)
    methods = "knn,knn:neighbours=1,tip-adapter:alpha=0.5:beta=3,tip-adapter-f,clip-adapter,lp++,coop"
    result = hica_bench("-p", "pixel_encoder", "run", "--no-report", "--encoder", "pixels", "--datasets", "breastmnist", "--methods", methods,
                        "--shots", "1,5", "--seeds", "0", "--data-root", str(medmnist_root), "--cache-dir", str(tmp_path / "cache"),
                        "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    records = {(r["key"]["method"], r["key"]["k"]): r for r in map(json.loads, (tmp_path / "out" / "results.jsonl").open())}
    assert len(records) == 7 * 2
    for k in (1, 5):
        for name in ("knn", "knn:neighbours=1"):
            assert records[(name, k)]["status"] == "ok" and 0.0 <= records[(name, k)]["metrics"]["auc"] <= 1.0
        for name in ("tip-adapter:alpha=0.5:beta=3.0", "tip-adapter-f", "clip-adapter", "lp++", "coop"):
            assert records[(name, k)]["status"] == "not_applicable" and "aligned" in records[(name, k)]["reason"]
    assert records[("tip-adapter:alpha=0.5:beta=3.0", 5)]["identity"]["origin"]["method"]["options"] == {
        "alpha": 0.5, "beta": 3.0, "logit_scale": 100.0, "search": False}
    assert records[("knn", 1)]["metrics"] == records[("knn:neighbours=1", 1)]["metrics"]  # auto: 1 neighbour at 1 shot
