"""What a model's tool call may do: the boundary between an untrusted model and the user's machine.

- Every path a call names (inputs, globs, `--out`, `--checkpoint`, ...) must resolve, symlinks
  resolved, inside the root the user gave; a glob is expanded here and each match checked.
- A value never becomes an option: string values may not start with `-`, and positional values follow
  `--` on the command line. The model cannot set `--force`, `--debug` or `--help` (they are not in
  the schema, and the argv is built here).
- A call that would write into an existing path is marked so the user is asked, even with `--yes`.
- The command runs with the root as its working folder but never on the import path, in an
  environment without the user's secrets.
"""

from __future__ import annotations

import glob
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

# Path arguments that name something a command writes.
OUTPUT_PARAMS = {"out", "plot", "transcript", "render", "routes_out", "attention"}
# Environment variables a tool's process does not get: API keys, tokens, passwords.
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH|COOKIE|SESSION", re.IGNORECASE)
GLOB_CHARS = set("*?[")


class BoundaryError(ValueError):
    """A tool call that reaches outside the boundary; the message goes back to the model."""


@dataclass
class CheckedCall:
    """A call that stays inside the boundary: the argv to run and the existing paths it would write."""

    argv: list[str]
    overwrites: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class Boundary:
    root: Path  # resolved

    @classmethod
    def at(cls, root: str | os.PathLike) -> Boundary:
        return cls(Path(root).resolve())

    def path(self, value: str, name: str) -> Path:
        """`value` (relative to the root, or absolute) resolved inside the root, else BoundaryError."""
        self.check_value(value, name)
        if value.startswith("~"):  # a command may expand it to a home folder outside the root
            raise BoundaryError(f"argument {name}: {value!r} is outside the working folder {self.root}")
        resolved = (self.root / value).resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise BoundaryError(f"argument {name}: {value!r} is outside the working folder {self.root}")
        return resolved

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.root)) if path != self.root else "."

    def inputs(self, values: list[str], name: str) -> list[str]:
        """Files, folders or globs, each inside the root; a glob becomes its matches, each checked."""
        out: list[str] = []
        for value in values:
            self.check_value(value, name)
            if value.startswith("~"):
                raise BoundaryError(f"argument {name}: {value!r} is outside the working folder {self.root}")
            if GLOB_CHARS & set(value) and not (self.root / value).exists():
                if Path(value).is_absolute() or ".." in PurePath(value).parts:
                    raise BoundaryError(f"argument {name}: the pattern {value!r} must stay inside the working folder")
                matches = sorted(glob.glob(value, root_dir=self.root, recursive=True))
                out += [self.relative(self.path(m, name)) for m in matches]
            else:
                out.append(self.relative(self.path(value, name)))
        if not out and values:
            raise BoundaryError(f"argument {name}: no file matches {', '.join(values)}")
        return out

    @staticmethod
    def check_value(value: str, name: str) -> None:
        if value.startswith("-"):
            raise BoundaryError(f"argument {name}: values may not start with '-' ({value!r})")
        if "\x00" in value:
            raise BoundaryError(f"argument {name}: values may not contain NUL characters")

    def check_call(self, tool: Any, arguments: dict[str, Any]) -> CheckedCall:
        """The command line for validated `arguments`, every path confined; BoundaryError otherwise."""
        options: list[str] = []
        positionals: list[str] = []
        overwrites: list[Path] = []
        for param in tool.params:
            value = arguments.get(param.name)
            if value is None:
                continue
            schema = tool.schema["properties"][param.name]
            is_path = (schema.get("items", schema)).get("format") == "path"
            values = [str(v) for v in value] if param.is_list else [value if param.is_bool else str(value)]
            if is_path and param.flag is None:
                values = self.inputs(values, param.name)
            elif is_path:
                paths = [self.path(v, param.name) for v in values]
                if param.name in OUTPUT_PARAMS:
                    overwrites += [p for p in paths if p.exists()]
                values = [self.relative(p) for p in paths]
            elif not param.is_bool and isinstance(value, (str, list)):
                for v in values:
                    if not _is_number(v):
                        self.check_value(v, param.name)
            if param.flag is None:
                positionals += values
            elif param.is_bool:
                options += [param.flag] if value else [param.off_flag] if param.off_flag else []
            else:
                for v in values:
                    options += [param.flag, v]
        return CheckedCall([*tool.command, *options, "--", *positionals], overwrites)

    def enter(self) -> None:
        """Confine this process as `tool_command` confines a tool's: the root as its working folder, no
        secrets in its environment, nothing importable from the root (this dsfuse's own folder goes last)."""
        os.chdir(self.root)
        for name in [k for k in os.environ if SECRET_NAME.search(k)]:
            del os.environ[name]
        os.environ.update(NO_DOWNLOADS)
        sys.path[:] = [p for p in sys.path if not _inside(Path(p or "."), self.root)] + [PACKAGE_ROOT]

    def environment(self) -> dict[str, str]:
        """The tool process's environment: the user's, less secrets and import paths into the root, with
        downloads off (weights and Hub models already in the user's caches still load)."""
        env = {k: v for k, v in os.environ.items() if not SECRET_NAME.search(k)} | NO_DOWNLOADS
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if os.path.isabs(p)]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if not _inside(Path(p), self.root))
        return env


def _inside(path: Path, root: Path) -> bool:
    resolved = path.resolve()
    return resolved == root or root in resolved.parents


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# The folder this dsfuse was imported from (a source checkout, or site-packages).
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
# A model's tool call never downloads: a download writes into a cache outside the root.
NO_DOWNLOADS = {"DSFUSE_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
# `-c` puts "" (the working folder) first on sys.path: drop it, and append the folder this dsfuse was
# imported from (a source checkout) after everything else, so no file in the root shadows a module.
TOOL_BOOTSTRAP = "import sys; del sys.path[0]; sys.path.append(sys.argv.pop(1)); from dsfuse.cli import main; main()"


def tool_command(argv: list[str]) -> list[str]:
    """The process that runs `dsfuse ARGV` with nothing importable from its working folder."""
    return [sys.executable, "-c", TOOL_BOOTSTRAP, PACKAGE_ROOT, *argv]
