"""Captions from `name.txt` beside each image, with a trigger word and a default.

A caption file is read as UTF-8 (a byte-order mark is dropped, surrounding whitespace trimmed).
An empty file counts as no caption, so the default applies to it too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserInputError
from .scan import FolderScan, ImageEntry, _shown

MISSING_CAPTION_POLICIES = ("use_default", "error")


@dataclass(frozen=True)
class CaptionOptions:
    trigger_word: str = ""            # prepended as "trigger, caption"
    default_caption: str = ""         # for images without a caption file
    missing: str = "use_default"      # "use_default" | "error"

    def __post_init__(self) -> None:
        if self.missing not in MISSING_CAPTION_POLICIES:
            raise UserInputError(
                f"missing captions = {self.missing!r} is not an option: use one of "
                f"{', '.join(MISSING_CAPTION_POLICIES)}."
            )


def read_caption_file(path: Path, shown: str) -> str | None:
    """The caption text, None when the file is missing or empty."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise UserInputError(f"Cannot read caption file {shown} ({err.strerror}): check its permissions.") from err
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserInputError(
            f"Caption file {shown} is not UTF-8 (byte {err.start} is 0x{raw[err.start]:02x}): open it in "
            f"a text editor and save it with UTF-8 encoding."
        ) from err
    text = text.strip()
    return text or None


def with_trigger(caption: str, trigger_word: str) -> str:
    """"trigger, caption"; unchanged when the caption already starts with the trigger word."""
    trigger = trigger_word.strip()
    if not trigger:
        return caption
    if not caption:
        return trigger
    if caption == trigger or caption.startswith(trigger + ",") or caption.startswith(trigger + " "):
        return caption
    return f"{trigger}, {caption}"


def caption_entries(scan: FolderScan, options: CaptionOptions | None = None) -> FolderScan:
    """The scan with every entry's caption filled in, following `options`.

    Caption files are the ones the scan found (see `scan_folder`'s `caption_extension`), so
    `a.TXT` serves `a.png` on any file system.
    """
    options = options or CaptionOptions()
    entries: list[ImageEntry] = []
    missing: list[str] = []
    for entry in scan.entries:
        caption_file = scan.caption_files.get(os.path.splitext(entry.relative_path)[0])
        text = None
        if caption_file is not None:
            text = read_caption_file(scan.root / caption_file, _shown(scan.root, scan.root / caption_file, False))
        if text is None:
            missing.append(entry.relative_path)
            text = options.default_caption.strip()
        entries.append(ImageEntry(path=entry.path, relative_path=entry.relative_path, repeats=entry.repeats,
                                  concept=entry.concept, caption=with_trigger(text, options.trigger_word)))
    if missing and options.missing == "error":
        raise UserInputError(_missing_message(scan, missing, options))
    return scan.with_entries(entries)


def _missing_message(scan: FolderScan, missing: list[str], options: CaptionOptions) -> str:
    listed = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
    message = (
        f"{len(missing)} of {len(scan.entries)} images in {_shown(scan.root, scan.folder)} have no caption "
        f"({listed}): add a {scan.caption_extension} file with the same name beside each image, or set missing "
        f"captions to 'use_default' and give a default caption."
    )
    if scan.caption_files_without_image:
        orphans = ", ".join(scan.caption_files_without_image[:10])
        message += f" These caption files match no image, check their names: {orphans}."
    return message
