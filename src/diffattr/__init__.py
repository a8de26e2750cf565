"""Data attribution for diffusion models: the maths behind the LDS workflow."""
