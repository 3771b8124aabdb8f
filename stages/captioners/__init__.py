"""Video captioning stages (`type: VideoCaptioner`): Qwen2-VL / Qwen2.5-VL, LLaVA-NeXT-Video, LLaVA-OneVision.

Shared flow and config in `common`, the two backends in `stages/engines/hf_vision.py` and `vllm_backend`,
one module per model family.
"""
