"""Planner backed by an instruction-tuned causal LM (``hf-llm:MODEL``).

The LLM reads the encoder's Description (caption + measurements), the job's instruction
and a rule-based prior, and writes a JSON plan. Decoding is *constrained to the plan
schema*: the JSON skeleton is forced token by token, every closed field (degradation
class, operation strengths, scale) can only take one of its allowed values, and the two
free-text fields (prompt, negative prompt) may only use tokens that keep the JSON string
valid and are cut at a token budget (the engine: ``pipeline.constrained``; this module only
writes the templates). Whatever the model's weights, the text it writes parses, and maps onto
a schema-valid Plan; the raw text is kept in ``Plan.raw``.

Fields the LLM does not choose come from the RulesPlanner prior (degradation estimates,
output format, rationale). The user's explicit wishes are hard constraints, not hints:
``--scale`` fixes the scale (any other than 1, 2, 4, and ``--width``/``--height``, fix the
plan's target and the native scale ``pipeline.outsize.planned`` proposes); an instruction
that forbids an operation ("no sharpening") pins its strength to 0, one that asks for it
excludes 0. A change to a template changes the JSON keys the ``_to_plan`` mappers read.

Tasks ``edit`` and ``style`` use a second template: a strength for each grading operation
(signed ones from -1 to 1), whether a generative edit is needed, its strength, and the
prompts (then the generative edit's). The rules planner's reading of the instruction
(``planners.edits``), where it has one, is a hard constraint too: an operation it maps can
only take a strength of the same sign, one it forbids only 0. A plan that ends up with no
grading and no generative edit is not returned: the item gets ``EmptyEditPlanError`` ("the
plan has no edit operations") in its slot and fails; a job never silently returns an
unchanged image. The generative edit's seed is derived from the instruction, so the same
job edits the same way again.

Generation is batched with left padding and greedy, so a batch of N gives the same
plans as N single calls.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pixelrelay.pipeline import hf, outsize
from pixelrelay.pipeline.constrained import Grammar, SchemaLogitsProcessor, merge_literals, string_token_mask
from pixelrelay.pipeline.messages import (
    EDIT_TASKS,
    MAX_SEED,
    SIGNED_GRADING,
    Description,
    Edit,
    GenerativeEdit,
    GradingOp,
    JobOptions,
    Operation,
    Plan,
)
from pixelrelay.pipeline.stages.base import Planner, check_batch
from pixelrelay.pipeline.stages.planners.edits import (
    ORDER as GRADING_ORDER,
)
from pixelrelay.pipeline.stages.planners.edits import (
    EmptyEditPlanError,
    PlanningError,
    UnmappableInstructionError,
    map_instruction,
)
from pixelrelay.pipeline.stages.planners.rules import OPERATION_ORDER, RulesPlanner, instruction_requests

if TYPE_CHECKING:
    from pixelrelay.pipeline.settings import Settings

log = logging.getLogger("pixelrelay.planner.hf_llm")

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
DEFAULT_BATCH_SIZE = 16
PROMPT_MAX_TOKENS = 40
NEGATIVE_MAX_TOKENS = 24

STRENGTH_CHOICES = ("0", "0.25", "0.5", "0.75", "1")
# Degradation class -> the decoder variant it calls for (hf-sr understands these names).
DEGRADATIONS = {
    "clean": "classical",
    "noise": "realworld",
    "blur": "realworld",
    "jpeg": "compressed",
    "mixed": "realworld",
}

SYSTEM_PROMPT = (
    "You plan image restoration. Given an image description, measurements and the user's "
    "instruction, reply with one JSON object: the main degradation (clean, noise, blur, "
    "jpeg or mixed); the strength, from 0 to 1, of each operation: deblock (JPEG "
    "artifacts), denoise, deblur, sharpen (0 when not needed; never restore what is not "
    "broken); the output scale; a short positive prompt describing the restored image; "
    "and a short negative prompt listing what to avoid."
)


EDIT_SYSTEM_PROMPT = (
    "You plan photo edits. Given an image description, measurements and the user's "
    "instruction, reply with one JSON object: the strength of each global grading operation "
    "(0 when the instruction does not ask for it): white_balance (neutralise a colour cast), "
    "exposure, warmth, contrast and saturation from -1 (less) to 1 (more), grayscale (black "
    "and white), sepia and vignette from 0 to 1; the output scale; whether the instruction "
    "needs a generative edit (a change of content or style that no grading can make: yes or "
    "no) and how strong it is; a short positive prompt describing the edited image and a "
    "short negative prompt listing what to avoid."
)
# Nearest to no change first: a value off the choices falls back to the first one allowed.
SIGNED_CHOICES = ("0", "0.25", "-0.25", "0.5", "-0.5", "1", "-1")
UNSIGNED_CHOICES = ("0", "0.25", "0.5", "0.75", "1")
EDIT_STRENGTH_CHOICES = ("0.25", "0.5", "0.75")


def grading_choices(mapped: dict[str, float] | None, forbidden: set[str]) -> tuple[tuple[str, ...], ...]:
    """Allowed strengths per grading operation (``GRADING_ORDER``), given the rules
    planner's reading of the instruction (None: it has none)."""
    out = []
    for name in GRADING_ORDER:
        choices: tuple[str, ...] = SIGNED_CHOICES if name in SIGNED_GRADING else UNSIGNED_CHOICES
        if name in forbidden:
            choices = ("0",)
        elif mapped and name in mapped:
            sign = 1 if mapped[name] > 0 else -1
            choices = tuple(c for c in choices if float(c) * sign > 0)
        out.append(choices)
    return tuple(out)


def edit_seed(instruction: str) -> int:
    """The generative edit's seed: the same instruction, the same seed."""
    return int.from_bytes(hashlib.sha256(instruction.encode()).digest()[:4], "big") % (MAX_SEED + 1)


class HFLLMPlanner(Planner):
    """Plans with a causal LM whose output is held to the plan's JSON template (``pipeline.constrained``)."""

    kind = "hf-llm"
    default_model = DEFAULT_MODEL

    def __init__(
        self,
        model: str | None = None,
        device: str = "cpu",
        settings: Settings | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        dtype: Any = None,
    ) -> None:
        super().__init__(model=model, device=device, settings=settings)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_id = model or DEFAULT_MODEL
        path = hf.load_path(self.model_id, "planner", self.kind)
        self.batch_size = batch_size
        self.dtype = dtype or hf.choose_dtype(device, self.settings.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"planner model {self.model_id!r} has no chat template")
        self.lm = hf.load_pretrained(AutoModelForCausalLM, path, self.model_id, "planner", dtype=self.dtype)
        self.lm.to(torch.device(device)).eval()
        self.eos_token_id = self._eos_id()
        self.rules = RulesPlanner()
        self._free_mask = self._make_free_mask()
        self._grammars: dict[tuple, Grammar] = {}

    @classmethod
    def check_available(cls, model: str | None) -> None:
        hf.require_model(model or DEFAULT_MODEL, "planner", cls.kind)

    # -- setup helpers

    def _eos_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            gen_eos = getattr(self.lm.generation_config, "eos_token_id", None)
            eos = gen_eos[0] if isinstance(gen_eos, (list, tuple)) else gen_eos
        if eos is None:
            raise ValueError(f"planner model {self.model_id!r} has no end-of-sequence token")
        return int(eos)

    def _make_free_mask(self) -> Any:
        """Tokens allowed inside a JSON string, over the model's output vocabulary."""
        return string_token_mask(self.tokenizer, int(self.lm.get_output_embeddings().weight.shape[0]))

    def _grammar(self, scale_choices: tuple[int, ...], op_choices: tuple[tuple[str, ...], ...]) -> Grammar:
        key = (scale_choices, op_choices)
        if key not in self._grammars:
            template: list[tuple] = [
                ("lit", '{"degradation": "'),
                ("choice", "degradation", list(DEGRADATIONS)),
                ("lit", '", '),
            ]
            for name, choices in zip(OPERATION_ORDER, op_choices, strict=True):
                template.append(("lit", f'"{name}": '))
                template.append(("choice", name, list(choices)))
                template.append(("lit", ", "))
            template.append(("lit", '"scale": '))
            template.append(("choice", "scale", [str(s) for s in scale_choices]))
            template.append(("lit", ', "prompt": "'))
            template.append(("free", "prompt", PROMPT_MAX_TOKENS))
            template.append(("lit", '", "negative_prompt": "'))
            template.append(("free", "negative_prompt", NEGATIVE_MAX_TOKENS))
            template.append(("lit", '"}'))
            self._grammars[key] = Grammar(self.tokenizer, merge_literals(template), self._free_mask)
        return self._grammars[key]

    def _edit_grammar(self, scale_choices: tuple[int, ...], choices: tuple[tuple[str, ...], ...]) -> Grammar:
        key = ("edit", scale_choices, choices)
        if key not in self._grammars:
            template: list[tuple] = [("lit", "{")]
            for name, allowed in zip(GRADING_ORDER, choices, strict=True):
                template += [("lit", f'"{name}": '), ("choice", name, list(allowed)), ("lit", ", ")]
            template += [
                ("lit", '"scale": '),
                ("choice", "scale", [str(s) for s in scale_choices]),
                ("lit", ', "generative": "'),
                ("choice", "generative", ["no", "yes"]),
                ("lit", '", "edit_strength": '),
                ("choice", "edit_strength", list(EDIT_STRENGTH_CHOICES)),
                ("lit", ', "prompt": "'),
                ("free", "prompt", PROMPT_MAX_TOKENS),
                ("lit", '", "negative_prompt": "'),
                ("free", "negative_prompt", NEGATIVE_MAX_TOKENS),
                ("lit", '"}'),
            ]
            self._grammars[key] = Grammar(self.tokenizer, merge_literals(template), self._free_mask)
        return self._grammars[key]

    # -- planning

    @staticmethod
    def _edit_constraints(options: JobOptions) -> tuple[tuple[int, ...], tuple[tuple[str, ...], ...]]:
        scales = _fixed_scale(options) or (1,)
        try:
            mapping = map_instruction(options.instruction, options.task)
        except UnmappableInstructionError:
            return scales, grading_choices(None, set())
        return scales, grading_choices({op.name: op.strength for op in mapping.grading}, mapping.forbidden)

    def _grammar_for(self, options: JobOptions) -> Grammar:
        if options.task in EDIT_TASKS:
            return self._edit_grammar(*self._edit_constraints(options))
        return self._grammar(*self._constraints(options))

    @staticmethod
    def _constraints(options: JobOptions) -> tuple[tuple[int, ...], tuple[tuple[str, ...], ...]]:
        fixed = _fixed_scale(options)
        if fixed:
            scales: tuple[int, ...] = fixed
        elif options.task == "upscale":
            scales = (2, 4)
        else:
            scales = (1,)
        requests, _, _ = instruction_requests(options.instruction)
        ops: list[tuple[str, ...]] = []
        for name in OPERATION_ORDER:
            wanted = requests.get(name)
            if wanted is False:
                ops.append(("0",))
            elif wanted is True:
                ops.append(tuple(c for c in STRENGTH_CHOICES if c != "0"))
            else:
                ops.append(STRENGTH_CHOICES)
        return scales, tuple(ops)

    def _user_message(self, description: Description, options: JobOptions, prior: Plan) -> str:
        lines = []
        if description.caption:
            lines.append(f"Caption: {description.caption}")
        lines.append(f"Measurements: {description.text}")
        est = []
        if description.noise_sigma is not None:
            est.append(f"noise sigma {description.noise_sigma:.1f}")
        if description.blur_sigma is not None:
            est.append(f"blur sigma {description.blur_sigma:.1f}")
        if description.jpeg_quality is not None:
            est.append(f"JPEG quality {description.jpeg_quality:.0f}")
        if est:
            lines.append("Estimates: " + ", ".join(est))
        ops = ", ".join(f"{op.name} {op.strength:.2f}" for op in prior.operations) or "none"
        lines.append(f"Rule-based suggestion: {ops}")
        lines.append(f"Task: {options.task}, {_size_text(options)}")
        lines.append(f"Instruction: {options.instruction.strip() or '(none)'}")
        return "\n".join(lines)

    def _prompt_text(self, description: Description, options: JobOptions, prior: Plan) -> str:
        messages = [
            {"role": "system", "content": EDIT_SYSTEM_PROMPT if options.task in EDIT_TASKS else SYSTEM_PROMPT},
            {"role": "user", "content": self._user_message(description, options, prior)},
        ]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not isinstance(text, str):  # tokenize=False renders text
            raise TypeError(f"chat template of {self.model_id!r} rendered {type(text).__name__}, not text")
        return text

    def _generate(self, prompts: Sequence[str], grammars: Sequence[Grammar]) -> list[str]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        enc = self.tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(self.lm.device) for k, v in enc.items()}
        proc = SchemaLogitsProcessor(grammars, self.eos_token_id)
        config = GenerationConfig(
            max_new_tokens=max(g.max_tokens for g in grammars),
            do_sample=False,
            num_beams=1,
            # Explicit neutral values: unset fields would be filled from the model's own
            # generation_config (Qwen's samples, with a repetition penalty).
            temperature=1.0,
            top_p=1.0,
            top_k=50,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        with torch.inference_mode():
            out = self.lm.generate(**enc, generation_config=config, logits_processor=LogitsProcessorList([proc]))
        new = out[:, enc["input_ids"].shape[1] :]
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)

    def _plan_batch(self, items: Sequence[tuple[Description, JobOptions, Plan]]) -> list[Plan | PlanningError]:
        prompts = [self._prompt_text(d, o, p) for d, o, p in items]
        grammars = [self._grammar_for(o) for _, o, _ in items]
        raws = self._generate(prompts, grammars)
        return [self._to_plan_or_error(raw, d, o, p) for raw, (d, o, p) in zip(raws, items, strict=True)]

    def _to_plan_or_error(
        self, raw: str, description: Description, options: JobOptions, prior: Plan
    ) -> Plan | PlanningError:
        try:
            if options.task in EDIT_TASKS:
                return self._to_edit_plan(raw, options, prior)
            return self._to_plan(raw, description, options, prior)
        except PlanningError as exc:
            return exc

    def plan(self, descriptions: Sequence[Description], options: Sequence[JobOptions]) -> list[Plan | PlanningError]:
        from pixelrelay.pipeline.tiling import map_batches_with_oom

        check_batch(descriptions, options, "descriptions/option sets")
        # The rules prior: restoration, estimates, format (an edit's grading is the LLM's).
        priors = [self.rules.plan_one(d, o, map_edit=False) for d, o in zip(descriptions, options, strict=True)]
        items = list(zip(descriptions, options, priors, strict=True))
        return map_batches_with_oom(self._plan_batch, items, self.batch_size, what="planner")

    def _to_plan(self, raw: str, description: Description, options: JobOptions, prior: Plan) -> Plan:
        """Map the constrained JSON onto a Plan; anything off-schema falls back to the prior."""
        scales, op_choices = self._constraints(options)
        data = _json_object(raw)
        if data is None:
            plan = prior.model_copy(deep=True)
            plan.raw = raw
            plan.rationale = f"LLM output unparseable, rule-based plan used; {prior.rationale}"
            return plan

        operations: list[Operation] = []
        for name, allowed in zip(OPERATION_ORDER, op_choices, strict=True):
            value = _as_choice(data.get(name), allowed)
            strength = float(value)
            if strength > 0:
                operations.append(Operation(name=name, strength=strength))
        scale = _scale_choice(data.get("scale"), scales)
        chosen = data.get("degradation")
        degradation = chosen if isinstance(chosen, str) and chosen in DEGRADATIONS else "clean"
        prompt = _clean_text(data.get("prompt")) or prior.prompt
        negative = _clean_text(data.get("negative_prompt")) or prior.negative_prompt
        summary = ", ".join(f"{op.name} {op.strength:g}" for op in operations) or "no operation"
        return Plan(
            operations=operations,
            scale=scale,  # type: ignore[arg-type]
            output_format=prior.output_format,
            prompt=prompt,
            negative_prompt=negative,
            noise_sigma=prior.noise_sigma,
            blur_sigma=prior.blur_sigma,
            jpeg_quality=prior.jpeg_quality,
            model=DEGRADATIONS[degradation],
            rationale=f"LLM ({self.model_id}): degradation {degradation}; {summary}; x{scale}",
            raw=raw,
            target=prior.target,  # the job's output target (pipeline.outsize), as the rules set it
        )

    def _to_edit_plan(self, raw: str, options: JobOptions, prior: Plan) -> Plan:
        """Map the constrained edit JSON onto a Plan; raises ``EmptyEditPlanError`` when it
        changes nothing."""
        scales, choices = self._edit_constraints(options)
        data = _json_object(raw) or {}
        grading = []
        for name, allowed in zip(GRADING_ORDER, choices, strict=True):
            strength = float(_as_choice(data.get(name), allowed))
            if strength != 0:
                grading.append(GradingOp(name=name, strength=strength))
        generative = None
        if data.get("generative") == "yes":
            prompt = _clean_text(data.get("prompt"), 500) or _clean_text(options.instruction, 500)
            generative = GenerativeEdit(
                prompt=prompt,
                negative_prompt=_clean_text(data.get("negative_prompt"), 500),
                strength=float(_as_choice(data.get("edit_strength"), ("0.5", "0.25", "0.75"))),
                seed=edit_seed(options.instruction),
            )
        if not grading and generative is None:
            raise EmptyEditPlanError(
                f"the plan has no edit operations: the LLM ({self.model_id}) mapped the instruction to no grading "
                "and no generative edit; rephrase it"
            )
        edit = Edit(grading=grading, generative=generative)
        scale = _scale_choice(data.get("scale"), scales)
        restoration = ", ".join(f"{op.name} {op.strength:g}" for op in prior.operations)
        return prior.model_copy(
            update={
                "scale": scale,
                "edit": edit,
                "raw": raw,
                "rationale": f"LLM ({self.model_id}): {options.task}: {edit.describe()}"
                + (f"; restoration as asked: {restoration}" if restoration else "")
                + f"; x{scale}",
            }
        )


def _fixed_scale(options: JobOptions) -> tuple[int, ...]:
    """The one native scale the plan may take when the job fixes its size (``--scale``,
    ``--width``/``--height``: the proposal of ``pipeline.outsize.planned``), else ()."""
    if options.scale is None and options.target() is None:
        return ()
    return (outsize.planned(options)[0],)


def _size_text(options: JobOptions) -> str:
    """The prompt's words for the output size ("scale x2", or "output x1.5" for a target size)."""
    if options.target() is None:
        return f"scale x{options.effective_scale()}"
    return f"output {outsize.describe(options)}"


def _json_object(raw: str) -> dict | None:
    """The planner's output as a JSON object, or None (logged). The grammar makes it one;
    the text is still never trusted blindly."""
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        log.warning("planner output not JSON (%s): %r", exc, raw[:200])
        return None
    return data


def _as_choice(value: Any, allowed: Sequence[str]) -> str:
    for choice in allowed:
        try:
            if value is not None and abs(float(value) - float(choice)) < 1e-9:
                return choice
        except (TypeError, ValueError):
            break
    return allowed[0]


def _scale_choice(value: Any, allowed: Sequence[int]) -> int:
    """The scale the LLM wrote, if ``allowed``; else the first allowed."""
    return int(value) if _is_int(value) and int(value) in allowed else allowed[0]


def _is_int(value: Any) -> bool:
    try:
        return float(value) == int(value)
    except (TypeError, ValueError):
        return False


def _clean_text(value: Any, limit: int = 300) -> str:
    if not isinstance(value, str):
        return ""
    return " ".join(value.split())[:limit].strip(" ,;")
