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


class FolderInUse(OSError):
    """Another process holds the lock of a run folder (see :class:`RunLock`)."""


class RunLock:
    """An advisory lock on a run's folder, held while the run writes there.

    ``fcntl.flock`` on ``FOLDER/.tnkd.lock``: a second process that asks for it is refused at
    once (nobody waits), with a one-line :class:`FolderInUse` naming the holder's PID; the
    kernel releases it when the holder exits, crashes included, so a stale lock file never
    blocks anyone. :meth:`release` removes the file (and the folder, if the lock created it and
    it is empty). On systems without ``fcntl`` (Windows) there is no lock.

    Args:
        folder: the run's folder.
        what: what the folder is, for the message (``"run folder"``, ``"results file"``).
        hint: how to avoid the clash, for the message.
        name: the lock file's name inside ``folder``.
    """

    def __init__(
        self, folder: str | os.PathLike, what: str, hint: str, name: str = ".tnkd.lock"
    ) -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self.what, self.hint = what, hint
        self._fd: int | None = None
        self._made: Path | None = None  # the outermost folder the lock created

    def acquire(self) -> RunLock:
        """Take the lock, or raise :class:`FolderInUse` if another process holds it."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        if self._fd is not None:
            return self
        top = self.folder
        while not top.parent.exists() and top.parent != top:
            top = top.parent
        self._made = None if self.folder.exists() else top
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = False
            except BlockingIOError:
                held = True
            if held:  # raised outside the except: the message is the error, not EAGAIN
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise FolderInUse(
                    f"{self.what} {self.folder} is in use by another tnkd process (PID {holder}); "
                    f"wait for it to end, or {self.hint}"
                )
            try:  # the holder may have removed the file between our open and our lock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock back and remove its file (nothing if it was not held)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
            folder = self.folder
            while self._made is not None and folder.is_relative_to(self._made):
                if any(folder.iterdir()):
                    break
                folder.rmdir()  # created by the lock and left empty by the run
                folder = folder.parent
        except OSError:
            pass  # a lock file left behind blocks nobody: the kernel released the lock
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def discard_wandb_run() -> None:
    """Finish the current W&B run and delete its folder: a run a full disk cut short.

    Also removes the ``latest-run`` and ``debug*.log`` links that W&B put beside it, so that no
    trace of the run that could not be written is left.
    """
    import shutil
    import sys

    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is None:
        return
    folder = Path(run.dir).parent
    try:
        wandb.finish(exit_code=1)
    except Exception:  # the disk is full: W&B's own last writes may fail too
        pass
    shutil.rmtree(folder, ignore_errors=True)
    parent = folder.parent
    if parent.is_dir():
        for link in parent.iterdir():
            if link.is_symlink() and not link.exists():  # pointed into the removed folder
                link.unlink(missing_ok=True)
