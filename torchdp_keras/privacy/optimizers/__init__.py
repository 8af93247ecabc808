"""TF Privacy's `privacy.optimizers` modules: the DP optimizers under TF Privacy's names.

They carry the DP settings; the DP model's `train_step` clips and noises
(see `torchdp_keras.optimizers`). Compile them into a `torchdp_keras.Model`
(the drop-in for `keras.Model`) or any DP model class.
"""
