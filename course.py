"""course.py: assignments made from the code, graded by its tests (issue 28).

    python course.py table                                    # the README's teachers' table
    python course.py assignment --out runs/assignment         # a student copy, every formula blank
    python course.py assignment --out runs/a1 --formulas ths quadrants
    cd runs/assignment && make grade                          # or: python course.py grade

FORMULAS is the one list of the paper formulas a course can set: each row names the function
(`file.py::qualname`), the tests that grade it, its points, the assignment stage it belongs to
and a hint that cites the paper section and the SPEC rule. The README's "For teachers" table is
`course.py table` (tests/test_course.py checks that it is), and tests/test_teaching.py reads the
rows from here.

`assignment` copies the repository's files (`git ls-files`: tracked and untracked-but-not-ignored,
so not .venv/ or runs/) to --out, links the copy's .venv to this repository's .venv (a symlink: the
copy installs nothing), and replaces the body of each chosen function by its docstring, a hint
comment and `raise NotImplementedError`. Only those line ranges change; every other byte of every
file is the original.

`grade` runs the rows' tests in a pytest subprocess (as `make test` runs them: the same user,
environment and rights, no shell) with a wall-clock limit; if that run gives no report (an infinite
loop, a crash), it runs each row on its own with the limit per formula. It reads pytest's JUnit
XML report, prints one table (formula, points, pass/fail, the first line of the first failure)
and writes it as JSON for a course's autograder. A row passes only if every one of its tests
passes; a blank body reads "not implemented".
"""
import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 120         # seconds per pytest run: all rows' tests take about 10 s on a loaded
                      # 2-core machine, one row's 2-4 s
BLANK_MESSAGE = "course: this formula is yours to write"

# ----------------------------------------------------------------------------------------------
# The formulas a course can set, in assignment-stage order (README "For teachers").
# Each row's tests call no other row's function, or replace it by a hand-answer stand-in inside
# the test, so blanking one formula fails only its own row (tests/test_course.py checks each).
FORMULAS = [
    # stage 1: THS and the knowledge quadrants
    dict(name="ths", stage=1, points=1,
         formula="THS = Pc - Pw * Pc0 / Pw0 (SPEC 7)",
         function="kernels/ths.py::ths",
         tests=["tests/test_evaluate.py::test_ths_geometry"],
         hint="CRaFT §4 (THS, the Pc-Pw plane); SPEC 7: THS = cross(E2, E1) / cross(A, E1) in "
              "percentage points, NaN when Pw0 = 0"),
    dict(name="quadrants", stage=1, points=1,
         formula="refusal precision = refused unknown / refused, refusal recall = refused unknown "
                 "/ unknown, over-refusal = refused known / known, hallucination = wrong unknown "
                 "/ unknown (ours, issue 27)",
         function="kernels/ths.py::quadrants",
         tests=["tests/test_evaluate.py::test_quadrants"],
         hint="CRaFT §1 (over-refusal vs hallucination); SPEC 7 rates; ours: % of known refused, "
              "% of unknown answered wrong, % of refusals on unknown items, % of unknown refused; "
              "None on an empty base"),
    dict(name="average_precision", stage=1, points=1,
         formula="AP = sum over distinct confidences t, high to low, of (R(t) - R(t_prev)) * P(t), "
                 "ties entering together (R-Tuning's AP; issue 27)",
         function="kernels/ths.py::average_precision",
         tests=["tests/test_evaluate.py::test_average_precision_hand_values"],
         hint="R-Tuning §4 (AP of answers ranked by confidence, label = correct; SPEC 7 lists AP "
              "among the measures CRaFT argues against); README "
              "'evaluate.py': no interpolation, tied scores enter at one threshold; None when "
              "nothing is correct"),
    dict(name="auroc", stage=1, points=1,
         formula="AUROC = P(confidence of a correct answer > that of a not-correct one), ties one "
                 "half (issue 27)",
         function="kernels/ths.py::auroc",
         tests=["tests/test_evaluate.py::test_auroc_hand_values"],
         hint="issue 27 / README 'evaluate.py' (SPEC 7 metrics): the Mann-Whitney statistic over (correct, "
              "not-correct) pairs, a tie counts one half; None when a class is empty"),
    dict(name="paired_diff", stage=1, points=1,
         formula="THS(a) - THS(b) on the same items, with paired item resamples (issue 26)",
         function="kernels/ths.py::paired_diff",
         tests=["tests/test_evaluate.py::test_paired_diff_hand_case"],
         hint="issue 26 (paired differences of SPEC 7's THS): marginalise the joint (Init-Basic, a, b) table "
              "over b for a's THS and over a for b's; resample each subject's 64 joint counts "
              "as one multinomial, so both models and Init-Basic move together"),
    # stage 2: the knowledge query's mu and sigma
    dict(name="mcqa_state", stage=2, points=1,
         formula="MCQA correctness and certainty: mu = p(gold) / sum p, sigma = sum q log q "
                 "(SPEC 2.1)",
         function="probe.py::mcqa_state",
         tests=["tests/test_probe.py::test_mcqa_state_hand_values"],
         hint="CRaFT §3.1 knowledge query (MCQA); SPEC 2.1 and SPEC 9 #4: mu renormalised over "
              "the letters, sigma = negative entropy of the renormalised q (raw-entropy: of p)"),
    dict(name="oeqa_mu", stage=2, points=1,
         formula="OEQA correctness: share of correct samples (SPEC 2.2)",
         function="probe.py::oeqa_mu",
         tests=["tests/test_probe.py::test_oeqa_mu"],
         hint="CRaFT §3.1 knowledge query (OEQA); SPEC 2.2: mu = share of the N samples labelled "
              "correct (a refusal is not correct)"),
    dict(name="embedding_certainty", stage=2, points=1,
         formula="OEQA certainty: mean cosine over distinct sample pairs (SPEC 2.2)",
         function="probe.py::embedding_certainty",
         tests=["tests/test_probe.py::test_embedding_certainty_hand_values"],
         hint="CRaFT §3.1 knowledge query (OEQA); SPEC 2.2: L2-normalise, then the mean cosine "
              "over the n(n-1) ordered pairs i != j (the diagonal left out)"),
    # stage 3: knowledge flow and CRaFT Algorithm 1
    dict(name="knowledge_flow", stage=3, points=1,
         formula="knowledge flow dmu = mu(M~) - mu(M0) (CRaFT §3.2, SPEC 3)",
         function="rehearse.py::knowledge_flow",
         tests=["tests/test_rehearse.py::test_knowledge_flow_formula"],
         hint="CRaFT §3.2 knowledge flow; SPEC 0 and SPEC 3: dmu = mu(M~) - mu(M0), signed"),
    dict(name="correctness_split", stage=3, points=1,
         formula="Cor-RAIT split by correctness (SPEC 4)",
         function="construct.py::correctness_split",
         tests=["tests/test_construct.py::test_correctness_split"],
         hint="CRaFT §3.3 / R-Tuning; SPEC 4: MCQA van mu >= tau, idk mu < tau; OEQA van "
              "mu >= 0.51, idk mu <= 0.49 (THRESHOLDS)"),
    dict(name="flow_filter", stage=3, points=1,
         formula="CRaFT's flow filter (SPEC 4, 9 #1)",
         function="construct.py::flow_filter",
         tests=["tests/test_construct.py::test_flow_rules"],
         hint="CRaFT §3.3 and Fig. 4; SPEC 9 #1: `le0` keeps dmu <= 0, `strict` (Alg. 1) keeps "
              "dmu < 0, any other rule is a ValueError"),
    dict(name="by_certainty", stage=3, points=1,
         formula="CRaFT's certainty ranking (SPEC 4, 9 #5)",
         function="construct.py::by_certainty",
         tests=["tests/test_construct.py::test_certainty_order_with_id_tie_break"],
         hint="CRaFT Alg. 1 steps 2-3; SPEC 4 and SPEC 9 #5: sigma descending (most certain) or "
              "ascending, ties by id, the first n"),
    dict(name="craft", stage=3, points=2,
         formula="CRaFT Algorithm 1 (SPEC 4)",
         function="construct.py::craft",
         tests=["tests/test_construct.py::test_craft_composes_its_steps"],
         hint="CRaFT Alg. 1; SPEC 4: correctness_split, flow_filter on idk, by_certainty (van "
              "most certain, idk least certain), fill_short; call the step functions above"),
    dict(name="crss", stage=3, points=1,
         formula="CRSS = share of IdK items whose max cosine to a van item exceeds tau_sim "
                 "(CRaFT's static-conflict measure, SPEC 7)",
         function="construct.py::crss",
         tests=["tests/test_construct.py::test_crss_hand_case"],
         hint="CRaFT §4.2 (CRSS) and SPEC 7: normalise the representations, take each IdK row's "
              "largest cosine with any van row, count those above tau; None for an empty set"),
    dict(name="flow_agreement", stage=3, points=1,
         formula="flow reliability = share of IdK candidates (mu0 < 0.5) whose dmu has the same "
                 "sign after two rehearsal seeds (issue 26)",
         function="evaluate.py::flow_agreement",
         tests=["tests/test_evaluate.py::test_flow_agreement_hand_case"],
         hint="issue 26 (dynamic conflicts, SPEC 3 flow): sign -1/0/+1 of dmu per seed, over the items with "
              "mu0 < tau; `moved` restricts to items whose dmu is not 0 in at least one seed"),
    # stage 4: per-sample LoRA gradients against an autograd loop
    dict(name="lora_forward", stage=4, points=1,
         formula="LoRA forward y = W0 x + (alpha / r) B A dropout(x) (Hu et al. 2021)",
         function="kernels/lora.py::LoRALinear.forward",
         tests=["tests/test_lora.py::test_layer_equals_peft_layer"],
         hint="LoRA (Hu et al. 2021) §4.1; SPEC 6 (LoRA fine-tuning): base_layer(x) plus "
              "lora_B(lora_A(dropout(x)) * scaling); merged: the base output only"),
    dict(name="per_sample_grad", stage=4, points=2,
         formula="per-sample gradient of a linear: grad_W[b] = sum_t gout[b,t]^T x[b,t] "
                 "(SPEC 5.3 step 3)",
         function="kernels/persample.py::per_sample_linear_grad",
         tests=["tests/test_persample.py::"
                "test_per_sample_linear_grad_is_the_token_sum_of_outer_products",
                "tests/test_persample.py::test_per_sample_linear_grad_equals_an_autograd_loop"],
         hint="GRAIT step 2 influence via LESS per-sample gradients; SPEC 5.3 step 3: one "
              "batched matmul over tokens, [B, out, in]; a token_mask zeroes padded tokens"),
    # stage 5: GRAIT's greedy selection and weights
    dict(name="greedy_select", stage=5, points=2,
         formula="GRAIT's greedy objective F(S) (SPEC 5.4)",
         function="construct.py::greedy_select",
         tests=["tests/test_construct.py::test_greedy_select_equals_brute_force_greedy",
                "tests/test_construct.py::test_greedy_ties_go_to_the_lowest_index"],
         hint="GRAIT Fig. step 2 (Select); SPEC 5.4 steps 1-2: k times j* = argmax of s over the "
              "remaining candidates (lowest index on ties), s += K_ii[:, j*]; float64 scores"),
    dict(name="grait_delta", stage=5, points=1,
         formula="GRAIT's delta = mean influence on known - on unknown items (SPEC 5.5)",
         function="construct.py::grait_delta",
         tests=["tests/test_construct.py::test_grait_delta_equals_dense_means"],
         hint="GRAIT Fig. step 3 (weights); SPEC 5.5: delta(i) = mean_k K[i, ik] - mean_k "
              "K[i, idk] (kernels.persample.gram_row_means); no known items: the first mean is 0"),
    dict(name="released_select", stage=5, points=1,
         formula="GRAIT's released selection: k greedy picks, then the min(k, n - k) "
                 "lowest-scoring remaining candidates (SPEC 5.4 quirk (b), 9 #7)",
         function="construct.py::released_select",
         tests=["tests/test_construct.py::test_released_select_keeps_the_lowest_remaining"],
         hint="GRAIT released code; SPEC 5.4 quirk (b) and SPEC 9 #7: greedy_select for k picks, "
              "then the min(k, n - k) remaining with the lowest final score, stable ascending"),
    dict(name="grait_weights", stage=5, points=1,
         formula="GRAIT's weights w = scale * N * softmax(sign * delta / T): `inferred` "
                 "(default) sign -1, scale 0.5, the released formula and scale with the sign "
                 "flipped (mean 0.5); `code` sign +1, scale 0.5, exactly as released "
                 "(SPEC 5.5, 9 #8)",
         function="construct.py::grait_weights",
         tests=["tests/test_construct.py::test_grait_weights_each_variant_equals_its_formula"],
         hint="GRAIT Fig. step 3 (adaptive weights); SPEC 5.5 and SPEC 9 #8: "
              "scale * N * softmax(sign * delta / T) in float64, sum scale * N"),
    dict(name="grait", stage=5, points=2,
         formula="GRAIT after the split and top-N van, on the feature matrices: greedy IdK, "
                 "`inferred` weights, `uniform` = all 1 (SPEC 5)",
         function="construct.py::grait",
         tests=["tests/test_construct.py::test_grait_composes_its_steps"],
         hint="GRAIT Fig. steps 2b-3; SPEC 5.4-5.5: greedy_select (or released_select) on "
              "s_j = sum_v K_iv[j, v], then grait_delta, grait_weights; call the step functions "
              "above"),
]
STAGES = {1: "THS and the knowledge quadrants", 2: "the knowledge query's mu and sigma",
          3: "knowledge flow and CRaFT Algorithm 1",
          4: "per-sample LoRA gradients against an autograd loop",
          5: "GRAIT's greedy selection and weights"}


class CourseError(Exception):
    """One line for the user, naming the file at fault."""


def rows_named(names):
    """The FORMULAS rows for these names (all of them for None), in table order."""
    known = {r["name"] for r in FORMULAS}
    bad = [n for n in (names or []) if n not in known]
    if bad:
        raise CourseError(f"course.py: unknown formula(s) {' '.join(bad)} (known: "
                          f"{' '.join(r['name'] for r in FORMULAS)})")
    return [r for r in FORMULAS if names is None or r["name"] in names]


def markdown_table():
    """The README's teachers' table, one row per formula."""
    lines = ["| stage | formula | name | function | points | test |",
             "|---|---|---|---|---|---|"]
    for r in FORMULAS:
        lines.append(f"| {r['stage']} | {r['formula']} | `{r['name']}` | `{r['function']}` | "
                     f"{r['points']} | `.venv/bin/python -m pytest -q {' '.join(r['tests'])}` |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Blanking: the body of one function by qualname, found with ast, replaced line for line
def find_function(tree, qualname, path):
    """The FunctionDef at `qualname` ('f' or 'Class.method') of a parsed module."""
    body = tree.body
    node = None
    for part in qualname.split("."):
        node = next((n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                        ast.ClassDef)) and n.name == part), None)
        if node is None:
            raise CourseError(f"{path}: no top-level definition {qualname}")
        body = node.body
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        raise CourseError(f"{path}: {qualname} is not a function")
    return node


def blank_source(text, qualname, hint, path):
    """`text` with the body of `qualname` replaced by its docstring (kept as it is), the hint as
    a comment and `raise NotImplementedError(...)`. Every other line is unchanged."""
    node = find_function(ast.parse(text, filename=path), qualname, path)
    body = node.body
    has_doc = (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
               and isinstance(body[0].value.value, str))
    rest = body[1:] if has_doc else body
    lines = text.splitlines(keepends=True)
    indent = " " * body[0].col_offset
    if has_doc and body[0].end_lineno == node.lineno:
        raise CourseError(f"{path}: {qualname} has its docstring on the def line; cannot blank")
    wrapped = textwrap.wrap(f"Hint: {hint}", width=96 - len(indent), subsequent_indent="  ")
    new = [f"{indent}# {line}\n" for line in wrapped] + [
        f"{indent}raise NotImplementedError({BLANK_MESSAGE + ': ' + qualname!r})\n"]
    if has_doc:                                   # everything after the docstring goes
        start, end = body[0].end_lineno, max(body[-1].end_lineno, body[0].end_lineno)
    else:
        first = rest[0]
        start = min([first.lineno] + [d.lineno for d in getattr(first, "decorator_list", [])]) - 1
        end = body[-1].end_lineno
    return "".join(lines[:start] + new + lines[end:])


# ----------------------------------------------------------------------------------------------
# assignment: a student copy
def source_files(root):
    """Repository files as git lists them: tracked plus untracked-but-not-ignored (never .venv,
    runs/ or caches); files deleted from the work tree are left out."""
    r = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others",
                        "--exclude-standard"], capture_output=True, text=True)
    if r.returncode != 0:
        raise CourseError(f"{root}: not a git work tree ({r.stderr.strip().splitlines()[-1:]})")
    return sorted({p for p in r.stdout.split("\0") if p and os.path.isfile(os.path.join(root, p))})


def check_out(out, root):
    """Refuse an --out that would write into the source tree's files: inside the repository it
    must be a git-ignored path (runs/ is); it must not exist or be an empty folder."""
    out, root = os.path.realpath(out), os.path.realpath(root)
    if out == root or root.startswith(out + os.sep):
        raise CourseError(f"{out}: --out contains the source tree {root}")
    if out.startswith(root + os.sep):
        rel = os.path.relpath(out, root)
        if subprocess.run(["git", "-C", root, "check-ignore", "-q", rel]).returncode != 0:
            raise CourseError(f"{out}: --out is inside the source tree and not git-ignored "
                              "(use runs/... or a folder outside the repository)")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise CourseError(f"{out}: --out exists and is not an empty folder (remove it first)")
    return out


def make_assignment(out, names=None, root=ROOT):
    """Copy the repository to `out` with the chosen formulas blanked; returns the blanked rows."""
    rows = rows_named(names)
    out = check_out(out, root)
    by_file = {}
    for r in rows:
        path, qualname = r["function"].split("::")
        by_file.setdefault(path, []).append((qualname, r["hint"]))
    texts = {}
    for path, funcs in by_file.items():         # blank everything first: a bad row writes nothing
        text = open(os.path.join(root, path), encoding="utf-8").read()
        for qualname, hint in funcs:
            text = blank_source(text, qualname, hint, path)
        texts[path] = text
    os.makedirs(out, exist_ok=True)
    for rel in source_files(root):
        dst = os.path.join(out, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(os.path.join(root, rel), dst)       # mtimes kept: make sees nothing stale
        if rel in texts:
            with open(dst, "w", encoding="utf-8") as f:
                f.write(texts[rel])
    venv = os.path.join(root, ".venv")
    if os.path.exists(venv):
        os.symlink(os.path.realpath(venv), os.path.join(out, ".venv"))
    return rows


# ----------------------------------------------------------------------------------------------
# grade: each row's tests in a pytest subprocess, read back from JUnit XML
def case_messages(xml_path):
    """{'tests/x.py::test_y': None (passed) or the first line of its failure} from a JUnit XML
    report; a NotImplementedError reads "not implemented"."""
    out = {}
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        test = f"{case.get('classname').replace('.', '/')}.py::{case.get('name').split('[')[0]}"
        msg = None
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                text = (el.get("message") or el.text or tag).strip()
                if "NotImplementedError" in text + (el.text or ""):
                    msg = "not implemented"
                else:
                    msg = ("" if tag == "failure" else f"{tag}: ") + \
                        text.splitlines()[0].removeprefix("AssertionError: ")
                break
        if out.get(test) is None:          # a parametrized test: its first failure counts
            out[test] = msg
    return out


def run_pytest(tests, root, python, timeout):
    """Run these tests in one pytest subprocess in `root` (no shell, this user's environment,
    one torch thread, no cache written). Returns ({test: message or None}, None), or
    ({}, why) when no report came back (timeout, crash, collection error)."""
    with tempfile.TemporaryDirectory(prefix="grade-") as tmp:
        xml = os.path.join(tmp, "report.xml")
        cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
               f"--junitxml={xml}", "-o", "junit_family=xunit1", *tests]
        env = {k: v for k, v in os.environ.items()       # not a worker of an outer pytest-xdist
               if k not in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT",
                            "PYTEST_CURRENT_TEST")}
        env["OMP_NUM_THREADS"] = "1"
        try:
            r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout,
                               env=env)
        except subprocess.TimeoutExpired:
            return {}, f"timeout: stopped after {timeout:g} s"
        if not os.path.exists(xml):
            tail = (r.stdout + r.stderr).strip().splitlines()
            return {}, f"pytest exit {r.returncode}: {tail[-1] if tail else 'no output'}"
        return case_messages(xml), None


def row_result(row, cases, why, seconds):
    """One row of the grade: all its tests must pass; the first failure's line is the message."""
    msg = why
    if msg is None:
        for t in row["tests"]:
            if t not in cases:
                msg = f"{t.split('::')[1]} did not run"
            elif cases[t] is not None:
                msg = cases[t]
            if msg:
                break
    return {"formula": row["name"], "function": row["function"], "stage": row["stage"],
            "points": 0 if msg else row["points"], "max_points": row["points"],
            "passed": msg is None, "message": msg or "", "seconds": round(seconds, 1)}


def format_table(results):
    w = max(len(r["formula"]) for r in results)
    lines = [f"{'formula':<{w}}  points  result  first line of the failure"]
    for r in results:
        lines.append(f"{r['formula']:<{w}}  {r['points']:>2} / {r['max_points']:<2} "
                     f"{'pass' if r['passed'] else 'FAIL':<6}  {r['message'][:100]}")
    got, total = sum(r["points"] for r in results), sum(r["max_points"] for r in results)
    lines.append(f"{'total':<{w}}  {got:>2} / {total:<2}")
    return "\n".join(lines)


def grade(root, names=None, python=sys.executable, timeout=TIMEOUT, progress=True):
    """Every chosen row's tests in one pytest run, limited to `timeout` (they take seconds);
    if that run gives no report (an infinite loop, a crash), each row again in its own run with
    its own `timeout`, so one student's loop costs only its own row."""
    rows = rows_named(names)
    t0 = time.time()
    cases, why = run_pytest([t for r in rows for t in r["tests"]], root, python, timeout)
    if why is None:
        return [row_result(r, cases, None, time.time() - t0) for r in rows]
    if progress:
        print(f"[grade] one run for all rows gave no report ({why}); one run per formula",
              file=sys.stderr, flush=True)
    results = []
    for r in rows:
        t0 = time.time()
        results.append(row_result(r, *run_pytest(r["tests"], root, python, timeout),
                                  time.time() - t0))
        if progress:
            print(f"[grade] {r['name']}: {'pass' if results[-1]['passed'] else 'FAIL'} "
                  f"({results[-1]['seconds']} s)", file=sys.stderr, flush=True)
    return results


def write_json(path, results):
    """The grade as JSON (a course autograder's input), written atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    doc = {"total": sum(r["points"] for r in results),
           "max_total": sum(r["max_points"] for r in results), "rows": results}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("table", help="print the README's teachers' table (markdown) from FORMULAS")
    a = sub.add_parser("assignment", help="write a student copy with the chosen formulas blanked")
    a.add_argument("--out", required=True,
                   help="new folder for the copy: outside the repository, or a git-ignored path "
                        "inside it (e.g. runs/assignment)")
    a.add_argument("--formulas", nargs="+", default=None, metavar="NAME",
                   help="formula names to blank (default: every row of the table)")
    g = sub.add_parser("grade", help="run each formula's tests; print and write the grade table")
    g.add_argument("--root", default=ROOT,
                   help="the repository or student copy to grade (default: this one)")
    g.add_argument("--formulas", nargs="+", default=None, metavar="NAME",
                   help="grade only these rows (default: every row)")
    g.add_argument("--json", default=None,
                   help="where the JSON table goes (default: <root>/runs/grade.json)")
    g.add_argument("--timeout", type=float, default=TIMEOUT,
                   help="seconds per formula before its tests are stopped (an infinite loop)")
    g.add_argument("--python", default=sys.executable,
                   help="the interpreter that runs pytest (default: this one)")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    try:
        if a.command == "table":
            print(markdown_table())
        elif a.command == "assignment":
            rows = make_assignment(a.out, a.formulas)
            print(f"course.py: wrote {a.out} with {len(rows)} formula(s) blanked: "
                  f"{' '.join(r['name'] for r in rows)}; .venv is a symlink to "
                  f"{os.path.realpath(os.path.join(ROOT, '.venv'))}. Grade: cd {a.out} && "
                  "make grade")
        else:
            root = os.path.realpath(a.root)
            if not os.path.isfile(os.path.join(root, "course.py")):
                raise CourseError(f"{root}: no course.py here (not a repository or student copy)")
            results = grade(root, a.formulas, a.python, a.timeout)
            print(format_table(results))
            path = a.json or os.path.join(root, "runs", "grade.json")
            write_json(path, results)
            print(f"course.py: wrote {path}", file=sys.stderr)
    except CourseError as e:
        sys.exit(str(e))


if __name__ == "__main__":
    main()
