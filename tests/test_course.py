"""course.py (issue 28): a student copy changes only the chosen function bodies, `grade` gives 0
points to each blanked formula and full marks to the rest, the reference repository gets full
marks, blanking one formula fails only its own row (every row), a looping body is stopped, and
the README's teachers' table is course.FORMULAS."""
import ast
import difflib
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

import course


def test_readme_table_is_the_course_table():
    text = open(f"{ROOT}/README.md", encoding="utf-8").read()
    section = text.split("## For teachers", 1)[1].split("\n## ", 1)[0]
    assert course.markdown_table() in section, (
        "README.md: the teachers' table differs from `python course.py table`; paste its output")


def test_readme_stage_list_names_every_formula_of_its_stage():
    text = open(f"{ROOT}/README.md", encoding="utf-8").read()
    section = text.split("### Staged assignments", 1)[1].split("\n## ", 1)[0]
    listed = {int(row.split("|")[1]): set(row.split("`")[1].split())
              for row in section.splitlines() if row.startswith("| ") and row[2].isdigit()}
    want = {}
    for r in course.FORMULAS:
        want.setdefault(r["stage"], set()).add(r["name"])
    assert listed == want, f"README staged list {listed}, course.FORMULAS stages {want}"


SOURCE = '''import os


def f(a, b=1):
    """Doc of f,
    two lines."""
    # a comment inside
    x = a + b
    return x


class K:
    def m(self, x):
        if x:
            return 1
        return 2

    def other(self):
        return 3
'''


def test_blank_source_changes_only_the_body():
    out = course.blank_source(course.blank_source(SOURCE, "f", "paper §1; SPEC 1", "s.py"),
                              "K.m", "SPEC 2", "s.py")
    assert '"""Doc of f,\n    two lines."""\n    # Hint: paper §1; SPEC 1\n    raise ' \
        "NotImplementedError('course: this formula is yours to write: f')\n" in out, out
    assert "        # Hint: SPEC 2\n        raise NotImplementedError(" in out, out
    assert "x = a + b" not in out and "return 2" not in out and "a comment" not in out
    assert out.endswith("    def other(self):\n        return 3\n") and out.startswith("import os")
    ns = {}
    exec(compile(out, "s.py", "exec"), ns)
    for call in (lambda: ns["f"](1), lambda: ns["K"]().m(1)):
        with pytest.raises(NotImplementedError):
            call()
    assert ns["K"]().other() == 3 and ns["f"].__doc__ == "Doc of f,\n    two lines."
    with pytest.raises(course.CourseError, match="s.py: no top-level definition K.nope"):
        course.blank_source(SOURCE, "K.nope", "", "s.py")


def test_assignment_refuses_the_source_tree_and_unknown_names(tmp_path, capsys):
    for out, msg in ((f"{ROOT}/tests/copy", "not git-ignored"), (ROOT, "contains the source tree"),
                     (os.path.dirname(ROOT), "contains the source tree")):
        with pytest.raises(SystemExit) as e:
            course.main(["assignment", "--out", out])
        assert msg in str(e.value) and "\n" not in str(e.value), e.value
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    with pytest.raises(SystemExit, match="exists and is not an empty folder"):
        course.main(["assignment", "--out", str(tmp_path / "full")])
    with pytest.raises(SystemExit, match="unknown formula"):
        course.main(["assignment", "--out", str(tmp_path / "new"), "--formulas", "nope"])
    assert not (tmp_path / "new").exists() and (tmp_path / "full" / "x").read_text() == "mine"


def body_lines(path, qualnames):
    """1-based line ranges of these functions (def line to last line) in the original file."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    return [(n.lineno, n.end_lineno) for n in
            (course.find_function(tree, q, path) for q in qualnames)]


def check_copy(copy, rows):
    """Files without a blanked formula are byte-identical; in the others every changed line lies
    inside a blanked function; the copy's .venv is this repository's."""
    by_file = {}
    for r in rows:
        by_file.setdefault(r["function"].split("::")[0], []).append(r["function"].split("::")[1])
    files = course.source_files(ROOT)
    assert files and "course.py" in files and not any(f.startswith((".venv", "runs/"))
                                                      for f in files)
    for rel in files:
        a = open(os.path.join(ROOT, rel), "rb").read()
        b = open(os.path.join(copy, rel), "rb").read()
        if rel not in by_file:
            assert a == b, f"{rel} changed in the copy"
            continue
        spans = body_lines(os.path.join(ROOT, rel), by_file[rel])
        old, new = a.decode().splitlines(), b.decode().splitlines()
        for tag, i1, i2, _, _ in difflib.SequenceMatcher(None, old, new).get_opcodes():
            if tag != "equal":
                assert any(lo <= i1 + 1 and i2 <= hi for lo, hi in spans), (
                    f"{rel}: lines {i1 + 1}-{i2} changed outside the blanked functions")
    assert os.path.realpath(f"{copy}/.venv") == os.path.realpath(f"{ROOT}/.venv")


def graded(results):
    return {r["formula"]: (r["points"], r["message"]) for r in results}


def test_blanked_copy_gets_zero_the_rest_full_marks(tmp_path, capsys):
    """Every formula blanked: every row 0, "not implemented", and the stages still import (what
    `make all` in the copy needs before it reaches a student's function). Three step formulas
    blanked: only their rows fail (craft, released_select and grait call them). The reference
    repository: full marks, and the JSON says so."""
    copy = tmp_path / "all"
    rows = course.make_assignment(str(copy))
    assert [r["name"] for r in rows] == [r["name"] for r in course.FORMULAS]
    check_copy(str(copy), rows)
    r = subprocess.run([sys.executable, "-c", "import probe, rehearse, construct, finetune, "
                        "evaluate, pipeline, world, data, course"], cwd=copy,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    got = graded(course.grade(str(copy), progress=False))
    assert got == {r["name"]: (0, "not implemented") for r in course.FORMULAS}, got

    steps = ["flow_filter", "greedy_select", "per_sample_grad"]
    some = tmp_path / "some"
    course.make_assignment(str(some), steps)
    got = graded(course.grade(str(some), progress=False))
    want = {r["name"]: (0, "not implemented") if r["name"] in steps else (r["points"], "")
            for r in course.FORMULAS}
    assert got == want, got

    course.main(["grade", "--json", str(tmp_path / "ref.json")])
    table = capsys.readouterr().out
    doc = json.load(open(tmp_path / "ref.json"))
    full = sum(r["points"] for r in course.FORMULAS)
    assert (doc["total"], doc["max_total"]) == (full, full), table
    assert all(r["passed"] for r in doc["rows"]), doc
    assert table.splitlines()[-1].split() == ["total", str(full), "/", str(full)], table


def blank(*args, **kwargs):
    raise NotImplementedError("course: blank")


def test_blanking_one_formula_fails_only_its_row():
    """For every row of the table: with its function blank (as the student copy has it), every
    grading test of every row runs in-process, and exactly that row fails."""
    from test_teaching import grading_test, owner
    tests = {r["name"]: [grading_test(t) for t in r["tests"]] for r in course.FORMULAS}
    for row in course.FORMULAS:
        with pytest.MonkeyPatch.context() as m:
            m.setattr(*owner(row["function"]), blank)
            failing = set()
            for name, fns in tests.items():
                for fn in fns:
                    try:
                        fn()
                    except Exception:
                        failing.add(name)
        assert failing == {row["name"]}, (
            f"{row['function']} blank: the rows that fail are {sorted(failing)}, expected only "
            f"{row['name']}")


def test_a_looping_formula_is_stopped(tmp_path):
    """An infinite loop in one body: the all-rows run times out, each row then runs again with
    its own limit (the other rows' points: test_blanked_copy_gets_zero_the_rest_full_marks)."""
    copy = tmp_path / "loop"
    course.make_assignment(str(copy), ["knowledge_flow"])
    path = copy / "rehearse.py"
    text = path.read_text()
    blank_line = "    raise NotImplementedError('course: this formula is yours to write: " \
                 "knowledge_flow')\n"
    assert blank_line in text
    path.write_text(text.replace(blank_line, "    while True:\n        pass\n"))
    got = graded(course.grade(str(copy), ["knowledge_flow"], timeout=10, progress=False))
    assert got == {"knowledge_flow": (0, "timeout: stopped after 10 s")}, got


def test_grade_help_and_stage_list():
    r = subprocess.run([sys.executable, "course.py", "grade", "--help"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "--timeout" in r.stdout, r.stderr
    assert sorted({r["stage"] for r in course.FORMULAS}) == sorted(course.STAGES) == [1, 2, 3, 4, 5]
    for r in course.FORMULAS:
        assert "SPEC" in r["hint"], f"{r['name']}: the hint cites no SPEC rule"
