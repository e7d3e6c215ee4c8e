"""The training engine (host-agnostic), the bundled tiny diffusion model, the demo."""
