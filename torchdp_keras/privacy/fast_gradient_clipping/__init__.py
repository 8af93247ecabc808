"""TF Privacy's `privacy.fast_gradient_clipping` modules."""
