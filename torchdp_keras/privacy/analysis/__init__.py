"""TF Privacy's `privacy.analysis` modules (numpy and scipy only)."""
