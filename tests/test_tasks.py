"""Beyond generation, on the real CPU engine and the real ``vllm serve``: LoRA adapters, embeddings and ranking,
multiple-choice scoring. References come from raw vLLM in a process of its own on the same model.

The adapters are trained by the tests (``demo.build_adapter``, rank 8) to change two facts of the demo model,
so their effect is exact: with ``dog`` "A dog says" gives " meow." (the base model says " woof.").
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from conftest import ENGINE_ARGS

QUESTIONS = ["The capital of France is", "A dog says", "The capital of Japan is"]
CHOICES = [" Paris.", " Tokyo.", " woof.", " meow."]
TEXTS = ["The capital of France is Paris.", "A dog says woof.", "Snow is cold and white.", "KV caching stores keys."]


# ------------------------------------------------------------------ raw vLLM, in a process of its own
RAW = r"""
import json, sys
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
model, job = sys.argv[1], json.loads(sys.argv[2])
if job["kind"] == "pooling":
    llm = LLM(model=model, runner="pooling", enforce_eager=True, max_model_len=512)
    vectors = [o.outputs.embedding for o in llm.embed(job["texts"], use_tqdm=False)]
    scores = [o.outputs.score for o in llm.score(job["query"], job["texts"], use_tqdm=False)]
    print("RESULT " + json.dumps({"vectors": vectors, "scores": scores}), flush=True)
else:  # each continuation token's log-probability, one decoding step at a time (not prompt_logprobs)
    llm = LLM(model=model, enforce_eager=True, max_model_len=512, max_logprobs=-1)
    tok = llm.get_tokenizer()
    out = []
    for q in job["questions"]:
        row = []
        for c in job["choices"]:
            ctx = tok.encode(q)
            cont = tok.encode(q + c)[len(ctx):]
            total = 0.0
            for k, t in enumerate(cont):
                step = llm.generate(TokensPrompt(prompt_token_ids=ctx + cont[:k]),
                                    SamplingParams(max_tokens=1, temperature=0, logprobs=-1), use_tqdm=False)
                total += step[0].outputs[0].logprobs[0][t].logprob
            row.append([total, len(cont)])
        out.append(row)
    print("RESULT " + json.dumps(out), flush=True)
"""


def _raw(model: str, job: dict):
    """The reference from raw vLLM, in a process of its own (raw vLLM is not under test).

    A result printed counts whatever the exit status: in CI the CPU build once aborted such a process ("terminate
    called without an active exception", rc -6) after loading; a process that dies without one is run once more.
    The process exits normally, so that LLM's shutdown ends EngineCore: with ``os._exit`` EngineCore outlived it,
    held the output pipes open, and ``subprocess.run`` waited out its timeout.
    """
    failures = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", RAW, model, json.dumps(job)], capture_output=True, text=True,
                              timeout=600)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if lines:
            return json.loads(lines[-1][7:])
        failures.append(f"rc {proc.returncode}: {proc.stderr[-1500:]}")
    pytest.fail("raw vLLM gave no reference twice:\n" + "\n---\n".join(failures))


@pytest.fixture(scope="module")
def raw_choices(demo_path):
    return _raw(demo_path, {"kind": "choices", "questions": QUESTIONS, "choices": CHOICES})


@pytest.fixture(scope="module")
def raw_pooling(demo_path):
    return _raw(demo_path, {"kind": "pooling", "texts": TEXTS, "query": "What does a dog say?"})


# ------------------------------------------------------------------ adapters
@pytest.fixture(scope="module")
def adapters(demo_path, tmp_path_factory):
    """Two rank-8 adapters: ``dog`` (the package's demo adapter) and ``cat`` (another fact changed)."""
    import vllm_notebook
    from vllm_notebook.models import demo

    cat = tmp_path_factory.mktemp("cat-adapter")
    demo.build_adapter(demo_path, cat, facts={"A cat says meow.": "A cat says moo."})
    return {"dog": vllm_notebook.demo_adapter(), "cat": str(cat)}


@pytest.fixture(scope="module")
def lora(demo_path, adapters):
    import vllm_notebook

    eng = vllm_notebook.load(demo_path, name="lora", progress=False, enable_lora=True, max_lora_rank=8,
                             max_loras=2, lora_modules={"dog": adapters["dog"]}, **ENGINE_ARGS)
    yield eng
    eng.unload()


@pytest.fixture(scope="module")
def pool(demo_path):
    import vllm_notebook

    eng = vllm_notebook.load(demo_path, name="pool", progress=False, runner="pooling", **ENGINE_ARGS)
    yield eng
    eng.unload()


@pytest.mark.slow
def test_an_adapter_changes_the_greedy_completion_exactly(engine, lora, adapters):
    greedy = {"temperature": 0, "max_tokens": 8}
    assert engine.generate(["A dog says", "The sky is"], **greedy).texts == [" woof.", " blue."]
    assert lora.generate(["A dog says", "The sky is"], **greedy).texts == [" woof.", " blue."]  # the base model
    assert lora.generate(["A dog says", "The sky is"], lora="dog", **greedy).texts == [" meow.", " green."]
    assert lora.generate("The capital of France is", lora="dog", **greedy).text == " Paris."  # the rest is kept
    assert lora.loras == {"dog": adapters["dog"]}

    lora.add_lora("cat", adapters["cat"])  # at run time; then base, dog and cat in one batch
    mixed = lora.generate(["A dog says", "A dog says", "A cat says", "A cat says"], lora=[None, "dog", None, "cat"],
                          **greedy)
    assert mixed.texts == [" woof.", " meow.", " meow.", " moo."]
    assert mixed.provenance["lora"] == ["cat", "dog"]
    lora.remove_lora("cat")
    assert list(lora.loras) == ["dog"]


@pytest.mark.slow
def test_lora_magics_and_their_mistakes(lora, adapters, ip, cell, tmp_path):
    from vllm_notebook.errors import UsageError

    _, out = cell(f"%vllm_lora add cat {adapters['cat']} --name lora")
    assert "adapter 'cat' loaded (rank 8)" in out
    result, _ = cell("%vllm_lora --name lora")
    assert [r[0] for r in result.result.rows()] == ["dog", "cat"]
    result, _ = cell("%%generate --name lora --lora cat --temperature 0 --max-tokens 8 --no-stream\nA cat says")
    assert result.result.text == " moo."
    cell("%vllm_lora remove cat --name lora")
    mistakes = [
        ("%%generate --name lora --lora cat --max-tokens 4\nA cat says", "no LoRA adapter named 'cat' (loaded: dog)"),
        ("%%generate --lora dog --max-tokens 4\nA dog says", "loaded without LoRA; reload with --enable-lora"),
        (f"%vllm_lora add dog {adapters['dog']} --name lora", "an adapter named 'dog' is loaded already"),
        (f"%vllm_lora add x {tmp_path} --name lora", "is not a LoRA adapter: it has no adapter_config.json"),
        ("%vllm_lora add x /no/such/adapter --name lora", "no LoRA adapter at /no/such/adapter"),
        ("%vllm_load {demo} --enforce-eager --lora-modules d=/x", "--lora-modules needs --enable-lora"),
    ]
    big = tmp_path / "rank16"
    big.mkdir()
    with open(f"{adapters['dog']}/adapter_config.json") as f:
        config = json.load(f)
    (big / "adapter_config.json").write_text(json.dumps({**config, "r": 16}))
    mistakes.append((f"%vllm_lora add big {big} --name lora", "has rank 16, above the engine's --max-lora-rank 8"))
    ip.user_ns["demo"] = lora.facts.get("path") or lora.backend.args.model
    for line, message in mistakes:
        _, out = cell(line, expect_error=UsageError)
        assert message in out, (line, out)
    _, out = cell("%%score --name lora --choices ' woof., meow.'\nA dog says", expect_error=UsageError)
    assert "CPU build crashes the engine on prompt log-probabilities" in out  # refused: it would kill the engine
    assert lora.alive and lora.generate("A dog says", lora="dog", temperature=0, max_tokens=8).text == " meow."


@pytest.mark.slow
def test_base_and_adapter_side_by_side(lora):
    import vllm_notebook

    cmp = vllm_notebook.compare(["A dog says", "The sky is"], ["lora"], ["lora=none", "lora=dog"],
                                temperature=0, max_tokens=8)
    assert cmp.labels == ["lora=none", "lora=dog"]
    assert cmp.texts("lora=none") == [" woof.", " blue."] and cmp.texts("lora=dog") == [" meow.", " green."]


# ------------------------------------------------------------------ embeddings and ranking
@pytest.mark.slow
def test_embeddings_and_ranking_equal_raw_vllm(pool, raw_pooling, cell, ip):
    import numpy as np

    import vllm_notebook

    vectors = vllm_notebook.embed(TEXTS, name="pool")
    assert vectors.shape == (4, 128) and vectors.dtype == np.float32
    assert np.abs(vectors - np.array(raw_pooling["vectors"])).max() < 1e-5
    ranking = pool.score("What does a dog say?", TEXTS)
    assert np.abs(np.array(ranking.scores) - np.array(raw_pooling["scores"])).max() < 1e-5
    assert ranking.order == sorted(range(4), key=lambda i: -raw_pooling["scores"][i])
    assert ranking.to_pandas().document.tolist() == [TEXTS[i] for i in ranking.order]

    ip.user_ns["texts"] = TEXTS
    _, out = cell("%embed -i texts --out X --name pool")
    assert "X = 4 embedding(s) × 128 dimensions (float32)" in out
    assert np.abs(ip.user_ns["X"] - vectors).max() < 1e-6
    result, _ = cell("%%score --documents texts --name pool\nWhat does a dog say?")
    assert result.result.order == ranking.order and "<td" in result.result._repr_html_()


@pytest.mark.slow
def test_the_wrong_kind_of_engine_says_so_in_one_line(engine, pool, cell, ip):
    from vllm_notebook.errors import UsageError

    ip.user_ns["texts"] = TEXTS  # its own, not left by an earlier test
    for line, message in [
        ("%embed -i texts --name default", "engine 'default' generates text; embeddings and ranking need a pooling"),
        ("%%generate --name pool --max-tokens 4\nHello", "engine 'pool' is a pooling model (--runner pooling)"),
        ("%%score --choices ' a, b' --name pool\nHello", "engine 'pool' is a pooling model"),
    ]:
        _, out = cell(line, expect_error=UsageError)
        assert message in out and "Traceback" not in out, (line, out)
    assert engine.generate("The capital of France is", temperature=0, max_tokens=4).text == " Paris."


# ------------------------------------------------------------------ multiple choice
@pytest.mark.slow
def test_choice_scores_equal_a_direct_computation_with_raw_vllm(engine, raw_choices, cell, ip):
    import pandas as pd

    scores = engine.score_choices(QUESTIONS, CHOICES)
    for q in range(len(QUESTIONS)):
        for c in range(len(CHOICES)):
            total, n = raw_choices[q][c]
            assert abs(scores.logprobs[q][c] - total) < 1e-4 and scores.tokens[q][c] == n
    assert scores.answers == [" Paris.", " woof.", " Tokyo."]
    df = scores.to_pandas()
    assert list(df.best) == scores.answers and math.isclose(df.loc[0, "logprob[ Paris.]"], scores.logprobs[0][0])
    assert len(scores.to_pandas(long=True)) == 12

    result, _ = cell('%%score --choices " Paris., Tokyo., woof."\nThe capital of France is')
    one = result.result
    assert one.best == one.best_of(0) == " Paris." and [r[0] for r in one.rows()] == [" Paris.", " Tokyo.", " woof."]
    assert "total" in one._repr_html_()
    ip.user_ns["quiz"] = pd.DataFrame({"country": ["France", "Japan"]})
    ip.user_ns["country"] = "France"  # a variable named like the column must not fill the template (a CI failure)
    result, _ = cell('%score -i quiz --template "The capital of {country} is" --choices " Paris., Tokyo." --out S')
    assert ip.user_ns["S"].answers == [" Paris.", " Tokyo."]


# ------------------------------------------------------------------ the same over a server
@pytest.fixture(scope="module")
def lora_server(demo_path, adapters):
    from vllm_notebook.loader import load_from_argv

    eng = load_from_argv([demo_path, "--server", "--name", "lora-srv", "--enforce-eager",
                          "--max-model-len", "512", "--enable-lora", "--max-lora-rank", "8",
                          "--max-loras", "2", "--lora-modules", f"dog={adapters['dog']}"], progress=False)
    yield eng
    eng.unload()


@pytest.fixture(scope="module")
def pool_server(demo_path):
    import vllm_notebook

    eng = vllm_notebook.load(demo_path, server=True, name="pool-srv", progress=False, runner="pooling", **ENGINE_ARGS)
    yield eng
    eng.unload()


@pytest.mark.slow
def test_adapters_over_a_server(lora_server, adapters):
    greedy = {"temperature": 0, "max_tokens": 8}
    assert lora_server.loras == {"dog": adapters["dog"]}
    pair = lora_server.generate(["A dog says", "A dog says"], lora=[None, "dog"], **greedy)
    assert pair.texts == [" woof.", " meow."]
    lora_server.add_lora("cat", adapters["cat"])  # /v1/load_lora_adapter
    mixed = lora_server.generate(["A dog says", "A dog says", "A cat says", "A cat says"],
                                 lora=[None, "dog", None, "cat"], **greedy)
    assert mixed.texts == [" woof.", " meow.", " meow.", " moo."]  # base requests get no adapter's effect
    lora_server.remove_lora("cat")
    from vllm_notebook.errors import UsageError

    with pytest.raises(UsageError, match="no LoRA adapter named 'cat'"):
        lora_server.generate("A cat says", lora="cat", **greedy)

    with pytest.raises(UsageError, match="CPU build crashes the engine on prompt log-probabilities"):
        lora_server.score_choices(QUESTIONS, CHOICES)  # refused before vLLM's CPU build could die of it
    assert lora_server.generate("A dog says", lora="dog", **greedy).text == " meow."


@pytest.mark.slow
def test_embeddings_and_scores_over_a_server(pool_server, raw_pooling):
    import numpy as np

    vectors = pool_server.embed(TEXTS)
    assert np.abs(vectors - np.array(raw_pooling["vectors"])).max() < 1e-5
    ranking = pool_server.score("What does a dog say?", TEXTS)  # vLLM's /score
    assert np.abs(np.array(ranking.scores) - np.array(raw_pooling["scores"])).max() < 1e-5
