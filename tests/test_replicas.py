"""Data-parallel replicas (``%vllm_load --replicas N``): one engine handle over N engines of the same model.

Fast tier: the layout (which GPUs or cores each replica gets). Slow tier, in a real kernel on vLLM's CPU build with
one core per replica: two replicas give exactly one engine's greedy output in prompt order, both take work, and a
replica whose EngineCore is killed mid-batch loses and duplicates nothing (the journal holds each prompt once)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest
from kernel import Kernel, engine_processes
from test_journal import CUT  # a thread in the kernel that SIGKILLs pids once the journal holds n results

from vllm_notebook.cluster.plan import Plan, PlanError, make_plan, replica_layout

FLAGS = "--enforce-eager --max-model-len 512"


def assert_whole_after_a_cut(k: Kernel, out: str, journal: Path, n: int) -> None:
    """A batch printed ``texts == ref.texts``, its run id and its footer after one replica was cut mid-way: the
    texts are right, the footer names the dead replica, the journal holds each of its ``n`` prompts once, and the
    engine says one replica is left (within a minute: a Slurm job's replica may be seen gone at its watcher's
    next look)."""
    lines = out.strip().splitlines()
    same, run_id = lines[-2].split()
    assert same == "True", out[-1500:]
    assert "died" in lines[-1] and "went to the other replicas" in lines[-1], lines[-1]
    keys = [json.loads(ln)["key"] for ln in journal.read_text().splitlines()
            if '"kind":"result"' in ln and json.loads(ln)["run"] == run_id]
    assert len(keys) == len(set(keys)) == n
    deadline = time.monotonic() + 60
    while "1 of 2 replicas serving" not in (status := k.run("%vllm_status")) and time.monotonic() < deadline:
        time.sleep(2)
    assert "1 of 2 replicas serving" in status, status


def _plan(replicas: int, tp: int = 1, gpus: int = 0) -> Plan:
    return Plan(nodes=1, gpus_per_node=gpus, tensor_parallel_size=tp, pipeline_parallel_size=1, executor=None,
                replicas=replicas)


def test_each_replica_gets_its_own_gpus_or_cores():
    two_gpus = replica_layout(_plan(2, gpus=2), cores=list(range(8)), gpu_ids=["0", "1"], memory=0.9)
    assert [r.env for r in two_gpus] == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]
    assert [r.memory_share for r in two_gpus] == [None, None]
    tp2 = replica_layout(_plan(2, tp=2, gpus=4), cores=[], gpu_ids=["4", "5", "6", "7"], memory=None)
    assert [r.env["CUDA_VISIBLE_DEVICES"] for r in tp2] == ["4,5", "6,7"]
    shared = replica_layout(_plan(3, gpus=1), cores=[], gpu_ids=["0"], memory=0.9)  # one card: memory split
    assert {r.env["CUDA_VISIBLE_DEVICES"] for r in shared} == {"0"} and [r.memory_share for r in shared] == [0.3] * 3
    cpu = replica_layout(_plan(2), cores=[0, 1, 2, 3], gpu_ids=[], memory=None)
    assert [r.env["VLLM_CPU_OMP_THREADS_BIND"] for r in cpu] == ["0,1", "2,3"] and cpu[0].place == "cores 0,1"
    cpu_tp = replica_layout(_plan(2, tp=2), cores=list(range(8)), gpu_ids=[], memory=None)
    assert [r.env["VLLM_CPU_OMP_THREADS_BIND"] for r in cpu_tp] == ["0,1|2,3", "4,5|6,7"]
    with pytest.raises(PlanError, match="need 3 cores"):
        replica_layout(_plan(3), cores=[0, 1], gpu_ids=[], memory=None)


def test_replicas_take_one_gpu_each_unless_told_and_must_fit():
    from types import SimpleNamespace

    from vllm_notebook.cluster.allocation import Allocation

    alloc = Allocation.from_env(gpu_count=4)
    args = SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1, distributed_executor_backend=None)
    plan = make_plan(alloc, {"num_attention_heads": 8}, set(), args, replicas=4)
    assert (plan.tensor_parallel_size, plan.replicas) == (1, 4) and ("replicas", "4") in plan.rows()
    args.tensor_parallel_size = 4
    with pytest.raises(PlanError, match="2 replicas x 4 GPUs each = 8 GPUs"):
        make_plan(alloc, {"num_attention_heads": 8}, {"tensor_parallel_size"}, args, replicas=2)


def test_replicas_over_the_nodes_of_an_allocation_one_node_each():
    """A multi-node allocation: each replica on one node (no pipeline across nodes), spread evenly, this node
    first; the step's server takes its share of its node as an in-kernel replica would."""
    from types import SimpleNamespace

    from vllm_notebook.cluster.allocation import Allocation
    from vllm_notebook.cluster.plan import replica_nodes, replica_share

    env = {"SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "g[1-2]", "SLURMD_NODENAME": "g2", "SLURM_GPUS_ON_NODE": "4",
           "SLURM_JOB_CPUS_PER_NODE": "16(x2)"}
    alloc = Allocation.from_env(env)
    args = SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1, distributed_executor_backend=None)
    plan = make_plan(alloc, {"num_attention_heads": 8}, set(), args, replicas=8)
    assert (plan.nodes, plan.tensor_parallel_size, plan.pipeline_parallel_size, plan.executor) == (2, 1, 1, None)
    assert ("replicas", "8 over 2 nodes (a job step each, srun --overlap)") in plan.rows()
    args.tensor_parallel_size = 2
    plan = make_plan(alloc, {"num_attention_heads": 8}, {"tensor_parallel_size"}, args, replicas=4)
    assert (plan.tensor_parallel_size, plan.executor) == (2, "mp")
    with pytest.raises(PlanError, match="3 a node x 2 GPUs each = 6 GPUs, but a node has 4"):
        make_plan(alloc, {"num_attention_heads": 8}, {"tensor_parallel_size"}, args, replicas=5)
    args.pipeline_parallel_size = 2
    with pytest.raises(PlanError, match="a replica runs on one node"):
        make_plan(alloc, {"num_attention_heads": 8}, {"pipeline_parallel_size"}, args, replicas=2)
    assert replica_nodes(3, ["g1", "g2"], "g2") == [("g2", 0, 2), ("g2", 1, 2), ("g1", 0, 1)]
    assert replica_nodes(2, ["g1", "g2"], None) == [("g1", 0, 1), ("g2", 0, 1)]
    # in the step on g2: its node alone, the GPUs its share was given
    step = Allocation.from_env({**env, "VLLM_NOTEBOOK_REPLICA": "1/2/1", "CUDA_VISIBLE_DEVICES": "2"})
    assert (step.nodes, step.gpus_per_node, step.cpus_per_node) == (["g2"], 1, [16])
    part = replica_share("1/2/2", cores=list(range(16)), gpu_ids=["0", "1", "2", "3"], memory=None)
    assert part.env == {"CUDA_VISIBLE_DEVICES": "2,3"}
    shared = replica_share("2/3/1", cores=[], gpu_ids=["0"], memory=0.9)
    assert shared.env == {"CUDA_VISIBLE_DEVICES": "0"} and shared.memory_share == pytest.approx(0.3)
    assert replica_share("1/2/1", cores=[0, 1, 2, 3], gpu_ids=[], memory=None).env == {
        "VLLM_CPU_OMP_THREADS_BIND": "2,3"}


def test_a_replica_steps_command_has_no_secret_and_its_flags_no_adapters():
    from vllm_notebook.backends.server import ServerBackend
    from vllm_notebook.backends.step import Step
    from vllm_notebook.loader import _without_loras

    flags = ["--enable-lora", "--lora-modules", "a=/x", "b=/y", "--max-model-len", "512"]
    assert _without_loras(flags) == ["--enable-lora", "--max-model-len", "512"]
    step = Step("/models/m", ["--max-model-len", "512"], node="g2", share="0/1/1", job_id="9", cpus=16)
    step.key_file = "/home/u/.local/state/vllm-notebook/servers/step.key"
    cmd = step.command()
    assert cmd[:8] == ["srun", "--overlap", "--jobid=9", "-N1", "-n1", "-w", "g2", "--cpus-per-task=16"]
    assert cmd[-2:] == ["--api-key-file", step.key_file] and "serve" in cmd
    member = ServerBackend("", None, model="m", launcher=step)
    assert not member.alive and member.place() == "g2 (job step)" and not member.outlives_kernel


def test_replicas_go_with_an_engine_in_this_kernel_only():
    from vllm_notebook.errors import UsageError
    from vllm_notebook.loader import LoadRequest, start

    for line, said in (("m --replicas 0", "1 or more"), ("m --replicas 2 --server", "--server it is not supported")):
        with pytest.raises(UsageError, match=said):
            start(LoadRequest.from_argv(line.split()))


# ------------------------------------------------------------------ real kernels, vLLM's CPU build


def _engine_cores(pid: int) -> list[psutil.Process]:
    """The kernel's EngineCore processes, oldest first (replica 1's, then replica 2's)."""
    cores = [p for p in engine_processes(pid) if "EngineCore" in p.name()]
    return sorted(cores, key=lambda p: p.create_time())


@pytest.mark.slow
def test_two_replicas_give_one_engines_output_in_order_and_survive_a_killed_replica(tmp_path, demo_path):
    journal = tmp_path / "study.vllm-journal.jsonl"
    k = Kernel(env={"VLLM_NOTEBOOK_JOURNAL": str(journal)})
    try:
        k.run(f"%load_ext vllm_notebook\n%vllm_load {demo_path} {FLAGS} --name one\n"
              "prompts = [f'Tell me about the number {i}.' for i in range(24)] + ['The capital of France is']\n"
              "ref = %generate -i prompts --name one --max-tokens 96 --temperature 0 --ignore-eos --no-journal\n"
              "%vllm_unload --name one", timeout=400)
        out = k.run(f"_two = %vllm_load {demo_path} {FLAGS} --max-num-seqs 2 --replicas 2", timeout=400)
        assert "2 replicas" in out, out[-500:]
        cores = _engine_cores(k.pid)
        assert len(cores) == 2, cores
        out = k.run("g = %generate -i prompts --max-tokens 96 --temperature 0 --ignore-eos --no-journal\n"
                    "print(g.texts == ref.texts, [r['served'] for r in _two.backend.parts()])")
        same, served = out.strip().splitlines()[-1].split(" ", 1)
        assert same == "True", out[-800:]
        assert all(n > 0 for n in json.loads(served)), served  # both replicas took work

        # Replica 2's EngineCore killed once 4 results are journaled: the batch still ends whole and right.
        k.run(CUT + f"_cut({str(journal)!r}, 4, [{cores[1].pid}])")
        out = k.run("g2 = %generate -i prompts --max-tokens 96 --temperature 0 --ignore-eos\n"
                    "print(g2.texts == ref.texts, g2.provenance['run'])\nprint(g2.footer())", timeout=400)
        lines = out.strip().splitlines()
        same, run_id = lines[-2].split()
        assert same == "True", out[-1500:]
        assert "replica" in lines[-1] and "died" in lines[-1] and "went to the other replicas" in lines[-1], lines[-1]
        keys = [json.loads(line)["key"] for line in journal.read_text().splitlines()
                if '"kind":"result"' in line and json.loads(line)["run"] == run_id]
        assert len(keys) == len(set(keys)) == 25, (len(keys), len(set(keys)))  # each prompt once
        out = k.run("%vllm_status")
        assert "1 of 2 replicas serving" in out, out
        again = k.run("g3 = %generate -i prompts --max-tokens 96 --temperature 0 --ignore-eos --no-journal\n"
                      "print(g3.texts == ref.texts)")
        assert again.strip().splitlines()[-1] == "True"  # the survivor serves on alone
        k.run("%vllm_unload --all")
        assert not engine_processes(k.pid)
    finally:
        k.shutdown()
    assert Path(journal).exists()


def test_replicas_auto_takes_the_smallest_tensor_parallel_size_that_holds_the_model():
    from vllm_notebook.cluster.plan import auto_replicas

    llama8b = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096,
               "max_position_embeddings": 131072}
    h100 = 80 * 2**30
    est = auto_replicas(llama8b, weights=16_060_000_000, gpus=4, card_bytes=h100, utilization=0.9,
                        max_model_len=8192, tp=None)
    assert (est.tensor_parallel_size, est.replicas) == (1, 4)  # 16 GB + 1 GB of KV: one card each
    assert "TP 1, 4 replicas" in est.row()[1] and "weights 16.06 GB" in est.row()[1]
    llama70b = {**llama8b, "num_hidden_layers": 80, "num_attention_heads": 64, "hidden_size": 8192}
    est = auto_replicas(llama70b, weights=141_000_000_000, gpus=8, card_bytes=h100, utilization=0.9,
                        max_model_len=8192, tp=None)
    assert (est.tensor_parallel_size, est.replicas) == (2, 4)  # 70.5 GB + 1.3 GB of KV + 2 GiB a card: fits 77 GB
    small = {**llama8b, "num_hidden_layers": 16, "hidden_size": 2048}
    est = auto_replicas(small, weights=1_580_000_000, gpus=1, card_bytes=h100, utilization=0.9, max_model_len=4096,
                        tp=None)
    assert (est.tensor_parallel_size, est.replicas) == (1, 2) and "two a card" in est.why
    assert auto_replicas(llama8b, weights=1, gpus=0, card_bytes=None, utilization=0.9, max_model_len=None, tp=None,
                         cpu_nodes=2).replicas == 2
    with pytest.raises(PlanError, match="does not fit this node"):
        auto_replicas(llama70b, weights=141_000_000_000, gpus=1, card_bytes=h100, utilization=0.9,
                      max_model_len=8192, tp=None)


def test_dry_run_shows_the_replicas_and_the_arithmetic(demo_path):
    import vllm_notebook

    plan = vllm_notebook.load(demo_path, name="dry", dry_run=True, replicas="auto", enforce_eager=True,
                              max_model_len=512)
    text = str(plan)
    assert "replicas auto" in text and "CPU build: one replica per NUMA node" in text, text
    two = str(vllm_notebook.load(demo_path, name="dry", dry_run=True, replicas=2, enforce_eager=True))
    assert "replicas" in two and "2" in two


# ------------------------------------------------------------------ the spread, on fake back-ends (fast)
class _Mortal:
    """A fake replica that dies after it has served ``lives`` requests (its engine gone: every request fails)."""

    def __new__(cls, lives: int, **kw):
        from fake_backend import FakeBackend

        class Mortal(FakeBackend):
            async def request(self, i, prompt, fields, rid, q, lora=None):
                if self.died or len(self.sent) >= lives:
                    self.died = True
                    raise EngineDiedError(f"engine '{self.name}' has died (EngineCore killed)")
                return await super().request(i, prompt, fields, rid, q, lora)

        from vllm_notebook.errors import EngineDiedError

        return Mortal(**kw)


def _replicas(*members, name: str = "default"):
    from vllm_notebook.backends.replicas import ReplicasBackend
    from vllm_notebook.engine.core import Engine

    return Engine(name, ReplicasBackend(list(members), [{}] * len(members),
                                        places=[f"fake {k + 1}" for k in range(len(members))])).start()


PROMPTS = [f"prompt number {i} is here" for i in range(40)]


def test_a_batch_over_replicas_is_one_engines_result_in_order_and_both_work():
    from fake_backend import FakeBackend, fake_engine

    one = fake_engine("one").generate(PROMPTS, max_tokens=6)
    a, b = FakeBackend(delay=0.001), FakeBackend(delay=0.001)
    eng = _replicas(a, b)
    try:
        gen = eng.generate(PROMPTS, max_tokens=6)
        assert gen.texts == one.texts and not gen.notes
        assert a.sent and b.sent and len(a.sent) + len(b.sent) == 40  # both took work, each prompt once
        assert eng.generate("just one prompt", max_tokens=3).text == " just one prompt"
        assert [p["served"] for p in eng.backend.parts()] == [len(a.sent), len(b.sent)]
        assert all(p["tokens/s"] > 0 for p in eng.backend.parts())  # each replica's, while it had requests
        from vllm_notebook.engine import registry
        from vllm_notebook.ui.status import Status

        registry.register(eng)
        rows = [r for r in Status.collect().rows if r["engine"].startswith("  default[")]
        assert [r["tok/s"] != "-" for r in rows] == [True, True] and rows[0]["where"] == "fake 1"
    finally:
        eng.unload()


def test_a_replica_that_dies_mid_batch_hands_its_requests_to_the_others():
    from fake_backend import FakeBackend, fake_engine

    one = fake_engine("one").generate(PROMPTS, max_tokens=6)
    mortal, steady = _Mortal(5, delay=0.002), FakeBackend(delay=0.002)
    eng = _replicas(mortal, steady)
    try:
        gen = eng.generate(PROMPTS, max_tokens=6)
        assert gen.texts == one.texts and not gen.errors
        assert len(mortal.sent) == 5 and len(steady.sent) == 35  # nothing done twice, nothing lost
        assert "replica 1 (fake 1) died (engine 'default[1]' has died (EngineCore killed))" in gen.footer()
        assert "unfinished request(s) went to the other replicas" in gen.footer()
        assert eng.state == "1 of 2 replicas serving" and "died" in eng.backend.parts()[0]["state"]
        assert eng.generate(PROMPTS[:3], max_tokens=6).texts == one.texts[:3]  # the survivor serves on
        from vllm_notebook.errors import EngineDiedError

        steady.died = True
        with pytest.raises(EngineDiedError, match="every replica of engine 'default' has died"):
            eng.generate(PROMPTS, max_tokens=2)
    finally:
        eng.unload()


def test_requests_a_stopping_replica_aborts_go_to_the_others():
    """A replica's server shutting down (its job cancelled) answers ``finish_reason="abort"`` before it stops
    answering: those requests are redone on the other replica, not returned as aborted (CI caught 8 lost)."""
    import copy

    from fake_backend import FakeBackend, fake_engine
    from vllm_notebook.engine.outputs import Completion, RequestOutput

    class Stopping(FakeBackend):
        async def request(self, i, prompt, fields, rid, q, lora=None):
            if len(self.sent) < 4:
                return await super().request(i, prompt, fields, rid, q, lora)
            self.sent.append((prompt, dict(fields)))
            if len(self.sent) > 6:
                self.died = True  # gone now: later requests fail
                raise EngineDiedError(f"the server of engine '{self.name}' stopped answering")
            out = RequestOutput(rid, prompt, prompt_token_ids=[0], outputs=[Completion(index=0)])
            out.outputs[0].finish_reason, out.finished = "abort", True
            q.put((i, copy.deepcopy(out)))
            return out

    from vllm_notebook.errors import EngineDiedError

    one = fake_engine("one").generate(PROMPTS, max_tokens=6)
    stopping, steady = Stopping(delay=0.002), FakeBackend(delay=0.002)
    eng = _replicas(stopping, steady)
    try:
        gen = eng.generate(PROMPTS, max_tokens=6)
        assert gen.texts == one.texts and not gen.errors and not gen.aborted
        assert gen.finish_reasons.count("length") == 40
        assert "replica 1 (fake 1) died" in gen.footer() and "went to the other replicas" in gen.footer()
    finally:
        eng.unload()


def test_a_request_aborted_twice_or_by_the_run_itself_is_its_result():
    """A request aborted again on its redo keeps that result (redone once, never in a loop); the footer says the
    replica aborted them, not that it died."""
    import copy

    from fake_backend import FakeBackend
    from vllm_notebook.engine.outputs import Completion, RequestOutput

    class Aborts(FakeBackend):
        async def request(self, i, prompt, fields, rid, q, lora=None):
            self.sent.append((prompt, dict(fields)))
            out = RequestOutput(rid, prompt, prompt_token_ids=[0], outputs=[Completion(index=0)])
            out.outputs[0].finish_reason, out.finished = "abort", True
            q.put((i, copy.deepcopy(out)))
            return out

    a, b = Aborts(), Aborts()
    eng = _replicas(a, b)
    try:
        gen = eng.generate(PROMPTS[:4], max_tokens=3)
        assert gen.finish_reasons == ["abort"] * 4 and len(a.sent) + len(b.sent) == 8  # each redone once
        assert "aborted requests on its own" in gen.footer()
    finally:
        eng.unload()


def _slow_starters(n: int, seconds: float, fail: int | None = None):
    """Fake replicas whose start takes ``seconds`` (replica ``fail`` fails half-way); each notes when it ran,
    whether it was stopped, and gives up when abandoned."""
    import threading

    from fake_backend import FakeBackend
    from vllm_notebook.errors import EngineStartError, VllmNotebookError

    class Slow(FakeBackend):
        def __init__(self, k):
            super().__init__(delay=0.001)
            self.k, self.ran, self.stopped, self.gave_up = k, None, False, threading.Event()

        def start(self, progress=None):
            t0 = time.monotonic()
            if self.gave_up.wait(seconds / 2 if self.k == fail else seconds):
                raise VllmNotebookError("load interrupted")
            if self.k == fail:
                raise EngineStartError("out of memory on its node")
            self.ran = (t0, time.monotonic())

        def abandon_start(self):
            self.gave_up.set()

        def stop(self):
            self.stopped = True
            return super().stop()

    return [Slow(k) for k in range(n)]


def test_replicas_on_nodes_of_their_own_start_together_and_a_failure_stops_them_all():
    from vllm_notebook.backends.replicas import ReplicasBackend
    from vllm_notebook.engine.core import Engine
    from vllm_notebook.errors import EngineStartError

    members = _slow_starters(3, 0.4)
    t0 = time.monotonic()
    eng = Engine("default", ReplicasBackend(members, [{}] * 3, places=["n1", "n2", "n3"],
                                            start_groups=[[0], [1], [2]])).start()
    took = time.monotonic() - t0
    try:
        assert took < 1.0, took  # together: about one start, not three
        assert len(eng.generate(PROMPTS[:6], max_tokens=2).texts) == 6
    finally:
        eng.unload()
    members = _slow_starters(2, 0.2)
    Engine("default", ReplicasBackend(members, [{}] * 2, start_groups=[[0, 1]])).start().unload()
    assert members[0].ran[1] <= members[1].ran[0]  # one group: one after another (a shared card)

    members = _slow_starters(3, 3.0, fail=1)
    t0 = time.monotonic()
    with pytest.raises(EngineStartError, match=r"replica 2 of 3 \(n2\) failed to start: out of memory on its node"):
        Engine("default", ReplicasBackend(members, [{}] * 3, places=["n1", "n2", "n3"],
                                          start_groups=[[0], [1], [2]])).start()
    assert time.monotonic() - t0 < 2.5  # the others gave up when it failed (1.5 s), not after their 3 s
    assert all(m.gave_up.is_set() for m in (members[0], members[2]))
    members = _slow_starters(2, 0.2, fail=1)
    with pytest.raises(EngineStartError, match="replica 2 of 2"):
        Engine("default", ReplicasBackend(members, [{}] * 2, start_groups=[[0, 1]])).start()
    assert members[0].stopped  # the one started before the failure is stopped: nothing left running


def test_a_batch_starts_on_the_first_ready_replica_and_a_late_one_joins():
    import threading

    from fake_backend import FakeBackend

    class Late(FakeBackend):
        is_ready = False

        @property
        def ready(self):
            return self.is_ready

    early, late = FakeBackend(delay=0.02), Late(delay=0.02)
    for m in (early, late):  # each runs 8 at a time, so one alone takes the batch in turns of 8 + a share
        m.facts["max_num_seqs"] = 8
    eng = _replicas(early, late)
    try:
        threading.Timer(0.05, lambda: setattr(late, "is_ready", True)).start()  # during the first turn
        gen = eng.generate(PROMPTS * 3, max_tokens=8)
        assert len(gen.texts) == 120 and early.sent and late.sent  # the late one took shares once ready
        assert len(early.sent) + len(late.sent) == 120
    finally:
        eng.unload()


def test_a_stream_goes_to_the_least_loaded_replica_and_a_chat_stays_on_one():
    from fake_backend import FakeBackend

    a, b = FakeBackend(delay=0.001), FakeBackend(delay=0.001)
    eng = _replicas(a, b)
    try:
        eng.backend.load[0] = 5  # replica 1 is busy: a stream goes to replica 2
        assert "".join(eng.stream("a dog says", max_tokens=3)) and len(b.sent) == 1 and not a.sent
        eng.backend.load[0] = 0
        history = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello there"}]
        turns = []
        for reply in ("Hi.", "Fine.", "Bye."):
            before = (len(a.sent), len(b.sent))
            eng.chat(history, max_tokens=2)
            turns.append(0 if len(a.sent) > before[0] else 1)
            history += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
        assert len(set(turns)) == 1, turns  # every turn on the replica that holds the conversation's prefix
    finally:
        eng.unload()
