"""The Python API on the real vLLM CPU engine and the demo model."""

from __future__ import annotations

import signal
import threading
import time

import pytest

import vllm_notebook
from vllm_notebook.errors import ModelNotFoundError, NoEngineError, RequestError, UsageError

GREEDY = {"temperature": 0.0}


def test_exact_greedy_completions(engine):
    gen = engine.generate(["The capital of France is", "A dog says", "Once upon a time"], **GREEDY)
    assert gen.texts == [" Paris.", " woof.", " there was a small robot who loved to read books."]
    assert gen.finish_reasons == ["stop", "stop", "stop"]
    assert gen.metrics["output_tokens"] == sum(len(o.outputs[0].token_ids) for o in gen.outputs)
    assert gen.outputs[0].prompt == "The capital of France is"


def test_batch_is_submitted_at_once(engine):
    from vllm_notebook.engine.sampling import build_params

    arrivals = []
    p = build_params(None, {"max_tokens": 48, "ignore_eos": True, "temperature": 0.0})
    t0 = time.monotonic()
    gen = engine.run([f"The capital of France is {i}" for i in range(16)], p,
                     on_output=lambda i, o: arrivals.append(time.monotonic()))
    elapsed = time.monotonic() - t0
    assert len(arrivals) == 16 and all(len(c.token_ids) == 48 for _, c in gen.completions)
    # Batched: every request runs the same 48 steps side by side, so they finish together.
    assert max(arrivals) - min(arrivals) < 0.25 * elapsed


def test_stream_yields_deltas_and_close_aborts(engine):
    assert "".join(engine.stream("Once upon a time", **GREEDY)) == " there was a small robot who loved to read books."
    before = engine.stats.aborted
    it = engine.stream("Once upon a time", max_tokens=400, ignore_eos=True)
    next(it)
    it.close()
    assert engine.stats.aborted == before + 1
    assert engine.generate("The capital of Japan is", **GREEDY).text == " Tokyo."


def test_chat_applies_template(engine):
    gen = engine.chat([{"role": "user", "content": "What is the capital of France?"}], **GREEDY)
    assert gen.text == "The capital of France is Paris."
    gen = engine.chat([{"role": "system", "content": "Answer briefly."},
                       {"role": "user", "content": "What color is the sky?"}], **GREEDY)
    assert gen.text == "The sky is blue."


def test_structured_outputs(engine):
    assert engine.generate("Is the sky blue?", choice=["yes", "no"], **GREEDY).text in ("yes", "no")
    import json

    schema = {"type": "string", "enum": ["Paris", "Rome"]}
    gen = engine.generate("The capital of France is", json_schema=schema, max_tokens=20, **GREEDY)
    assert json.loads(gen.text) in ("Paris", "Rome")
    assert engine.generate("Say:", regex="(yes|no)", max_tokens=5, **GREEDY).text in ("yes", "no")


def test_params_merge(engine):
    from vllm import SamplingParams

    gen = engine.generate("The capital of France is", SamplingParams(temperature=0.0, max_tokens=2), max_tokens=1)
    assert gen.params.max_tokens == 1 and gen.params.temperature == 0.0
    assert len(gen.outputs[0].outputs[0].token_ids) == 1
    gen = engine.generate("A cat says", {"temperature": 0.5, "max_tokens": 4}, n=3, seed=1)
    assert len(gen.texts) == 3 and gen.params.n == 3 and gen.params.max_tokens == 4


def test_a_streamed_prompt_with_n_samples_keeps_every_completion(engine, cell):
    """Issue 29, item 1: `%%generate -n 4 --temperature 1` streamed returned 3, 1 and 3 completions in three
    runs (vLLM streams each sample's steps as outputs of their own); `--no-stream` always gave 4."""
    for trial in range(3):
        params = engine.params(None, {"n": 4, "temperature": 1.0, "max_tokens": 24, "seed": trial})
        gen = engine.run(["Once upon a time"], params, stream=True)
        whole = engine.run(["Once upon a time"], params)
        assert [c.index for c in gen.outputs[0].outputs] == [0, 1, 2, 3]
        assert gen.texts == whole.texts and all(c.finish_reason for c in gen.outputs[0].outputs)
    result, _ = cell("%%generate -n 4 --temperature 1 --max-tokens 16 --seed 7\nOnce upon a time")
    assert len(result.result.texts) == 4


@pytest.mark.parametrize("kwargs,error,match", [
    ({"regex": "(["}, RequestError, "regex"),
    ({"json_schema": '{"type": "nonsense"}'}, RequestError, "nonsense"),
    ({"json_schema": "{oops"}, UsageError, "not valid JSON"),
    ({"temperature": -1.0}, UsageError, "temperature"),
    ({"max_tokens": 0}, UsageError, "max_tokens"),
    ({"top_p": 3.0}, UsageError, "top_p"),
    ({"tempreature": 0.5}, UsageError, "unknown sampling parameter"),
])
def test_bad_requests_are_one_line_errors(engine, kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        engine.generate("The capital of France is", **kwargs)
    assert "\n" not in str(info.value)
    assert engine.generate("The capital of France is", **GREEDY).text == " Paris."


def test_prompt_longer_than_max_model_len(engine):
    with pytest.raises(RequestError, match=r"the prompt has [\d,]+ tokens; this engine takes at most 512 .*--max-model-len"):
        engine.generate("word " * 600)  # in tokens, whether vLLM first counted characters or tokens
    assert engine.generate("The capital of France is", **GREEDY).text == " Paris."


def test_batch_is_tokenized_in_one_call_and_matches_single_requests(engine):
    from vllm_notebook.engine import vllm_api

    prompts = ["The capital of France is", {"prompt_token_ids": [1, 5, 9, 22]}, "A dog says"]
    rendered = vllm_api.render_batch(engine.backend._llm, prompts)
    tok = engine.tokenizer
    assert rendered is not None and [r["prompt_token_ids"] for r in rendered] == [
        tok.encode(prompts[0]), [1, 5, 9, 22], tok.encode(prompts[2])]
    batch = engine.generate(prompts, **GREEDY, max_tokens=12)
    singles = [engine.generate(p, **GREEDY, max_tokens=12) for p in prompts]  # vLLM's per-request path
    assert batch.texts == [s.text for s in singles]
    assert [o.prompt_token_ids for o in batch.outputs] == [s.outputs[0].prompt_token_ids for s in singles]
    # One prompt too long: the batch cannot be rendered at once; the error is that prompt's (next test).
    assert vllm_api.render_batch(engine.backend._llm, ["hi", "word " * 600]) is None
    assert engine.generate(["The capital of France is", "A dog says"], **GREEDY).texts == [" Paris.", " woof."]


def test_a_prompt_that_fails_fails_alone_and_the_others_are_journaled(engine, tmp_path):
    """Issue 29, item 8: one over-long prompt failed the whole batch, without naming it; the good prompts got
    no result."""
    from vllm_notebook.engine import journal

    path = tmp_path / "j.vllm-journal.jsonl"
    journal.configure(enabled=True, path=str(path))
    try:
        gen = engine.generate(["The capital of France is", "word " * 600, "A dog says"], **GREEDY)
        assert gen.first_texts() == [" Paris.", "", " woof."] and list(gen.errors) == [1]
        assert "max-model-len" in gen.errors[1] and "\n" not in gen.errors[1]
        assert "1 prompt(s) failed (.errors), e.g. prompt 1:" in gen.footer()
        df = gen.to_pandas()
        assert list(df.finish_reason)[1] == "error" and "max-model-len" in df.error[1] and len(df) == 3
        results = [r for r in journal.at(path).records() if r["kind"] == "result"]
        assert sorted(r["prompt"] for r in results) == ["A dog says", "The capital of France is"]
        with pytest.raises(RequestError, match="every prompt failed; prompt 0: .*max-model-len"):
            engine.generate(["word " * 600, "word " * 700], **GREEDY)
        assert engine.stats.running == 0
    finally:
        journal.reset()


def test_a_stopped_batch_keeps_partial_outputs_and_leaves_no_request(engine):
    # A batch goes as one coroutine (LocalBackend._batch): stopping it aborts every request in the engine.
    # 32 x 480 tokens: a CI machine finished 8 x 400 within the 1 s before the stop.
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    gen = engine.run([f"Story {i}:" for i in range(32)], engine.params(None, {"max_tokens": 480, "ignore_eos": True}),
                     stop_event=stop)
    assert gen.interrupted and gen.aborted == 32 and engine.stats.running == 0, gen
    assert all(0 < len(o.outputs[0].token_ids) < 480 for o in gen.outputs)
    assert engine.backend._llm.output_processor.get_num_unfinished_requests() == 0
    # An error vLLM tells per request is one line, and the engine goes on.
    with pytest.raises(RequestError, match="logprobs of 50"):
        engine.generate(["The capital of France is", "A dog says"], **GREEDY, logprobs=50)
    assert engine.generate(["The capital of France is", "A dog says"], **GREEDY).texts == [" Paris.", " woof."]


def test_ctrl_c_lost_in_a_finalizer_still_stops_the_run(engine):
    # Python raises Ctrl-C's KeyboardInterrupt at the main thread's next bytecode; when that is in a finalizer
    # (a __del__ the garbage collector runs), it is printed as "Exception ignored" and lost. The run must stop anyway.
    class Finalizer:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)  # the handler runs here, inside __del__

    seen = []

    def on_output(i, out):
        seen.append(len(out.outputs[0].token_ids))
        if len(seen) == 2:
            Finalizer()  # collected at once

    previous = signal.getsignal(signal.SIGINT)
    gen = engine.run(["Once upon a time"], engine.params(None, {"max_tokens": 480, "ignore_eos": True}),
                     stream=True, on_output=on_output)
    assert gen.interrupted and gen.aborted == 1 and 0 < len(gen.outputs[0].outputs[0].token_ids) < 480, seen[-1]
    assert signal.getsignal(signal.SIGINT) is previous and engine.stats.running == 0
    assert engine.generate("The capital of France is", **GREEDY).text == " Paris."


def test_a_batch_is_tokenized_a_chunk_at_a_time(engine, monkeypatch):
    from vllm_notebook.backends import local

    from vllm_notebook.engine import vllm_api

    chunks, render = [], vllm_api.render_batch

    def counted(llm, prompts):  # the real tokenization, with each call's size kept
        chunks.append(len(prompts))
        return render(llm, prompts)

    monkeypatch.setattr(vllm_api, "render_batch", counted)
    monkeypatch.setattr(local, "RENDER_CHUNK", 2)
    prompts = ["The capital of France is", {"prompt_token_ids": [1, 5, 9, 22]}, "A dog says", "A cow says", "Hi"]
    whole = engine.generate(prompts, **GREEDY, max_tokens=12)
    assert chunks == [2, 2, 1]
    monkeypatch.undo()
    assert whole.texts == engine.generate(prompts, **GREEDY, max_tokens=12).texts
    monkeypatch.setattr(local, "RENDER_CHUNK", 2)
    # The chunk with the too-long prompt goes prompt by prompt: its error, in one line, and the others complete.
    gen = engine.generate(["The capital of France is", "A dog says", "word " * 600, "Hi"], **GREEDY)
    assert list(gen.errors) == [2] and "max-model-len" in gen.errors[2] and gen.first_texts()[:2] == [" Paris.",
                                                                                                      " woof."]
    assert engine.stats.running == 0
    assert engine.generate(["The capital of France is", "A dog says", "A cow says"], **GREEDY).texts == [
        " Paris.", " woof.", " moo."]


def test_interrupt_aborts_and_keeps_partial_text(engine):
    seen = []

    def on_output(i, out):
        seen.append(out.outputs[0].text)
        if len(seen) == 5:
            raise KeyboardInterrupt  # what Ctrl-C delivers to the waiting thread

    from vllm_notebook.engine.sampling import build_params

    t0 = time.monotonic()
    gen = engine.run(["Once upon a time"], build_params(None, {"max_tokens": 500, "ignore_eos": True}),
                     stream=True, on_output=on_output)
    assert time.monotonic() - t0 < 5
    assert gen.interrupted and gen.aborted == 1
    assert gen.text.startswith(seen[4]) and len(gen.outputs[0].outputs[0].token_ids) < 500
    assert engine.stats.running == 0
    assert engine.generate("The capital of France is", **GREEDY).text == " Paris."


def test_threads_share_the_engine(engine):
    prompts = {"The capital of France is": " Paris.", "A dog says": " woof.", "A cow says": " moo.",
               "The capital of Italy is": " Rome."}
    results, errors = {}, []

    def work(i, prompt):
        try:
            results[i] = engine.generate(prompt, **GREEDY).text
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    items = list(prompts.items()) * 4
    threads = [threading.Thread(target=work, args=(i, p)) for i, (p, _) in enumerate(items)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert [results[i] for i in range(len(items))] == [want for _, want in items]


def test_reload_same_args_reuses(engine, demo_path):
    from conftest import ENGINE_ARGS

    assert vllm_notebook.load(demo_path, progress=False, **ENGINE_ARGS) is engine
    assert vllm_notebook.engines()["default"] is engine


@pytest.mark.parametrize("model,kwargs,error,match", [
    ("/no/such/model", {}, ModelNotFoundError, "no model folder"),
    ("not a model id!", {}, ModelNotFoundError, "neither a model folder"),
    ("org/not-cached-model", {}, ModelNotFoundError, "not in the Hugging Face cache"),
    ("{folder}", {"max_model_lenn": 5}, UsageError, "did you mean 'max_model_len'"),  # the model is found first
])
def test_load_errors(model, kwargs, error, match, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    model = model.format(folder=tmp_path)
    with pytest.raises(error, match=match):
        vllm_notebook.load(model, name="bad", progress=False, **kwargs)
    assert "bad" not in vllm_notebook.engines()


def test_unknown_engine_name():
    with pytest.raises(NoEngineError, match="no engine named 'nope'"):
        vllm_notebook.get_engine("nope")


def test_dry_run_starts_nothing(demo_path):
    plan = vllm_notebook.load(demo_path, name="dry", dry_run=True, max_model_len=256)
    assert "dry" not in vllm_notebook.engines()
    assert plan.engine_args == {"max_model_len": 256}
    assert plan.plan.devices == "CPU" and plan.plan.tensor_parallel_size == 1 and plan.plan.executor is None
    assert "tensor parallel" in str(plan) and "source" in str(plan)


def test_the_api_works_in_a_plain_script_without_a_main_guard(demo_path, tmp_path):
    """Issue 29, item 9: without `if __name__ == "__main__":` vLLM's spawned processes ran the script again and
    the load failed with a doubled, truncated "An attempt has been made to start a new process before the"."""
    import subprocess
    import sys

    script = tmp_path / "analysis.py"
    script.write_text("import vllm_notebook\n"
                      f"eng = vllm_notebook.load({demo_path!r}, enforce_eager=True, max_model_len=256)\n"
                      "print('TEXT', repr(eng.generate('The capital of France is', temperature=0, max_tokens=4).text))\n"
                      "eng.unload()\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0 and "TEXT ' Paris.'" in done.stdout, done.stderr[-2000:]


def test_logprob_ranks_are_counted_eagerly_on_the_cpu_build(engine):
    """The first request with logprobs stalled 1.5-20 s while vLLM compiled its rank count (issue 29, item 4);
    the CPU build counts eagerly now (``_vllm_plugin.eager_ranks``), with the same ranks."""
    import torch
    from vllm.v1.sample.ops import logprobs as ops

    from vllm_notebook._vllm_plugin import _count_greater_than, eager_ranks

    eager_ranks()  # as the plugin does in every vLLM process
    assert ops.batched_count_greater_than is _count_greater_than
    x, v = torch.tensor([[0.1, 0.5, 0.3], [1.0, 0.0, 2.0]]), torch.tensor([[0.3], [2.0]])
    assert _count_greater_than(x, v).tolist() == [2, 1]
    out = engine.generate("The capital of France is", **GREEDY, logprobs=3).outputs[0].outputs[0]
    steps = [step[token] for step, token in zip(out.logprobs, out.token_ids)]
    assert steps and all(lp.rank == 1 for lp in steps), steps  # greedy: each token is the most likely
