"""Checks on the files a run reads and writes, made before any training starts.

A mistyped or read-only output folder used to fail after the first epoch, and an unwritable
teacher export path after the teacher's whole training (its weights lost). Every output a run
will write (logger folder, checkpoint folder, teacher file, teacher-logit cache, results and
prediction files) is checked here first, without creating anything; a checkpoint file to
resume from is checked to be a complete archive before Lightning reads it.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path


def check_writable(path: str | os.PathLike, what: str, *, folder: bool = True) -> Path:
    """Raise a one-line error unless ``path`` can be created (or written) by this process.

    Nothing is created: the nearest existing ancestor must be a writable folder, and ``path``
    itself, if it exists, a folder (``folder=True``) or a file (``folder=False``).

    Args:
        path: the folder or file the run will write.
        what: the setting's name, for the message (e.g. ``"--trainer.logger.init_args.save_dir"``).
        folder: whether ``path`` is a folder (else a file).
    """
    target = Path(path)
    if target.exists():
        if folder and not target.is_dir():
            raise NotADirectoryError(
                f"{what} {target} is a file, not a folder; give a folder path for {what}"
            )
        if not folder and target.is_dir():
            raise IsADirectoryError(f"{what} {target} is a folder; give a file path for {what}")
        probe = target if folder else target.parent
    else:
        probe = target.parent
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir():
            raise NotADirectoryError(
                f"{what} {target} cannot be created: {probe} is a file, not a folder; fix the "
                f"path given for {what}"
            )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(
            f"{what} {target} cannot be written: {probe} is not writable (read-only folder or "
            f"disk); point {what} at a writable place"
        )
    return target


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """Fail early, in one line, on a checkpoint path that is missing, truncated or not a checkpoint.

    A torch checkpoint is a zip archive: its entries' CRCs are checked, nothing is loaded.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"checkpoint {file} does not exist; pass an existing .ckpt to --ckpt_path, or "
            "--ckpt_path last to resume the named run"
        )
    try:
        with zipfile.ZipFile(file) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as err:
        bad = str(err)
    if bad is not None:
        raise ValueError(
            f"checkpoint {file} is corrupt or not a checkpoint ({bad}); it was left as it is: pass "
            "another file to --ckpt_path (a run's checkpoints/last.ckpt), or retrain"
        )
