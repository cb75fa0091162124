"""Transfer sets: a few labeled images, the rest of the training images (and more) unlabeled.

Distillation needs no labels: the teacher's outputs are the targets. A *transfer set* is the
data the student is distilled on, which may differ from the teacher's training set (Hinton et
al. 2015 call it so; it is what a deployed teacher whose training data is gone leaves a student).
Here the transfer set is the training split with only a seeded, stratified subset of
``labeled_per_class`` images per class keeping its label, the others labeled ``-1``
(:data:`UNLABELED`), optionally with an extra set of unlabeled images appended.
"""

from __future__ import annotations

from pathlib import Path

import torch

#: the label of an unlabeled sample
UNLABELED = -1


def stratified_subset(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Positions of ``per_class`` samples of every class, drawn without replacement, sorted.

    The draw for each class is a permutation of that class's positions from a generator seeded
    with ``seed``, so the subset is the same on every run and machine.

    Raises:
        ValueError: if some class has fewer than ``per_class`` samples.
    """
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for c in torch.unique(labels[labels >= 0]).tolist():
        where = torch.nonzero(labels == c).squeeze(1)
        if len(where) < per_class:
            raise ValueError(
                f"labeled_per_class is {per_class} but class {c} has only {len(where)} training "
                "images; lower labeled_per_class"
            )
        chosen.append(where[torch.randperm(len(where), generator=gen)[:per_class]])
    return torch.cat(chosen).sort().values


def load_unlabeled(path: str | Path, input_shape: tuple[int, ...]) -> torch.Tensor:
    """Images of an extra unlabeled set: a torch file holding one ``(n, *input_shape)`` tensor.

    Float tensors must be in ``[0, 1]``; uint8 tensors are divided by 255.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if it holds no tensor, the wrong shape, or values outside ``[0, 1]``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"extra_unlabeled file {path} does not exist; give a torch file with an "
            f"(n, {', '.join(map(str, input_shape))}) image tensor (torch.save(images, path))"
        )
    try:
        images = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"extra_unlabeled file {path} is not a torch file ({type(err).__name__})"
        ) from err
    if not isinstance(images, torch.Tensor) or tuple(images.shape[1:]) != tuple(input_shape):
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(
            f"extra_unlabeled file {path}: expected an image tensor of shape (n, "
            f"{', '.join(map(str, input_shape))}), but got {got}"
        )
    images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if not bool(torch.isfinite(images).all()) or (
        images.numel() and (images.min() < 0 or images.max() > 1)
    ):
        raise ValueError(f"extra_unlabeled file {path}: pixel values must be finite and in [0, 1]")
    return images
