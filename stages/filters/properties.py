"""PropertyFilter: drop clips by duration, size, frame rate, aspect ratio or codec.

The properties come from the record when an earlier step measured them, else from probing the
file (with the record's clip window, so a clip's duration is the clip's):

1. `transcode` (ClipTranscoder, when `clip_file` is set): the clip file's width, height, fps;
2. `clip` (ShotSplitter): the clip's duration (num_frames / fps, or end_s - start_s) and fps;
3. `probe` (VideoProbe, `probe_key`): everything VideoProbe reports.

A record failing any limit becomes `Filtered`; its reason names each failing property, its value
and the limit, and its scores hold every property read, so a threshold can be revisited later.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from stages.base import FieldKind, Filtered, Stage, StageConfig, StageError
from stages.video.frames import CLIP_FILE_KEY, CLIP_KEY, clip_window, probe

PROPERTIES = ("duration_s", "width", "height", "fps", "codec")


class PropertyFilterConfig(StageConfig):
    min_duration_s: float | None = Field(None, ge=0, description="Drop clips shorter than this (seconds).")
    max_duration_s: float | None = Field(None, gt=0, description="Drop clips longer than this (seconds).")
    min_width: int | None = Field(None, ge=1, description="Drop videos narrower than this (pixels, as displayed).")
    min_height: int | None = Field(None, ge=1, description="Drop videos lower than this (pixels, as displayed).")
    min_fps: float | None = Field(None, gt=0, description="Drop videos below this frame rate.")
    max_fps: float | None = Field(None, gt=0, description="Drop videos above this frame rate.")
    aspect_ratio: tuple[float, float] | None = Field(
        None, description="[min, max] of width / height as displayed, e.g. [1.3, 1.8] keeps landscape 4:3 to 16:9."
    )
    codecs: list[str] | None = Field(None, min_length=1, description="Keep only these video codecs (h264, hevc, ...).")
    probe_key: str = Field("probe", description="Record field where VideoProbe wrote its result, if it ran.")

    @model_validator(mode="after")
    def _ranges(self):
        pairs = [
            ("min_duration_s", "max_duration_s"),
            ("min_fps", "max_fps"),
        ]
        for low, high in pairs:
            a, b = getattr(self, low), getattr(self, high)
            if a is not None and b is not None and a > b:
                raise ValueError(f"{low} {a} is above {high} {b}; no clip could pass")
        if self.aspect_ratio is not None and not 0 < self.aspect_ratio[0] <= self.aspect_ratio[1]:
            raise ValueError(f"aspect_ratio must be [min, max] with 0 < min <= max, got {list(self.aspect_ratio)}")
        return self

    def input_fields(self) -> dict[str, FieldKind]:
        return {self.video_key: "video"}


class PropertyFilter(Stage):
    """Passes a record on unchanged (`{}`) or drops it with the reasons."""

    registered_as = ("VideoFilter",)

    Config = PropertyFilterConfig
    config: PropertyFilterConfig

    def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError | Filtered]:
        results: list[dict[str, Any] | StageError | Filtered] = []
        for record in batch:
            try:
                facts = self.properties(record)
            except StageError as error:
                results.append(error)
                continue
            failures = self.failures(facts)
            results.append(Filtered("; ".join(failures), facts) if failures else {})
        return results

    def properties(self, record: dict[str, Any]) -> dict[str, Any]:
        """What this filter judges, from the record where it can, else from the file."""
        c = self.config
        facts: dict[str, Any] = {}
        measured = record.get(c.probe_key)
        if isinstance(measured, dict):
            facts.update({k: measured[k] for k in (*PROPERTIES, "rotation") if measured.get(k) is not None})
        clip = record.get(CLIP_KEY)
        if isinstance(clip, dict):
            facts.update(_clip_facts(clip))
        transcoded = record.get("transcode")
        if record.get(CLIP_FILE_KEY) and isinstance(transcoded, dict):
            facts.update({k: transcoded[k] for k in ("width", "height", "fps") if transcoded.get(k) is not None})
            facts.pop("rotation", None)  # the clip file is written upright
        if any(k not in facts for k in PROPERTIES):
            path = record.get(c.video_key)
            if path is None:
                raise StageError(
                    f"PropertyFilter: the record has no {c.video_key!r} field (video_key) and no {c.probe_key!r} "
                    f"result to read; fields: {sorted(k for k in record if not k.startswith('_'))}",
                    error_type="MissingField",
                )
            info = probe(path, clip_window(record)).as_dict()
            self.usage["probed"] += 1
            facts = {**{k: info[k] for k in (*PROPERTIES, "rotation")}, **facts}
        if round(facts.pop("rotation", 0) / 90) % 2 == 1:  # judge the size as displayed
            facts["width"], facts["height"] = facts["height"], facts["width"]
        facts["aspect_ratio"] = round(facts["width"] / facts["height"], 4) if facts.get("height") else None
        return {k: facts.get(k) for k in (*PROPERTIES, "aspect_ratio")}

    def failures(self, facts: dict[str, Any]) -> list[str]:
        c, out = self.config, []

        def below(name: str, limit, key: str) -> None:
            if limit is not None and facts[name] is not None and facts[name] < limit:
                out.append(f"{name} {facts[name]:g} is below {key} {limit:g}")

        def above(name: str, limit, key: str) -> None:
            if limit is not None and facts[name] is not None and facts[name] > limit:
                out.append(f"{name} {facts[name]:g} is above {key} {limit:g}")

        below("duration_s", c.min_duration_s, "min_duration_s")
        above("duration_s", c.max_duration_s, "max_duration_s")
        below("width", c.min_width, "min_width")
        below("height", c.min_height, "min_height")
        below("fps", c.min_fps, "min_fps")
        above("fps", c.max_fps, "max_fps")
        if c.aspect_ratio is not None and facts["aspect_ratio"] is not None:
            low, high = c.aspect_ratio
            if not low <= facts["aspect_ratio"] <= high:
                out.append(f"aspect_ratio {facts['aspect_ratio']:g} is outside aspect_ratio [{low:g}, {high:g}]")
        if c.codecs is not None and facts["codec"] not in c.codecs:
            out.append(f"codec {facts['codec']!r} is not in codecs {c.codecs}")
        return out


def _clip_facts(clip: dict[str, Any]) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    fps = clip.get("fps")
    if isinstance(fps, int | float) and fps > 0:
        facts["fps"] = round(float(fps), 3)
        if isinstance(clip.get("num_frames"), int):
            facts["duration_s"] = round(clip["num_frames"] / fps, 3)
    if "duration_s" not in facts and {"start_s", "end_s"} <= clip.keys():
        facts["duration_s"] = round(float(clip["end_s"]) - float(clip["start_s"]), 3)
    return facts
