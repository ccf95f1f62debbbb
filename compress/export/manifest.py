"""The export manifest: format version, resolved recipe, per-module formats, file checksums.

Loading reads the manifest, never file names, to learn what an export holds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compress.errors import ExportError
from compress.utils.fs import sha256_file

__all__ = [
    "BASE_MODEL_TYPE_KEY",
    "FORMAT_VERSION",
    "GUARDED_MODEL_TYPE",
    "MANIFEST_NAME",
    "QUANT_METHOD",
    "check_format_version",
    "guard_config_dict",
    "read_manifest",
    "verify_files",
]

MANIFEST_NAME = "compress_manifest.json"
QUANT_METHOD = "compress"
FORMAT_VERSION = 1

GUARDED_MODEL_TYPE = "compress-export (import compress before loading)"
"""``model_type`` in the ``config.json`` of our exports. Stock transformers stops on it with
"has model type `compress-export (import compress before loading)` but Transformers does not
recognize this architecture", instead of loading packed layers as randomly initialised
``nn.Linear`` with only a warning; ``import compress`` registers it and restores the family's
own type."""

BASE_MODEL_TYPE_KEY = "compress_base_model_type"
"""The family's own ``model_type`` (``llama``, ``gemma3_text`` ...) in a guarded ``config.json``."""


def guard_config_dict(config: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` of an export loaded through our quantizer, with the family's
    ``model_type`` moved aside so that loading it without ``import compress`` fails loudly."""
    guarded = dict(config)
    guarded[BASE_MODEL_TYPE_KEY] = guarded.get("model_type")
    guarded["model_type"] = GUARDED_MODEL_TYPE
    return guarded


def check_format_version(version: Any, where: Path | str) -> None:
    if version != FORMAT_VERSION:
        raise ExportError(
            f"{where}: unknown compress format version {version!r} (this compress reads "
            f"version {FORMAT_VERSION})",
            hint="upgrade compress, or re-export the model with this version",
        )


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of an export folder; a clear error if it is missing or unreadable."""
    directory = Path(directory)
    if directory.is_file():
        inside = directory.parent if (directory.parent / MANIFEST_NAME).is_file() else None
        raise ExportError(
            f"{directory}: is a file, not an export folder",
            hint=f"pass its folder: {inside}"
            if inside
            else "pass the folder that `compress apply` exported",
        )
    if not directory.is_dir():
        raise ExportError(
            f"{directory}: no such folder", hint="pass the folder that `compress apply` exported"
        )
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ExportError(
            f"{directory}: not a compress export ({MANIFEST_NAME} is missing)",
            hint="pass the folder that `compress apply` exported",
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ExportError(f"{path}: unreadable manifest: {error}") from None
    if not isinstance(manifest, dict):
        raise ExportError(f"{path}: manifest is not a JSON object")
    check_format_version(manifest.get("format_version"), path)
    return manifest


def verify_files(directory: Path, manifest: dict[str, Any]) -> None:
    """Check every file the manifest lists against its recorded size and SHA-256."""
    directory = Path(directory)
    files = manifest.get("files", {})
    if not isinstance(files, dict) or not all(
        isinstance(entry, dict) and {"bytes", "sha256"} <= entry.keys() for entry in files.values()
    ):
        raise ExportError(
            f"{directory / MANIFEST_NAME}: 'files' is not a mapping of name -> bytes, sha256",
            hint="the manifest is damaged; re-run `compress apply`",
        )
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise ExportError(
                f"{path}: listed in the manifest but missing",
                hint="the export is incomplete; re-run `compress apply`",
            )
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise ExportError(
                f"{path}: size {size} bytes, manifest says {expected['bytes']} (truncated or "
                "modified)",
                hint="the export is corrupted; re-run `compress apply` or restore the file",
            )
        digest = sha256_file(path)
        if digest != expected["sha256"]:
            raise ExportError(
                f"{path}: checksum mismatch (sha256 {digest[:12]}…, manifest says "
                f"{expected['sha256'][:12]}…)",
                hint="the export is corrupted; re-run `compress apply` or restore the file",
            )
