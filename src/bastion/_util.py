"""Small helpers shared by every layer: seeding, atomic writes, safe folder walks."""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bastion.errors import BastionError, UnsafePathError

_LINK_HINT = "replace the link with the real file or folder"


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch so that two runs with one seed give one result."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def torch_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (or from torch's global state when None)."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    Nobody ever sees a half-written file: either the old content or the new one.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes 0600 files; give the usual umask-based mode
            umask = os.umask(0)
            os.umask(umask)
            tmp_path.chmod(0o666 & ~umask)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file, then rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_folder_atomic(directory: str | os.PathLike[str], write: Callable[[Path], Any]) -> Path:
    """Run ``write(tmp_dir)`` in a fresh folder beside ``directory``, then move it onto
    ``directory`` (replacing an old one). On any error nothing changes at ``directory``.

    Callers check first that overwriting ``directory`` is allowed.
    """
    target = Path(directory).expanduser()
    _no_link(target, "output folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; these folders are not secret
        write(tmp)
        if target.exists():
            trash = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, trash)
            try:
                os.replace(tmp, target)
            except OSError:
                os.replace(trash, target)
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _no_link(path: Path, what: str) -> None:
    if path.is_symlink():
        raise UnsafePathError(f"{what} {path} is a symbolic link; Bastion does not follow "
                              "links in model, defense or report folders", hint=_LINK_HINT)


def ensure_inside(folder: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """``path`` (absolute, or relative to ``folder``) when it lies inside ``folder`` with no
    symbolic link anywhere from ``folder`` down to it (``folder`` itself included);
    else :class:`~bastion.errors.UnsafePathError`. ``path`` need not exist yet."""
    base = Path(folder).expanduser()
    _no_link(base, "folder")
    p = Path(path).expanduser()
    p = p if p.is_absolute() else base / p
    try:
        rel = p.relative_to(base)
    except ValueError:
        raise UnsafePathError(f"{p} is outside {base}",
                              hint="keep every file inside the folder") from None
    if ".." in rel.parts:
        raise UnsafePathError(f"{p} leaves {base} through '..'",
                              hint="keep every file inside the folder")
    cur = base
    for part in rel.parts:
        cur = cur / part
        _no_link(cur, "path")
    base_real = os.path.realpath(base)
    if os.path.commonpath([base_real, os.path.realpath(p)]) != base_real:
        raise UnsafePathError(f"{p} resolves outside {base}",
                              hint="keep every file inside the folder")
    return p


def safe_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Every regular file under ``folder``, sorted; refuses (UnsafePathError) a
    ``folder`` that is a link, and any link, device, FIFO or socket inside it, so
    nothing outside the folder is ever read or copied through it."""
    import stat

    base = Path(folder).expanduser()
    _no_link(base, "folder")
    if not base.is_dir():
        raise UnsafePathError(f"{base} is not a folder", hint="check the path")
    out: list[Path] = []
    for root, dirs, files in os.walk(base, followlinks=False):
        for name in sorted(dirs) + sorted(files):
            p = Path(root) / name
            mode = os.lstat(p).st_mode
            if stat.S_ISLNK(mode):
                _no_link(p, "path")
            if name in files:
                if not stat.S_ISREG(mode):
                    raise UnsafePathError(f"{p} is not a regular file",
                                          hint="keep only plain files in the folder")
                out.append(p)
    return sorted(out)


def copy_folder_safely(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Copy the regular files of ``src`` (checked with :func:`safe_files`) into ``dst``,
    opening each with ``O_NOFOLLOW`` so a link swapped in meanwhile is not followed."""
    base = Path(src).expanduser()
    target = Path(dst)
    for f in safe_files(base):
        rel = f.relative_to(base)
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(f, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError as exc:
            raise UnsafePathError(f"cannot read {f} safely: {exc.strerror}",
                                  hint=_LINK_HINT) from None
        with os.fdopen(fd, "rb") as fin, open(target / rel, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    return target


def check_output_dir(out: str | os.PathLike[str]) -> Path:
    """Refuse an output folder that is a symbolic link or an existing file."""
    p = Path(out).expanduser()
    _no_link(p, "output folder")
    if p.exists() and not p.is_dir():
        raise UnsafePathError(f"output path {p} is a file", hint="give a folder path")
    return p


def folder_digest(folder: str | os.PathLike[str]) -> str:
    """SHA-256 over a model folder's files (names and contents), in name order: the
    fingerprint the registry, scans, audits and factsheets know a model by."""
    import hashlib

    d = Path(folder)
    h = hashlib.sha256()
    for p in safe_files(d):  # refuses links: nothing outside the folder is read
        h.update(str(p.relative_to(d)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def model_digest_tag(model_spec: str | None) -> dict[str, str]:
    """``{"bastion.model_sha256": digest}`` when ``model_spec`` is a local model folder
    (how a factsheet finds the scans and audits of a registered version), else ``{}``."""
    if not model_spec:
        return {}
    try:
        d = Path(model_spec).expanduser()
        if not d.is_dir():
            return {}
        return {"bastion.model_sha256": folder_digest(d)}
    except Exception:  # an unreadable folder simply goes untagged
        return {}


def read_mapping_file(path: str | os.PathLike[str], *, what: str, hint: str
                      ) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON file holding a mapping at the top level.
    Errors are one line naming the file and, for a syntax error, its line and column,
    never the file's text (a config may hold a token). ``what`` names the file in the
    messages ("policy file"), ``hint`` says how to fix a file that is not found."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise BastionError(f"{what} not found: {p}", hint=hint)
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            doc = yaml.safe_load(text)
        else:
            doc = json.loads(text)
    except Exception as exc:
        mark = getattr(exc, "problem_mark", None)
        line, col = (mark.line + 1, mark.column + 1) if mark is not None else \
            (getattr(exc, "lineno", None), getattr(exc, "colno", None))
        where = f" at line {line}, column {col}" if line is not None else ""
        raise BastionError(f"cannot parse {p}{where}: {type(exc).__name__}",
                           hint="write it as YAML or JSON") from None
    if not isinstance(doc, dict):
        raise BastionError(f"{p} must hold a mapping at the top level")
    return doc
