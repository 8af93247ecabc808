"""TF Privacy's `privacy.keras_models` modules."""
