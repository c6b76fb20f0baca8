"""The engine as a Slurm batch job (issue 14), against the real dev Slurm cluster and the CPU vLLM server.

The kernel runs outside any allocation, as on a login node; the job's server runs on a dev node
(n1/n2, each with a /tmp of its own) and is reached at the node's address with its key.
In a module of its own: test_cluster.py's allocation holds every GPU of the dev cluster until it ends.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time

import psutil
import pytest
from kernel import Kernel
from test_replicas import assert_whole_after_a_cut
from test_cluster import SLURM_CONF, _cluster_up, slurm_report

PARIS = " Paris."
FLAGS = "--enforce-eager --max-model-len 512"


@pytest.fixture(scope="module", autouse=True)
def cluster():
    if not _cluster_up():
        if os.environ.get("CI"):
            pytest.fail("the dev Slurm cluster did not start (scripts/dev-cluster up)")
        pytest.skip("no Slurm here: run scripts/dev-cluster up (needs root and Debian's slurm packages)")
    os.environ["SLURM_CONF"] = SLURM_CONF
    _forget_all_jobs()
    yield
    _forget_all_jobs()


def _forget_all_jobs() -> None:
    from vllm_notebook.backends import slurm_job

    subprocess.run(["scancel", "--user", str(os.getuid())], capture_output=True)
    for rec in slurm_job.records():
        slurm_job.cancel(rec)


def _squeue() -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %j %T"], capture_output=True, text=True, check=True)
    return [ln for ln in out.stdout.splitlines() if " vnb-" in ln]


def _wait(what, timeout: float = 120, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not within {timeout} s: {what}\n{slurm_report()}")


def _marked_servers() -> list[int]:
    """Servers of Slurm jobs (a server that another module's failed test left behind is not this module's)."""
    return [p.pid for p in psutil.process_iter(["environ"])
            if {"VLLM_NOTEBOOK_SERVER", "SLURM_JOB_ID"} <= set(p.info["environ"] or {})]


def test_a_notebook_outside_any_allocation_gets_exact_completions_from_a_job(demo_path):
    """Queue (nodes filled first), RUNNING, READY, exact text, kernel restart, %vllm_jobs, %vllm_unload."""
    blocker = subprocess.run(["sbatch", "--parsable", "-N2", "--gres=gpu:2", "-o", "/dev/null", "--wrap", "sleep 600"],
                             capture_output=True, text=True, check=True).stdout.strip()
    _wait(lambda: "RUNNING" in subprocess.run(["squeue", "-h", "-j", blocker, "-o", "%T"], capture_output=True,
                                              text=True).stdout)
    load = f'%vllm_load {demo_path} {FLAGS} --slurm "-N1 --gres=gpu:1 -t 5"'
    gen = "%%generate --max-tokens 8 --temperature 0\nThe capital of France is"
    k = Kernel()  # outside any allocation, as on a login node
    try:
        t0 = time.monotonic()
        out = k.run(f"%load_ext vllm_notebook\neng = {load}\nprint(eng.state)", timeout=120)
        assert time.monotonic() - t0 < 60, "the load returns at once, while the job waits in the queue"
        assert "submitted job" in out and "PENDING" in _wait(lambda: k.run("print(eng.backend.poll().text)"), 30), out
        jobs = _wait(lambda: (lambda t: "PENDING (Resources)" in t and t)(k.run("%vllm_jobs")), 60, every=2)
        assert demo_path in jobs, jobs
        _, error = k.collect(k.submit("eng.backend.wait = False\neng.generate('The capital of France is')"))
        assert error is not None and error["ename"] == "EngineStartError" and "not ready yet" in error["evalue"]
        assert len(error["traceback"]) == 1
        k.run("eng.backend.wait = True")

        subprocess.run(["scancel", blocker], check=True)  # the node frees up: the job runs, its server loads
        out, error = k.collect(k.submit(gen), timeout=300)
        assert error is None, error
        assert PARIS in out and "warning: job" in out and "(walltime)" in out, out  # -t 5: under 10 minutes left
        assert "READY" in k.run("%vllm_jobs")
        cli = subprocess.run([sys.executable, "-m", "vllm_notebook.cli", "jobs"], capture_output=True, text=True,
                             timeout=60)
        assert cli.returncode == 0 and "READY" in cli.stdout and demo_path in cli.stdout, cli.stdout + cli.stderr
        [job] = _squeue()
        job_id = job.split()[0]
        node_addr = k.run("print(eng.backend.url)").strip()
        assert node_addr.startswith(("http://127.0.0.2:", "http://127.0.0.3:")), node_addr  # the job's node

        k.restart()
        out = k.run(f"%load_ext vllm_notebook\neng = {load}", timeout=120)
        assert "found job" in out and _squeue() == [job], out  # no second submission
        out = k.run(gen, timeout=120)
        assert PARIS in out
        status = k.run("%vllm_status")
        assert f"job {job_id}" in status and "left" in status, status

        out = k.run("%vllm_unload")
        assert f"cancelled job {job_id}" in out
        _wait(lambda: not _squeue(), 60)
        _wait(lambda: not _marked_servers(), 60)
        assert "no submitted jobs" in k.run("%vllm_jobs")
    finally:
        k.shutdown()
        subprocess.run(["scancel", blocker])


def test_a_refused_submission_leaves_the_engine_of_that_name_serving(engine, demo_path):
    """Issue 29, item 2: a --slurm submission that sbatch refuses (or a --max-model-len the model cannot take)
    left no engine at all. Both are refused now before the engine of that name is touched, in one line."""
    from vllm_notebook import get_engine
    from vllm_notebook.cluster.slurm import SlurmError
    from vllm_notebook.errors import UsageError
    from vllm_notebook.loader import load_from_argv

    with pytest.raises(UsageError) as err:  # checked before the queue
        load_from_argv([demo_path, "--max-model-len", "100000", "--slurm", "-t 1"], progress=False)
    assert "use --max-model-len 2048" in str(err.value)
    with pytest.raises(SlurmError) as err:
        load_from_argv([demo_path, *FLAGS.split(), "--slurm", "-p no-such-partition -t 1"], progress=False)
    text = str(err.value)
    assert "partition" in text.lower() and "engine 'default'" in text and "still serves" in text and "\n" not in text
    assert get_engine("default") is engine and engine.alive
    assert engine.generate("The capital of France is", max_tokens=8, temperature=0).text == PARIS
    assert not _squeue()


def test_a_job_that_fails_at_start_shows_its_root_cause(demo_path):
    import vllm_notebook
    from vllm_notebook.errors import EngineStartError

    # a quantization the model does not have: it fails only once the server starts (a --max-model-len over the
    # model's limit is refused before the queue now: test_a_refused_submission...)
    eng = vllm_notebook.submit(demo_path, "-N1 -t 5", name="broken", enforce_eager=True, quantization="awq",
                               progress=False)
    try:
        with pytest.raises(EngineStartError) as err:
            eng.generate("The capital of France is", max_tokens=4)
        text = str(err.value)
        assert "FAILED" in text and "awq" in text.lower(), text
        assert "\n" not in text and str(eng.backend.job.folder) in text
        assert "FAILED" in str(vllm_notebook.jobs())
        cli = subprocess.run([sys.executable, "-m", "vllm_notebook.cli", "jobs", "--cancel", "broken"],
                             capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0 and f"cancelled job {eng.backend.job.jobs[0]}" in cli.stdout, cli.stdout + cli.stderr
        assert "no submitted jobs" in str(vllm_notebook.jobs()) and not eng.backend.job.folder.exists()
    finally:
        eng.unload()
    assert not _squeue()


def test_a_chained_successor_takes_over_and_a_cut_stream_goes_on_from_its_last_token(demo_path):
    """-t 2 with --chain 2: each successor waits on `after:PREVIOUS+1`. The handle moves to the second job by
    itself; when that one ends mid-stream (killed here, as at the walltime or a node crash), the stream goes on from its
    last token on the third job's server: what was shown stays, and the text is complete."""
    import vllm_notebook

    eng = vllm_notebook.submit(demo_path, "-N1 --gres=gpu:1 -t 2", name="chained", chain=2, enforce_eager=True,
                               max_model_len=2048, progress=False)
    try:
        first, second, third = eng.backend.job.jobs
        _wait(lambda: vllm_notebook.jobs().states[third].reason == "Dependency", 60, every=2)
        # 2000 tokens: long enough to be cut by the end of its job (Slurm's KillWait is 5 s on the dev cluster)
        # a stop string that never comes: vLLM holds back the last 18 characters of what it streams (they could begin
        # it), and the continuation must show them once the successor rules the stop string out
        prompt, sampling = "Once upon a time", {"max_tokens": 2000, "ignore_eos": True, "temperature": 0,
                                                "stop": ["@@ never in it @@@@"]}
        reference = eng.generate(prompt, **sampling).text
        assert eng.backend.progress.successor_live

        _wait(lambda: eng.backend.poll() and eng.backend._job_id == second, 300, every=2)  # no request needed to move
        assert eng.generate("The capital of France is", max_tokens=8, temperature=0).text == PARIS
        _wait(lambda: not vllm_notebook.jobs().states[first].live, 120)  # the first job is gone

        # as a node crash: SIGKILL to the job's own processes, then Slurm ends the job. They are found now, before the
        # stream: with the scan of every process's environment inside the callback, a loaded node once streamed all
        # 2,000 tokens (6.3 s) before the kill, and `scancel --signal=KILL` alone leaves the cut to slurmctld
        victims = [p for p in psutil.process_iter(["environ", "cmdline"])
                   if (p.info["environ"] or {}).get("SLURM_JOB_ID") == second]
        assert any("api_server" in " ".join(p.info["cmdline"] or ()) for p in victims), victims
        cut: list[float] = []
        texts: list[str] = []
        shown: list[int] = []

        def end_second_job(i, out):
            texts.append(out.outputs[0].text)
            if not cut and len(out.outputs[0].token_ids) >= 24:  # past the start: a request sent again would shrink
                shown.append(len(out.outputs[0].text))
                for proc in victims:
                    with contextlib.suppress(psutil.Error):
                        proc.kill()
                cut.append(time.monotonic())
                threading.Thread(target=subprocess.run, args=(["scancel", "--full", "--signal=KILL", second],),
                                 daemon=True).start()

        started = time.monotonic()
        gen = eng.run([prompt], eng.params(None, sampling), stream=True, on_output=end_second_job)
        took = time.monotonic() - started
        timing = f"killed {cut[0] - started if cut else '-'} s after the send; the run took {took} s"
        assert cut and not gen.interrupted and eng.backend._job_id == third and "READY" in eng.backend.progress.text, timing
        # continued, not sent again whole: every update extends the text shown before it (a request sent again
        # would start over from its first token), and the continuation asked only for the tokens left: 2,000 in all,
        # on the prompt's own tokens. Greedy text over 2,000 tokens may drift between two engines whose CPU threads
        # differ, so the first job's text is only compared at the start
        restarted = [k for k in range(1, len(texts)) if not texts[k].startswith(texts[k - 1])]
        assert not restarted, (timing, len(texts), [(len(texts[k - 1]), texts[k][:80]) for k in restarted[:3]])
        done = gen.outputs[0].outputs[0]
        assert len(done.token_ids) == 2000 and done.finish_reason == "length", (len(done.token_ids), timing)
        assert gen.outputs[0].prompt_token_ids == eng.generate(prompt, max_tokens=1).outputs[0].prompt_token_ids
        # nothing lost at the cut, the held-back characters included (the old continuation dropped them)
        upto = max(200, shown[0] + 100)  # the first 200 characters as before, and 100 past the cut
        assert texts[-1] == gen.text and gen.text[:upto] == reference[:upto], (shown, gen.text[:upto], reference[:upto])
        assert eng.generate("The capital of France is", max_tokens=8, temperature=0).text == PARIS
    finally:
        eng.unload()
    _wait(lambda: not _squeue(), 60)


def test_replicas_as_two_jobs_on_two_nodes_and_one_cancelled_mid_batch(demo_path, tmp_path):
    """--slurm --replicas 2: two jobs, one a node; a batch uses both once ready; one job ended mid-batch as by a
    node failure: the batch ends whole and right, the journal holds each prompt once, the footer says what happened."""
    journal = tmp_path / "replicas.vllm-journal.jsonl"
    load = f'%vllm_load {demo_path} {FLAGS} --max-num-seqs 2 --slurm "-N1 -c 2 --gres=gpu:1 -t 10" --replicas 2'
    batch = ("g = %generate -i prompts --max-tokens 64 --temperature 0 --ignore-eos\n"
             "print(g.texts == ref.texts, g.provenance['run'])\nprint(g.footer())")
    k = Kernel(env={"VLLM_NOTEBOOK_JOURNAL": str(journal)})
    try:
        out = k.run(f"%load_ext vllm_notebook\n%vllm_load {demo_path} {FLAGS} --name one\n"
                    "prompts = [f'Tell me about the number {i}.' for i in range(16)]\n"
                    "ref = %generate -i prompts --name one --max-tokens 64 --temperature 0 --ignore-eos --no-journal\n"
                    f"%vllm_unload --name one\neng = {load}\nprint(eng.kind, eng.backend.place())", timeout=300)
        assert "2 replicas submitted as jobs" in out and "replicas 2 replicas (slurm)" in out, out
        jobs = _wait(lambda: len(_squeue()) == 2 and _squeue())
        _wait(lambda: k.run("print(len(eng.backend.live()))").strip() == "2", 300, every=2)  # both READY
        nodes = {ln.split()[0] for ln in subprocess.run(["squeue", "-h", "-o", "%i %N"], capture_output=True,
                                                        text=True).stdout.splitlines() if ln.split()[0] in
                 {j.split()[0] for j in jobs}}
        assert len(nodes) == 2
        out = k.run(batch, timeout=300)
        assert out.strip().splitlines()[-2].split()[0] == "True", out[-800:]

        # The second job ended as by a node failure once 3 results of the next batch are journaled: its processes
        # SIGKILLed, then Slurm ends the job. (A plain scancel lets its server finish what it runs as it shuts down,
        # or abort it, depending on timing: nothing is lost either way, but there may be nothing to cut.) The
        # processes are found now: scanning every process's environment at the cut took too long in the chain test.
        second = jobs[1].split()[0]
        victims = [p for p in psutil.process_iter(["environ", "cmdline"])
                   if (p.info["environ"] or {}).get("SLURM_JOB_ID") == second]
        assert any("api_server" in " ".join(p.info["cmdline"] or ()) for p in victims), victims
        stop = threading.Event()

        def cancel_after(n: int) -> None:
            while not stop.is_set():
                try:
                    results = [ln for ln in journal.read_text().splitlines() if '"kind":"result"' in ln]
                except FileNotFoundError:
                    results = []
                if len(results) >= 16 + n:
                    for proc in victims:
                        with contextlib.suppress(psutil.Error):
                            proc.kill()
                    subprocess.run(["scancel", "--full", "--signal=KILL", second])
                    return
                time.sleep(0.05)

        threading.Thread(target=cancel_after, args=(3,), daemon=True).start()
        # A longer batch (32 prompts x 256 tokens, two at a time on each replica: ~8 s). A replica's results come a
        # share (one request) at a time: the 3rd is seen with the first shares, half-way, the second ones in flight.
        k.run("prompts = [f'Tell me about the colour {i}.' for i in range(32)]\n"
              "ref = %generate -i prompts --max-tokens 256 --temperature 0 --ignore-eos --no-journal", timeout=300)
        out = k.run(batch.replace("--max-tokens 64", "--max-tokens 256"), timeout=400)
        stop.set()
        assert_whole_after_a_cut(k, out, journal, 32)
        out = k.run("%vllm_unload")
        assert "unloaded engine 'default'" in out, out
        _wait(lambda: not _squeue(), 60)
        _wait(lambda: not _marked_servers(), 60)
    finally:
        k.shutdown()
