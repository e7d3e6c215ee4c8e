"""The tiny host: a bundled diffusion model that runs the training engine on CPU without ComfyUI.

Owns the tiny model and its noise schedules (`model.py`, `schedules.py`), the stand-in text encoder
(`text.py`), the model's callables for the engine (`host.py`, what ComfyUI's guider is to a ComfyUI
model) and the demo (`demo.py`). It imports training/ and lora/; they never import it, nor do the
nodes: inside ComfyUI the host is ComfyUI itself.
"""
