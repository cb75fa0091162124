"""Run the real ``tnkd`` command in subprocesses, fast.

Starting ``tnkd`` costs about 4 s of imports (Lightning, torch). A server process loads the
``tnkd`` console script's entry point once, then forks a child per command: each child is a
separate process with its own working folder, environment, stdout, stderr and exit status,
running exactly what the installed ``tnkd`` script runs (``sys.exit(main())`` semantics). The
server imports but never runs torch code, so forking it is safe. ``tests/test_cli_errors.py``
checks that a few commands give the same output through the plain console script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SERVER = r"""
import json, os, sys, traceback
from importlib.metadata import entry_points

(entry,) = entry_points(group="console_scripts", name="tnkd")
main = entry.load()
# what the commands import on demand, imported once here (import only: no torch code runs)
import sklearn.datasets, tnkd.data, tnkd.students, tnkd.experiments.grid  # noqa: E401
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(request["cwd"])
            os.environ.update(request["env"])
            sys.path[:0] = request["path"]
            for fd, name in ((1, "stdout"), (2, "stderr")):
                target = os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(target, fd)
            sys.argv = ["tnkd", *request["args"]]
            try:
                main()
                code = 0
            except SystemExit as stop:  # what the interpreter does with an uncaught SystemExit
                if stop.code is None:
                    code = 0
                elif isinstance(stop.code, int):
                    code = stop.code
                else:
                    print(stop.code, file=sys.stderr)
                    code = 1
            except BaseException:
                traceback.print_exc()
                code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
"""


@dataclass
class Result:
    """What one ``tnkd`` command did."""

    rc: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        """Non-empty lines written to stderr."""
        return [line for line in self.stderr.splitlines() if line.strip()]


class TnkdRunner:
    """``runner(args, cwd=...)`` runs ``tnkd ARGS`` in a forked child of a warm server."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.count = 0
        env = dict(os.environ, WANDB_MODE="disabled", WANDB_SILENT="true")
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def __call__(
        self,
        args: list[str],
        cwd: Path,
        env: dict[str, str] | None = None,
        path: list[str] | None = None,
    ) -> Result:
        """Run ``tnkd *args`` in ``cwd``; ``path`` is prepended to ``sys.path`` (plugins)."""
        self.count += 1
        out = self.scratch / f"cmd{self.count}.out"
        err = self.scratch / f"cmd{self.count}.err"
        request = {
            "args": [str(a) for a in args],
            "cwd": str(cwd),
            "env": env or {},
            "path": [str(p) for p in (path or [])],
            "stdout": str(out),
            "stderr": str(err),
        }
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        reply = json.loads(self.process.stdout.readline())
        return Result(reply["rc"], out.read_text(), err.read_text())

    def close(self) -> None:
        """Stop the server."""
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=30)


DIGITS_MPS = str(Path(__file__).resolve().parents[1] / "configs" / "digits" / "mps_from_cnn.yaml")


def digits_run(
    subcommand: str, name: str, *extra: str, labels_only: bool = True, epochs: int = 1
) -> list[str]:
    """``tnkd`` arguments of a small named digits MPS run (bond dimension 4, CSV logger)."""
    args = [
        subcommand,
        "--config",
        DIGITS_MPS,
        "--bond_dim",
        "4",
        "--epochs",
        str(epochs),
        "--trainer.limit_val_batches",
        "1",
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.init_args.save_dir",
        "runs",
        "--trainer.logger.init_args.name",
        name,
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
    ]
    if labels_only:
        args += ["--beta", "0", "--model.init_args.teacher_checkpoint", "null"]
    return [*args, *extra]
