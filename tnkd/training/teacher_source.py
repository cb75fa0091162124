"""Where a run's teacher comes from: its file(s), its architecture, its logits cache.

A :class:`TeacherSource` resolves the teacher once (one file, an ensemble of files, or trained
networks given as they are) and hands the networks down: ``tnkd compare`` loads them once for
all its runs, :class:`~tnkd.training.modules.DistillationModule` loads the one it is given.

Example:
    >>> from tnkd.teachers import MLP
    >>> source = TeacherSource(architecture=[MLP(4, 3), MLP(4, 3)])
    >>> type(source.load(temperature=2.0)).__name__
    'TeacherEnsemble'
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from tnkd.teachers import TeacherEnsemble, load_teacher, read_teacher_file
from tnkd.training.outputs import check_writable


@dataclass(frozen=True)
class TeacherSource:
    """A teacher's file(s), architecture and logits cache.

    Args:
        checkpoint: a teacher file (a tnkd teacher file, a ``state_dict``, a Lightning
            checkpoint or a trusted pickled module; see :func:`tnkd.teachers.load_teacher`), a
            list of files (an ensemble), or ``None`` (the ``architecture`` is the teacher).
        architecture: with a ``checkpoint``, the network the weights are loaded into (copied
            for each file of an ensemble) or a factory of fresh networks; ``None`` reads it from
            a tnkd teacher file. Without, the trained network itself, or a list of them (an
            ensemble).
        trust_file: allow pickled modules, whose loading runs code from the file.
        cache: the folder of the teacher's cached logits (:mod:`tnkd.training.teacher_cache`).
    """

    checkpoint: str | Sequence[str] | None = None
    architecture: nn.Module | Sequence[nn.Module] | Callable[[], nn.Module] | None = None
    trust_file: bool = False
    cache: str | None = None

    @property
    def files(self) -> list[str]:
        """The teacher files (none for a teacher given as networks)."""
        files = [] if self.checkpoint is None else self.checkpoint
        return [str(files)] if _single(files) else list(files)

    @property
    def is_ensemble(self) -> bool:
        """Whether the teacher is several networks (their probabilities averaged at T)."""
        return not _single(self.checkpoint) or not _single(self.architecture)

    def missing(self) -> list[str]:
        """The teacher files that do not exist."""
        return [f for f in self.files if not Path(f).exists()]

    def members(self) -> list[nn.Module]:
        """The trained networks, in eval mode: one per file, or the networks given."""
        if not _single(self.architecture):
            if not _single(self.checkpoint):
                raise ValueError("give the ensemble's teachers as files or as networks, not both")
            return list(self.architecture)  # type: ignore[arg-type]
        if self.checkpoint is None:
            return [] if self.architecture is None else [self.architecture]  # type: ignore[list-item]
        return [load_teacher(f, self._fresh(), trust_file=self.trust_file) for f in self.files]

    def load(self, temperature: float = 1.0) -> nn.Module | None:
        """The teacher: one network, an ensemble at ``temperature`` for several, or ``None``."""
        members = self.members()
        if self.is_ensemble:
            return TeacherEnsemble(members, temperature)
        return members[0] if members else None

    def class_path(self) -> str:
        """The teacher's class path from its file(s), ``TeacherEnsemble[...]`` for several."""
        paths = [read_teacher_file(f)["class_path"] for f in self.files]
        if self.is_ensemble:
            return f"tnkd.teachers.TeacherEnsemble[{', '.join(paths)}]"
        return paths[0]

    def check_outputs(self) -> None:
        """One-line errors unless the teacher file to train (one, missing) and cache can be written."""
        if isinstance(self.checkpoint, str) and not Path(self.checkpoint).exists():
            check_writable(self.checkpoint, "--teacher_checkpoint", folder=False)
        if self.cache:
            check_writable(self.cache, "--teacher_cache")

    def _fresh(self) -> nn.Module | None:
        """A network to load one file into: a new one per file of an ensemble."""
        arch = self.architecture
        if not isinstance(arch, nn.Module):
            return arch() if callable(arch) else None
        return copy.deepcopy(arch) if self.is_ensemble else arch


def _single(value: object) -> bool:
    return not isinstance(value, list | tuple)
