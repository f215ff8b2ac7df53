"""
arithmetic.py: arithmetic laid out so that a small model can learn it. Data design decides
what a model learns: where the digits sit decides whether a small model learns addition in a
laptop's budget (Lee et al. 2023).

The concept. A transformer reads a token at a *fixed* distance back almost for free: one
attention head with rotary positions learns "the token 7 places back" early. Reading
a token at a distance that changes from example to example ("the third digit of the first
number", wherever the first number happens to start) takes an induction circuit, two heads
working together, which forms only after far more tokens than a laptop gives. Written the
usual way, `123 + 45 = 168`, addition asks for the second kind: the digits that meet in a
column sit at distances that depend on both operands' lengths, and the carry flows right to
left while the answer is written left to right. So the layouts here put every digit the model
reads at a fixed offset from where it writes:

    words   What is 123 + 45?          working: "Add digit by digit from the right. 3 + 5 ..."   answer: 168
    msd     000123 + 000045            working: 861000      answer: 000168    (numbers padded to WIDTH)
    lsd     321000 + 540000            working: 861000      answer: 000168    (operands least significant first)

The working (the thinking block of a chat turn) is the result, padded and least significant
digit first, so that digit i of the result is written right after digit i - 1 and its carry,
from digit i of each operand: in `lsd` at one fixed offset, in `msd` at an offset that grows
by two per digit, the same for every problem. The answer after the working reads as a person
reads a number, most significant digit first, and padded to the same width (`000168`): digit i
of the answer is digit WIDTH - 1 - i of the working, a distance that depends on i alone, the
same for every problem. Unpadded (`168`) it would not be: where the answer's first digit sits in
the working depends on the result's length, and a small model that read two-digit sums back
right misread the longer results it had computed right (README: the walkthrough's card). A
question may open with a line in words (`Compute:`), off the path the skill depends on: what
comes before the numbers moves nothing the model reads.

Levels are the operands' number of digits, 1 to 5, for addition and subtraction (a >= b), half
of each level with a carry or borrow and half without (where both exist). Each problem `a op b`
belongs to one of three splits by a hash of its text, the same on every machine and run:
"train" (pretraining's math and SFT's demonstrations, the preference pairs), "rl" (RL's prompts:
a verifier, no solution) and "heldout" (evaluation only). The held-out problems are therefore
never in any stage's training data, whatever the seed or the order.

The playbook's lesson: data design, more than architecture, decides what a model learns; and
post-training demonstrates what it can (SFT) and verifies what it cannot demonstrate (RL).

Papers: Lee et al. 2023 (Teaching Arithmetic to Small Transformers: reversed output and
scratchpads take a small nanoGPT from failing to ~100% on 3-digit addition); Shen et al. 2023
(Positional Description Matters for Transformers Arithmetic); McLeish et al. 2024
(Transformers Can Do Arithmetic with the Right Embeddings: Abacus); Zhou et al. 2024 (What
Algorithms can Transformers Learn?).

This file imports only the standard library.

Run:
    python arithmetic.py          # demo: one problem in each format, a number read back, the splits' sizes per level
"""
import functools
import hashlib
import itertools
import random

WIDTH = 6                       # operands up to 5 digits, results up to 6: every padded number
LEVELS = (1, 2, 3, 4, 5)        # the operands' number of digits
OPS = ("+", "-")
FORMATS = ("words", "msd", "lsd")
FORMAT, DIGITS = "lsd", 2       # the defaults: the layout, and the levels SFT demonstrates (1 to 2 digits)
SPLITS = ("train", "rl", "heldout")
HELDOUT, RL = 0.15, 0.25        # fractions of every level's problems, by hash
PREFIXES = ("", "Compute:\n", "Work this out:\n", "Add or subtract:\n")


def result(a, op, b):
    return a + b if op == "+" else a - b


def carries(a, op, b):
    """How many columns carry (addition) or borrow (subtraction), right to left."""
    n, carry = 0, 0
    while a or b:
        x, y = a % 10, b % 10
        carry = int(x + y + carry >= 10) if op == "+" else int(x - y - carry < 0)
        n += carry
        a, b = a // 10, b // 10
    return n


def level(a, b):
    return max(len(str(a)), len(str(b)))


def split(a, op, b):
    """"train", "rl" or "heldout": a hash of the problem's text, never of its position in a stream."""
    h = int(hashlib.sha256(f"{a} {op} {b}".encode()).hexdigest()[:8], 16) % 1000 / 1000
    return "heldout" if h < HELDOUT else "rl" if h < HELDOUT + RL else "train"


def draw(rng, digits, op=None, carry=None):
    """(a, op, b): both operands of exactly `digits` digits (0-9 for one digit), a >= b for a
    subtraction, with a carry or borrow when `carry` (drawn at even odds when None; a
    one-digit subtraction never borrows, so it has none)."""
    op = op or rng.choice(OPS)
    carry = rng.random() < 0.5 if carry is None else carry
    if digits == 1 and op == "-":
        carry = False
    lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10 ** digits
    while True:
        a, b = rng.randrange(lo, hi), rng.randrange(lo, hi)
        if op == "-" and b > a:
            a, b = b, a
        if (carries(a, op, b) > 0) == carry:
            return a, op, b


def problems(which, levels=LEVELS, seed=0):
    """An endless stream of (a, op, b) of one split, the levels in turn, from the seed."""
    rng = random.Random(f"arithmetic/{which}/{seed}")
    while True:
        for d in levels:
            while True:
                p = draw(rng, d)
                if split(*p) == which:
                    yield p
                    break


def heldout(digits, n, op=None):
    """The first n distinct held-out problems of a level (all of them when the level has fewer:
    one digit has 155 problems in all, 27 of them held out), in a fixed order."""
    rng, out, seen = random.Random(f"arithmetic/heldout/{digits}/{op}"), [], set()
    space = 10 ** (2 * digits)
    for _ in range(20 * n + 10 * space if digits == 1 else 50 * n):
        p = draw(rng, digits, op)
        if p not in seen and split(*p) == "heldout":
            seen.add(p)
            out.append(p)
            if len(out) == n:
                break
    return out


def padded(n):
    return str(n).rjust(WIDTH, "0")


def rendered(a, op, b, fmt):
    """The problem's numbers as the format writes them: `000123 + 000045` (msd), `321000 +
    540000` (lsd), `123 + 45` (words)."""
    if fmt == "words":
        return f"{a} {op} {b}"
    if fmt == "msd":
        return f"{padded(a)} {op} {padded(b)}"
    if fmt == "lsd":
        return f"{padded(a)[::-1]} {op} {padded(b)[::-1]}"
    raise ValueError(f"unknown arithmetic format {fmt!r}: one of {', '.join(FORMATS)}")


def question(a, op, b, fmt, rng=None):
    """The question: in words today's phrasings, else an optional line of words and then the
    numbers, last, so that every offset the model reads at is the same for every problem."""
    if fmt == "words":
        phrase = rng.choice(["What is {}?", "Compute {}.", "Calculate {}, please.", "How much is {}?"]) if rng else "What is {}?"
        return phrase.format(rendered(a, op, b, fmt))
    return (rng.choice(PREFIXES) if rng else "") + rendered(a, op, b, fmt)


def answer(n, fmt):
    """The answer as the format writes it: padded to WIDTH (`000168`), each digit at a fixed
    distance from the working's digit it reads; in words as a person writes it (`168`)."""
    return str(n) if fmt == "words" else padded(n)


def working(a, op, b, fmt, c=None):
    """The worked solution leading to c (the right result when None, a wrong one to show a slip):
    in words the digit-by-digit steps of the classroom method; else the result padded, least
    significant digit first."""
    c = result(a, op, b) if c is None else c
    if fmt != "words":
        return padded(c)[::-1]
    width = max(len(str(a)), len(str(b)))
    digits = lambda n: [int(ch) for ch in str(n).rjust(width, "0")][::-1]
    steps, carry = [f"{'Add' if op == '+' else 'Subtract'} digit by digit from the right."], 0
    for x, y in zip(digits(a), digits(b)):
        if op == "+":
            s = x + y + carry
            steps.append(f"{x} + {y} + {carry} = {s}, write {s % 10} carry {s // 10}.")
            carry = s // 10
        elif x - y - carry < 0:
            steps.append(f"{x} + 10 - {y} - {carry} = {x + 10 - y - carry}, write {x + 10 - y - carry} borrow 1.")
            carry = 1
        else:
            steps.append(f"{x} - {y} - {carry} = {x - y - carry}, write {x - y - carry} borrow 0.")
            carry = 0
    steps.append(f"So {a} {op} {b} = {c}.")
    return "\n".join(steps)


def reading(rng):
    """(question, working, n): a number of 1 to WIDTH digits (the width drawn evenly) to read
    back, written as the working writes a result (padded, least significant digit first): the
    working copies it and the answer is the number as the answer writes it (answer). No sum: only the step
    from the working to the answer, shown at every width. Demonstrations of sums stop at the
    levels SFT covers, so without these the model learns to read back only the results those
    levels make (at most 198 for two digits) and misreads longer ones it computed right."""
    k = rng.randint(1, WIDTH)
    n = rng.randrange(10 ** (k - 1) if k > 1 else 0, 10 ** k)
    w = padded(n)[::-1]
    return f"Read back:\n{w}", w, n


def slipped(a, op, b, rng):
    """A wrong result a careless hand writes: one carry or borrow forgotten (when the problem
    has one) or one digit off by one. Never the right result, never negative."""
    c, n = result(a, op, b), carries(a, op, b)
    if n and rng.random() < 0.5:
        drop, out, carry, i, k = rng.randrange(n), 0, 0, 0, 0
        while a or b:
            s = a % 10 + b % 10 + carry if op == "+" else a % 10 - b % 10 - carry
            carry = int(s >= 10) if op == "+" else int(s < 0)
            if carry:                      # the k-th carry of the problem: forgotten when k == drop
                carry, k = int(k != drop), k + 1
            out += s % 10 * 10 ** i
            a, b, i = a // 10, b // 10, i + 1
        return out + carry * 10 ** i
    place = 10 ** rng.randrange(len(str(c)))
    wrong = c + rng.choice((-1, 1)) * place
    return wrong if wrong >= 0 and wrong != c else c + place


def document(i, seed=0, fmt=FORMAT, digits=DIGITS):
    """The i-th pretraining math document for `seed`: a training problem of 1 to `digits` digits
    (the level drawn evenly), `Question: <problem>\nAnswer: <working>\n#### <result>\n`."""
    rng = random.Random(f"math/{seed}/{i}")  # string seeds are hashed the same on every run
    while True:
        p = draw(rng, rng.randint(1, digits))
        if split(*p) == "train":
            return document_text(p, fmt, rng)


def document_text(problem, fmt=FORMAT, rng=None):
    a, op, b = problem
    return f"Question: {question(a, op, b, fmt, rng)}\nAnswer: {working(a, op, b, fmt)}\n#### {answer(result(a, op, b), fmt)}\n"


def corpus(fmt=FORMAT, digits=DIGITS):
    """data.prepare's math=: (the document generator, its key), the key recorded in the manifest."""
    # ("layout" 2: the answer padded; a corpus prepared with the earlier layout is not reused)
    return functools.partial(document, fmt=fmt, digits=digits), {"format": fmt, "digits": digits, "layout": 2}


def heldout_documents(n, fmt=FORMAT):
    """n math documents no stage trains on: the held-out problems, every level in turn."""
    levels = [heldout(d, n) for d in LEVELS]
    problems = [p for group in itertools.zip_longest(*levels) for p in group if p is not None]
    return [document_text(p, fmt) for p in problems[:n]]


def _demo():
    rng = random.Random(0)
    a, op, b = draw(rng, 3, "+", carry=True)
    print(f"{a} {op} {b} = {result(a, op, b)}, {carries(a, op, b)} carries; a slip: {slipped(a, op, b, rng)}\n")
    for fmt in FORMATS:
        print(f"[{fmt}]\n{question(a, op, b, fmt, rng)}\n--- working ---\n{working(a, op, b, fmt)}\n"
              f"--- answer ---\n{answer(result(a, op, b), fmt)}\n")
    q, w, n = reading(rng)
    print(f"[a number to read back]\n{q}\n--- working ---\n{w}\n--- answer ---\n{answer(n, FORMAT)}\n")
    print("split sizes of 2,000 draws per level (train / rl / heldout):")
    for d in LEVELS:
        counts = dict.fromkeys(SPLITS, 0)
        for _ in range(2000):
            counts[split(*draw(rng, d))] += 1
        print(f"  {d} digit{'s' if d > 1 else ' '}: " + " / ".join(str(counts[s]) for s in SPLITS))


if __name__ == "__main__":
    _demo()
