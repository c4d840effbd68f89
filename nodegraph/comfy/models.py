"""Converters of ComfyUI loader, conditioning, latent and sampler types."""
