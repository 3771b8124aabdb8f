"""Tiny random-weight diffusers pipelines for the nine generators, built offline from config objects.

Each builder returns a pipeline (or, for AnimateDiff, a base pipeline and a motion adapter) whose
shapes follow the real model's wiring but whose weights are random and small (< ~10 MB). The
tests save them with `save_pretrained` and load them back through the stage's real
`from_pretrained` path. Tokenizers are made here too: a CLIP tokenizer from a byte-level
`vocab.json` (no merges: every character is a token) and a T5 tokenizer from a sentencepiece
unigram model trained on the spot.

Sizes the tiny models expect (the tests use these):
- FLUX / SD3: images whose sides are multiples of 16 (the real models' rule).
- CogVideoX (T2V and I2V): frames 8k+1, sides multiples of 16; the I2V model's trained
  resolution is 16x16.
- Allegro: the VAE decodes in tiles of 24 frames x 128 px (sample_size 128), so 24 frames at 128x128.
- AnimateDiff / ModelScope / I2VGen-XL / SVD: sides multiples of 8.
"""

from __future__ import annotations

from pathlib import Path

from daemon.demo.tiny_diffusers import (  # shared with `reelflow demo`
    clip_text,
    clip_tokenizer,
    modelscope_t2v,
    sd_scheduler,
    sd_vae,
)
from daemon.demo.tiny_tokenizer import CORPUS

T5_D_MODEL = 32  # T5 width shared by every tiny model that uses T5

ALLEGRO_VAE_SAMPLE_SIZE = 128
COGVIDEOX_I2V_SIZE = 16


# --- tokenizers ------------------------------------------------------------------------------


def t5_tokenizer(folder: Path):
    """A T5Tokenizer from a sentencepiece unigram model trained on the tiny corpus (pad 0, eos 1, unk 2; 80 pieces)."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    prefix = folder / "spiece"
    if not prefix.with_suffix(".model").exists():
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(CORPUS),
            model_prefix=str(prefix),
            vocab_size=80,
            hard_vocab_limit=False,
            model_type="unigram",
            normalization_rule_name="identity",
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            character_coverage=1.0,
            minloglevel=2,
        )
    return T5Tokenizer(vocab_file=str(prefix.with_suffix(".model")), extra_ids=0)


T5_VOCAB = 128  # >= the sentencepiece vocabulary (80)


def _t5_encoder(d_model: int = T5_D_MODEL):
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=T5_VOCAB,
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def _clip_vision(hidden: int, image_size: int, patch_size: int, projection_dim: int):
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=hidden,
        projection_dim=projection_dim,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        intermediate_size=16,
        patch_size=patch_size,
    )
    processor = CLIPImageProcessor(crop_size=image_size, size=image_size)
    return CLIPVisionModelWithProjection(config), processor


# --- pipelines -------------------------------------------------------------------------------


def flux(work: Path):
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=(4, 4),
        layers_per_block=1,
        latent_channels=2,
        norm_num_groups=1,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * 2,  # 4 x VAE latent channels (2x2 packing)
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_D_MODEL,
        pooled_projection_dim=32,  # CLIP hidden size
        axes_dims_rope=[4, 4, 8],
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=clip_text(32),
        tokenizer=clip_tokenizer(work / "clip"),
        text_encoder_2=_t5_encoder(),
        tokenizer_2=t5_tokenizer(work / "t5"),
        transformer=transformer,
    )


def sd3(work: Path):
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=(4, 4),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=T5_D_MODEL,  # T5 width >= the two CLIP widths together (16 + 16)
        pooled_projection_dim=32,  # the two CLIP projections together
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=clip_text(16, with_projection=True, projection_dim=16),
        tokenizer=clip_tokenizer(work / "clip"),
        text_encoder_2=clip_text(16, with_projection=True, projection_dim=16),
        tokenizer_2=clip_tokenizer(work / "clip2"),
        text_encoder_3=_t5_encoder(),
        tokenizer_3=t5_tokenizer(work / "t5"),
    )


def allegro(work: Path):
    import torch
    from diffusers import AllegroPipeline, AllegroTransformer3DModel, AutoencoderKLAllegro, DDIMScheduler

    torch.manual_seed(0)
    transformer = AllegroTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        cross_attention_dim=24,
        sample_width=16,
        sample_height=16,
        sample_frames=6,
        caption_channels=T5_D_MODEL,
    )
    torch.manual_seed(0)
    vae = AutoencoderKLAllegro(
        in_channels=3,
        out_channels=3,
        down_block_types=("AllegroDownBlock3D",) * 4,
        up_block_types=("AllegroUpBlock3D",) * 4,
        block_out_channels=(4, 4, 4, 4),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
        sample_size=ALLEGRO_VAE_SAMPLE_SIZE,
    )
    return AllegroPipeline(
        tokenizer=t5_tokenizer(work / "t5"),
        text_encoder=_t5_encoder(),
        vae=vae,
        transformer=transformer,
        scheduler=DDIMScheduler(),
    )


def animatediff_base(work: Path):
    """A Stable Diffusion 1.5-shaped base pipeline (what `emilianJR/epiCRealism` is)."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 8),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=2,
    )
    return StableDiffusionPipeline(
        vae=sd_vae(),
        text_encoder=clip_text(8),
        tokenizer=clip_tokenizer(work / "clip"),
        unet=unet,
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def motion_adapter():
    """A MotionAdapter matching `animatediff_base` (block_out_channels (8, 8))."""
    import torch
    from diffusers import MotionAdapter

    torch.manual_seed(0)
    return MotionAdapter(
        block_out_channels=(8, 8),
        motion_layers_per_block=1,
        motion_norm_num_groups=2,
        motion_num_attention_heads=2,
        motion_max_seq_length=32,
    )


def _cogvideox_vae():
    import torch
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(0)
    return AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )


def cogvideox_t2v(work: Path):
    import torch
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,  # a multiple of 16 (3D sincos / rotary embeddings)
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=T5_D_MODEL,
        num_layers=1,
        sample_width=2,
        sample_height=2,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=16,
    )
    return CogVideoXPipeline(
        tokenizer=t5_tokenizer(work / "t5"),
        text_encoder=_t5_encoder(),
        vae=_cogvideox_vae(),
        transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(),
    )


def cogvideox_i2v(work: Path):
    import torch
    from diffusers import CogVideoXDDIMScheduler, CogVideoXImageToVideoPipeline, CogVideoXTransformer3DModel

    latent = COGVIDEOX_I2V_SIZE // 8
    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=8,  # noise + image latents
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=T5_D_MODEL,
        num_layers=1,
        sample_width=latent,
        sample_height=latent,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=16,
        use_rotary_positional_embeddings=True,
        use_learned_positional_embeddings=True,  # as CogVideoX-5b-I2V: one trained resolution
    )
    return CogVideoXImageToVideoPipeline(
        tokenizer=t5_tokenizer(work / "t5"),
        text_encoder=_t5_encoder(),
        vae=_cogvideox_vae(),
        transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(),
    )


def i2vgen_xl(work: Path):
    import torch
    from diffusers import DDIMScheduler, I2VGenXLPipeline, I2VGenXLUNet

    torch.manual_seed(0)
    unet = I2VGenXLUNet(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=4,
        attention_head_dim=4,
        num_attention_heads=None,
        norm_num_groups=2,
    )
    image_encoder, feature_extractor = _clip_vision(hidden=4, image_size=32, patch_size=4, projection_dim=4)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False
    )
    return I2VGenXLPipeline(
        vae=sd_vae(),
        text_encoder=clip_text(4),
        tokenizer=clip_tokenizer(work / "clip"),
        image_encoder=image_encoder,
        feature_extractor=feature_extractor,
        unet=unet,
        scheduler=scheduler,
    )


def svd(work: Path):
    import torch
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )

    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 32),  # the spatio-temporal blocks use 32 norm groups
        layers_per_block=1,
        sample_size=16,
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=8,
        num_attention_heads=2,
        projection_class_embeddings_input_dim=3 * 8,
        addition_time_embed_dim=8,
        num_frames=4,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        interpolation_type="linear",
        num_train_timesteps=1000,
        prediction_type="v_prediction",
        sigma_max=700.0,
        sigma_min=0.002,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
        use_karras_sigmas=True,
    )
    torch.manual_seed(0)
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=[32, 32],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        latent_channels=4,
        layers_per_block=1,
    )
    # SVD resizes the conditioning image to 224x224 for CLIP, so the vision model must take 224.
    image_encoder, feature_extractor = _clip_vision(hidden=8, image_size=224, patch_size=32, projection_dim=8)
    return StableVideoDiffusionPipeline(
        vae=vae, image_encoder=image_encoder, unet=unet, scheduler=scheduler, feature_extractor=feature_extractor
    )


BUILDERS = {
    "flux": flux,
    "sd3": sd3,
    "allegro": allegro,
    "animatediff_base": animatediff_base,
    "cogvideox_t2v": cogvideox_t2v,
    "cogvideox_i2v": cogvideox_i2v,
    "i2vgen_xl": i2vgen_xl,
    "modelscope_t2v": modelscope_t2v,
    "svd": svd,
}


def save_tiny(name: str, dest: Path, work: Path | None = None, **save_kwargs) -> Path:
    """Build tiny pipeline `name` (a BUILDERS key, or "motion_adapter") and save it to `dest`."""
    work = work or dest.parent / f".{dest.name}-tokenizers"
    model = motion_adapter() if name == "motion_adapter" else BUILDERS[name](work)
    model.save_pretrained(str(dest), **save_kwargs)
    return dest


def place_in_hub_cache(folder: Path, hub_home: Path, repo_id: str, revision: str = "0" * 40) -> Path:
    """Copy a saved model into a hub cache layout (`hub/models--org--name/snapshots/<sha>` + `refs/main`).

    With `HF_HOME=hub_home` and `HF_HUB_OFFLINE=1`, `from_pretrained(repo_id)` loads it by its hub id.
    """
    import shutil

    repo = hub_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    if snapshot.exists():
        shutil.rmtree(snapshot)
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot
