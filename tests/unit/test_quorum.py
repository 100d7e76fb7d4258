"""Agreement and quorum: pure functions over literal arrays (DESIGN.md §4)."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.quorum import Accepted, Tolerance, Undecided, Vote, agree, check_finite, decide_quorum
from protocol.tensors import digest_tensors, tensors_from_arrays

TOL = Tolerance()


def vote(node: str, owner: str, probs: list[list[float]], labels: list[int] | None = None) -> Vote:
    outputs = {"probs": np.array(probs, dtype=np.float32)}
    if labels is not None:
        outputs["label"] = np.array(labels, dtype=np.int64)
    return Vote(lease=f"l-{node}", node=node, owner=owner,
                output_digest=digest_tensors(tensors_from_arrays(outputs)), outputs=outputs)


def test_bitwise_equal_outputs_agree_on_the_fast_path() -> None:
    a, b = vote("n1", "o1", [[0.1, 0.9]]), vote("n2", "o2", [[0.1, 0.9]])
    assert a.output_digest == b.output_digest
    assert agree(a, b, TOL)


def test_floats_within_tolerance_with_the_same_argmax_agree() -> None:
    assert agree(vote("n1", "o1", [[0.2, 0.8]]), vote("n2", "o2", [[0.20005, 0.79995]]), TOL)


def test_floats_beyond_tolerance_disagree() -> None:
    assert not agree(vote("n1", "o1", [[0.2, 0.8]]), vote("n2", "o2", [[0.21, 0.79]]), TOL)


def test_a_different_final_answer_disagrees_even_when_floats_are_close() -> None:
    # within allclose, but the argmax flips: the final answer must match exactly
    a, b = vote("n1", "o1", [[0.50001, 0.49999]]), vote("n2", "o2", [[0.49999, 0.50001]])
    assert np.allclose(a.outputs["probs"], b.outputs["probs"], rtol=1e-3, atol=1e-4)
    assert not agree(a, b, TOL)
    assert agree(a, b, Tolerance(final="none"))


def test_integer_outputs_must_match_exactly() -> None:
    assert not agree(vote("n1", "o1", [[0.2, 0.8]], [1]), vote("n2", "o2", [[0.2, 0.8]], [0]), TOL)


def test_exact_mode_requires_bitwise_equality() -> None:
    assert not agree(vote("n1", "o1", [[0.2, 0.8]]), vote("n2", "o2", [[0.20005, 0.79995]]), Tolerance(final="exact"))


def test_nan_and_inf_make_a_result_invalid() -> None:
    assert check_finite({"x": np.array([1.0, np.nan], dtype=np.float32)}) is not None
    assert check_finite({"x": np.array([np.inf], dtype=np.float64)}) is not None
    assert check_finite({"x": np.array([1.0], dtype=np.float32), "y": np.array([3], dtype=np.int64)}) is None


def test_two_agreeing_owners_make_a_quorum_with_the_first_as_canonical() -> None:
    a, b = vote("n1", "o1", [[0.2, 0.8]]), vote("n2", "o2", [[0.2, 0.8]])
    verdict = decide_quorum([a, b], k=2, tol=TOL)
    assert isinstance(verdict, Accepted)
    assert verdict.canonical is a
    assert {v.node for v in verdict.agreeing} == {"n1", "n2"}


def test_results_from_two_nodes_of_one_owner_do_not_make_a_quorum() -> None:
    verdict = decide_quorum([vote("n1", "o1", [[0.2, 0.8]]), vote("n2", "o1", [[0.2, 0.8]])], k=2, tol=TOL)
    assert verdict == Undecided(have=2, best_group=1)


def test_a_liar_is_outvoted_and_left_out_of_the_agreeing_group() -> None:
    honest1, honest2 = vote("n1", "o1", [[0.2, 0.8]]), vote("n3", "o3", [[0.2, 0.8]])
    liar = vote("n2", "o2", [[0.9, 0.1]])
    assert isinstance(decide_quorum([honest1, liar], k=2, tol=TOL), Undecided)
    verdict = decide_quorum([honest1, liar, honest2], k=2, tol=TOL)
    assert isinstance(verdict, Accepted)
    assert liar not in verdict.agreeing


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from([0, 1]), min_size=1, max_size=5), st.integers(1, 3))
def test_arrival_order_cannot_change_whether_a_quorum_exists(answers: list[int], k: int) -> None:
    votes = [vote(f"n{i}", f"o{i}", [[0.9, 0.1]] if a == 0 else [[0.1, 0.9]]) for i, a in enumerate(answers)]
    outcomes = {isinstance(decide_quorum(list(p), k=k, tol=TOL), Accepted)
                for p in itertools.islice(itertools.permutations(votes), 24)}
    assert len(outcomes) == 1


@settings(max_examples=300, deadline=None)
@given(st.floats(0.5, 2.0), st.floats(-3e-3, 3e-3))
def test_agreement_is_symmetric(base: float, delta: float) -> None:
    # np.allclose(a, b) scales its tolerance by |b| only: near the edge a ~ b held while b ~ a did not.
    a = vote("n1", "o1", [[base, 0.0]])
    b = vote("n2", "o2", [[base * (1 + delta), 0.0]])
    assert agree(a, b, TOL) == agree(b, a, TOL)


def test_an_accepted_group_never_holds_two_results_that_disagree() -> None:
    # a ~ b and b ~ c but not a ~ c: the candidate b must not gather a and c into one group of 3.
    eps = 0.9e-3
    a = vote("n1", "o1", [[1.0 - eps, 0.0]])
    b = vote("n2", "o2", [[1.0, 0.0]])
    c = vote("n3", "o3", [[1.0 + eps, 0.0]])
    assert agree(a, b, TOL) and agree(b, c, TOL) and not agree(a, c, TOL)
    assert isinstance(decide_quorum([b, a, c], k=3, tol=TOL), Undecided)
    two = decide_quorum([b, a, c], k=2, tol=TOL)
    assert isinstance(two, Accepted)
    assert all(agree(x, y, TOL) for x, y in itertools.combinations(two.agreeing, 2))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.99, 1.01), min_size=2, max_size=6), st.integers(2, 4))
def test_every_accepted_group_agrees_pairwise_for_any_k(values: list[float], k: int) -> None:
    votes = [vote(f"n{i}", f"o{i}", [[v, 0.0]]) for i, v in enumerate(values)]
    verdict = decide_quorum(votes, k=k, tol=TOL)
    if isinstance(verdict, Accepted):
        assert len({v.owner for v in verdict.agreeing}) >= k
        assert all(agree(x, y, TOL) for x, y in itertools.combinations(verdict.agreeing, 2))
