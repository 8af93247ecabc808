"""`UserDataLoader`: Poisson sampling of users, for user-level DP-SGD.

Many datasets hold several examples per person (messages, sessions, medical
visits). Example-level DP protects one example; a person with many examples
is then protected only by group privacy. User-level DP-SGD protects a whole
user instead:

1. every update Poisson-samples **users**, each independently with
   probability `q = expected users per update / number of users`;
2. each sampled user contributes at most `max_examples_per_user` (m) of its
   examples (the first m in dataset order, or m drawn at random);
3. the DP step clips each **user's** gradient, the mean gradient of its
   examples, to `l2_norm_clip` (a clipping unit is one user: m contiguous
   rows of the batch, padding rows weighted 0), adds the noise once per
   update, and the accountant composes the steps at the users' q.

Guarantee: adding or removing one user (with all of its examples) changes
each update's clipped sum by at most `l2_norm_clip`, so the reported epsilon
(`model.privacy_unit == "user"`, logged as `user_epsilon`) is about users.
Which m examples a user contributes depends only on that user's own data,
so the choice costs no privacy.
"""

from __future__ import annotations

import secrets

import numpy as np

from torchdp_keras._validation import check_int
from torchdp_keras.data.loader import (
    POISSON_BATCH_KEY,
    PrivateDataLoader,
    _take,
    to_numpy_tree,
)
from torchdp_keras.data.sampling import PoissonSampler, padded_size
from torchdp_keras.errors import DPConfigError

__all__ = ["EXAMPLE_CHOICES", "UserDataLoader"]

EXAMPLE_CHOICES = ("first", "random")


class UserDataLoader(PrivateDataLoader):
    """Poisson-sampled batches of users, for user-level DP (see the module docstring).

    Args:
        feature_df: Features, as for `PrivateDataLoader`.
        label_df: Labels, as for `PrivateDataLoader` (or None).
        batch_size: The expected number of **users** per physical batch.
        user_ids: One id per example (any hashable values, e.g. ints or
            strings): which user each row belongs to.
        max_examples_per_user: m, the most examples a sampled user
            contributes to an update.
        example_choice: "first" (a user's first m rows in dataset order) or
            "random" (m of its rows drawn afresh at every update).
        sample_weight: Optional per-example weights (multiplied into each
            user's mean).
        seed: Seed of the user sampler and of "random"; None: OS entropy.
        gradient_accumulation_steps: k; each update's users are one Poisson
            draw with q = k * batch_size / number of users, split into k
            physical batches.
        steps_per_epoch: Updates per epoch; default num_users // (k * batch_size).
        secure_mode: Draw the samples from the OS CSPRNG (no seed allowed).

    Example:
        >>> x = np.random.default_rng(0).random((300, 4), dtype="float32")
        >>> y = x.sum(axis=1, keepdims=True)
        >>> users = np.arange(300) % 100          # 100 users, 3 examples each
        >>> loader = UserDataLoader(x, y, batch_size=10, user_ids=users,
        ...                         max_examples_per_user=2, seed=0)
        >>> loader.num_users, loader.sampling_probability, loader.unit_size
        (100, 0.1, 2)
        >>> model = tdk.DPSequential([keras.Input((4,)), keras.layers.Dense(1)],
        ...                          l2_norm_clip=1.0, noise_multiplier=1.1)
        >>> model.compile(optimizer="sgd", loss="mse")
        >>> history = model.fit(loader, epochs=2, target_delta=1e-3, verbose=0)
        >>> model.privacy_unit, "user_epsilon" in history.history
        ('user', True)
    """

    def __init__(
        self,
        feature_df,
        label_df=None,
        batch_size: int = 32,
        *,
        user_ids,
        max_examples_per_user: int,
        example_choice: str = "first",
        sample_weight=None,
        seed: int | None = None,
        gradient_accumulation_steps: int = 1,
        steps_per_epoch: int | None = None,
        secure_mode: bool = False,
    ):
        super().__init__(
            feature_df,
            label_df,
            batch_size,
            sample_weight=sample_weight,
            seed=seed,
            gradient_accumulation_steps=gradient_accumulation_steps,
            steps_per_epoch=1,
            secure_mode=secure_mode,
        )
        if self._world > 1:
            raise DPConfigError(
                "UserDataLoader does not shard users across torch.distributed ranks yet: "
                f"train user-level DP on one process. Received: world size {self._world}"
            )
        self.max_examples_per_user = check_int(max_examples_per_user, "max_examples_per_user")
        if example_choice not in EXAMPLE_CHOICES:
            raise DPConfigError(
                f"Expected example_choice in {EXAMPLE_CHOICES}. "
                f"Received: example_choice={example_choice!r}"
            )
        self.example_choice = example_choice
        ids = to_numpy_tree(user_ids, "user_ids")
        if not isinstance(ids, np.ndarray) or ids.ndim != 1 or len(ids) != self.num_examples:
            raise DPConfigError(
                f"Expected user_ids to be one id per example ({self.num_examples} values). "
                f"Received: {getattr(ids, 'shape', type(ids).__name__)}"
            )
        # Users in order of first appearance; each user's rows in dataset order.
        _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        user_of_row = rank[inverse]
        rows = np.argsort(user_of_row, kind="stable")
        counts = np.bincount(user_of_row, minlength=len(order))
        self.user_ids = ids[np.sort(first)]
        self._user_rows = np.split(rows, np.cumsum(counts)[:-1])
        self.num_users = len(self._user_rows)
        effective = self.batch_size * self.gradient_accumulation_steps
        if effective > self.num_users:
            raise DPConfigError(
                f"Expected batch_size * gradient_accumulation_steps <= the number of users "
                f"({self.num_users}). Received: batch_size={self.batch_size}, "
                f"gradient_accumulation_steps={self.gradient_accumulation_steps}"
            )
        self._sampler = PoissonSampler(
            self.num_users, effective, seed=seed, secure_mode=secure_mode
        )
        self._choice_entropy = seed if seed is not None else secrets.randbits(128)
        if steps_per_epoch is None:
            steps_per_epoch = max(1, self.num_users // effective)
        self.updates_per_epoch = check_int(steps_per_epoch, "steps_per_epoch")

    # -- what the DP step and the accountant need -----------------------------------------
    @property
    def privacy_unit(self) -> str:
        """What one clipping unit is, and what the epsilon protects: a user."""
        return "user"

    @property
    def unit_size(self) -> int:
        """Rows per clipping unit in a batch: `max_examples_per_user`."""
        return self.max_examples_per_user

    @property
    def num_units(self) -> int:
        """The number of users (the n of q = expected users / n)."""
        return self.num_users

    @property
    def expected_batch_size(self) -> int:
        """Expected users per model update: batch_size * gradient_accumulation_steps."""
        return self.batch_size * self.gradient_accumulation_steps

    @property
    def physical_batch_size(self) -> int:
        """Expected users per physical batch."""
        return self.batch_size

    def user_examples(self, user: int, key: int = 0) -> np.ndarray:
        """The rows that user number `user` (by first appearance) contributes at update `key`."""
        rows = self._user_rows[user]
        m = self.max_examples_per_user
        if len(rows) <= m:
            return rows
        if self.example_choice == "first":
            return rows[:m]
        rng = np.random.default_rng([self._choice_entropy, key, user])
        return np.sort(rng.choice(rows, size=m, replace=False))

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"Expected 0 <= index < {len(self)}. Received: index={index}")
        update, part = divmod(index, self.gradient_accumulation_steps)
        key = self._first_update + self.epoch * self.updates_per_epoch + update
        users = np.array_split(self._draw(update), self.gradient_accumulation_steps)[part]
        slots = padded_size(len(users), self.physical_batch_size, self.num_users)
        m = self.max_examples_per_user
        rows = np.zeros(slots * m, dtype=np.int64)
        mask = np.zeros(slots * m, dtype="float32")
        weight = np.zeros(slots * m, dtype="float32")
        for slot, user in enumerate(users):
            chosen = self.user_examples(int(user), key)
            start = slot * m
            rows[start : start + len(chosen)] = chosen
            mask[start : start + len(chosen)] = 1.0
            # A user's unit loss is the mean of its m rows: weight m / count makes
            # it the mean of the user's own examples (padding rows weigh 0).
            weight[start : start + len(chosen)] = m / len(chosen)
        if self.sample_weight is not None:
            weight = weight * np.asarray(_take(self.sample_weight, rows), dtype="float32")
        batch = {"x": _take(self.features, rows), "mask": mask, "sample_weight": weight}
        if self.labels is not None:
            batch["y"] = _take(self.labels, rows)
        return {POISSON_BATCH_KEY: batch}
