"""data.py: converters on the real benchmark files (../shared/data, skipped when absent), the
original file formats, and the download path against a local HTTP server (loopback only)."""
import functools
import hashlib
import http.server
import io
import json
import os
import shutil
import tarfile
import threading
import zipfile

import pytest

from conftest import SHARED_DATA

from kernels.base import InputError
from rait import files
from rait import runs
import data

MMLU, ARC, NQ = (os.path.join(SHARED_DATA, d) for d in ("mmlu", "arc", "nq"))
need = {name: pytest.mark.skipif(not os.path.isdir(path), reason=f"{path} absent")
        for name, path in (("mmlu", MMLU), ("arc", ARC), ("nq", NQ))}


def all_valid(items):
    assert len({it["id"] for it in items}) == len(items)
    assert all(files.check_item(it) is None for it in items)


# ----------------------------------------------------------------------------------------------
# Converters on the real files
@need["mmlu"]
def test_mmlu_counts():
    test, dev = data.mmlu_split(MMLU, "test"), data.mmlu_split(MMLU, "dev")
    assert len(test) == 14042 and len({it["subject"] for it in test}) == 57
    assert len(dev) == 285 and len({it["subject"] for it in dev}) == 57
    assert data.mmlu_split(MMLU, "val") == []
    repeated = [it["id"] for it in test if files.repeated_option(it["choices"])]
    assert len(repeated) == 9          # issue 29: options that repeat a text (data.py drops them)
    all_valid([it for it in test if it["id"] not in repeated])
    first = test[0]
    assert first["subject"] == "abstract algebra" and first["id"] == "abstract_algebra/test/0"
    assert len(first["choices"]) == 4 and first["answer"] in "ABCD"
    assert "high school biology" in {it["subject"] for it in test}


@need["mmlu"]
def test_mmlu_holdout_when_no_val():
    test = data.mmlu_split(MMLU, "test")
    kept, held = data.holdout(test, data.MMLU_VAL_SHARE, seed=0)
    assert len(kept) + len(held) == 14042 and abs(len(held) - 1531) < 30
    assert not {it["id"] for it in kept} & {it["id"] for it in held}
    assert len({it["subject"] for it in held}) == 57
    assert [it["id"] for it in data.holdout(test, data.MMLU_VAL_SHARE, 0)[1]] == \
        [it["id"] for it in held]                                   # seeded
    assert data.holdout(test, data.MMLU_VAL_SHARE, 1)[1] != held


def test_mmlu_original_headerless_format(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "high_school_physics_test.csv").write_text(
        'What is 1+1?,1,2,3,"4, maybe",B\nWhy?,a,b,c,d,D\n')
    items = data.mmlu_split(str(tmp_path), "test")
    assert items[0] == {"id": "high_school_physics/test/0", "task": "mcqa",
                        "question": "What is 1+1?", "answer": "B",
                        "choices": ["1", "2", "3", "4, maybe"], "subject": "high school physics"}
    (tmp_path / "test" / "x_test.csv").write_text("q,a,b,c,d,Z\n")
    with pytest.raises(InputError, match="x_test.csv:1"):
        data.mmlu_split(str(tmp_path), "test")


@need["arc"]
def test_arc_fixed_and_released():
    path = os.path.join(ARC, "ARC-Challenge-Test.jsonl")
    items, counts = data.arc_items(path)
    assert len(items) == 1172
    assert counts == {"digit_labels": 22, "three_options": 4, "five_options": 3,
                      "never_correct_if_released": 22}
    all_valid(items)
    assert {it["subject"] for it in items} == {"STEM"}
    assert sorted({len(it["choices"]) for it in items}) == [3, 4, 5]
    digit = [it for it in items if it["meta"]["labels"][0] == "1"]
    assert len(digit) == 22 and all(it["answer"] in "ABCD" for it in digit)
    rel, _ = data.arc_items(path, released=True)
    all_valid(rel)
    assert {len(it["choices"]) for it in rel} == {4}
    assert sum(it["choices"][3] == "nan" for it in rel) == 4
    assert sum(bool(it["meta"].get("unscorable")) for it in rel) == 22


@need["nq"]
def test_nq_dev():
    items = data.nq_items(os.path.join(NQ, "dev.csv"))
    assert len(items) == 3610
    all_valid(items)
    assert items[0]["question"] == "when was the last time anyone was on the moon?"
    assert items[0]["aliases"] == ["14 December 1972 UTC", "December 1972"]
    assert all(it["question"].endswith("?") and not it["question"].endswith("??")
               for it in items)


def test_nq_jsonl_and_triviaqa(tmp_path):
    (tmp_path / "nq.jsonl").write_text('{"question": "who sang x", "answer": ["A B", "AB"]}\n')
    assert data.nq_items(str(tmp_path / "nq.jsonl")) == [
        {"id": "nq_dev_0", "task": "oeqa", "question": "who sang x?", "answer": "A B",
         "aliases": ["A B", "AB"]}]
    (tmp_path / "bad.jsonl").write_text('{"question": "who", "answer": []}\n')
    with pytest.raises(InputError, match="record 1: expected a question"):
        data.nq_items(str(tmp_path / "bad.jsonl"))
    rows = [{"QuestionId": f"tc_{i}", "Question": f"Q{i}?",
             "Answer": {"Value": "Harry Truman", "NormalizedValue": "harry truman",
                        "Aliases": ["Truman", "Harry Truman"], "NormalizedAliases": ["truman"]}}
            for i in range(20)]
    (tmp_path / "tq.json").write_text(json.dumps({"Data": rows, "Version": 1.0}))
    items = data.trivia_items(str(tmp_path / "tq.json"))
    assert items[0]["aliases"] == ["Harry Truman", "harry truman", "Truman", "truman"]
    assert items[0]["answer"] == "Harry Truman"
    sub = data.trivia_items(str(tmp_path / "tq.json"), limit=5, seed=1)
    assert len(sub) == 5 and sub == data.trivia_items(str(tmp_path / "tq.json"), 5, 1)
    assert [it["id"] for it in sub] != [it["id"] for it in data.trivia_items(
        str(tmp_path / "tq.json"), 5, 2)]


def test_json_array_form_of_nq_and_triviaqa(tmp_path):
    """The form the papers' authors distribute: [{"qid", "question", "answer", "answers"}]."""
    rows = [{"qid": f"q{i}", "question": f"who wrote {i}", "answer": "Ann Lee",
             "answers": ["Ann Lee", "A. Lee", " "]} for i in range(10)]
    (tmp_path / "nq.json").write_text(json.dumps(rows))
    items = data.nq_items(str(tmp_path / "nq.json"))
    assert items[0] == {"id": "q0", "task": "oeqa", "question": "who wrote 0?", "answer": "Ann Lee",
                        "aliases": ["Ann Lee", "A. Lee"]}            # blank alias dropped
    (tmp_path / "tq").mkdir()
    (tmp_path / "tq" / "triviaqa_train.json").write_text(json.dumps(rows))
    (tmp_path / "tq" / "triviaqa_dev.json").write_text(json.dumps(rows[:4]))
    tq = data.trivia_items(str(tmp_path / "tq" / "triviaqa_train.json"), limit=3, seed=0)
    assert len(tq) == 3 and tq[0]["question"] == tq[0]["question"].rstrip("?")   # no "?" added
    data.main(["triviaqa", "--src", str(tmp_path / "tq"), "--out", str(tmp_path / "out")])
    assert len(files.read_jsonl(str(tmp_path / "out" / "oeqa" / "test_id.jsonl"))) == 4
    (tmp_path / "bad.json").write_text('[{"qid": "a", "question": "q", "answer": 3}]')
    with pytest.raises(InputError, match="record 1: expected a question"):
        data.nq_items(str(tmp_path / "bad.json"))
    (tmp_path / "bad2.json").write_text('{"qid": "a"}')
    with pytest.raises(InputError, match="expected a JSON array"):
        data.nq_items(str(tmp_path / "bad2.json"))
    (tmp_path / "bad3.json").write_text('[1, 2]')
    with pytest.raises(InputError, match="record 1: expected an object"):
        data.trivia_items(str(tmp_path / "bad3.json"))


@need["mmlu"]
def test_cli_mmlu_writes_the_task_folder(tmp_path):
    data.main(["mmlu", "--src", MMLU, "--out", str(tmp_path)])
    read = {s: files.read_jsonl(str(tmp_path / "mcqa" / f"{s}.jsonl"), files.check_item)
            for s in ("train", "shots", "test_id")}
    # 9 test rows and 1 dev row repeat an option text (issue 29): left out, and listed
    assert len(read["train"]) + len(read["test_id"]) == 14042 - 9 and len(read["shots"]) == 284
    cfg = json.load(open(tmp_path / "mcqa" / "test_id.jsonl.config.json"))
    assert "no val split" in cfg["id_test"]
    left_out = cfg["left_out_repeated_options"]
    assert len(left_out.pop("shots")) == 1 and sum(map(len, left_out.values())) == 9


# ----------------------------------------------------------------------------------------------
# Download against a local server
class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files from `directory`; honours `Range: bytes=N-` unless the server says not."""

    def do_GET(self):
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404)
            return
        body = open(path, "rb").read()
        rng = self.headers.get("Range")
        self.server.log.append(rng)
        if rng and self.server.honour_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            body = body[start:]
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    for k in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
              "RAIT_DATA_URL"):
        monkeypatch.delenv(k, raising=False)
    root = tmp_path / "www"
    root.mkdir()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                          functools.partial(RangeHandler, directory=str(root)))
    srv.log, srv.honour_range = [], True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv, root, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def nq_jsonl(n=50):
    """NQ-open JSONL text made from the first n rows of the shared CSV (or synthetic rows)."""
    if os.path.isdir(NQ):
        items = data.nq_items(os.path.join(NQ, "dev.csv"))[:n]
        rows = [{"question": it["question"][:-1], "answer": it["aliases"]} for it in items]
    else:
        rows = [{"question": f"who is number {i}", "answer": [f"person {i}"]} for i in range(n)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_download_records_and_verifies(server, tmp_path, capsys):
    srv, root, url = server
    body = nq_jsonl()
    (root / "NQ-open.dev.jsonl").write_bytes(body)
    cache, out = tmp_path / "cache", tmp_path / "items"
    args = ["nq", "--download", "--cache", str(cache), "--base-url", url, "--out", str(out)]
    data.main(args)
    items = files.read_jsonl(str(out / "oeqa" / "test_ood.jsonl"), files.check_item)
    assert len(items) == 50 and items[0]["question"].endswith("?")
    digest = hashlib.sha256(body).hexdigest()
    assert (cache / "SHA256SUMS").read_text() == f"{digest}  nq/NQ-open.dev.jsonl\n"
    assert srv.log == [None]
    data.main(args)                                    # cached and verified: no second request
    assert srv.log == [None]
    # a cached file that no longer matches its recorded checksum stops the run in one line
    (cache / "nq" / "NQ-open.dev.jsonl").write_bytes(body[:-10])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        runs.cli(lambda: data.main(args))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not match the expected" in err[0]


def test_download_resumes_a_partial_file(server, tmp_path):
    srv, root, url = server
    body = nq_jsonl(200)
    (root / "NQ-open.dev.jsonl").write_bytes(body)
    cache = tmp_path / "cache"
    (cache / "nq").mkdir(parents=True)
    (cache / "nq" / "NQ-open.dev.jsonl.part").write_bytes(body[:1000])
    dest = str(cache / "nq" / "NQ-open.dev.jsonl")
    digest = data.download(f"{url}/NQ-open.dev.jsonl", dest, hashlib.sha256(body).hexdigest())
    assert srv.log == ["bytes=1000-"]
    assert open(dest, "rb").read() == body and digest == hashlib.sha256(body).hexdigest()
    assert not os.path.exists(dest + ".part")
    # a part that is already complete: the server answers 416 and the file is finished as is
    os.replace(dest, dest + ".part")
    data.download(f"{url}/NQ-open.dev.jsonl", dest)
    assert srv.log[-1] == f"bytes={len(body)}-" and open(dest, "rb").read() == body
    # a server that ignores Range: start over instead of appending a second copy
    srv.honour_range = False
    os.remove(dest)
    (cache / "nq" / "NQ-open.dev.jsonl.part").write_bytes(body[:1000])
    data.download(f"{url}/NQ-open.dev.jsonl", dest)
    assert open(dest, "rb").read() == body


def test_download_checksum_mismatch(server, tmp_path, capsys):
    srv, root, url = server
    (root / "NQ-open.dev.jsonl").write_bytes(nq_jsonl())
    cache = tmp_path / "cache"
    args = ["nq", "--download", "--cache", str(cache), "--base-url", url, "--sha256", "0" * 64,
            "--out", str(tmp_path / "items")]
    with pytest.raises(SystemExit) as e:
        runs.cli(lambda: data.main(args))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "sha256 mismatch" in err and "0" * 64 in err
    assert not os.listdir(cache / "nq")                    # neither the file nor its part kept
    assert not (tmp_path / "items").exists()


def test_download_missing_file(server, tmp_path):
    _, _, url = server
    with pytest.raises(InputError, match="HTTP 404"):
        data.fetch("nq", str(tmp_path / "cache"), url)


@need["arc"]
def test_download_unpacks_archives(server, tmp_path, monkeypatch):
    srv, root, url = server
    with zipfile.ZipFile(root / "ARC-V1-Feb2018.zip", "w") as z:     # the AI2 release layout
        for f in ("ARC-Challenge-Test.jsonl", "ARC-Challenge-Dev.jsonl"):
            z.write(os.path.join(ARC, f), f"ARC-V1-Feb2018-2/ARC-Challenge/{f}")
    monkeypatch.setenv("RAIT_DATA_URL", url)                          # env instead of the flag
    data.main(["arc", "--download", "--cache", str(tmp_path / "cache"),
               "--out", str(tmp_path / "items")])
    assert len(files.read_jsonl(str(tmp_path / "items" / "mcqa" / "test_ood.jsonl"))) == 1172
    # MMLU's tarball layout (data/{dev,test}/...), two subjects, header-less like the original
    with tarfile.open(root / "data.tar", "w") as t:
        for split in ("dev", "test"):
            for subj in ("anatomy", "virology"):
                rows = "".join(f"q{i} {subj},a,b,c,d,{'ABCD'[i % 4]}\n" for i in range(30))
                info = tarfile.TarInfo(f"data/{split}/{subj}_{split}.csv")
                info.size = len(rows.encode())
                t.addfile(info, io.BytesIO(rows.encode()))
    data.main(["mmlu", "--download", "--cache", str(tmp_path / "cache"),
               "--out", str(tmp_path / "items")])
    test_id = files.read_jsonl(str(tmp_path / "items" / "mcqa" / "test_id.jsonl"))
    train = files.read_jsonl(str(tmp_path / "items" / "mcqa" / "train.jsonl"))
    assert len(test_id) + len(train) == 60 and {it["subject"] for it in test_id} == \
        {"anatomy", "virology"}
    shutil.rmtree(tmp_path / "cache")
