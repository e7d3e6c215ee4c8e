"""The training engine: host-agnostic, it trains whatever model a host hands it as callables
(nodes/ for ComfyUI models, tiny/ for the bundled tiny model)."""
