import numpy as np
import pytest

from hica_bench import protocol
from hica_bench.errors import UserError


@pytest.fixture
def labels():
    return np.array([0] * 30 + [1] * 50 + [2] * 7)[np.random.default_rng(3).permutation(87)]


def test_k_per_class_and_deterministic(labels):
    a = protocol.sample_support(labels, 3, 5, seed=0, dataset="toy")
    b = protocol.sample_support(labels, 3, 5, seed=0, dataset="toy")
    assert np.array_equal(a, b)
    assert np.bincount(labels[a], minlength=3).tolist() == [5, 5, 5]
    assert len(set(a.tolist())) == 15


def test_seeds_and_datasets_give_different_supports(labels):
    a = protocol.sample_support(labels, 3, 5, seed=0, dataset="toy")
    assert not np.array_equal(a, protocol.sample_support(labels, 3, 5, seed=1, dataset="toy"))
    assert not np.array_equal(a, protocol.sample_support(labels, 3, 5, seed=0, dataset="other"))


def test_supports_are_nested_across_shots(labels):
    one, five, seven = (set(protocol.sample_support(labels, 3, k, 2, "toy").tolist()) for k in (1, 5, 7))
    assert one < five < seven


def test_rule_is_the_documented_sha256_ranking(labels):
    """The rule is spelled out in the module docstring; recompute it independently of numpy's RNGs."""
    import hashlib

    chosen = protocol.sample_support(labels, 3, 2, seed=4, dataset="toy")
    for c in range(3):
        members = [i for i in range(len(labels)) if labels[i] == c]
        expected = sorted(members, key=lambda i: hashlib.sha256(f"toy|4|{i}".encode()).hexdigest())[:2]
        assert sorted(chosen[labels[chosen] == c].tolist()) == sorted(expected)


def test_invalid_shots(labels):
    with pytest.raises(UserError, match="smallest train class"):
        protocol.sample_support(labels, 3, 8, 0, "toy")
    with pytest.raises(UserError, match=">= 1"):
        protocol.check_shots([0], labels, 3, "toy")


def test_support_hash_ignores_order():
    assert protocol.support_hash(np.array([3, 1, 2])) == protocol.support_hash(np.array([1, 2, 3]))
