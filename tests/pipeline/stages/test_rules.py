"""RulesPlanner: plans from real AnalysisEncoder descriptions and from learned-style estimates."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from pixelrelay.pipeline.imageio import DecodedImage
from pixelrelay.pipeline.messages import Description, JobOptions, Plan
from pixelrelay.pipeline.stages.encoders.analysis import AnalysisEncoder
from pixelrelay.pipeline.stages.planners.rules import RulesPlanner
from tests.images import add_noise, clean_photo


@pytest.fixture(scope="module")
def encoder() -> AnalysisEncoder:
    return AnalysisEncoder()


@pytest.fixture(scope="module")
def planner() -> RulesPlanner:
    return RulesPlanner()


def plan_for(planner, description: Description, **options) -> Plan:
    (plan,) = planner.plan([description], [JobOptions(**options)])
    return plan


def measured(encoder, rgb: np.ndarray) -> Description:
    (description,) = encoder.describe([DecodedImage(rgb=rgb)])
    return description


def op_names(plan: Plan) -> list[str]:
    return [op.name for op in plan.operations]


@pytest.mark.parametrize("task", ["restore", "upscale"])
def test_clean_image_gets_no_operations(encoder, planner, task):
    plan = plan_for(planner, measured(encoder, clean_photo(120, 160)), task=task)
    assert plan.operations == []
    assert "no denoise" in plan.rationale and "no sharpen" in plan.rationale


def test_noisy_image_gets_denoise_rising_with_sigma(encoder, planner):
    strengths = []
    for sigma in (6, 10, 14):
        plan = plan_for(planner, measured(encoder, add_noise(clean_photo(120, 160), sigma)))
        assert "denoise" in op_names(plan), plan.rationale
        assert "sharpen" not in op_names(plan)
        assert plan.noise_sigma == pytest.approx(sigma, abs=2.5)
        strengths.append(plan.strength("denoise"))
    assert strengths[0] < strengths[1] < strengths[2], strengths


def test_blur_leads_to_deblur_and_soft_to_sharpen(encoder, planner):
    blurred = np.asarray(Image.fromarray(clean_photo(120, 160)).filter(ImageFilter.GaussianBlur(2.5)))
    plan = plan_for(planner, measured(encoder, blurred))
    assert op_names(plan) == ["deblur"]
    assert plan.blur_sigma == pytest.approx(2.5, abs=0.8)
    soft = plan_for(planner, Description(text="soft", blur_sigma=1.2, noise_sigma=0.5))
    assert op_names(soft) == ["sharpen"]


def test_jpeg_blocking_leads_to_deblock(planner):
    blocky = plan_for(planner, Description(text="blocky", metrics={"blockiness": 6.0, "noise_sigma": 0.2}))
    assert op_names(blocky) == ["deblock"]
    learned = plan_for(planner, Description(text="jpeg", jpeg_quality=20.0, metrics={"blockiness": 1.0}))
    assert op_names(learned) == ["deblock"] and learned.jpeg_quality == 20.0
    assert plan_for(planner, Description(text="png", metrics={"blockiness": 1.02})).operations == []


def test_learned_estimates_take_precedence_over_metrics(planner):
    description = Description(
        text="x", metrics={"noise_sigma": 0.3, "blur_sigma": 0.0}, noise_sigma=20.0, blur_sigma=3.0
    )
    plan = plan_for(planner, description)
    assert plan.noise_sigma == 20.0 and plan.blur_sigma == 3.0
    assert plan.strength("denoise") == 1.0
    # Too noisy to sharpen safely.
    assert "deblur" not in op_names(plan) and "sharpen" not in op_names(plan)
    quiet = plan_for(planner, Description(text="x", metrics={"noise_sigma": 30.0}, noise_sigma=0.5))
    assert quiet.operations == [] and quiet.noise_sigma == 0.5


@pytest.mark.parametrize(
    "instruction", ["no sharpen", "Don't sharpen it", "please don\u2019t sharpen", "without sharpening"]
)
def test_negated_sharpen_removes_sharpening(planner, instruction):
    soft = Description(text="soft", blur_sigma=1.2)
    blurry = Description(text="blurry", blur_sigma=2.5)
    assert "sharpen" in op_names(plan_for(planner, soft))
    assert "sharpen" not in op_names(plan_for(planner, soft, instruction=instruction))
    assert op_names(plan_for(planner, blurry, instruction=instruction)) == []


@pytest.mark.parametrize(
    "instruction,expected",
    [
        ("denoise", ["denoise"]),
        ("please remove noise", ["denoise"]),
        ("sharpen", ["sharpen"]),
        ("make it sharper", ["sharpen"]),
        ("denoise and sharpen", ["denoise", "sharpen"]),
        ("sharpen but don't denoise", ["sharpen"]),
        ("remove jpeg artifacts", ["deblock"]),
        ("upscale nicely", []),
    ],
)
def test_instruction_forces_operations_on_a_clean_image(planner, instruction, expected):
    clean = Description(text="clean", metrics={"noise_sigma": 0.3, "blur_sigma": 0.2, "blockiness": 1.0})
    plan = plan_for(planner, clean, instruction=instruction)
    assert op_names(plan) == expected
    assert all(0.0 < op.strength <= 1.0 for op in plan.operations)


def test_gentle_and_strong_scale_strengths(planner):
    noisy = Description(text="noisy", noise_sigma=10.0)
    normal = plan_for(planner, noisy).strength("denoise")

    def denoise_strength(instruction: str) -> float:
        return plan_for(planner, noisy, instruction=instruction).strength("denoise")

    assert denoise_strength("gentle please") == pytest.approx(normal * 0.5, abs=1e-3)
    assert denoise_strength("subtle") == pytest.approx(normal * 0.5, abs=1e-3)
    assert denoise_strength("aggressive") == pytest.approx(min(1.0, normal * 1.5), abs=1e-3)
    very_noisy = Description(text="very noisy", noise_sigma=30.0)
    assert plan_for(planner, very_noisy, instruction="strong denoise").strength("denoise") == 1.0


def test_scale_and_format(planner):
    description = Description(text="clean")
    assert plan_for(planner, description).scale == 1
    assert plan_for(planner, description, task="upscale").scale == 2
    assert plan_for(planner, description, task="upscale", scale=4).scale == 4
    assert plan_for(planner, description, task="restore", scale=2).scale == 2
    assert plan_for(planner, description).output_format == "png"
    assert plan_for(planner, description, format="webp").output_format == "webp"
    assert plan_for(planner, description, format="jpg").output_format == "jpg"


def test_prompts(planner):
    plan = plan_for(planner, Description(text="noisy", noise_sigma=12.0, caption="a red barn in snow"))
    assert plan.prompt.startswith("a clean, sharp, high-resolution photo of a red barn in snow")
    assert plan.negative_prompt.startswith("noise") and "jpeg artifacts" in plan.negative_prompt
    assert "of" not in plan_for(planner, Description(text="x")).prompt.split(",")[0].split()


def test_plans_are_schema_valid_and_deterministic(encoder, planner):
    descriptions = [
        measured(encoder, clean_photo(120, 160)),
        measured(encoder, add_noise(clean_photo(120, 160), 20)),
        measured(encoder, np.zeros((1, 1, 3), np.uint8)),
        Description(text="extreme", noise_sigma=500.0, blur_sigma=50.0, jpeg_quality=0.0),
        Description(text="nan", noise_sigma=float("nan"), metrics={"blockiness": float("inf")}),
    ]
    options = [
        JobOptions(),
        JobOptions(task="upscale", instruction="gentle, no sharpen"),
        JobOptions(scale=4, format="webp"),
        JobOptions(instruction="strong"),
        JobOptions(instruction="denoise"),
    ]
    plans = planner.plan(descriptions, options)
    assert len(plans) == len(descriptions)
    for plan in plans:
        assert Plan.model_validate(plan.model_dump()) == plan
        assert Plan.model_validate_json(plan.model_dump_json()) == plan
        assert plan.rationale
    assert planner.plan(descriptions, options) == plans
    assert RulesPlanner().plan(descriptions, options) == plans


def test_mismatched_batch_is_an_error(planner):
    with pytest.raises(ValueError):
        planner.plan([Description(text="a")], [])


@pytest.mark.parametrize(
    "options, scale, target",
    [
        ({"task": "upscale", "scale": 1.5}, 2, {"scale": 1.5}),
        ({"scale": 3}, 4, {"scale": 3}),
        ({"scale": 0.5}, 1, {"scale": 0.5}),
        ({"scale": 8}, 4, {"scale": 8}),
        ({"width": 800}, 1, {"width": 800}),
        ({"task": "upscale", "width": 800, "height": 600}, 2, {"width": 800, "height": 600}),
    ],
)
def test_any_output_scale_is_carried_as_the_plans_target(planner, options, scale, target):
    plan = plan_for(planner, Description(text="clean"), **options)
    assert plan.scale == scale and plan.target.model_dump() == target
    assert plan.model_dump(mode="json")["target"] == target and "resamples" in plan.rationale


def test_a_native_scale_plan_has_no_target_key(planner):
    for options in ({}, {"task": "upscale"}, {"scale": 4}, {"scale": 2.0}):
        plan = plan_for(planner, Description(text="clean"), **options)
        assert plan.target is None and "target" not in plan.model_dump(mode="json")
