"""Tests for search.py: the hierarchical grid search against a plain re-implementation of the paper's loop.

Run: python -m pytest -q test_search.py
"""
import itertools
import json
import math

import numpy as np
import pytest

from search import best_subcube, grid_points, hierarchical_grid_search, point_key, search_cost

W_STAR = (0.3, 0.7, 0.55)


def smooth(w):
    """Unimodal, maximum at W_STAR (not symmetric, so near-ties between cells are unlikely)."""
    return -sum((x - y) ** 2 for x, y in zip(w, W_STAR))


def bumpy(w):
    """Deterministic and many-peaked, so the kept cell is often not the one around the global maximum."""
    x, y, z = w
    return math.sin(13 * x + 1) * math.cos(7 * y - 2) + 0.5 * math.sin(19 * z * x + 3 * y) + 0.1 * z


def counted(objective):
    """Wrap an objective; the wrapper's .calls lists every point it was called at."""
    def wrapper(w):
        wrapper.calls.append(tuple(w))
        return objective(w)
    wrapper.calls = []
    return wrapper


def paper_loop_3d(objective, iterations=5):
    """The authors' loop, written out for 3 objectives and no memoisation: 27 calls per iteration.

    Shares no code with search.py: its own grid (numpy linspace), its own cell sums (explicit i, j, k loops).
    """
    bounds = [(0.0, 1.0)] * 3
    best_w, best_score, calls = None, -math.inf, 0
    for _ in range(iterations):
        axes = [np.linspace(lo, hi, 3) for lo, hi in bounds]
        score = np.zeros((3, 3, 3))
        for i in range(3):
            for j in range(3):
                for k in range(3):
                    w = (float(axes[0][i]), float(axes[1][j]), float(axes[2][k]))
                    score[i, j, k] = objective(w)
                    calls += 1
                    if score[i, j, k] > best_score:  # strict: the first point seen wins ties
                        best_w, best_score = w, score[i, j, k]
        best_sum, best_cell = -math.inf, None
        for i in range(2):
            for j in range(2):
                for k in range(2):
                    s = 0.0
                    for di in range(2):
                        for dj in range(2):
                            for dk in range(2):
                                s += score[i + di, j + dj, k + dk]
                    if s > best_sum:
                        best_sum, best_cell = s, (i, j, k)
        bounds = [(float(axes[a][c]), float(axes[a][c + 1])) for a, c in enumerate(best_cell)]
    return best_w, float(best_score), calls


# ----------------------------------------------------------------------------------------------
# the grid and the sub-cube

def test_grid_points_order_is_product_order_axis_0_slowest():
    assert grid_points([(0, 1), (0, 1)], 3) == [
        (0, 0), (0, 0.5), (0, 1), (0.5, 0), (0.5, 0.5), (0.5, 1), (1, 0), (1, 0.5), (1, 1)]
    points = grid_points([(0.2, 0.4), (1.0, 2.0), (-1.0, 0.0)], 4)
    assert len(points) == 64
    assert points[0] == (0.2, 1.0, -1.0) and points[-1] == (0.4, 2.0, 0.0)  # ends exact
    assert grid_points([(0.3, 0.9)], 4)[-1] == (0.9,)  # lo + (hi - lo) * 3 / 3 would give 0.9000000000000001


@pytest.mark.parametrize("dim, n", [(1, 2), (1, 5), (2, 3), (3, 3), (3, 4), (4, 3)])
def test_best_subcube_matches_numpy_sliding_sum(dim, n):
    rng = np.random.default_rng(dim * 10 + n)
    scores = rng.normal(size=n ** dim)
    bounds = [(0.0, 1.0)] * dim
    # independent: sum the 2^dim shifted views of the score array, argmax in C order = grid order
    grid = scores.reshape([n] * dim)
    sums = np.zeros([n - 1] * dim)
    for offset in itertools.product((0, 1), repeat=dim):
        sums += grid[tuple(slice(o, o + n - 1) for o in offset)]
    cell = np.unravel_index(np.argmax(sums), sums.shape)
    values = np.linspace(0, 1, n)
    expected = [(values[c], values[c + 1]) for c in cell]
    assert best_subcube(bounds, n, list(scores)) == pytest.approx(expected)


def test_best_subcube_ties_go_to_the_first_cell():
    assert best_subcube([(0, 1)] * 3, 3, [1.0] * 27) == [(0, 0.5)] * 3
    assert best_subcube([(0, 1)] * 2, 4, [0.0] * 16) == pytest.approx([(0, 1 / 3)] * 2)


def test_best_subcube_rejects_wrong_number_of_scores():
    with pytest.raises(ValueError, match="one score per"):
        best_subcube([(0, 1)] * 3, 3, [0.0] * 26)


def test_search_cost_is_the_naive_count():
    assert search_cost(3) == 135
    assert search_cost(2, 4, 2) == 32


# ----------------------------------------------------------------------------------------------
# the search against the paper's loop

@pytest.mark.parametrize("objective", [smooth, bumpy])
def test_search_equals_paper_loop_with_fewer_calls(objective):
    ref_w, ref_score, ref_calls = paper_loop_3d(objective)
    f = counted(objective)
    best_w, best_score, history = hierarchical_grid_search(f, 3, progress=False)
    assert best_w == pytest.approx(ref_w) and best_score == pytest.approx(ref_score)
    assert ref_calls == 135
    # 27 points in the first grid; each later grid has 27 points, of which the 2^3 = 8 whose coordinates
    # are all at offset 0 or 1/2 of the cell width are the corners of the cell kept from the grid before;
    # its other 19 have some coordinate at an odd multiple of the new (halved) spacing, which no earlier
    # grid held. So 27 + 4 * 19 = 103, and 135 - 103 = 32 repeats saved.
    assert len(f.calls) == 103 == 27 + 4 * (27 - 8)
    assert len(set(f.calls)) == 103  # no point evaluated twice
    assert [tuple(e["weights"]) for e in history] == f.calls
    assert [e["score"] for e in history] == [objective(w) for w in f.calls]


@pytest.mark.parametrize("dim", [1, 2, 3, 4])
def test_any_dim_stays_in_bounds_with_predicted_call_count(dim):
    bounds = [(0.1 * a, 0.1 * a + 1.0) for a in range(dim)]
    target = [0.1 * a + 0.37 for a in range(dim)]
    f = counted(lambda w: -sum((x - t) ** 2 for x, t in zip(w, target)))
    best_w, best_score, history = hierarchical_grid_search(f, dim, bounds=bounds, progress=False)
    assert len(best_w) == dim
    for x, (lo, hi) in zip(best_w, bounds):
        assert lo <= x <= hi
    for w in f.calls:
        assert all(lo <= x <= hi for x, (lo, hi) in zip(w, bounds))
    assert len(f.calls) == 3 ** dim + 4 * (3 ** dim - 2 ** dim)  # same argument as for dim 3
    assert best_score == max(e["score"] for e in history)


def test_smooth_optimum_found_within_final_spacing():
    best_w, _, _ = hierarchical_grid_search(smooth, 3, progress=False)
    for x, y in zip(best_w, W_STAR):
        assert abs(x - y) <= 1 / 32


def test_more_points_per_axis_and_iterations():
    f = counted(smooth)
    best_w, _, history = hierarchical_grid_search(f, 3, points_per_axis=5, iterations=3, progress=False)
    assert len(f.calls) == len(set(f.calls)) == len(history)
    assert len(f.calls) < search_cost(3, 5, 3)
    for x, y in zip(best_w, W_STAR):  # final spacing (1/4)^2 / 4 = 1/64
        assert abs(x - y) <= 1 / 64


def test_constant_objective_picks_the_first_grid_point():
    best_w, best_score, history = hierarchical_grid_search(lambda w: 1.0, 3, progress=False)
    assert best_w == (0.0, 0.0, 0.0) and best_score == 1.0
    # the kept cell is always the first one, so the search walks into the corner at the origin
    assert max(max(e["weights"]) for e in history[27:]) <= 0.5


def test_zero_point_is_evaluated_and_extras_are_kept():
    f = counted(lambda w: {"score": sum(w) / 3, "reflection": w[0], "empathy": w[1], "fluency": w[2]})
    best_w, best_score, history = hierarchical_grid_search(f, 3, progress=False)
    assert f.calls[0] == (0.0, 0.0, 0.0)
    assert best_w == (1.0, 1.0, 1.0) and best_score == 1.0
    for e in history:
        assert e["reflection"] == e["weights"][0] and e["fluency"] == e["weights"][2]


def test_point_key_rounds_away_float_noise():
    assert 0.1 + 0.2 != 0.3 and point_key((0.1 + 0.2, 1.0)) == point_key((0.3, 1.0))
    # on one ray, but the divisions differ in the last bit (0.14285714285714288 vs ...85)
    assert 0.1 / 0.7 != 0.3 / 2.1
    assert point_key((0.1, 0.7), scale_invariant=True) == point_key((0.3, 2.1), scale_invariant=True)
    assert point_key((0.1, 0.7)) != point_key((0.3, 2.1))
    assert point_key((0.0, 0.0), scale_invariant=True) == (0.0, 0.0)
    # w and -w are on opposite rays (c > 0 only), also for equal coordinates
    assert point_key((-1.0, -1.0), scale_invariant=True) != point_key((1.0, 1.0), scale_invariant=True)
    assert point_key((-1.0, -2.0), scale_invariant=True) == point_key((-0.5, -1.0), scale_invariant=True)


def test_non_binary_bounds_keep_the_call_count():
    # bounds whose grid values are not exact binary fractions: shared corners must still be found
    f = counted(smooth)
    hierarchical_grid_search(f, 3, bounds=[(0.1, 0.7), (0.3, 0.9), (0.2, 0.8)], progress=False)
    assert len(f.calls) == 103


# ----------------------------------------------------------------------------------------------
# ray de-duplication

def direction_only(w):
    """Depends on w only through w / max(w), as greedy hidden-state aggregation does."""
    m = max(w)
    if m == 0:
        return -5.0
    u = [x / m for x in w]
    return bumpy(u)


def test_scale_invariant_saves_calls_and_keeps_the_result():
    plain = counted(direction_only)
    w1, s1, h1 = hierarchical_grid_search(plain, 3, progress=False)
    dedup = counted(direction_only)
    w2, s2, h2 = hierarchical_grid_search(dedup, 3, scale_invariant=True, progress=False)
    assert len(dedup.calls) < len(plain.calls) == 103
    assert s2 == s1 and w2 == pytest.approx(w1)
    # the first grid alone: the 7 non-zero points with coordinates in {0, 1/2} lie on the rays of points
    # with coordinates in {0, 1}, so 27 - 7 = 20 calls
    first = counted(direction_only)
    hierarchical_grid_search(first, 3, iterations=1, scale_invariant=True, progress=False)
    assert len(first.calls) == 20
    # no two evaluated points on one ray; the origin is evaluated once, on its own
    rays = {tuple(round(x / max(w), 9) for x in w) if max(w) > 0 else "origin" for w in dedup.calls}
    assert len(rays) == len(dedup.calls)
    assert (0.0, 0.0, 0.0) in dedup.calls


# ----------------------------------------------------------------------------------------------
# resume

class Interrupted(Exception):
    pass


def failing_after(n, objective):
    f = counted(objective)
    def wrapper(w):
        if len(f.calls) >= n:
            raise Interrupted
        return f(w)
    wrapper.calls = f.calls
    return wrapper


def with_extras(w):
    return {"score": bumpy(w), "reflection": w[0] * 0.5, "empathy": [w[1], "x"]}


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("n", [0, 1, 27, 50])
def test_resume_gives_the_uninterrupted_result(tmp_path, n):
    full = counted(with_extras)
    expected = hierarchical_grid_search(full, 3, progress=False)
    path = tmp_path / "search.jsonl"
    first = failing_after(n, with_extras)
    with pytest.raises(Interrupted):
        hierarchical_grid_search(first, 3, history_path=str(path), progress=False)
    assert len(read_lines(path)) == 1 + n  # header + one line per evaluation, written as made
    second = counted(with_extras)
    result = hierarchical_grid_search(second, 3, history_path=str(path), progress=False)
    assert result == expected
    assert second.calls == full.calls[n:]  # only the missing calls, in order
    assert read_lines(path)[1:] == expected[2]
    # a third run finds everything in the file
    third = counted(with_extras)
    assert hierarchical_grid_search(third, 3, history_path=str(path), progress=False) == expected
    assert third.calls == []


def test_resume_tolerates_a_truncated_last_line(tmp_path):
    full = counted(bumpy)
    expected = hierarchical_grid_search(full, 3, progress=False)
    path = tmp_path / "search.jsonl"
    with pytest.raises(Interrupted):
        hierarchical_grid_search(failing_after(40, bumpy), 3, history_path=str(path), progress=False)
    text = path.read_text()
    path.write_text(text[: len(text) - 15])  # cut the 40th evaluation mid-line
    second = counted(bumpy)
    assert hierarchical_grid_search(second, 3, history_path=str(path), progress=False) == expected
    assert second.calls == full.calls[39:]  # the cut point is evaluated again
    lines = read_lines(path)  # every line parses: the cut line did not get glued to the next one
    assert len(lines) == 1 + 103


def test_resume_with_other_settings_raises(tmp_path):
    path = tmp_path / "search.jsonl"
    hierarchical_grid_search(smooth, 3, iterations=2, history_path=str(path), progress=False)
    for kwargs in [dict(iterations=3), dict(scale_invariant=True), dict(points_per_axis=4),
                   dict(bounds=[(0, 1), (0, 1), (0, 0.5)])]:
        settings = dict(iterations=2) | kwargs
        with pytest.raises(ValueError, match="other settings.*delete it or use another run folder"):
            hierarchical_grid_search(smooth, 3, history_path=str(path), progress=False, **settings)
    with pytest.raises(ValueError, match="other settings"):
        hierarchical_grid_search(lambda w: 0.0, 2, iterations=2, history_path=str(path), progress=False)


def test_damaged_history_raises(tmp_path):
    path = tmp_path / "search.jsonl"
    hierarchical_grid_search(smooth, 3, iterations=1, history_path=str(path), progress=False)
    lines = path.read_text().splitlines()
    lines[3] = lines[3][:10]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="damaged"):
        hierarchical_grid_search(smooth, 3, iterations=1, history_path=str(path), progress=False)


# ----------------------------------------------------------------------------------------------
# bad input

@pytest.mark.parametrize("kwargs, message", [
    (dict(dim=0), "dim must be"),
    (dict(dim=2.0), "dim must be"),
    (dict(dim=3, points_per_axis=1), "points_per_axis must be"),
    (dict(dim=3, iterations=0), "iterations must be"),
    (dict(dim=3, bounds=[(0, 1), (0, 1)]), "list of 3"),
    (dict(dim=2, bounds=[(0, 1), (1, 1)]), "lo < hi"),
    (dict(dim=2, bounds=[(0, 1), (1, 0)]), "lo < hi"),
    (dict(dim=2, bounds=[(0, 1), (0, 1, 2)]), "pair"),
    (dict(dim=1, bounds=[(0, math.inf)]), "finite"),
])
def test_bad_input_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hierarchical_grid_search(smooth, progress=False, **kwargs)


def test_bad_objective_output_raises():
    with pytest.raises(ValueError, match="NaN"):
        hierarchical_grid_search(lambda w: float("nan"), 2, progress=False)
    with pytest.raises(ValueError, match="'score'"):
        hierarchical_grid_search(lambda w: {"reward": 1.0}, 2, progress=False)
