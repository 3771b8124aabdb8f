"""DiffusersGenerator: the path every diffusers generator runs, written once.

load (the loading lock, the dependency and offload checks, from_pretrained, device placement)
-> prepare (each record's prompt and/or conditioning image) -> one pipeline call per batch, with
a seeded CPU generator per output -> each record's files written -> close (memory given back).

A generator's own file keeps what is specific to its pipeline: its config (its own keys and
checks, its defaults and notes for the shared keys of _config.py, the pipeline class it runs,
and in `call_keys` those of its own keys its pipeline takes under the same name: the key groups
of _config.py name theirs) and `call_args` (the arguments it takes otherwise), plus the hooks
its pipeline needs (`pipeline_components`, `after_load`, `frame_size`, `load_pipeline`,
`generate`). Every call gets
`prompt` and/or `image` (as the config's `needs_prompt`/`needs_image` say), `height`, `width`,
`num_inference_steps`, one generator per sample and `output_type`. The stage's name, in every
message, is its class name: written once, in its `class` line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from stages.base import MODEL_LOADING, RECORD_ID, Requirements, Stage, StageError, require
from stages.generators import _checkpoints as checkpoints
from stages.generators import _common as common
from stages.generators import _media as media
from stages.generators._common import PREPARED, GeneratorConfig, VideoGeneratorConfig


@dataclass(frozen=True)
class Samples:
    """The samples of one pipeline call: one per output asked for (`outputs_per_record` per
    record), each with its record's prepared inputs and the (record id, output index) its noise
    is seeded from.

    One sample per output, instead of num_videos_per_prompt, keeps every sample's noise tied to
    (seed, record id, index), which diffusers' own repetition does not for every pipeline.
    """

    inputs: list[dict[str, Any]]
    keys: list[tuple[Any, int]]
    seed: int

    @classmethod
    def of(cls, records: list[dict[str, Any]], count: int, seed: int) -> Samples:
        inputs = [record[PREPARED] for record in records for _ in range(count)]
        return cls(inputs, [(record.get(RECORD_ID), index) for record in records for index in range(count)], seed)

    def __len__(self) -> int:
        return len(self.inputs)

    def generators(self, salt: str = ""):
        """A seeded CPU generator per sample; another `salt` gives another, independent draw."""
        return common.cpu_generators(common.record_seed(self.seed, f"{rid}{salt}", index) for rid, index in self.keys)

    def each(self, value: Any) -> list | None:
        """`value` once per sample (a per-prompt argument such as negative_prompt); None when unset.
        An empty string is passed on: it is Allegro's only "no negative prompt" (None fails there)."""
        return None if value is None else [value] * len(self.inputs)


class DiffusersGenerator(Stage):
    """One resident diffusers pipeline; subclasses set `Config` and say what their pipeline takes."""

    Config: ClassVar[type[GeneratorConfig]] = GeneratorConfig
    accelerated = True  # one resident pipeline per GPU
    half_dtype: ClassVar[str] = "bfloat16"  # what `dtype: auto` loads on a GPU: the model's recommended one
    deprecated: ClassVar[bool] = False  # diffusers deprecated the pipeline (no fixes) but it still runs
    vae_switches: ClassVar[bool] = True  # enable_vae_tiling / enable_vae_slicing apply to the model's VAE

    @classmethod
    def requirements(cls, config: GeneratorConfig) -> Requirements:
        return Requirements.of("generators", "torch", "diffusers", "transformers", model_path=config.model_path)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "Config" in cls.__dict__:  # the config's checks name the stage in their messages
            cls.Config.stage = cls.__name__

    @property
    def name(self) -> str:
        return type(self).__name__

    # --- hooks a generator overrides where its pipeline needs it ---------------------------------

    def pipeline_components(self, dtype) -> dict[str, Any]:
        """Sub-models loaded on their own and handed to from_pretrained."""
        return {}

    def after_load(self) -> None:
        """Checks and fixes on the pipeline just loaded, before it moves to its device."""

    def frame_size(self) -> tuple[int, int]:
        """(height, width) of the output, and of the conditioning image it is cropped to."""
        return self.config.height, self.config.width

    def call_args(self, samples: Samples) -> dict[str, Any]:
        """The pipeline's arguments that are not a config key under the same name."""
        return {}

    # --- load / close ----------------------------------------------------------------------------

    def load(self) -> None:
        with MODEL_LOADING:  # loading is not thread-safe: the process's one model-loading lock
            require("diffusers", stage=self.name, extra="generators")
            config = self.config
            common.check_offload(config, self.device, self.name)
            if self.deprecated:
                common.log_once(
                    f"{self.name}.deprecated", f"{self.name}: diffusers has deprecated {config.pipeline}; it still runs"
                )
            self.pipe = self.load_pipeline(common.torch_dtype(config.dtype, self.device, self.half_dtype))
            if isinstance(config, common.ClipSkip):
                common.clip_text_model_shim(self.pipe.text_encoder)
            self.after_load()
            common.place(self.pipe, config, self.device)
            self.knobs = common.Knobs(self.pipe, self.name)

    def load_pipeline(self, dtype):
        """The config's pipeline from `model_path`, once the checkpoint is known to hold it."""
        config = self.config
        checkpoints.ensure_pipeline_class(config.model_path, [config.pipeline], self.name)
        return self.from_pretrained(config.pipeline, config.model_path, dtype, **self.pipeline_components(dtype))

    def from_pretrained(self, pipeline: str, path: str, dtype, **components):
        kwargs = common.pretrained_kwargs(self.config, dtype)
        return common.diffusers_class(pipeline, path).from_pretrained(path, **kwargs, **components)

    def close(self) -> None:
        self.pipe = self.knobs = None
        common.release(self.device)

    # --- records ---------------------------------------------------------------------------------

    def prepare(self, record: dict[str, Any]) -> dict[str, Any]:
        config = self.config
        inputs: dict[str, Any] = {}
        if config.needs_image:
            height, width = self.frame_size()
            inputs["image"] = media.fit_image(common.load_image(record, config.image_key, self.name), width, height)
        if config.needs_prompt:
            inputs["prompt"] = common.prompt_of(record, config, self.name)
        return {**record, PREPARED: inputs}

    def process(self, batch: list[dict[str, Any]]) -> list[dict[str, Any] | StageError]:
        """prepare (unless the runtime already did) -> one pipeline call for the batch -> write each record.

        A record that fails in prepare gets a StageError in its slot; a failing pipeline call
        raises, so the runtime can retry record by record (and halve the batch on out-of-memory).
        A file that cannot be written raises too: the runtime's failure contract tells a full
        disk (transient: the batch is asked again once there is space, no record is failed)
        from the record's own bad path (that record fails, alone).
        """
        results: list[dict[str, Any] | StageError | None] = [None] * len(batch)
        ready: list[tuple[int, dict[str, Any]]] = []
        for slot, record in enumerate(batch):
            try:
                ready.append((slot, record if PREPARED in record else self.prepare(record)))
            except StageError as error:
                results[slot] = error
        if ready:
            outputs = self._generate([record for _, record in ready])
            for (slot, record), produced in zip(ready, outputs, strict=True):
                try:
                    results[slot] = self._write(record, produced)
                except StageError as error:
                    results[slot] = error
                except OSError as exc:
                    if exc.errno is None:
                        raise
                    # The same errno (what the runtime classifies by), saying what was being written.
                    why = f"cannot write the generated file: {exc.strerror}"
                    raise OSError(exc.errno, why, exc.filename, None, exc.filename2) from exc
        return results  # type: ignore[return-value]

    def _generate(self, records: list[dict[str, Any]]) -> list[list]:
        """Prepared records -> per record, the list of its outputs (uint8 frames or image), in order."""
        config = self.config
        switches = (config.enable_vae_tiling, config.enable_vae_slicing) if self.vae_switches else (None, None)
        self.knobs.sync(config.scheduler, config.scheduler_config, *switches)  # hot reload may change them
        count = config.outputs_per_record()
        outputs = list(self.generate(Samples.of(records, count, config.seed)))
        return [outputs[start : start + count] for start in range(0, len(outputs), count)]

    def generate(self, samples: Samples) -> list:
        """One pipeline call -> a uint8 array per sample."""
        output = self.pipe(**self.pipeline_args(samples), generator=samples.generators(), output_type="np")
        return media.to_uint8(output.frames if isinstance(self.config, VideoGeneratorConfig) else output.images)

    def pipeline_args(self, samples: Samples) -> dict[str, Any]:
        config = self.config
        height, width = self.frame_size()
        args: dict[str, Any] = {}
        if config.needs_image:  # cropped again: a hot reload may have changed the size since prepare
            args["image"] = [media.fit_image(inputs["image"], width, height) for inputs in samples.inputs]
        if config.needs_prompt:
            args["prompt"] = [inputs["prompt"] for inputs in samples.inputs]
        args |= {"height": height, "width": width, "num_inference_steps": config.num_inference_steps}
        args |= {key: getattr(config, key) for key in config.pipeline_keys("call_keys")}
        args |= {key: samples.each(getattr(config, key)) for key in config.pipeline_keys("per_sample_keys")}
        return args | self.call_args(samples)

    def _write(self, record: dict[str, Any], outputs: list) -> dict[str, Any]:
        config = self.config
        video = isinstance(config, VideoGeneratorConfig)
        key = config.output_key or (config.video_key if video else config.image_key)
        paths = media.output_paths(
            record, "mp4" if video else "png", config.filename, len(outputs), _tag(config, video)
        )
        for output, path in zip(outputs, paths, strict=True):
            if video:
                media.write_video(output, path, config.fps)  # each video config declares its fps
                self.usage["generated_frames"] += len(output)
            else:
                media.write_png(output, path)
                self.usage["generated_frames"] += 1
        return {key: paths[0] if len(paths) == 1 else paths}


def _tag(config: GeneratorConfig, video: bool) -> str | None:
    """Without a `filename`, a step writing under an output_key of its own names its files
    `<id>~<output_key>` (so two generator steps of a pipeline do not overwrite each other's
    `<id>.mp4`); None when it writes the default key, or names its files itself."""
    if config.filename is None and config.output_key not in (None, config.video_key if video else config.image_key):
        return config.output_key
    return None
