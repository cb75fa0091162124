"""Training: the LightningModules, their callbacks, the teacher-logit cache and logged media.

Built on the library below it (divergences, feature maps, students, teachers, data); the
experiment tooling (:mod:`tnkd.experiments`) and the CLI are built on it.
"""

from tnkd.training.callbacks import RunCheckpoint
from tnkd.training.modules import DistillationModule, TeacherModule

__all__ = ["DistillationModule", "RunCheckpoint", "TeacherModule"]
