"""Video captioning stages (`type: VideoCaptioner`): Qwen2-VL / Qwen2.5-VL, LLaVA-NeXT-Video, LLaVA-OneVision.

Shared flow and config in `common`, the two backends in `hf_backend` and `vllm_backend`,
one module per model family.
"""
