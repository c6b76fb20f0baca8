"""Side-by-side comparison: two engines (the demo model and a second tiny model the test trains), or two
settings on one engine, run at once; each column's texts are exactly what its engine gives alone."""

from __future__ import annotations

import pytest

from conftest import ENGINE_ARGS

from vllm_notebook.ui import render

PROMPTS = ["The capital of France is", "A cat says", "Once upon a time"]


def test_settings_are_parsed_as_typed():
    from vllm_notebook.engine.compare import parse_setting
    from vllm_notebook.errors import UsageError

    assert parse_setting("temperature=0.8 top-p=0.9") == {"temperature": 0.8, "top_p": 0.9}
    assert parse_setting("system='Answer briefly.' seed=3") == {"system": "Answer briefly.", "seed": 3}
    with pytest.raises(UsageError, match="NAME=VALUE"):
        parse_setting("temperature")
    with pytest.raises(UsageError, match="No closing quotation"):
        parse_setting("system='open")


@pytest.fixture(scope="module")
def other(tmp_path_factory, engine):
    """A second tiny model: the demo recipe, another seed and far fewer steps, so it answers differently."""
    import vllm_notebook
    from vllm_notebook.models import demo

    path = tmp_path_factory.mktemp("second-model")
    demo.build(path, steps=40, seed=1)
    eng = vllm_notebook.load(str(path), name="other", progress=False, **ENGINE_ARGS)
    yield eng
    eng.unload()


@pytest.mark.slow
def test_two_engines_side_by_side_give_each_engines_own_text(engine, other):
    import vllm_notebook

    cmp = vllm_notebook.compare(PROMPTS, ["default", "other"], temperature=0, max_tokens=8)
    assert cmp.labels == ["default", "other"] and not cmp.interrupted
    alone = {e.name: e.generate(PROMPTS, temperature=0, max_tokens=8).texts for e in (engine, other)}
    assert cmp.texts("default") == alone["default"] and cmp.texts("other") == alone["other"]
    assert cmp.texts("default")[0] == " Paris." and cmp.texts("other") != cmp.texts("default")
    wide = cmp.to_pandas(wide=True)
    assert list(wide.columns) == ["default", "other"] and list(wide.index) == PROMPTS
    assert wide.loc["A cat says", "other"] == alone["other"][1]
    long = cmp.to_pandas()
    assert len(long) == 6 and set(long.column) == {"default", "other"} and "tokens_per_s" in long
    assert long.attrs["provenance"]["other"]["model"] == other.model
    html = render.comparison_html(cmp)
    assert "tok/s" in html and "finish: " in html and ">other</th>" in html


@pytest.mark.slow
def test_two_system_prompts_on_one_engine_and_the_magic(engine, other, cell):
    import vllm_notebook

    systems = ["You are a helpful assistant.", "Answer briefly."]
    cmp = vllm_notebook.compare(["What is the capital of France?"], ["default"], [{"system": s} for s in systems],
                                temperature=0, max_tokens=16)
    for s in systems:
        label = f"system={s}"
        alone = engine.chat([{"role": "system", "content": s},
                             {"role": "user", "content": "What is the capital of France?"}],
                            temperature=0, max_tokens=16).text
        assert cmp.texts(label) == [alone]

    cell("qs = ['The capital of France is', '<b>bold</b> is']")
    result, out = cell("%generate -i qs --name default,other --temperature 0 --max-tokens 6")
    cmp = result.result
    assert isinstance(cmp, vllm_notebook.Comparison) and cmp.labels == ["default", "other"]
    assert "<b>bold" not in render.comparison_html(cmp)  # prompts and model output are text, never HTML
    result, _ = cell("%generate -i qs --compare temperature=0 --compare 'temperature=0 max_tokens=2' --name default")
    assert result.result.labels == ["temperature=0", "temperature=0 max_tokens=2"]
    assert all(len(o.outputs[0].token_ids) <= 2 for o in result.result.generations[result.result.labels[1]].outputs)
    from vllm_notebook.errors import UsageError

    result, _ = cell("%generate -i qs --compare temperature=0", expect_error=UsageError)
    assert "two columns or more" in str(result.error_in_exec)
