"""
code_tasks.py — a generated, offline instruction -> Python code task in HumanEval format, small enough
for a tiny masked-diffusion code model to learn (NOTES.md §5: the code model needs a task it can solve
before HumanEval means anything).

    python code_tasks.py --split test --n 200 --out synthetic_test.jsonl   # write problems, print a summary
    python eval_code.py --checkpoint out/code/hf --problems synthetic_test.jsonl --base   # score a model on them

- FAMILIES: one row per task family — an English instruction template, the argument's type, the result's
  type, the reference body as source text, and the parameter sets it draws from. Bodies are *text* so
  that the canonical solution is exactly what a model should write, and so two families compose by text.
- Compositions: "<first>, then <second>" for a list->list (or str->str) family followed by another family
  of the same input type; a fixed fifth of the pairs (crc32 of the name) appears only in the test split.
- Splits: every parameter draws from two disjoint value sets (train / test), so no (family, params) pair
  is shared and test parameter values are never seen in training.
- Tests: the reference body is run on random inputs; draws where returning the argument unchanged would
  pass, or where every expected output is the same, are redrawn, so trivial programs score ~0.
- make_problems(split, n, seed): a set of n is a prefix of m > n; held-out prompts are distinct.
"""
import json
import random
import zlib
from collections import Counter
from dataclasses import dataclass

from runs import InputError, argparser, check_out_file, positive_int, run_cli, seed_int

# ---------------------------------------------------------------------------------------------------------
# Parameter sets: (train values, test values), disjoint so the test split only sees unseen values. Many values
# per slot, interleaved: a model cannot look a value up, it has to copy it from the instruction, and a test value
# looks like a training one (one digit or two, a letter from the same half of the alphabet).
def _split(values, test):
    return tuple(v for v in values if v not in test), tuple(test)


DIV = _split(range(2, 20), (4, 6, 9, 11, 14, 17))  # divisors, moduli, strides
ADD = _split(range(1, 30), (4, 9, 12, 17, 21, 26))  # offsets and thresholds (list elements are 0..30)
POS = _split(range(1, 9), (3, 5, 8))  # positions and counts inside a list of length <= 9
DIGIT = _split(range(10), (2, 5, 7))
CHAR_A = _split("abcdefghijklm", "bfhk")  # a character to look for (a-m)
CHAR_B = _split("nopqrstuvwxyz", "psvy")  # a character to write (n-z: never equal to CHAR_A's)
# Families whose body is right for any k train on every value up to 99 but the slot's test values: with ~90
# values a model cannot look a value up and has to copy it (tiny models did not learn to copy from ADD's and
# DIV's ~20). Their test values, and so the test split, are ADD's and DIV's.
WIDE_ADD = (tuple(v for v in range(1, 100) if v not in ADD[1]), ADD[1])
WIDE_DIV = (tuple(v for v in range(2, 100) if v not in DIV[1]), DIV[1])
SPLITS = ("train", "test")

# argument name and annotation per type: bodies are written against these names
ARG = {"list": ("xs", "list[int]"), "int": ("n", "int"), "str": ("s", "str")}
RET = {"list": "list[int]", "int": "int", "str": "str"}


@dataclass(frozen=True)
class Family:
    name: str  # the family's id; also the function name (entry_point)
    instr: str  # English template, an imperative sentence; {k}, {c}... are the parameters
    arg: str  # "list" | "int" | "str": the argument's type (see ARG)
    ret: str  # "list" | "int" | "str": the result's type
    code: str  # the reference body, unindented; {k!r}... are the parameters (repr keeps chars quoted)
    params: tuple  # ((param name, (train values, test values)), ...)

    @property
    def composable_first(self):
        # a one-line `return EXPR` body that maps the argument to the same type can feed another family
        return self.arg == self.ret and self.code.startswith("return ") and "\n" not in self.code


F = Family
FAMILIES = [
    # --- lists: maps -----------------------------------------------------------------------------------
    F("add_k", "Add {k} to every element of the list.", "list", "list", "return [x + {k} for x in xs]",
      (("k", WIDE_ADD),)),
    F("sub_k", "Subtract {k} from every element of the list.", "list", "list", "return [x - {k} for x in xs]",
      (("k", WIDE_ADD),)),
    F("mul_k", "Multiply every element of the list by {k}.", "list", "list", "return [x * {k} for x in xs]",
      (("k", WIDE_DIV),)),
    F("mod_k", "Replace every element of the list by its remainder when divided by {k}.", "list", "list",
      "return [x % {k} for x in xs]", (("k", DIV),)),
    F("cap_k", "Replace every element of the list that is greater than {k} by {k}.", "list", "list",
      "return [min(x, {k}) for x in xs]", (("k", ADD),)),
    # --- lists: filters --------------------------------------------------------------------------------
    F("keep_div_k", "Keep only the elements of the list that are divisible by {k}.", "list", "list",
      "return [x for x in xs if x % {k} == 0]", (("k", DIV),)),
    F("drop_div_k", "Remove the elements of the list that are divisible by {k}.", "list", "list",
      "return [x for x in xs if x % {k} != 0]", (("k", DIV),)),
    F("keep_gt_k", "Keep only the elements of the list that are greater than {k}.", "list", "list",
      "return [x for x in xs if x > {k}]", (("k", ADD),)),
    F("keep_lt_k", "Keep only the elements of the list that are less than {k}.", "list", "list",
      "return [x for x in xs if x < {k}]", (("k", ADD),)),
    # --- lists: index arithmetic -----------------------------------------------------------------------
    F("every_kth", "Return every {k}-th element of the list, starting with the first.", "list", "list",
      "return xs[::{k}]", (("k", DIV),)),
    F("drop_first_k", "Remove the first {k} elements of the list.", "list", "list", "return xs[{k}:]",
      (("k", POS),)),
    F("take_last_k", "Return the last {k} elements of the list.", "list", "list", "return xs[-{k}:]",
      (("k", POS),)),
    F("reverse_first_k", "Reverse the order of the first {k} elements of the list.", "list", "list",
      "return xs[:{k}][::-1] + xs[{k}:]", (("k", POS),)),
    F("rotate_left_k", "Rotate the list to the left by {k} positions.", "list", "list",
      "if not xs:\n    return []\nk = {k} % len(xs)\nreturn xs[k:] + xs[:k]", (("k", POS),)),
    F("running_sum_plus_k", "Return the running sums of the list, each increased by {k}.", "list", "list",
      "out = []\ntotal = 0\nfor x in xs:\n    total += x\n    out.append(total + {k})\nreturn out", (("k", WIDE_ADD),)),
    # --- lists: counting and reductions ----------------------------------------------------------------
    F("count_div_k", "Count the elements of the list that are divisible by {k}.", "list", "int",
      "return sum(1 for x in xs if x % {k} == 0)", (("k", DIV),)),
    F("count_gt_k", "Count the elements of the list that are greater than {k}.", "list", "int",
      "return sum(1 for x in xs if x > {k})", (("k", ADD),)),
    F("sum_gt_k", "Return the sum of the elements of the list that are greater than {k}.", "list", "int",
      "return sum(x for x in xs if x > {k})", (("k", ADD),)),
    F("first_index_gt_k", "Return the index of the first element greater than {k}, or -1 if there is none.",
      "list", "int", "for i, x in enumerate(xs):\n    if x > {k}:\n        return i\nreturn -1", (("k", ADD),)),
    F("element_at_k", "Return the element at index {k}, or -1 if the list is too short.", "list", "int",
      "return xs[{k}] if len(xs) > {k} else -1", (("k", POS),)),
    F("max_mod_k", "Return the largest remainder of an element divided by {k}, or 0 if the list is empty.",
      "list", "int", "return max((x % {k} for x in xs), default=0)", (("k", DIV),)),
    # --- integers --------------------------------------------------------------------------------------
    F("round_down_k", "Round n down to a multiple of {k}.", "int", "int", "return n - n % {k}", (("k", WIDE_DIV),)),
    F("at_least_k", "Return n, or {k} if n is smaller than {k}.", "int", "int", "return max(n, {k})",
      (("k", WIDE_ADD),)),
    F("sum_multiples_k", "Return the sum of the numbers from 0 to n inclusive that are divisible by {k}.",
      "int", "int", "total = 0\nfor i in range(n + 1):\n    if i % {k} == 0:\n        total += i\nreturn total",
      (("k", WIDE_DIV),)),
    F("collatz_k", "If n is even return half of n, otherwise return n times {k} plus 1.", "int", "int",
      "if n % 2 == 0:\n    return n // 2\nreturn n * {k} + 1", (("k", WIDE_DIV),)),
    F("count_digit_d", "Count how many times the digit {d} appears in n.", "int", "int",
      "return str(n).count('{d}')", (("d", DIGIT),)),
    F("sign_times_k", "Return {k} if n is positive, -{k} if n is negative, and 0 otherwise.", "int", "int",
      "if n > 0:\n    return {k}\nif n < 0:\n    return -{k}\nreturn 0", (("k", WIDE_ADD),)),
    # --- strings ---------------------------------------------------------------------------------------
    F("repeat_chars_k", "Repeat every character of s {k} times.", "str", "str",
      "return ''.join(ch * {k} for ch in s)", (("k", POS),)),
    F("caesar_k", "Shift every lowercase letter of s forward by {k} places in the alphabet, wrapping from z to a "
      "(other characters stay).", "str", "str",
      "return ''.join(chr((ord(ch) - 97 + {k}) % 26 + 97) if ch.islower() else ch for ch in s)", (("k", WIDE_ADD),)),
    F("remove_char_c", "Remove every '{c}' from s.", "str", "str", "return s.replace({c!r}, '')",
      (("c", CHAR_A),)),
    F("replace_char_c_d", "Replace every '{c}' in s by '{d}'.", "str", "str", "return s.replace({c!r}, {d!r})",
      (("c", CHAR_A), ("d", CHAR_B))),
    F("upper_first_k", "Make the first {k} characters of s uppercase.", "str", "str",
      "return s[:{k}].upper() + s[{k}:]", (("k", POS),)),
    F("every_kth_char", "Return every {k}-th character of s, starting with the first.", "str", "str",
      "return s[::{k}]", (("k", DIV),)),
    F("pad_left_k", "Pad s on the left with '{d}' up to length {k}.", "str", "str", "return s.rjust({k}, {d!r})",
      (("k", ADD), ("d", CHAR_B))),
    F("count_char_c", "Count how many times '{c}' appears in s.", "str", "int", "return s.count({c!r})",
      (("c", CHAR_A),)),
    F("index_char_c", "Return the index of the first '{c}' in s, or -1 if there is none.", "str", "int",
      "return s.find({c!r})", (("c", CHAR_A),)),
]
BY_NAME = {f.name: f for f in FAMILIES}
assert len(BY_NAME) == len(FAMILIES), "family names must be unique"


def compositions():
    """All two-step pairs (first, second): first maps a type to itself in one expression, second takes that
    type; NOTE: crc32 (not hash()) so the test-only fifth is the same in every process."""
    pairs = [(a, b) for a in FAMILIES if a.composable_first for b in FAMILIES if b.arg == a.ret and b is not a]
    test_only = {f"{a.name}+{b.name}" for a, b in pairs if zlib.crc32(f"{a.name}+{b.name}".encode()) % 5 == 0}
    return pairs, test_only


PAIRS, TEST_ONLY = compositions()


# ---------------------------------------------------------------------------------------------------------
# One problem: family + params -> prompt, body, tests.
def draw_params(fam, split, rng):
    s = SPLITS.index(split)
    return {name: rng.choice(values[s]) for name, values in fam.params}


def instruction_of(fam, p):
    return fam.instr.format(**p)


def body_of(fam, p):
    return fam.code.format(**p)


def compose(a, pa, b, pb):
    """(instruction, body) of "a, then b": a's result is rebound to the argument name, then b's body runs."""
    name = ARG[a.arg][0]
    first, then = instruction_of(a, pa), instruction_of(b, pb)
    instr = f"{first[:-1]}, then {then[0].lower()}{then[1:]}"
    return instr, f"{name} = {body_of(a, pa)[len('return '):]}\n{body_of(b, pb)}"


def random_input(kind, chars, rng):
    if kind == "list":
        return [rng.randint(0, 30) for _ in range(rng.randint(0, 9))]
    if kind == "int":
        return rng.randint(-20, 200) if rng.random() < 0.8 else rng.randint(1000, 99999)
    # strings: lowercase letters, with the family's own characters mixed in so counts are not always 0
    pool = "abcdefghijklmnopqrstuvwxyz"
    return "".join(rng.choice(chars) if chars and rng.random() < 0.3 else rng.choice(pool)
                   for _ in range(rng.randint(0, 10)))


def make_tests(fn, kind, chars, rng, n_asserts=5, tries=50):
    """(input, expected) pairs from the reference fn; redraws sets that returning the argument unchanged would
    pass, or whose outputs are all equal (a constant would pass), so trivial programs fail."""
    for _ in range(tries):
        xs = [random_input(kind, chars, rng) for _ in range(n_asserts)]
        ys = [fn(_copy(x)) for x in xs]
        if all(x == y for x, y in zip(xs, ys)) or len({repr(y) for y in ys}) == 1:
            continue
        return list(zip(xs, ys))
    return None  # e.g. "keep elements > 9, then keep those < 3" is always []: the caller redraws the params


def _copy(x):
    return list(x) if isinstance(x, list) else x  # NOTE: the reference must not see (or mutate) our input


def build(task_id, family, params, instr, arg, ret, body, rng):
    """The HumanEval dict; the reference is compiled from the same text the problem ships."""
    name, ann = ARG[arg]
    entry = family.replace("+", "_then_")
    prompt = f'def {entry}({name}: {ann}) -> {RET[ret]}:\n    """{instr}\n    """\n'
    solution = "".join(f"    {line}\n" for line in body.splitlines())
    env = {}
    exec(prompt + solution, env)  # our own reference text, not model output
    values = [v for d in (params.get("first", params), params.get("then", {})) for v in d.values()]
    tests = make_tests(env[entry], arg, [v for v in values if isinstance(v, str) and v.isalpha()], rng)
    if tests is None:
        return None
    asserts = "".join(f"    assert candidate({x!r}) == {y!r}\n" for x, y in tests)
    return {"task_id": task_id, "family": family, "params": params, "prompt": prompt, "entry_point": entry,
            "canonical_solution": solution, "test": f"def check(candidate):\n{asserts}", "instruction": instr}


def make_problem(split, seed, i, redraw=0):
    # NOTE: a string seed is hashed with sha512 by random.Random, so it is stable across processes and
    # PYTHONHASHSEED; draw i depends on nothing else (make_problems' redraws add their number to the seed).
    rng = random.Random(f"code_tasks:{split}:{seed}:{i}" + (f":{redraw}" if redraw else ""))
    task_id = f"synthetic/{split}/{i}"
    for _ in range(100):  # redraw the family and params if no input set tells the answer from a trivial one
        prob = draw_problem(split, task_id, rng)
        if prob is not None:
            return prob
    raise RuntimeError(f"{task_id}: no problem with discriminating tests in 100 draws")


def draw_problem(split, task_id, rng, p_compose=0.4):
    if rng.random() >= p_compose:
        fam = rng.choice(FAMILIES)
        p = draw_params(fam, split, rng)
        return build(task_id, fam.name, p, instruction_of(fam, p), fam.arg, fam.ret, body_of(fam, p), rng)
    if split == "train":
        pool = [(a, b) for a, b in PAIRS if f"{a.name}+{b.name}" not in TEST_ONLY]
    else:  # test: half its compositions from the pairs training never saw
        unseen = rng.random() < 0.5
        pool = [(a, b) for a, b in PAIRS if (f"{a.name}+{b.name}" in TEST_ONLY) == unseen]
    a, b = rng.choice(pool)
    pa, pb = draw_params(a, split, rng), draw_params(b, split, rng)
    instr, body = compose(a, pa, b, pb)
    return build(task_id, f"{a.name}+{b.name}", {"first": pa, "then": pb}, instr, a.arg, b.ret, body, rng)


def make_problems(split, n, seed=0):
    """The first n problems of a split; a set of n is a prefix of m > n. Held-out prompts are all distinct (a
    repeated one would count twice in pass@1): a test draw whose prompt came earlier is redrawn. Training
    prompts may repeat (with other test inputs), as any sample of a small space does."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    problems, seen = [], set()
    for i in range(n):
        for redraw in range(100):
            p = make_problem(split, seed, i, redraw)
            if split == "train" or p["prompt"] not in seen:
                break
        else:
            raise InputError(f"the {split} split has no more distinct prompts: {i} found, {n} asked for (the "
                             f"default sets hold about 7,000)")
        seen.add(p["prompt"])
        problems.append(p)
    return problems


def write_jsonl(path, problems):
    """HumanEval JSONL: one problem per line (eval_code.load_problems reads it)."""
    with open(path, "w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps(p) + "\n")


def summary(problems):
    """Count per family, one example instruction each; compositions as one line per pair."""
    by = Counter(p["family"] for p in problems)
    first = {}
    for p in problems:
        first.setdefault(p["family"], p["instruction"])
    lines = [f"{c:5d}  {fam:40s} {first[fam]}" for fam, c in sorted(by.items(), key=lambda t: (-t[1], t[0]))]
    n_comp = sum(c for fam, c in by.items() if "+" in fam)
    n_new = sum(c for fam, c in by.items() if fam in TEST_ONLY)
    lines.append(f"{len(problems)} problems, {len(by)} families; {n_comp} compositions, {n_new} of them "
                 f"from the {len(TEST_ONLY)} test-only pairs ({len(FAMILIES)} base families, {len(PAIRS)} pairs)")
    return "\n".join(lines)


def main(argv=None):
    ap = argparser(__doc__.split("\n\n")[0])
    ap.add_argument("--split", default="test", choices=SPLITS, help="which parameter values and pairs to draw")
    ap.add_argument("--n", type=positive_int, default=200, help="number of problems")
    ap.add_argument("--seed", type=seed_int, default=0, help="seed: (split, n, seed) fixes the output")
    ap.add_argument("--out", default=None, help="JSONL to write (HumanEval format); none: summary only")
    ap.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = ap.parse_args(argv)
    if args.out is not None:
        check_out_file("--out", args.out, args.overwrite)
    problems = make_problems(args.split, args.n, args.seed)
    print(summary(problems))
    if args.out:
        write_jsonl(args.out, problems)
        print(f"wrote {len(problems)} problems to {args.out}")


if __name__ == "__main__":
    run_cli(main)
