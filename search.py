"""Hierarchical grid search for the aggregation weights w (EMORL, Kong et al. 2025, Sec. 3.3).

The paper searches the weights w = (w_1, ..., w_K) of the hidden-state aggregation
h = sum_k w_k h_k with a coarse-to-fine grid: evaluate a 3x3x3 grid on [0,1]^3 (score = mean
validation reward, higher is better), keep the 2x2x2 sub-cube (one cell of the grid) whose 8
corners have the largest summed score, make it the new bounds and repeat, 5 times in all. The
width halves each time, so the last grid has spacing 1/32. The answer is the best point ever seen.

    best_w, best_score, history = hierarchical_grid_search(objective, dim=3)

`objective(w)` takes a tuple of K floats and returns a float, or a dict with key "score" and any
other keys (per-objective rewards, ...), which are kept in the history.

Where this departs from the paper and the authors' code (engineerkong/EMORL):
1. No repeated evaluations. Consecutive grids share the 2^K corners of the kept cell, and the
   authors' loop evaluates them again: 3^3 * 5 = 135 calls, 32 of them repeats. Here every point
   is evaluated once and its score is reused (27 + 4 * 19 = 103 calls for K = 3).
2. Any number of objectives K and any number of points per axis; the authors hard-wire 3 x 3 x 3.
3. Optional ray de-duplication (`scale_invariant=True`). The LM head is linear, so
   lm_head(sum_k c w_k h_k) = c lm_head(sum_k w_k h_k): for c > 0 greedy decoding gives the same
   tokens for w and c w, and points on one ray from the origin are one point. Off by default,
   because it holds only for generators whose output depends on the direction of w alone.
4. Resumable: every evaluation is appended to a JSON-lines history file the moment it is made,
   so an interrupted search restarts where it stopped and ends with the same result.
5. Ties are broken by order (first sub-cube in grid order, first point evaluated), so the search
   is deterministic; the paper does not say how it breaks ties.
"""
import itertools
import json
import math
import os

from tqdm import tqdm


# ----------------------------------------------------------------------------------------------
# The grid and the choice of sub-cube (pure functions)

def axis_values(lo, hi, points_per_axis):
    """points_per_axis evenly spaced values from lo to hi, both ends included exactly."""
    n = points_per_axis
    # (1 - t) lo + t hi, not lo + t (hi - lo): the ends come out exactly as lo and hi, so the next
    # grid's corners are bit-identical to this grid's values and hit the cache without rounding.
    return [(1 - i / (n - 1)) * lo + (i / (n - 1)) * hi for i in range(n)]


def grid_points(bounds, points_per_axis):
    """All grid points inside bounds [(lo, hi) per axis], as tuples, axis 0 varying slowest."""
    values = [axis_values(lo, hi, points_per_axis) for lo, hi in bounds]
    return list(itertools.product(*values))


def flat_index(index, points_per_axis):
    """Position of the grid point with per-axis indices `index` in grid_points' order."""
    flat = 0
    for i in index:  # axis 0 slowest: row-major order, as itertools.product
        flat = flat * points_per_axis + i
    return flat


def best_subcube(bounds, points_per_axis, scores):
    """New bounds: the grid cell (2 adjacent values per axis) whose 2^dim corners score highest.

    scores[j] is the score of grid_points(bounds, points_per_axis)[j]. Ties go to the first cell
    in grid order (the cell named by its lowest corner).
    """
    dim, n = len(bounds), points_per_axis
    if len(scores) != n ** dim:
        raise ValueError(f"best_subcube got {len(scores)} scores for a grid of {n}^{dim} = {n ** dim} "
                         f"points; pass one score per grid_points(bounds, {n}) point, in that order")
    best_sum, best_start = -math.inf, None
    for start in itertools.product(range(n - 1), repeat=dim):  # lowest corner of each cell
        corner_sum = 0.0
        for offset in itertools.product((0, 1), repeat=dim):
            corner = [s + o for s, o in zip(start, offset)]
            corner_sum += scores[flat_index(corner, n)]
        if best_start is None or corner_sum > best_sum:  # strict '>': first cell wins ties
            best_sum, best_start = corner_sum, start
    values = [axis_values(lo, hi, n) for lo, hi in bounds]
    return [(values[a][s], values[a][s + 1]) for a, s in enumerate(best_start)]


def search_cost(dim, points_per_axis=3, iterations=5):
    """Objective calls of the authors' loop, which re-evaluates shared corners (135 for 3, 3, 5)."""
    return points_per_axis ** dim * iterations


def point_key(weights, decimals=9, scale_invariant=False):
    """Cache key of a point: rounded so float noise cannot defeat the cache.

    With scale_invariant, w and c w (c > 0) get one key: w divided by max |w_k| (= max w_k for
    non-negative weights). The all-zero point has no direction and is its own key.
    """
    w = list(weights)
    if scale_invariant:
        scale = max(abs(x) for x in w)
        if scale > 0:
            w = [x / scale for x in w]
    return tuple(round(x, decimals) for x in w)


def check_settings(dim, points_per_axis, iterations, bounds):
    """Validate the search settings; return bounds as a list of (lo, hi) float pairs."""
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be an integer >= 1 (the number of objectives K), got {dim!r}")
    if not isinstance(points_per_axis, int) or points_per_axis < 2:
        raise ValueError(f"points_per_axis must be an integer >= 2 (the paper uses 3), got {points_per_axis!r}")
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1 (the paper uses 5), got {iterations!r}")
    if bounds is None:
        return [(0.0, 1.0)] * dim
    if not isinstance(bounds, (list, tuple)) or len(bounds) != dim:
        raise ValueError(f"bounds must be a list of {dim} (lo, hi) pairs, one per objective, got {bounds!r}; "
                         f"pass e.g. [(0.0, 1.0)] * {dim} or leave it None")
    checked = []
    for axis, pair in enumerate(bounds):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"bounds[{axis}] must be a (lo, hi) pair, got {pair!r}")
        lo, hi = float(pair[0]), float(pair[1])
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"bounds[{axis}] = {pair!r} needs finite lo < hi; swap or widen the pair")
        checked.append((lo, hi))
    return checked


# ----------------------------------------------------------------------------------------------
# The history file (JSON lines: one header with the settings, then one line per evaluation)

def append_json_line(path, record):
    """Append one JSON line and force it to disk, so a crash loses at most the line being written."""
    with open(path, "a") as f:
        f.write(json.dumps(record, default=to_json) + "\n")
        f.flush()
        os.fsync(f.fileno())


def to_json(value):
    """json.dumps fallback for numpy / torch scalars in the objective's extra info."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"objective returned {type(value).__name__} {value!r}, which cannot be written to the "
                    f"history file; return floats, ints, strings, lists or dicts")


def open_history(path, settings):
    """Load the evaluations already in `path` (in file order); start the file if it is new.

    A last line that does not parse is what an interrupted write leaves: it is dropped and the file
    is rewritten without it (atomically), so later lines do not get glued onto it.
    """
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        append_json_line(path, {"search_settings": settings})
        return []
    with open(path) as f:
        text = f.read()
    lines = [line for line in text.split("\n") if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise ValueError(f"line {number} of the search history {path} is not valid JSON, and it is not "
                                 f"the last line, so the file is damaged; delete it or use another run folder")
    if len(records) < len(lines) or not text.endswith("\n"):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    if not records:  # only a truncated header was there
        append_json_line(path, {"search_settings": settings})
        return []
    header = records[0]
    if not isinstance(header, dict) or "search_settings" not in header:
        raise ValueError(f"{path} does not start with a search settings line, so it is not a search history; "
                         f"delete it or use another run folder")
    if header["search_settings"] != settings:
        raise ValueError(f"{path} was written by a search with other settings ({header['search_settings']}) "
                         f"than this one ({settings}); delete it or use another run folder")
    return records[1:]


# ----------------------------------------------------------------------------------------------
# The search

def evaluate(objective, weights):
    """Call the objective once; return the history entry {"weights", "score", extra keys...}."""
    result = objective(tuple(weights))
    extra = {}
    if isinstance(result, dict):
        if "score" not in result:
            raise ValueError(f"objective returned a dict without a 'score' key at w = {weights}: {sorted(result)}")
        extra = {k: v for k, v in result.items() if k != "score"}
        result = result["score"]
    score = float(result)
    if math.isnan(score):  # NaN compares False with everything and would silently steer the search
        raise ValueError(f"objective returned NaN at w = {weights}; return a number (-inf for a failure)")
    if "weights" in extra:
        raise ValueError("objective returned a 'weights' key, which the history keeps for the point itself; rename it")
    return {"weights": list(weights), "score": score, **extra}


def hierarchical_grid_search(objective, dim, points_per_axis=3, iterations=5, bounds=None,
                             scale_invariant=False, history_path=None, decimals=9, progress=True):
    """The paper's coarse-to-fine grid search for w, maximising objective(w).

    Returns (best_weights, best_score, history): the best point ever seen (first evaluated wins
    ties) and one entry per distinct point in the order the search reached it, each
    {"weights": [...], "score": float, ...extra keys from the objective}.
    """
    bounds = check_settings(dim, points_per_axis, iterations, bounds)
    settings = {"dim": dim, "points_per_axis": points_per_axis, "iterations": iterations,
                "bounds": [[lo, hi] for lo, hi in bounds], "scale_invariant": scale_invariant}

    # ---- setup: the cache maps point_key -> history entry; a resumed search pre-fills it
    cache = {}
    if history_path is not None:
        for entry in open_history(history_path, settings):
            cache.setdefault(point_key(entry["weights"], decimals, scale_invariant), entry)
    history, seen = [], set()
    bar = tqdm(total=search_cost(dim, points_per_axis, iterations), desc="grid search",
               unit="point", disable=not progress)
    evaluations = 0

    # ---- loop: evaluate the grid, keep the best cell, shrink to it
    for iteration in range(iterations):
        points = grid_points(bounds, points_per_axis)
        scores = []
        for w in points:
            key = point_key(w, decimals, scale_invariant)
            if key not in cache:  # only here is the objective called: shared corners are reused
                cache[key] = evaluate(objective, w)
                evaluations += 1
                if history_path is not None:
                    append_json_line(history_path, cache[key])
            if key not in seen:  # also adds points loaded from a resumed file, in search order
                seen.add(key)
                history.append(cache[key])
            scores.append(cache[key]["score"])
            bar.set_postfix(iteration=iteration + 1, evaluated=evaluations, refresh=False)
            bar.update(1)
        bounds = best_subcube(bounds, points_per_axis, scores)
    bar.close()

    # ---- result: best point ever seen, the first one on ties
    best = history[0]
    for entry in history:
        if entry["score"] > best["score"]:
            best = entry
    return tuple(best["weights"]), best["score"], history
