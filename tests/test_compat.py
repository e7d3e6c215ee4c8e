"""The fallbacks for older ComfyUI interfaces (nodes/compat.py), against stand-ins of the older and the newer
interface: what an October 2025 ComfyUI (0.3.64) lacked (`intermediate_dtype`, the downscale argument of
`fix_empty_latent_channels`, the latent previewer's reshape) made the training example's previews fail there."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from comfyui_lora_trainer.nodes import compat
from comfyui_lora_trainer.nodes.compat import fitted_empty_latent, intermediate_dtype, latent_rgb_previewer


def test_the_intermediate_dtype_is_comfyuis_or_fp32_before_it_had_one():
    assert intermediate_dtype(SimpleNamespace(intermediate_dtype=lambda: torch.float16)) == torch.float16
    assert intermediate_dtype(SimpleNamespace()) == torch.float32


def test_the_empty_latent_is_fitted_with_the_downscale_where_comfyui_takes_one():
    calls = []

    def newer(model, latent_image, downscale_ratio_spacial=None, downscale_ratio_temporal=None):
        calls.append(("newer", downscale_ratio_spacial))
        return latent_image.repeat(1, 4, 1, 1)

    def older(model, latent_image):  # 0.3.64: channels only
        calls.append(("older", None))
        return latent_image.repeat(1, 4, 1, 1)

    empty = torch.zeros(1, 4, 8, 8)
    for fix in (newer, older):
        out = fitted_empty_latent(SimpleNamespace(fix_empty_latent_channels=fix), "patcher", empty, 8)
        assert out.shape == (1, 16, 8, 8)
    assert calls == [("newer", 8), ("older", None)]


def test_the_latent_previewer_gets_the_reshape_where_it_takes_one():
    class Newer:
        def __init__(self, latent_rgb_factors, latent_rgb_factors_bias=None, latent_rgb_factors_reshape=None):
            self.args = (latent_rgb_factors, latent_rgb_factors_bias, latent_rgb_factors_reshape)

    class Older:  # 0.3.64
        def __init__(self, latent_rgb_factors, latent_rgb_factors_bias=None):
            self.args = (latent_rgb_factors, latent_rgb_factors_bias)

    newer_format = SimpleNamespace(latent_rgb_factors=[[1]], latent_rgb_factors_bias=[0], latent_rgb_factors_reshape="r")
    older_format = SimpleNamespace(latent_rgb_factors=[[1]], latent_rgb_factors_bias=[0])  # no reshape attribute
    assert latent_rgb_previewer(SimpleNamespace(Latent2RGBPreviewer=Newer), newer_format).args == ([[1]], [0], "r")
    assert latent_rgb_previewer(SimpleNamespace(Latent2RGBPreviewer=Older), older_format).args == ([[1]], [0])


def test_offload_on_a_comfyui_without_partial_loading_names_the_version_it_needs():
    """0.3.64's prepare_sampling (model, noise_shape, conds, model_options) cannot load partially: the error
    names offload, the version it needs and this one; 0.14.0's (with force_offload) passes."""
    def old_prepare(model, noise_shape, conds, model_options=None):
        pass

    def new_prepare(model, noise_shape, conds, model_options=None, force_full_load=False, force_offload=False):
        pass

    old, new = SimpleNamespace(prepare_sampling=old_prepare), SimpleNamespace(prepare_sampling=new_prepare)
    assert compat.partial_load_problem(old, "0.3.64") == (
        "offload: needs ComfyUI 0.14.0 or newer (this is ComfyUI 0.3.64), whose sampler loads a model partially for "
        "training; update ComfyUI, or turn offload off on LoRA Options: Optimizer & Memory")
    assert "(this ComfyUI is older)" in compat.partial_load_problem(old, None)
    assert compat.partial_load_problem(new, "0.14.0") is None
