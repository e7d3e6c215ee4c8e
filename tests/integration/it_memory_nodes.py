"""A test-only ComfyUI node (not part of the pack) for test_memory_families.py: a base stored in bf16 or fp8.

ITBaseAs takes any MODEL and returns the same diffusion model rebuilt with its weights stored in
`weight_dtype`, the way core's UNETLoader builds a model whose `weight_dtype` it was given
(comfy.sd.load_diffusion_model_state_dict with model_options["dtype"]): the config's inference
dtype set to that dtype with the compute dtype `model_management.unet_manual_cast` picks for the load
device (fp32 on a CPU, so ComfyUI's manual-cast ops cast each weight as a layer runs), `get_model`,
then the weights loaded into it. It serves the models no file can hold at toy width (the tiny SDXL
and Qwen-Image of make_sdxl.py / make_qwen_image.py) and bf16 (UNETLoader offers fp8 only, and a
CPU upcasts a bf16 file to fp32). Plain torch and ComfyUI only.
"""
import logging

import torch

DTYPES = {"bf16": torch.bfloat16, "fp8_e4m3fn": torch.float8_e4m3fn}


class ITBaseAs:
    CATEGORY = "testing"
    FUNCTION = "rebuild"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "weight_dtype": (list(DTYPES),)}}

    def rebuild(self, model, weight_dtype):
        import comfy.model_management as mm
        import comfy.model_patcher

        dtype = DTYPES[weight_dtype]
        old = model.model
        sd = {k: v.detach().clone() for k, v in old.diffusion_model.state_dict().items()}
        config = type(old.model_config)(old.model_config.unet_config)  # a fresh config of the same family
        load_device = model.load_device
        config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device, config.supported_inference_dtypes))
        new = config.get_model(sd, "")
        new.load_model_weights(sd, "")
        kinds = {}
        for p in new.diffusion_model.parameters():
            kinds[p.dtype] = kinds.get(p.dtype, 0) + p.numel()
        if kinds.get(dtype, 0) == 0:
            raise RuntimeError(f"ITBaseAs: no weight of the rebuilt model is {dtype}: {kinds}")
        logging.info("ITBaseAs: %s rebuilt, parameters by dtype %s, compute dtype %s", type(new).__name__,
                     {str(k): v for k, v in kinds.items()}, config.manual_cast_dtype)
        return (comfy.model_patcher.ModelPatcher(new, load_device=load_device, offload_device=model.offload_device),)


NODE_CLASS_MAPPINGS = {"ITBaseAs": ITBaseAs}
NODE_DISPLAY_NAME_MAPPINGS = {"ITBaseAs": "IT Base As (test only)"}
