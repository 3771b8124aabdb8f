"""The transformers backend of the video captioners (stages/captioners/): one resident model per device.

`encode` runs the model's own processor on frames that are already decoded and sampled
(the processor never decodes or samples a video itself) and is meant for the runtime's
prepare threads; each thread gets its own copy of the processor, since a fast tokenizer
must not be called from two threads at once. `generate` left-pads a batch of encoded
records, calls `model.generate` once under `torch.inference_mode()` and decodes only the
new tokens.

Loading goes only through `AutoProcessor.from_pretrained` and
`AutoModelForImageTextToText.from_pretrained`, so a local folder and a hub id load the same way.
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass
from typing import Any

from stages.base import require
from stages.engines import Generation, sampling_rng, torch_dtype

log = logging.getLogger(__name__)

# Processor outputs that are per-token rows, padded on the left with these values.
_TOKEN_ROWS = {"input_ids": None, "attention_mask": 0, "mm_token_type_ids": 0, "token_type_ids": 0}


@dataclass(frozen=True)
class CaptionSampling:
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    seed: int | None = None
    # A JSON Schema the answer must match: vLLM constrains decoding to it; transformers cannot,
    # so the captioner checks and re-samples (stages/captioners/structured.py).
    json_schema: dict | None = None


class TransformersVideoLM:
    """A processor plus a resident `AutoModelForImageTextToText` on one device."""

    def __init__(self, model_path: str, device: str, dtype: str, trust_remote_code: bool, stage: str):
        self.model_path = model_path
        self.device = single_device(device, stage)
        self.dtype_name = dtype
        self.trust_remote_code = trust_remote_code
        self.stage = stage
        self.processor: Any = None
        self.model: Any = None
        self._local = threading.local()
        self._copy_lock = threading.Lock()
        # One generate at a time on this model: the runtime may have several batches of an
        # async stage in flight (max_num_seqs / batch_size), and they queue here.
        self._generate_lock = threading.Lock()

    def load_processor(self) -> None:
        require("torch", stage=self.stage, extra="captioners")
        transformers = require("transformers", stage=self.stage, extra="captioners")
        require("torchvision", stage=self.stage, extra="captioners")  # the video processors need it
        self.processor = transformers.AutoProcessor.from_pretrained(
            self.model_path, trust_remote_code=self.trust_remote_code
        )

    def load(self) -> None:
        """The processor, then the model, resident on `device`."""
        import transformers

        self.load_processor()
        dtype = torch_dtype(self.dtype_name, self.device)
        model = transformers.AutoModelForImageTextToText.from_pretrained(
            self.model_path, dtype=dtype, trust_remote_code=self.trust_remote_code
        )
        self.model = model.to(self.device).eval()
        self.dtype = dtype
        tokenizer = self.processor.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stop_ids = _stop_ids(self.model, tokenizer)
        log.info("%s: loaded %s on %s as %s (transformers)", self.stage, self.model_path, self.device, dtype)

    def thread_processor(self):
        """This thread's own copy of the processor (fast tokenizers are not re-entrant)."""
        mine = getattr(self._local, "processor", None)
        if mine is None:
            with self._copy_lock:
                mine = self._local.processor = copy.deepcopy(self.processor)
        return mine

    def encode(self, text: str, frames, metadata: dict, processor_kwargs: dict) -> dict:
        """Processor outputs (CPU tensors, batch of one) for one prompt and its sampled frames."""
        processor = self.thread_processor()
        encoded = processor(
            text=[text],
            videos=[frames],
            video_metadata=[metadata],
            do_sample_frames=False,
            return_tensors="pt",
            **processor_kwargs,
        )
        return dict(encoded)

    def generate(self, encoded: list[dict], sampling: CaptionSampling) -> list[Generation]:
        """Caption each encoded record; one Generation per record, in order.

        Records whose vision tensors cannot be stacked (e.g. LLaVA videos with different
        frame counts) are generated in separate sub-batches.
        """
        results: list[Generation | None] = [None] * len(encoded)
        with self._generate_lock:
            for group in _shape_groups(encoded):
                outputs = self._generate_group([encoded[i] for i in group], sampling)
                for index, result in zip(group, outputs, strict=True):
                    results[index] = result
        return results  # type: ignore[return-value]

    def _generate_group(self, encoded: list[dict], sampling: CaptionSampling) -> list[Generation]:
        import torch

        inputs = _collate(encoded, self.pad_id)
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor):
                # Only pixels follow the model's dtype; timing values (second_per_grid_ts) keep theirs.
                dtype = self.dtype if key.startswith("pixel_values") else None
                inputs[key] = value.to(self.device, dtype=dtype)
        options: dict[str, Any] = {"max_new_tokens": sampling.max_new_tokens, "pad_token_id": self.pad_id}
        if sampling.temperature > 0:
            options.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
            options["top_k"] = sampling.top_k if sampling.top_k > 0 else None
        else:
            options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if sampling.repetition_penalty != 1.0:
            options["repetition_penalty"] = sampling.repetition_penalty
        if not options["do_sample"]:  # greedy: no random draws, no lock
            with torch.inference_mode():
                output = self.model.generate(**inputs, **options)
        else:
            output = self._sample(inputs, options, sampling.seed)
        new_tokens = output[:, inputs["input_ids"].shape[1] :].cpu()
        counts = [_generated_length(row.tolist(), self.stop_ids) for row in new_tokens]
        texts = self.processor.batch_decode(
            [row[:count] for row, count in zip(new_tokens, counts, strict=True)], skip_special_tokens=True
        )
        prompt_lengths = [int(record["input_ids"].shape[1]) for record in encoded]
        return [
            Generation([text.strip()], n, count) for text, count, n in zip(texts, counts, prompt_lengths, strict=True)
        ]

    def _sample(self, inputs: dict, options: dict, seed: int | None):
        import torch

        with sampling_rng(self.device, seed), torch.inference_mode():
            return self.model.generate(**inputs, **options)

    def close(self) -> None:
        self.model = None
        self.processor = None
        try:
            import torch

            if self.device.startswith("cuda") and torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass


def single_device(device: str, stage: str) -> str:
    """transformers keeps the whole model on one device: a tensor-parallel group uses its first GPU."""
    first = device.split(",")[0].strip()
    if first != device:
        log.warning(
            "%s: tensor_parallel_size applies to the vLLM backend; the transformers backend runs the "
            "model on %s only (of %s). Use devices: [...] with tensor_parallel_size: 1 for one model per GPU",
            stage,
            first,
            device,
        )
    return first


def _stop_ids(model, tokenizer) -> set[int]:
    stops: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            stops.add(value)
        elif isinstance(value, list | tuple):
            stops.update(v for v in value if isinstance(v, int))
    return stops


def _generated_length(tokens: list[int], stop_ids: set[int]) -> int:
    """Tokens up to and including the first stop token (the rest is padding)."""
    for position, token in enumerate(tokens):
        if token in stop_ids:
            return position + 1
    return len(tokens)


def _vision_signature(record: dict) -> tuple:
    return tuple(
        (key, tuple(value.shape[1:]))
        for key, value in sorted(record.items())
        if key not in _TOKEN_ROWS and hasattr(value, "shape")
    )


def _shape_groups(encoded: list[dict]) -> list[list[int]]:
    groups: dict[tuple, list[int]] = {}
    for index, record in enumerate(encoded):
        groups.setdefault(_vision_signature(record), []).append(index)
    return list(groups.values())


def _collate(encoded: list[dict], pad_id: int) -> dict:
    """Left-pad the token rows; concatenate everything else along its first dimension."""
    import torch

    width = max(record["input_ids"].shape[1] for record in encoded)
    batch: dict[str, Any] = {}
    for key in encoded[0]:
        values = [record[key] for record in encoded]
        if not isinstance(values[0], torch.Tensor):
            batch[key] = values[0] if len(values) == 1 else values
        elif key in _TOKEN_ROWS:
            fill = pad_id if _TOKEN_ROWS[key] is None else _TOKEN_ROWS[key]
            batch[key] = torch.cat(
                [torch.nn.functional.pad(value, (width - value.shape[1], 0), value=fill) for value in values]
            )
        else:
            batch[key] = torch.cat(values)
    return batch
