"""hf-llm planner on a tiny random Qwen2ForCausalLM with a ChatML template, offline.

A random LLM writes nonsense; the planner must still return schema-valid Plans that honour
the user's hard constraints, with the raw (constrained) text kept in Plan.raw."""

from __future__ import annotations

import json

import pytest
import torch

from pixelrelay.pipeline.constrained import SchemaLogitsProcessor
from pixelrelay.pipeline.messages import Description, JobOptions, Plan
from pixelrelay.pipeline.stages.base import ModelUnavailableError
from pixelrelay.pipeline.stages.planners.edits import ORDER as GRADING_ORDER
from pixelrelay.pipeline.stages.planners.edits import EmptyEditPlanError
from pixelrelay.pipeline.stages.planners.hf_llm import DEGRADATIONS, HFLLMPlanner, edit_seed
from tests.pipeline.hf_fixtures import install_in_hub_cache, make_tiny_qwen2, tiny_model


@pytest.fixture(scope="session")
def qwen(tmp_path_factory):
    return tiny_model(tmp_path_factory, make_tiny_qwen2, "tiny-qwen2")


@pytest.fixture(scope="module")
def planner(qwen):
    return HFLLMPlanner(str(qwen), batch_size=8)


DESCRIPTIONS = [
    Description(text="noisy photo", metrics={"noise_sigma": 14.0}, noise_sigma=14.0, caption="a cat on a sofa"),
    Description(text="a clean image", metrics={"blur_sigma": 0.2}),
    Description(text="blocky JPEG", metrics={"blockiness": 3.1}, jpeg_quality=30.0),
]
OPTIONS = [
    JobOptions(task="upscale"),
    JobOptions(instruction="denoise it, but no sharpening please"),
    JobOptions(task="upscale", scale=4, format="webp"),
]


def _check(plan: Plan, options: JobOptions) -> dict:
    Plan.model_validate(plan.model_dump())  # schema-valid, round-trips
    data = json.loads(plan.raw)  # the raw LLM text is the constrained JSON
    assert set(data) == {"degradation", "deblock", "denoise", "deblur", "sharpen", "scale", "prompt", "negative_prompt"}
    assert plan.model == DEGRADATIONS[data["degradation"]]
    for op in plan.operations:
        assert 0.0 < op.strength <= 1.0 and float(data[op.name]) == op.strength
    if options.scale is not None:
        assert plan.scale == options.scale
    elif options.task == "restore":
        assert plan.scale == 1
    else:
        assert plan.scale in (2, 4)
    if options.format:
        assert plan.output_format == options.format
    assert plan.prompt and plan.negative_prompt and '"' not in plan.prompt
    return data


def test_random_llm_gives_valid_plans(planner):
    plans = planner.plan(DESCRIPTIONS, OPTIONS)
    assert len(plans) == 3
    for plan, options in zip(plans, OPTIONS, strict=True):
        _check(plan, options)
    # the instruction's hard constraints: denoise asked for, sharpen (and deblur) forbidden
    assert plans[1].strength("denoise") > 0
    assert plans[1].strength("sharpen") == 0 and plans[1].strength("deblur") == 0
    # fields the LLM does not choose come from the rules prior
    assert plans[0].noise_sigma == pytest.approx(14.0) and plans[2].jpeg_quality == pytest.approx(30.0)


@pytest.mark.slow
def test_other_random_weights_still_valid(tmp_path_factory):
    other = tiny_model(tmp_path_factory, make_tiny_qwen2, "tiny-qwen2-b", seed=7, layers=1)
    planner = HFLLMPlanner(str(other))
    for plan, options in zip(planner.plan(DESCRIPTIONS, OPTIONS), OPTIONS, strict=True):
        _check(plan, options)


@pytest.mark.slow
def test_any_output_scale_is_a_hard_constraint(planner):
    """The LLM's scale is pinned to the native scale proposed for the job's target, and the
    plan carries the target itself (edit plans too)."""
    options = [
        JobOptions(task="upscale", scale=1.5),
        JobOptions(scale=3),
        JobOptions(width=640, height=480),
        JobOptions(task="edit", instruction="make it warmer", scale=0.5),
    ]
    plans = planner.plan([DESCRIPTIONS[0]] * len(options), options)
    for plan, o, scale in zip(plans, options, (2, 4, 1, 1), strict=True):
        Plan.model_validate(plan.model_dump())
        assert plan.scale == scale and plan.target == o.target() and json.loads(plan.raw)["scale"] == scale
    assert "output fit 640x480" in planner._user_message(DESCRIPTIONS[0], options[2], plans[2])
    assert "scale x2" in planner._user_message(DESCRIPTIONS[0], OPTIONS[0], plans[0])  # as before


def test_batch_equals_single_calls(planner):
    batch = planner.plan(DESCRIPTIONS, OPTIONS)
    singles = [planner.plan([d], [o])[0] for d, o in zip(DESCRIPTIONS, OPTIONS, strict=True)]
    assert batch == singles


def _decode_adversarially(planner, grammars, vocab: int, seed: int, boosted: list[int] = ()) -> torch.Tensor:
    """Greedy decoding under the grammars from random logits (``boosted`` token ids pushed
    up by 50): the token ids, one row per grammar; every row must have ended."""
    proc = SchemaLogitsProcessor(grammars, planner.eos_token_id)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros((len(grammars), 1), dtype=torch.long)
    finished = torch.zeros(len(grammars), dtype=torch.bool)
    for _ in range(max(g.max_tokens for g in grammars)):
        scores = torch.randn((len(grammars), vocab), generator=gen) * 5
        if boosted:
            scores[:, boosted] += 50.0
        nxt = proc(ids, scores).argmax(-1)
        nxt = torch.where(finished, torch.full_like(nxt, planner.eos_token_id), nxt)
        finished |= nxt == planner.eos_token_id
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        if finished.all():
            break
    assert finished.all()
    return ids


def test_grammar_holds_against_adversarial_logits(planner):
    """Whatever the logits say (random, or a model that wants quotes and newlines), the
    decoded text is the schema's JSON."""
    quote_ids = [i for i in range(len(planner.tokenizer)) if '"' in planner.tokenizer.decode([i])]
    vocab = planner.lm.get_output_embeddings().weight.shape[0]
    for seed in range(6):
        grammars = [planner._grammar(*planner._constraints(o)) for o in OPTIONS]
        # odd seeds: the model "wants" to break out of strings
        ids = _decode_adversarially(planner, grammars, vocab, seed, quote_ids if seed % 2 else [])
        for row, options in zip(ids[:, 1:], OPTIONS, strict=True):
            text = planner.tokenizer.decode(row, skip_special_tokens=True)
            plan = planner._to_plan(text, DESCRIPTIONS[0], options, planner.rules.plan_one(DESCRIPTIONS[0], options))
            _check(plan, options)


def test_missing_model_fails_at_startup_and_cache_loads(tmp_path, monkeypatch, qwen):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelUnavailableError, match=r"Qwen/Qwen2.5-0.5B-Instruct.*pixelrelay models pull hf-llm"):
        HFLLMPlanner.check_available(None)
    install_in_hub_cache(qwen, tmp_path / "hub", "Qwen/Qwen2.5-0.5B-Instruct")
    HFLLMPlanner.check_available(None)
    plan = HFLLMPlanner(None).plan(DESCRIPTIONS[:1], OPTIONS[:1])[0]
    _check(plan, OPTIONS[0])


# --- edit and style tasks ----------------------------------------------------------------

EDIT_OPTIONS = [
    JobOptions(task="edit", instruction="make every product photo brighter with a neutral white balance"),
    JobOptions(task="style", instruction="in the style of a watercolour painting"),  # the rules can't map it
    JobOptions(task="style", instruction="vintage but no vignette"),
]
EDIT_KEYS = {*GRADING_ORDER, "scale", "generative", "edit_strength", "prompt", "negative_prompt"}


def _check_edit(plan, options: JobOptions) -> dict:
    assert isinstance(plan, Plan), plan
    Plan.model_validate_json(plan.model_dump_json())  # schema-valid, round-trips
    data = json.loads(plan.raw)
    assert set(data) == EDIT_KEYS
    assert {op.name: op.strength for op in plan.edit.grading} == {
        name: float(data[name]) for name in GRADING_ORDER if float(data[name]) != 0
    }
    assert (plan.edit.generative is not None) == (data["generative"] == "yes")
    if plan.edit.generative is not None:
        assert plan.edit.generative.seed == edit_seed(options.instruction)
        assert plan.edit.generative.strength == float(data["edit_strength"])
    assert plan.scale == 1 and plan.operations == []
    return data


@pytest.mark.slow
def test_random_llm_gives_valid_edit_plans_within_the_rules_reading(planner):
    plans = planner.plan([DESCRIPTIONS[1]] * len(EDIT_OPTIONS), EDIT_OPTIONS)
    for plan, options in zip(plans, EDIT_OPTIONS, strict=True):
        _check_edit(plan, options)
    catalogue, _, vintage = plans
    assert catalogue.edit.strength("exposure") > 0 and catalogue.edit.strength("white_balance") > 0
    assert vintage.edit.strength("vignette") == 0  # forbidden by the instruction
    assert vintage.edit.strength("sepia") > 0 and vintage.edit.strength("contrast") < 0
    assert planner.plan([DESCRIPTIONS[1]], EDIT_OPTIONS[2:])[0] == vintage  # batch equals single


def test_an_edit_plan_that_changes_nothing_fails_the_item(planner):
    options = EDIT_OPTIONS[1]
    prior = planner.rules.plan_one(DESCRIPTIONS[1], options, map_edit=False)
    nothing = json.dumps(
        {
            **{name: 0 for name in GRADING_ORDER},
            "scale": 1,
            "generative": "no",
            "edit_strength": 0.5,
            "prompt": "a photo",
            "negative_prompt": "blur",
        }
    )
    result = planner._to_plan_or_error(nothing, DESCRIPTIONS[1], options, prior)
    assert isinstance(result, EmptyEditPlanError) and "the plan has no edit operations" in str(result)
    # off-schema values (a forged or broken text) fall back to the allowed choices, never past them
    wild = json.dumps(
        {
            "exposure": 7,
            "warmth": "hot",
            "vignette": -3,
            "generative": "yes",
            "edit_strength": 9,
            "prompt": "x" * 900,
            "scale": 4,
        }
    )
    plan = planner._to_plan_or_error(wild, DESCRIPTIONS[1], options, prior)
    assert plan.edit.grading == [] and plan.edit.generative.strength == 0.5
    assert len(plan.edit.generative.prompt) <= 500 and plan.scale == 1


def test_edit_grammar_holds_against_adversarial_logits(planner):
    vocab = planner.lm.get_output_embeddings().weight.shape[0]
    grammars = [planner._grammar_for(o) for o in EDIT_OPTIONS]
    ids = _decode_adversarially(planner, grammars, vocab, 3)
    for row, options in zip(ids[:, 1:], EDIT_OPTIONS, strict=True):
        text = planner.tokenizer.decode(row, skip_special_tokens=True)
        prior = planner.rules.plan_one(DESCRIPTIONS[1], options, map_edit=False)
        result = planner._to_plan_or_error(text, DESCRIPTIONS[1], options, prior)
        if isinstance(result, EmptyEditPlanError):
            assert options is EDIT_OPTIONS[1]  # only where the rules put no floor under it
        else:
            _check_edit(result, options)
