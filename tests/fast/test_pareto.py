"""Pareto fronts, dominance removal, Pareto sampling and top-K: hand-worked matrices and a
cross-check against the installed gepa package's own selection code."""

import random
from collections import Counter

import pytest
from gepa.gepa_utils import remove_dominated_programs, select_program_candidate_from_pareto_front

from fst_jax.fast.candidates import Population, front_counts, pareto_fronts, remove_dominated
from fst_jax.fast.strategies import SELECTORS, top_k


def population(rows):
    pop = Population([f"i{i}" for i in range(len(rows[0]))])
    for r in rows:
        pop.add({"context": f"c{len(pop.members)}"}, r, origin="seed", born_step=0)
    return pop


def agg(rows):
    return [sum(r) / len(r) for r in rows]


def test_fronts_hold_every_candidate_tied_for_the_best_score():
    rows = [[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]]
    assert pareto_fronts(rows) == [{0, 2}, {1, 2}, {0, 1, 2, 3}]


def test_candidate_covered_by_a_better_one_everywhere_is_removed():
    rows = [[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]]
    fronts = pareto_fronts(rows)
    assert remove_dominated(fronts, agg(rows)) == {2}
    pop = population(rows)
    rng = random.Random(0)
    assert {SELECTORS["pareto"](pop, rng, 0.0) for _ in range(50)} == {2}


def test_specialists_survive_and_the_generalist_is_not_on_a_front():
    rows = [[1, 0], [0, 1], [0.5, 0.5]]
    fronts = pareto_fronts(rows)
    assert fronts == [{0}, {1}]
    assert remove_dominated(fronts, agg(rows)) == {0, 1}


def test_of_two_identical_candidates_the_higher_id_survives():
    rows = [[1, 1], [1, 1]]
    assert remove_dominated(pareto_fronts(rows), agg(rows)) == {1}


def test_pareto_selection_is_proportional_to_front_counts_and_seeded():
    rows = [[1, 1, 0], [0, 0, 1]]
    pop = population(rows)
    assert front_counts(pop.fronts(), {0, 1}) == {0: 2, 1: 1}
    draws = [SELECTORS["pareto"](pop, random.Random(7), 0.0) for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same draw
    rng = random.Random(1)
    freq = Counter(SELECTORS["pareto"](pop, rng, 0.0) for _ in range(3000))
    assert abs(freq[0] / 3000 - 2 / 3) < 0.03


def test_current_best_and_epsilon_greedy():
    pop = population([[0, 0], [1, 0], [1, 0]])
    assert SELECTORS["current_best"](pop, random.Random(0), 0.0) == 1  # ties: oldest
    rng = random.Random(0)
    picks = Counter(SELECTORS["epsilon_greedy"](pop, rng, 0.3) for _ in range(3000))
    assert abs(picks[0] / 3000 - 0.1) < 0.03  # 0.3 exploration spread over 3 members


def test_top_k_ranks_pareto_members_by_aggregate_then_coverage_then_age():
    rows = [
        [1, 0, 0, 0],        # 0: specialist on i0, agg .25
        [0, 1, 1, 0],        # 1: agg .5, on i1 and i2
        [0, 1, 0, 1],        # 2: agg .5, on i1 and i3
        [0, 0.5, 0.5, 0.5],  # 3: agg .375, on no front
        [0, 1, 1, 0],        # 4: a copy of 1 (dominated by it: higher id survives, so 1 is removed)
    ]
    pop = population(rows)
    # Pareto members after dominance removal: 0, 2, 4 (1 and 4 share fronts; 4 wins the tie).
    assert remove_dominated(pop.fronts(), pop.aggregate()) == {0, 2, 4}
    # 2 and 4 tie on aggregate and coverage (2 fronts each): older first; then 0; then the rest.
    assert top_k(pop, 3) == [2, 4, 0]
    assert top_k(pop, 5) == [2, 4, 0, 1, 3]
    assert top_k(pop, 10) == [2, 4, 0, 1, 3]


def test_top_k_puts_the_highest_aggregate_first_even_when_dominated_by_coverage():
    rows = [
        [1, 1, 0, 0, 0, 1],    # 0: agg .5, alone on i0 and i5, on i1 with 1
        [0, 1, 1, 1, 0, 0.9],  # 1: agg .65, its fronts (i1-i3) all hold 0 or 2: dominated
        [0, 0, 1, 1, 1, 0],    # 2: agg .5, alone on i4, on i2 and i3 with 1
    ]
    pop = population(rows)
    assert remove_dominated(pop.fronts(), pop.aggregate()) == {0, 2}
    assert top_k(pop, 1) == [1]
    assert top_k(pop, 3) == [1, 0, 2]  # then the Pareto members: tied aggregate and coverage, older first


def test_top_k_gives_an_aggregate_tie_for_slot_0_to_a_pareto_member_over_a_dominated_one_with_more_coverage():
    rows = [
        [1, 1, 1, 0, 0, 0],        # 0: on i0-i2 (3 fronts), each shared with one of 1-3: dominated
        [1, 0.5, 0.5, 1, 0, 0],    # 1: on i0 and alone on i3
        [0.5, 1, 0.5, 0, 1, 0],    # 2: on i1 and alone on i4
        [0.5, 0.5, 1, 0, 0, 1],    # 3: on i2 and alone on i5
    ]
    pop = population(rows)
    assert set(pop.aggregate()) == {0.5} and remove_dominated(pop.fronts(), pop.aggregate()) == {1, 2, 3}
    assert top_k(pop, 4) == [1, 2, 3, 0]


def random_matrix(rng):
    k, n = rng.randint(1, 7), rng.randint(1, 10)
    return [[rng.choice([0.0, 0.5, 1.0]) for _ in range(n)] for _ in range(k)]


def test_dominance_removal_matches_gepa_on_random_matrices():
    rng = random.Random(0)
    for _ in range(300):
        rows = random_matrix(rng)
        fronts = pareto_fronts(rows)
        a = agg(rows)
        ours = remove_dominated(fronts, a)
        # gepa orders its removal scan by score; a (score, id) key reproduces our tie rule.
        theirs = remove_dominated_programs(dict(enumerate(fronts)), scores={k: (a[k], k) for k in range(len(rows))})
        assert ours == set().union(*theirs.values()), rows


@pytest.mark.parametrize("seed", range(12))
def test_pareto_sampling_distribution_matches_gepa(seed):
    rows = random_matrix(random.Random(100 + seed))
    pop = population(rows)
    a = pop.aggregate()
    keyed = [(a[k], k) for k in range(len(rows))]
    mapping = dict(enumerate(pop.fronts()))
    draws = 1500
    rng_ours, rng_theirs = random.Random(seed), random.Random(seed)
    ours = Counter(SELECTORS["pareto"](pop, rng_ours, 0.0) for _ in range(draws))
    theirs = Counter(select_program_candidate_from_pareto_front(mapping, keyed, rng_theirs) for _ in range(draws))
    assert set(ours) == set(theirs)
    for k in ours:
        assert abs(ours[k] - theirs[k]) / draws < 0.06, (rows, ours, theirs)
