"""The results journal: every finished result on disk as it finishes, resumed batches, provenance.

The store's rules are checked on files the tests write; resume and provenance on the real engine (in this
process, and in a real kernel whose engine and then whose kernel are SIGKILLed mid-batch).
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path

import psutil
import pytest
from kernel import Kernel, engine_processes

from conftest import LOAD_FLAGS


@pytest.fixture
def book(tmp_path):
    """The journal on, in a file of this test's own."""
    from vllm_notebook.engine import journal

    path = tmp_path / "nb.vllm-journal.jsonl"
    journal.configure(enabled=True, path=str(path))
    yield journal.at(path)
    journal.reset()


def _result(key: str, text: str, run: str = "r1") -> dict:
    return {"kind": "result", "run": run, "key": key, "time": time.time(), "prompt": "p",
            "outputs": [{"text": text, "token_ids": [1, 2], "finish_reason": "length"}]}


# ------------------------------------------------------------------ the store
def test_torn_last_line_is_skipped_and_the_next_append_starts_afresh(book):
    book.append({"kind": "run", "run": "r1", "model": "m", "sampling": {"temperature": 0}})
    book.append(_result("a", "first"))
    with open(book.path, "ab") as f:  # a kernel killed in the middle of a write
        f.write(b'{"kind": "result", "run": "r1", "key": "b", "outp')
    assert set(book.lookup(["a", "b"])) == {"a"}
    from vllm_notebook.engine import journal

    fresh = journal.Journal(str(book.path))  # another kernel opening it later
    fresh.append(_result("c", "third"))
    assert set(fresh.lookup(["a", "b", "c"])) == {"a", "c"} and fresh.torn == 1
    assert book.lookup(["c"])["c"]["outputs"][0]["text"] == "third"  # the first one catches up too
    df = fresh.history()
    assert list(df.text) == ["first", "third"] and df.attrs["runs"]["r1"]["model"] == "m"


def test_two_kernels_append_whole_lines(book):
    from vllm_notebook.engine import journal

    other = journal.Journal(str(book.path))
    text = "x" * 5000  # longer than a pipe's atomic write: lines must still not interleave

    def write(j, tag):
        for i in range(200):
            j.append(_result(f"{tag}{i}", text))

    threads = [threading.Thread(target=write, args=(j, t)) for j, t in ((book, "a"), (other, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # A kernel that opens the file while another is mid-write may see no final newline and add one: at worst
    # a blank line, which readers skip. What must never happen is two records sharing a line.
    lines = [ln for ln in book.path.read_bytes().splitlines() if ln]
    assert len(lines) == 400 and all(json.loads(ln)["outputs"][0]["text"] == text for ln in lines)


def test_the_journal_is_private_and_sits_beside_the_notebook(tmp_path, monkeypatch):
    from vllm_notebook.engine import journal

    journal.reset()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VLLM_NOTEBOOK_JOURNAL", raising=False)
    monkeypatch.setenv("JPY_SESSION_NAME", str(tmp_path / "study" / "analysis.ipynb"))
    (tmp_path / "study").mkdir()
    old_umask = os.umask(0)
    try:
        assert journal.enabled() and journal.default_path() == tmp_path / "study" / "analysis.vllm-journal.jsonl"
        journal.current().append(_result("k", "t"))
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "study" / "analysis.vllm-journal.jsonl").stat().st_mode) == 0o600
    monkeypatch.setenv("JPY_SESSION_NAME", "work/other.ipynb")  # relative to the server's root: the kernel's folder
    assert journal.default_path() == tmp_path / "other.vllm-journal.jsonl"
    monkeypatch.setenv("VLLM_NOTEBOOK_JOURNAL", "off")
    assert journal.current() is None


def test_a_journal_that_cannot_be_read_or_written_is_one_line(tmp_path):
    from vllm_notebook.engine import journal
    from vllm_notebook.errors import UsageError
    from vllm_notebook.ui import status

    folder = journal.at(tmp_path)  # a folder where the file should be
    for call in (lambda: folder.lookup(["k"]), lambda: folder.records(), lambda: folder.append({"kind": "run"})):
        with pytest.raises(UsageError, match="results journal .*: Is a directory; choose another file"):
            call()
    assert journal.at(tmp_path / "none" / "j.jsonl").lookup(["k"]) == {}  # not there yet: nothing to resume
    journal.configure(enabled=True, path=str(tmp_path))
    try:  # %vllm_status shows the reason on the journal's line, and the rest of the status
        assert status.journal_line().startswith(f"journal: cannot read the results journal {tmp_path}: Is a directory")
    finally:
        journal.reset()


def test_what_is_reused():
    from vllm_notebook.engine import journal

    assert journal.reusable({"temperature": 0}) and journal.reusable({"temperature": 0.8, "seed": 3})
    assert not journal.reusable({"temperature": 0.8}) and not journal.reusable({})
    ident = {"model": "m", "revision": "abc", "flags": {"max_model_len": "512"}}
    key = journal.result_key(ident, {"temperature": 0}, "p")
    assert key == journal.result_key(dict(ident), {"temperature": 0}, "p")
    assert key != journal.result_key({**ident, "revision": "def"}, {"temperature": 0}, "p")
    assert key != journal.result_key(ident, {"temperature": 0, "max_tokens": 8}, "p")
    assert key != journal.result_key(ident, {"temperature": 0}, "q")


def test_template_rows_and_their_mistakes():
    import pandas as pd

    from vllm_notebook.engine.prompts import prompts_from_rows
    from vllm_notebook.errors import UsageError

    df = pd.DataFrame({"question": ["Why?", "How?"], "n": [1, 2]})
    assert prompts_from_rows(df, "Q{n}: {question}\nA:", "df") == ["Q1: Why?\nA:", "Q2: How?\nA:"]
    with pytest.raises(UsageError, match=r"\{answer\}, which is not a column of df \(columns: question, n\)"):
        prompts_from_rows(df, "{answer}", "df")
    with pytest.raises(UsageError, match="needs -i to name a DataFrame"):
        prompts_from_rows(["a"], "{x}", "xs")


# ------------------------------------------------------------------ on the engine
PROMPTS = [f"Story number {i}:" for i in range(8)]


@pytest.mark.slow
def test_an_interrupted_batch_resumes_with_only_the_missing_prompts(engine, book, tmp_path):
    from vllm_notebook.engine import journal

    greedy = engine.params(None, {"max_tokens": 24, "temperature": 0})
    reference = engine.run(PROMPTS, greedy, journal_results=False)
    # Five prompts end at their 5th token, three run on to the 21st or 24th, and the stop comes with the 3rd result.
    # On a loaded machine the three may end before the abort lands, and what ends first is kept (nothing computed is
    # lost): then nothing is missing and the run is tried again, on a journal of its own (CI saw all 8 kept once).
    for attempt in range(3):
        if attempt:
            book = journal.at(tmp_path / f"attempt-{attempt}.vllm-journal.jsonl")
            journal.configure(path=str(book.path))
        stop, finished = threading.Event(), []

        def stop_after_three(i, out):
            if out.finished:
                finished.append(i)
                if len(finished) == 3:
                    stop.set()

        first = engine.run(PROMPTS, greedy, on_output=stop_after_three, stop_event=stop)
        kept = sum(1 for r in book.records() if r["kind"] == "result")
        if kept < len(PROMPTS):
            break
    assert first.interrupted
    assert 3 <= kept < len(PROMPTS)
    before = engine.stats.requests
    again = engine.run(PROMPTS, greedy)
    assert again.reused == kept and engine.stats.requests - before == len(PROMPTS) - kept
    assert again.texts == reference.texts and not again.interrupted
    assert f"{kept} of 8 from the journal" in again.footer()
    assert engine.run(PROMPTS, greedy).reused == 8
    assert engine.run(PROMPTS, greedy, resume=False).reused == 0  # --fresh
    assert engine.run(PROMPTS[:1], greedy).reused == 0  # one prompt: generated again unless resume=True
    assert engine.run(PROMPTS[:1], greedy, resume=True).reused == 1

    sampled = engine.params(None, {"max_tokens": 8, "temperature": 0.9})
    engine.run(PROMPTS, sampled)
    assert engine.run(PROMPTS, sampled).reused == 0  # no seed: new samples every time
    seeded = engine.params(None, {"max_tokens": 8, "temperature": 0.9, "seed": 7})
    first = engine.run(PROMPTS, seeded)
    second = engine.run(PROMPTS, seeded)
    assert second.reused == 8 and second.texts == first.texts


def test_a_finished_stream_is_journaled_and_a_batch_resumes_from_it(engine, book):
    greedy = engine.params(None, {"max_tokens": 12, "temperature": 0})
    text = "".join(engine.stream(PROMPTS[0], greedy))
    results = [r for r in book.records() if r["kind"] == "result"]
    runs = [r for r in book.records() if r["kind"] == "run"]
    assert len(results) == 1 and results[0]["outputs"][0]["text"] == text and results[0]["prompt"] == PROMPTS[0]
    assert runs[-1]["run"] == results[0]["run"] and runs[-1]["model"] == engine.model
    again = engine.run(PROMPTS[:2], greedy)  # the same prompt in a batch: taken from the stream's result
    assert again.reused == 1 and again.texts[0] == text
    assert "".join(engine.stream(PROMPTS[0], greedy)) == text  # a stream is generated anew, and journaled again
    closed = engine.stream(PROMPTS[2], greedy)
    next(closed)
    closed.close()  # closed early: aborted, nothing journaled
    assert sum(1 for r in book.records() if r["kind"] == "result") == 3


def test_a_batch_and_a_stream_run_on_when_the_journal_cannot_be_used(engine, tmp_path, capsys):
    from vllm_notebook.engine import journal

    journal.configure(enabled=True, path=str(tmp_path))  # a folder: neither readable nor writable as a journal
    try:
        greedy = engine.params(None, {"max_tokens": 8, "temperature": 0})
        gen = engine.run(PROMPTS[:3], greedy)
        text = "".join(engine.stream(PROMPTS[0], greedy))
    finally:
        journal.reset()
    assert gen.texts == engine.run(PROMPTS[:3], greedy, journal_results=False).texts and text == gen.texts[0]
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("vllm-notebook:")]
    assert lines[0].startswith("vllm-notebook: nothing is resumed: cannot read the results journal")
    assert all("Is a directory" in ln for ln in lines) and len(lines) == 3  # resume, the batch's run, the stream's run
    assert engine.stats.running == 0


@pytest.mark.slow
def test_a_result_that_ends_before_an_earlier_prompt_is_journaled_before_it(engine, book):
    """A batch hands over each result when it ends, not in prompt order: three generations that the context
    length cuts at ~60 tokens, behind one of 480, reach on_output and the journal while the first still runs,
    so a kernel or engine that died then would keep them."""
    long = "word " * 150  # ~450 tokens: with --max-model-len 512 the engine stops these at ~60 tokens of output
    params = engine.params(None, {"max_tokens": 480, "temperature": 0, "ignore_eos": True})
    order = []
    gen = engine.run(["Once upon a time"] + [f"{long}{i}" for i in range(3)], params,
                     on_output=lambda i, out: order.append(i))
    assert sorted(order[:3]) == [1, 2, 3] and order[3:] == [0], order
    lengths = [len(o.outputs[0].token_ids) for o in gen.outputs]
    assert lengths[0] == 480 and all(n < 100 for n in lengths[1:]), lengths
    done = {r["prompt"][-1:]: r["elapsed_s"] for r in map(json.loads, book.path.read_text().splitlines())
            if r.get("kind") == "result"}
    assert len(done) == 4 and max(done[str(i)] for i in range(3)) < done["e"], done  # "...a time" ends in e


@pytest.mark.slow
def test_provenance_holds_the_exact_versions_and_flags(engine, book):
    import vllm

    import vllm_notebook

    gen = engine.run(PROMPTS[:2], engine.params(None, {"max_tokens": 4, "temperature": 0, "seed": 5}))
    p = gen.provenance
    assert p["vllm"] == vllm.__version__ and p["vllm_notebook"] == vllm_notebook.__version__
    assert p["model"] == engine.model and p["flags"]["enforce_eager"] == "True" and p["flags"]["max_model_len"] == "512"
    assert p["sampling"]["temperature"] == 0 and p["seed"] == 5 and p["node"] == os.uname().nodename
    assert gen.to_pandas().attrs["provenance"] == p
    from vllm_notebook.ui import render

    data, meta = render.bundle(gen), render.metadata(gen)
    assert meta["vllm_notebook"]["provenance"]["run"] == p["run"]
    runs = vllm_notebook.history().attrs["runs"]
    assert runs[p["run"]]["flags"] == p["flags"] and runs[p["run"]]["vllm"] == vllm.__version__


# ------------------------------------------------------------------ in a real kernel
def _results(path: Path) -> int:
    try:
        return sum(1 for line in path.read_bytes().splitlines() if b'"kind":"result"' in line)
    except FileNotFoundError:
        return 0


# Run in the kernel: a thread that SIGKILLs ``pids`` once the journal holds ``n`` results.
CUT = """
import os, signal, threading, time
def _cut(path, n, pids):
    def results():
        try:
            with open(path, "rb") as f:
                return sum(b'"kind":"result"' in line for line in f)
        except FileNotFoundError:
            return 0
    def watch():
        while results() < n:
            time.sleep(0.01)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
    threading.Thread(target=watch, daemon=True).start()
"""


@pytest.mark.slow
def test_a_batch_cut_by_engine_death_and_by_kernel_death_resumes(tmp_path, demo_path):
    """SIGKILL the engine mid-batch, reload, re-run the cell: only the missing prompts are sent. Then SIGKILL
    the kernel mid-batch, start a new one, re-run: the same. Both end equal to an uninterrupted run."""
    path = tmp_path / "study.vllm-journal.jsonl"
    env = {"VLLM_NOTEBOOK_JOURNAL": str(path)}
    load = f"%load_ext vllm_notebook\n%vllm_load {demo_path} {LOAD_FLAGS} --max-num-seqs 1"
    setup = "prompts = [f'Tell me about the number {i}.' for i in range(24)]\n"
    # One sequence at a time, 256 tokens each: after the 4th result the other 20 take 5,120 engine steps (~10 s
    # here). The kill comes from a thread in the kernel that watches the journal: in CI, this process (pytest)
    # twice got to its kill only as the batch ended (8 s after the 4th result), with all 24 results kept.
    cell = "g = %generate -i prompts --max-tokens 256 --temperature 0 --ignore-eos\n"
    k = Kernel(env=env)
    try:
        k.run(load + "\n" + setup + CUT, timeout=300)
        engine = [p.pid for p in engine_processes(k.pid)]  # found while the engine is idle
        assert engine, "no engine process under the kernel"
        k.run(f"_cut({str(path)!r}, 4, {engine!r})")
        out, error = k.collect(k.submit(cell), timeout=120)
        kept = _results(path)
        assert error is not None and len(error["traceback"]) == 1, (error, kept, out[-300:])
        assert 4 <= kept < 24
        k.run(load, timeout=300)
        out = k.run(cell + "print(len(prompts) - g.reused, g.engine)")
        assert f"{kept} of 24 from the journal" in out
        assert out.split()[-2] == str(24 - kept)
        reference = k.run("ref = %generate -i prompts --max-tokens 256 --temperature 0 --ignore-eos --no-journal\n"
                          "print(ref.texts == g.texts, len(ref.texts))")
        assert reference.split()[-2:] == ["True", "24"]

        k.run("prompts = [f'Write about the colour {i}.' for i in range(24)]\n")
        before = _results(path)
        k.run(f"_cut({str(path)!r}, {before + 4}, [os.getpid()])")  # the kernel kills itself
        k.submit(cell)
        psutil.Process(k.pid).wait(timeout=120)
        kept = _results(path) - before
    finally:
        k.shutdown()
    assert 4 <= kept < 24
    k = Kernel(env=env)
    try:
        k.run(load + "\nprompts = [f'Write about the colour {i}.' for i in range(24)]\n", timeout=300)
        out = k.run(cell + "ref = %generate -i prompts --max-tokens 256 --temperature 0 --ignore-eos --no-journal\n"
                    "print(g.reused, ref.texts == g.texts)")
        assert f"{kept} of 24 from the journal" in out and out.split()[-2:] == [str(kept), "True"]
        out = k.run("df = %vllm_history\nprint(len(df), df.model.nunique(), df.attrs['journal'])\n%vllm_status")
        assert out.split()[:3] == [str(_results(path)), "1", str(path)] and f"journal: {path}" in out
    finally:
        k.shutdown()


def test_the_hub_revision_comes_from_the_snapshot_folder(tmp_path):
    from types import SimpleNamespace

    from vllm_notebook.backends.local import LocalBackend

    snap = tmp_path / "models--org--tiny" / "snapshots" / "0123abcd4567"
    eng = LocalBackend(SimpleNamespace(model="org/tiny"), (("model", "'org/tiny'"), ("dtype", "'float16'")), "")
    eng.facts = {"model": "org/tiny", "path": str(snap)}
    ident = eng.identity()
    assert ident == {"model": "org/tiny", "path": str(snap), "revision": "0123abcd4567",
                     "flags": {"model": "'org/tiny'", "dtype": "'float16'"}}
    eng.facts = {"model": str(tmp_path)}
    assert eng.identity()["revision"] is None
