"""arithmetic.py: the levels, the three-way split, the formats' fixed offsets, the slips."""
import itertools
import random

import pytest

import arithmetic as A


def naive_carries(a, op, b):
    """Column arithmetic on digit strings, the way it is taught: the reference for carries()."""
    xs, ys = str(a)[::-1], str(b)[::-1].ljust(len(str(a)), "0")
    xs = xs.ljust(len(ys), "0")
    n, c = 0, 0
    for x, y in zip(xs, ys):
        v = int(x) + int(y) + c if op == "+" else int(x) - int(y) - c
        c = int(v >= 10) if op == "+" else int(v < 0)
        n += c
    return n


def test_carries_are_the_column_arithmetic():
    rng = random.Random(0)
    for _ in range(3000):
        a, b = rng.randrange(10 ** rng.randint(1, 5)), rng.randrange(10 ** rng.randint(1, 5))
        op = rng.choice("+-")
        if op == "-" and b > a:
            a, b = b, a
        assert A.carries(a, op, b) == naive_carries(a, op, b), (a, op, b)


@pytest.mark.parametrize("digits", A.LEVELS)
def test_a_level_is_its_digits_with_carries_balanced(digits):
    rng = random.Random(digits)
    drawn = [A.draw(rng, digits) for _ in range(2000)]
    for a, op, b in drawn:
        assert len(str(a)) == len(str(b)) == digits == A.level(a, b)
        assert a >= b or op == "+"
    with_carry = sum(A.carries(*p) > 0 for p in drawn) / len(drawn)
    # half of each op carries or borrows; a one-digit subtraction never borrows
    assert abs(with_carry - (0.25 if digits == 1 else 0.5)) < 0.05
    assert abs(sum(op == "+" for _, op, _ in drawn) / len(drawn) - 0.5) < 0.05


def test_the_split_is_a_hash_of_the_problem_in_the_stated_fractions():
    counts = dict.fromkeys(A.SPLITS, 0)
    for a, b in itertools.product(range(0, 1000, 7), range(0, 1000, 11)):
        s = A.split(a, "+", b)
        assert s == A.split(a, "+", b)               # no state, no seed
        counts[s] += 1
    n = sum(counts.values())
    assert abs(counts["heldout"] / n - A.HELDOUT) < 0.02
    assert abs(counts["rl"] / n - A.RL) < 0.02


@pytest.mark.parametrize("which", A.SPLITS)
def test_a_stream_yields_only_its_split_level_after_level(which):
    stream = list(itertools.islice(A.problems(which, seed=3), 500))
    assert all(A.split(*p) == which for p in stream)
    assert [A.level(a, b) for a, _, b in stream[:10]] == [1, 2, 3, 4, 5] * 2
    assert stream == list(itertools.islice(A.problems(which, seed=3), 500))       # seeded
    assert stream != list(itertools.islice(A.problems(which, seed=4), 500))


def test_heldout_problems_are_distinct_heldout_and_of_their_level():
    for digits in A.LEVELS:
        got = A.heldout(digits, 300)
        assert len(got) == (300 if digits > 1 else len(got)) and len(set(got)) == len(got)
        assert all(A.split(*p) == "heldout" and A.level(p[0], p[2]) == digits for p in got)
    one = A.heldout(1, 300)         # a digit has 100 sums and 55 differences: every held-out one
    every = {(a, op, b) for a in range(10) for b in range(10) for op in "+-" if op == "+" or a >= b}
    assert set(one) == {p for p in every if A.split(*p) == "heldout"}


@pytest.mark.parametrize("fmt", ["msd", "lsd"])
def test_every_digit_read_sits_at_a_fixed_offset(fmt):
    """The layout's one promise: the question and the working have the same length for every
    problem, and the result's digit i is read back from position i of the working."""
    rng = random.Random(0)
    lengths = set()
    for _ in range(500):
        a, op, b = A.draw(rng, rng.choice(A.LEVELS))
        q, w = A.question(a, op, b, fmt), A.working(a, op, b, fmt)
        lengths.add((len(q), len(w)))
        assert int(w[::-1]) == A.result(a, op, b)
        x, y = q.split(f" {op} ")
        if fmt == "lsd":
            x, y = x[::-1], y[::-1]
        assert (int(x), int(y)) == (a, b)
        assert A.question(a, op, b, fmt, random.Random(1)).endswith(q)   # words come first, if at all
    assert lengths == {(2 * A.WIDTH + 3, A.WIDTH)}


def test_the_words_working_is_right_step_by_step():
    rng = random.Random(1)
    for _ in range(300):
        a, op, b = A.draw(rng, rng.choice(A.LEVELS))
        lines = A.working(a, op, b, "words").split("\n")
        assert lines[-1] == f"So {a} {op} {b} = {A.result(a, op, b)}."
        written = []
        for line in lines[1:-1]:
            expr, rest = line.split(" = ")
            value = int(rest.split(",")[0])
            assert eval(expr) == value, line                 # (plain integer arithmetic)
            written.append(rest.split("write ")[1].split()[0])
        assert int("".join(reversed(written))) == A.result(a, op, b) % 10 ** len(written)


def test_a_slip_is_wrong_by_one_place():
    """A forgotten carry or a digit off by one: the result moves by a power of ten, never to the
    right answer or below zero."""
    rng = random.Random(2)
    kinds = set()
    for _ in range(3000):
        a, op, b = A.draw(rng, rng.choice(A.LEVELS))
        c, w = A.result(a, op, b), A.slipped(a, op, b, rng)
        d = abs(w - c)
        assert w >= 0 and d > 0 and 10 ** (len(str(d)) - 1) == d, (a, op, b, w)
        kinds.add((op, d > 1))
    assert kinds == {("+", True), ("+", False), ("-", True), ("-", False)}


def test_a_number_to_read_back_is_laid_out_as_a_result_at_every_width():
    """reading(): the working is the number as the working writes a result (arithmetic.working's
    layout, checked against a sum that makes it), the question ends with the same digits, the
    answer is the number; every width from 1 to WIDTH digits comes up, about equally."""
    rng = random.Random(3)
    widths = []
    for _ in range(1200):
        q, w, n = A.reading(rng)
        assert w == A.working(n, "+", 0, "lsd") and q.endswith("\n" + w) and int(w[::-1]) == n
        assert A.answer(n, "lsd") == w[::-1] and int(A.answer(n, "lsd")) == n
        widths.append(len(str(n)))
    counts = [widths.count(k) for k in range(1, A.WIDTH + 1)]
    assert min(counts) > 120, counts


def test_unknown_format_names_the_choices():
    with pytest.raises(ValueError, match="msd"):
        A.rendered(1, "+", 2, "abacus")
