"""Small configurations of every supported model family, with matching example inputs.

Used by the tests, `ditopt inspect` and the benchmarks.  Weights are random
(seeded); for quality figures use the trained fixture (ditopt.harness.fixture).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

FAMILIES = ("cogvideox", "wan", "hunyuanvideo", "ltx", "mochi", "latte", "pixart", "dit", "stdit")
SIZES = ("tiny", "mid")
MID_FAMILIES = ("cogvideox", "pixart")  # mid: benchmark sizes (thousands of tokens, 8 blocks of width 512)


@dataclass
class ModelCase:
    """A model and a way to make its inputs for a batch size and seed."""

    family: str
    model: torch.nn.Module
    make_inputs: Callable[[int, int], dict]

    def inputs(self, batch: int = 1, seed: int = 0) -> dict:
        return self.make_inputs(batch, seed)


def call(model, inputs: dict) -> torch.Tensor:
    """Run a zoo model on its inputs and return the output tensor, whatever the family's return type."""
    out = model(**inputs)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return getattr(out, "sample", out)


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen)


def build(family: str, size: str = "tiny", seed: int = 0) -> ModelCase:
    """A `size` model of `family` (see FAMILIES, SIZES), in eval mode with seeded weights."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {list(FAMILIES)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {list(SIZES)}")
    if size == "mid" and family not in MID_FAMILIES:
        raise ValueError(f"size 'mid' exists for families {list(MID_FAMILIES)} only")
    torch.manual_seed(seed)
    model, make = _BUILDERS[family](size)
    return ModelCase(family, model.eval(), make)


def _timestep(gen, batch):
    return (torch.rand(batch, generator=gen) * 1000).round()


def _cogvideox(size):
    from diffusers import CogVideoXTransformer3DModel

    if size == "mid":
        cfg = dict(num_attention_heads=8, attention_head_dim=64, in_channels=16, time_embed_dim=256, text_embed_dim=256,
                   num_layers=8, sample_width=48, sample_height=48, sample_frames=13, max_text_seq_length=32)
        frames, hw, text = 4, 48, 32
    else:
        cfg = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, time_embed_dim=32, text_embed_dim=32,
                   num_layers=2, sample_width=8, sample_height=8, sample_frames=5, max_text_seq_length=8)
        frames, hw, text = 2, 8, 8
    model = CogVideoXTransformer3DModel(**cfg)
    ch, tdim = cfg["in_channels"], cfg["text_embed_dim"]

    def make(batch, seed):
        g = torch.Generator().manual_seed(seed)
        return dict(hidden_states=_randn(g, batch, frames, ch, hw, hw), encoder_hidden_states=_randn(g, batch, text, tdim),
                    timestep=_timestep(g, batch), return_dict=False)

    return model, make


def _wan(size):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                  out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32)

    def make(batch, seed):
        g = torch.Generator().manual_seed(seed)
        return dict(hidden_states=_randn(g, batch, 4, 3, 8, 8), timestep=_timestep(g, batch),
                    encoder_hidden_states=_randn(g, batch, 5, 32), return_dict=False)

    return model, make


def _hunyuanvideo(size):
    from diffusers import HunyuanVideoTransformer3DModel

    model = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                           num_layers=2, num_single_layers=2, num_refiner_layers=1, patch_size=2,
                                           guidance_embeds=False, text_embed_dim=32, pooled_projection_dim=16,
                                           rope_axes_dim=(4, 6, 6))

    def make(batch, seed):
        g = torch.Generator().manual_seed(seed)
        return dict(hidden_states=_randn(g, batch, 4, 2, 8, 8), timestep=_timestep(g, batch),
                    encoder_hidden_states=_randn(g, batch, 6, 32), encoder_attention_mask=torch.ones(batch, 6),
                    pooled_projections=_randn(g, batch, 16), return_dict=False)

    return model, make


def _ltx(size):
    from diffusers import LTXVideoTransformer3DModel

    model = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16,
                                       cross_attention_dim=32, num_layers=2, caption_channels=32)

    def make(batch, seed):
        g = torch.Generator().manual_seed(seed)
        return dict(hidden_states=_randn(g, batch, 2 * 4 * 4, 8), encoder_hidden_states=_randn(g, batch, 6, 32),
                    timestep=_timestep(g, batch), encoder_attention_mask=torch.ones(batch, 6),
                    num_frames=2, height=4, width=4, return_dict=False)

    return model, make


def _mochi(size):
    from diffusers import MochiTransformer3DModel

    model = MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=3,
                                    pooled_projection_dim=16, in_channels=4, text_embed_dim=32, time_embed_dim=16,
                                    max_sequence_length=8)

    def make(batch, seed):
        g = torch.Generator().manual_seed(seed)
        return dict(hidden_states=_randn(g, batch, 4, 2, 8, 8), encoder_hidden_states=_randn(g, batch, 8, 32),
                    timestep=_timestep(g, batch), encoder_attention_mask=torch.ones(batch, 8), return_dict=False)

    return model, make


def _latte(size):
    from diffusers import LatteTransformer3DModel

    model = LatteTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                    num_layers=2, cross_attention_dim=32, sample_size=8, patch_size=2,
                                    norm_type="ada_norm_single", num_embeds_ada_norm=1000, caption_channels=32,
                                    video_length=3)

    def make(batch, seed):
        g = torch.Generator().manual_seed(seed)
        return dict(hidden_states=_randn(g, batch, 4, 3, 8, 8), timestep=_timestep(g, batch),
                    encoder_hidden_states=_randn(g, batch, 6, 32), return_dict=False)

    return model, make


def _pixart(size):
    from diffusers import PixArtTransformer2DModel

    if size == "mid":  # PixArt-alpha-shaped: 32 x 32 = 1024 image tokens, cross-attention to 32 text tokens
        cfg = dict(num_attention_heads=8, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=8,
                   cross_attention_dim=512, sample_size=64, patch_size=2, caption_channels=256)
        hw, text = 64, 32
    else:
        cfg = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                   cross_attention_dim=32, sample_size=8, patch_size=2, caption_channels=32)
        hw, text = 8, 6
    model = PixArtTransformer2DModel(**cfg)

    def make(batch, seed):
        g = torch.Generator().manual_seed(seed)
        return dict(hidden_states=_randn(g, batch, 4, hw, hw), encoder_hidden_states=_randn(g, batch, text, cfg["caption_channels"]),
                    timestep=_timestep(g, batch), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                    return_dict=False)

    return model, make


def _dit(size):
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=2,
                                  sample_size=8, patch_size=2)

    def make(batch, seed):
        g = torch.Generator().manual_seed(seed)
        return dict(hidden_states=_randn(g, batch, 4, 8, 8), timestep=_timestep(g, batch).long(),
                    class_labels=torch.randint(0, 1000, (batch,), generator=g), return_dict=False)

    return model, make


def _stdit(size):
    from .stdit3 import STDiT3

    model = STDiT3(in_channels=4, hidden_size=32, depth=2, num_heads=2, caption_channels=32)

    def make(batch, seed):
        g = torch.Generator().manual_seed(seed)
        return dict(x=_randn(g, batch, 4, 3, 8, 8), timestep=_timestep(g, batch), y=_randn(g, batch, 1, 5, 32))

    return model, make


_BUILDERS = {
    "cogvideox": _cogvideox, "wan": _wan, "hunyuanvideo": _hunyuanvideo, "ltx": _ltx, "mochi": _mochi,
    "latte": _latte, "pixart": _pixart, "dit": _dit, "stdit": _stdit,
}
