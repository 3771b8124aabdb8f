"""Which class runs a step: `(type, name)` as the config names it -> "module:Class".

Modules are imported on first use, not at `import stages`, so `reelflow check` and the
daemon's start-up stay fast and a missing optional dependency only matters to the step
that needs it. Third-party stages register through the `reelflow.stages` entry-point
group, named "Type.Name" with the value "module:Class".

For stages that live outside any installed package (tests, quick experiments), the
environment variable `REELFLOW_EXTRA_STAGES` adds more, comma-separated, in the same form:
`REELFLOW_EXTRA_STAGES="Test.SlowEcho=tests.stages_for_tests:SlowEcho,Test.Echo=mymod:Echo"`.
"""

from __future__ import annotations

import difflib
import importlib
import os
from importlib.metadata import entry_points

from stages.base import Stage

# One line per stage (and per alias the seed's tables use).
BUILTIN_STAGES: dict[tuple[str, str], str] = {
    ("VideoProcessor", "VideoProbe"): "stages.video.probe:VideoProbe",
    ("VideoProcessor", "FrameSampler"): "stages.video.sampler:FrameSampler",
    ("VideoProcessor", "ShotSplitter"): "stages.video.shot_splitter:ShotSplitter",
    ("VideoProcessor", "ClipTranscoder"): "stages.video.clip_transcoder:ClipTranscoder",
    ("VideoFilter", "MotionFilter"): "stages.filters.motion:MotionFilter",
    ("VideoFilter", "PropertyFilter"): "stages.filters.properties:PropertyFilter",
    ("VideoFilter", "NearDuplicateFilter"): "stages.filters.near_duplicate:NearDuplicateFilter",
    ("VideoFilter", "AestheticFilter"): "stages.filters.aesthetic:AestheticFilter",
    ("VideoEmbedder", "CLIPEmbedder"): "stages.embedders.clip:CLIPEmbedder",
    ("ImageGenerator", "FLUXGenerator"): "stages.generators.flux:FLUXGenerator",
    ("VideoGenerator", "FLUXGenerator"): "stages.generators.flux:FLUXGenerator",
    ("ImageGenerator", "StableDiffusionGenerator"): "stages.generators.sd3:StableDiffusionGenerator",
    ("ImageGenerator", "StableDiffusion3Generator"): "stages.generators.sd3:StableDiffusionGenerator",
    ("VideoGenerator", "StableDiffusionGenerator"): "stages.generators.sd3:StableDiffusionGenerator",
    ("VideoGenerator", "AllegroGenerator"): "stages.generators.allegro:AllegroGenerator",
    ("VideoGenerator", "AnimateDiffGenerator"): "stages.generators.animatediff:AnimateDiffGenerator",
    ("VideoGenerator", "CogVideoXT2VGenerator"): "stages.generators.cogvideox_t2v:CogVideoXT2VGenerator",
    ("VideoGenerator", "CogVideoXGenerator"): "stages.generators.cogvideox_i2v:CogVideoXGenerator",
    ("VideoGenerator", "I2VGenXLGenerator"): "stages.generators.i2vgen_xl:I2VGenXLGenerator",
    ("VideoGenerator", "ModelScopeT2VGenerator"): "stages.generators.modelscope_t2v:ModelScopeT2VGenerator",
    ("VideoGenerator", "SVDGenerator"): "stages.generators.svd:SVDGenerator",
    ("TextGenerator", "GPTTextGenerator"): "stages.text.gpt:GPTTextGenerator",
    ("TextGenerator", "LocalModelGenerator"): "stages.text.local_model:LocalModelGenerator",
    ("TextGenerator", "APIGenerator"): "stages.text.api_generator:APIGenerator",
    ("VideoCaptioner", "Qwen2VLCaptioner"): "stages.captioners.qwen2vl:Qwen2VLCaptioner",
    ("VideoCaptioner", "QwenVLCaptioner"): "stages.captioners.qwen2vl:Qwen2VLCaptioner",
    ("VideoCaptioner", "LLaVANeXTVideoCaptioner"): "stages.captioners.llava_next_video:LLaVANeXTVideoCaptioner",
    ("VideoCaptioner", "LLaVAOVCaptioner"): "stages.captioners.llava_onevision:LLaVAOVCaptioner",
}

ENTRY_POINT_GROUP = "reelflow.stages"
EXTRA_STAGES_ENV = "REELFLOW_EXTRA_STAGES"


class UnknownStage(LookupError):
    pass


def known_stages() -> dict[tuple[str, str], str]:
    found = dict(BUILTIN_STAGES)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        step_type, _, name = entry.name.partition(".")
        if name:
            found.setdefault((step_type, name), entry.value)
    for item in filter(None, (part.strip() for part in os.environ.get(EXTRA_STAGES_ENV, "").split(","))):
        label, _, target = item.partition("=")
        step_type, _, name = label.strip().partition(".")
        if not (name and ":" in target):
            raise UnknownStage(
                f"{EXTRA_STAGES_ENV}: cannot read {item!r}; expected Type.Name=module:Class, comma-separated"
            )
        found.setdefault((step_type, name), target.strip())
    return found


def stage_class(step_type: str, name: str) -> type[Stage]:
    stages = known_stages()
    target = stages.get((step_type, name))
    if target is None:
        raise UnknownStage(_unknown_message(step_type, name, stages))
    module_name, _, class_name = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, class_name)


def _unknown_message(step_type: str, name: str, stages: dict[tuple[str, str], str]) -> str:
    labels = [f"{t}/{n}" for t, n in sorted(stages)]
    guess = difflib.get_close_matches(f"{step_type}/{name}", labels, n=1, cutoff=0.5)
    hint = f" Did you mean {guess[0]}?" if guess else ""
    return f"no stage registered as type {step_type!r}, name {name!r}.{hint} Available: {', '.join(labels)}"
