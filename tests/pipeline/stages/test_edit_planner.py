"""The rules planner on edit and style instructions (``planners.edits`` + ``rules``): each
phrasing, combined ones, intensity words, negation, and what it refuses."""

from __future__ import annotations

import pytest

from pixelrelay.pipeline.messages import Description, JobOptions, Plan
from pixelrelay.pipeline.stages.planners import edits
from pixelrelay.pipeline.stages.planners.edits import UnmappableInstructionError, map_instruction
from pixelrelay.pipeline.stages.planners.rules import RulesPlanner


def _ops(instruction: str, task: str = "edit") -> dict[str, float]:
    return {op.name: op.strength for op in map_instruction(instruction, task).grading}


@pytest.mark.parametrize(
    "instruction, expected",
    [
        ("make it warmer", {"warmth": 0.35}),
        ("cooler please", {"warmth": -0.35}),
        ("brighter", {"exposure": 0.35}),
        ("Darker.", {"exposure": -0.35}),
        ("more contrast", {"contrast": 0.35}),
        ("less contrast", {"contrast": -0.35}),
        ("more saturated", {"saturation": 0.35}),
        ("less saturated", {"saturation": -0.35}),
        ("vivid colours", {"saturation": 0.35}),
        ("muted", {"saturation": -0.35}),
        ("black and white", {"grayscale": 1.0}),
        ("black & white", {"grayscale": 1.0}),
        ("monochrome", {"grayscale": 1.0}),
        ("grayscale", {"grayscale": 1.0}),
        ("sepia", {"sepia": 0.8}),
        ("add a vignette", {"vignette": 0.4}),
        ("neutral white balance", {"white_balance": 1.0}),
        ("remove the colour cast", {"white_balance": 1.0}),
        ("vintage", {"sepia": 0.5, "contrast": -0.25, "saturation": -0.2, "vignette": 0.35}),
        ("it is too dark", {"exposure": 0.35}),
        ("turn the saturation down", {"saturation": -0.35}),
        ("warm colours", {"warmth": 0.35}),  # "colours" without a direction names nothing
    ],
)
def test_each_phrasing(instruction, expected):
    assert _ops(instruction) == expected


@pytest.mark.parametrize(
    "instruction, expected",
    [
        ("slightly warmer", {"warmth": 0.175}),
        ("a bit brighter", {"exposure": 0.175}),
        ("much brighter", {"exposure": 0.7}),
        ("a lot more contrast", {"contrast": 0.7}),
        ("extremely vivid", {"saturation": 0.875}),
        ("brighter, but only slightly", {"exposure": 0.175}),
        ("slightly black and white", {"grayscale": 0.5}),
    ],
)
def test_intensity_words(instruction, expected):
    assert _ops(instruction) == expected


def test_several_operations_in_one_instruction():
    assert _ops("make every product photo brighter with a neutral white balance") == {
        "white_balance": 1.0,
        "exposure": 0.35,
    }
    assert _ops("warmer, slightly darker and much more contrast; add a vignette") == {
        "warmth": 0.35,
        "exposure": -0.175,
        "contrast": 0.7,
        "vignette": 0.4,
    }
    # contributions add up; a negation forbids an operation whatever else asks for it
    assert _ops("vintage with more contrast") == {"sepia": 0.5, "contrast": 0.1, "saturation": -0.2, "vignette": 0.35}
    assert _ops("vintage but no vignette") == {"sepia": 0.5, "contrast": -0.25, "saturation": -0.2}
    # the order of the operations is the grading order, not the sentence's
    assert list(_ops("vignette, then sepia, then brighter")) == ["exposure", "sepia", "vignette"]


@pytest.mark.parametrize(
    "instruction, expected",
    [
        ("film noir", {"grayscale": 1.0, "contrast": 0.5, "vignette": 0.45}),
        ("a faded film look", {"contrast": -0.2, "saturation": -0.5, "exposure": 0.1, "warmth": 0.1, "vignette": 0.2}),
        ("warm sunset", {"warmth": 0.6, "saturation": 0.2, "contrast": 0.1}),
        (
            "in the style of an old vintage postcard",
            {"sepia": 0.5, "contrast": -0.25, "saturation": -0.2, "vignette": 0.35},
        ),
    ],
)
def test_style_words(instruction, expected):
    assert _ops(instruction, "style") == pytest.approx(expected)


@pytest.mark.parametrize(
    "instruction, fragment",
    [
        ("make it look like a Van Gogh painting", "cannot map 'make it look like a van gogh painting'"),
        ("warmer and add a hat", "cannot map 'add a hat'"),
        ("make the sky bluer", "local edit (sky)"),
        ("brighten the background", "local edit (background)"),
        ("no vignette", "forbids every operation"),
        ("please", "names no operation"),
        ("denoise it", "only for restoration"),
    ],
)
def test_unmappable_instructions_are_refused_with_the_reason(instruction, fragment):
    with pytest.raises(UnmappableInstructionError, match="rules|cannot|local|forbids|names|restoration") as info:
        map_instruction(instruction)
    assert fragment in str(info.value)
    assert "hf-llm" in str(info.value) or "restore" in str(info.value)


def test_style_refusal_lists_the_styles():
    with pytest.raises(UnmappableInstructionError, match="a style it knows.*vintage"):
        map_instruction("cyberpunk", "style")


def test_long_adversarial_instruction_reads_in_one_pass():
    text = ("not " * 300 + "very " * 100 + "black and " * 50)[:2000]
    with pytest.raises(UnmappableInstructionError):
        map_instruction(text)  # an unfinished "black and": no operation
    assert _ops("brighter " + "very " * 380) == {"exposure": 0.35}
    assert len(edits.tokens("x" * 2000)) == 1


DESCRIPTION = Description(text="noisy photo", noise_sigma=12.0, blur_sigma=0.3, metrics={"noise_sigma": 12.0})


def test_rules_planner_edit_plans():
    planner = RulesPlanner()
    options = [
        JobOptions(task="edit", instruction="make every product photo brighter with a neutral white balance"),
        JobOptions(task="edit", instruction="denoise it and make it warmer"),
        JobOptions(task="style", instruction="vintage"),
        JobOptions(task="edit", instruction="add a hat"),
        JobOptions(task="restore"),
    ]
    plans = planner.plan([DESCRIPTION] * len(options), options)
    catalogue, denoised, vintage, refused, restored = plans
    assert catalogue.edit.describe() == "white_balance 1, exposure +0.35"
    assert catalogue.operations == [] and catalogue.scale == 1  # restoration only when asked for
    assert [op.name for op in denoised.operations] == ["denoise"] and denoised.edit.strength("warmth") == 0.35
    assert vintage.edit.strength("sepia") == 0.5 and "style:" in vintage.rationale
    assert isinstance(refused, UnmappableInstructionError) and "add a hat" in str(refused)
    assert restored.edit is None and [op.name for op in restored.operations] == ["denoise"]
    for plan in (catalogue, denoised, vintage, restored):
        assert Plan.model_validate_json(plan.model_dump_json()) == plan
    assert planner.plan([DESCRIPTION], [options[0]]) == [catalogue]  # batch equals single
