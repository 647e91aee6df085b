"""The eval pipeline end to end on the default model with its bundled, calibrated vectors (doses on bands):
steering toward an emotion raises that emotion under both scorers, and the metrics behave (similarity,
perplexity, repetition)."""

import pytest
from conftest import RUNNER
from engine_helpers import shutdown

from vllm_emosteer import steer
from vllm_emosteer.quality.evaluate import Variant, evaluate, neutral_prompts

# The default model sampling hundreds of answers through Triton's interpreter (vLLM's sampling kernel, about 0.2 s
# per request and step) does not finish in 15 minutes on the 2-core machine; the runner makes no difference to what
# this file measures, which the exactness tests hold on both runners (docs/testing.md).
pytestmark = pytest.mark.skipif(RUNNER == "v2", reason="sampling hundreds of answers through Triton's interpreter "
                                                       "is too slow on 2 cores; see docs/testing.md")


# the user-concept scorer (eval --prototypes), here with sadness as if it were a concept of the user's
CONCEPTS = {"sadness": ["I feel so sad and alone.", "My heart is broken and I keep crying."]}


@pytest.fixture(scope="module")
def result(default_model_dir):
    from vllm import LLM

    llm = LLM(model=str(default_model_dir), max_model_len=512, enforce_eager=True, seed=0,
              additional_config={"emosteer": {}})
    variants = [Variant("unsteered", None), Variant("sadness 1", steer(sadness=1.0), ("sadness",), 1.0),
                Variant("fear 1", steer(fear=1.0), ("fear",), 1.0)]
    try:
        yield evaluate(llm, variants, neutral_prompts()[:12], max_tokens=32, progress=False, concepts=CONCEPTS)
    finally:
        shutdown(llm)


def test_steering_raises_the_target_emotion(result):
    base = result.row("unsteered")
    assert result.row("sadness 1")["score_sadness"] > base["score_sadness"] + 0.1
    assert result.row("sadness 1")["hit_nade"] >= 0.5 and result.row("sadness 1")["hit_minilm"] >= 0.5
    assert result.row("fear 1")["hit_minilm"] > base["top_minilm_fear"] + 0.15


def test_metrics_are_sane(result):
    base, steered = result.row("unsteered"), result.row("sadness 1")
    assert base["sim"] == pytest.approx(1.0, abs=1e-4) and 0 < steered["sim"] < 0.95
    assert 1 < base["ppl"] < steered["ppl"]
    assert 0.5 < base["distinct2"] <= 1 and 0 < base["topic"] < 1
    assert 0 <= steered["hit_nade"] <= 1 and 0 <= steered["hit_minilm"] <= 1
    assert set(steered["each_shows"]) == {"sadness"}


def test_your_own_concepts_are_scored_against_your_sentences(result):
    steered, fear = result.row("sadness 1"), result.row("fear 1")
    assert steered["concept_lift"] > 0.05 and steered["concept_moved"] >= 0.75
    assert 0 < steered["concept_score"] < 1
    assert "concept_lift" not in fear  # fear is not one of the given concepts
