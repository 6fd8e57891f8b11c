"""bench/sensitivity.py's dose (issue 26 point 5): Cor-RAIT's set with a share of its IdK
examples replaced by IdK examples of facts M0 knows, nothing else changed."""
import os
import random
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import sensitivity  # noqa: E402
from rait import models  # noqa: E402


def item(i):
    return {"id": f"o{i}", "task": "oeqa", "question": f"Q{i}?", "answer": "a", "aliases": ["a"]}


def test_dose_replaces_that_share_of_idk_examples_with_known_facts():
    examples = [{"id": f"o{i}", "prompt": "p", "target": "a", "weight": 1.0, "kind": "van",
                 "method": "cor"} for i in range(8)]
    examples += [{"id": f"o{i}", "prompt": "p", "target": "I don't know", "weight": 1.0,
                  "kind": "idk", "method": "cor"} for i in range(8, 12)]
    known = [item(i) for i in (3, 20, 21, 22, 23)]        # o3 is already in the set (van)
    out = sensitivity.dosed(examples, known, 50, random.Random(0), "oeqa")
    assert len(out) == len(examples)
    assert out[:8] == examples[:8]                          # van examples untouched
    changed = [e for e, o in zip(examples, out) if e != o]
    assert len(changed) == 2                                # 50% of 4 IdK examples
    new = [o for e, o in zip(examples, out) if e != o]
    assert {o["id"] for o in new} <= {"o20", "o21", "o22", "o23"}       # known, not in the set
    assert all(o["kind"] == "idk" and o["target"] == models.IDK["oeqa"] for o in new)
    assert all(o["prompt"] == models.user_prompt(item(int(o["id"][1:])), "refuse") for o in new)
    assert sensitivity.dosed(examples, known, 0, random.Random(0), "oeqa") == examples
    with pytest.raises(Exception, match="known facts needed"):
        sensitivity.dosed(examples, known[:1], 100, random.Random(0), "oeqa")
