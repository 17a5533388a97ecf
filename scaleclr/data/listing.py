"""Listing an ImageFolder tree (``disk_folder``): torchvision's classes, order and labels, with every image once.

``torchvision.datasets.folder.make_dataset`` walks with ``os.walk(followlinks=True)``, which has no guard
against symbolic links: a link to a parent folder repeats every image below it until the path grows past
the system's limit (dozens of times, silently), and a link to another folder of the tree lists its images
twice, under two labels. Here:

- a directory link whose target contains the root (a loop) or lies inside the root (its images are listed
  where they live), or whose target was walked already, is not followed; a warning names the link;
- a file link to an image inside the root is left out (the image is listed where it lives), and a file reached
  twice otherwise (a folder outside the root linked twice) is listed once, at its first place in torchvision's
  order; both are counted in one warning;
- the rest is torchvision's listing: class = sorted sub-folder names of the root, images = files with an
  image extension below each class folder, sorted by folder path, then file name.

Real paths are computed once per directory (``os.path.realpath``) and only for links among files, so a
1.28M-image folder costs no more system calls than ``os.walk``.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from torchvision.datasets.folder import IMG_EXTENSIONS

logger = logging.getLogger(__name__)

__all__ = ["FolderListing", "list_image_folder", "probe_image_folder", "is_image_file"]


def is_image_file(name: str) -> bool:
    """torchvision's rule: the lower-cased name ends with one of ``IMG_EXTENSIONS``."""
    return name.lower().endswith(IMG_EXTENSIONS)


@dataclass
class FolderListing:
    """What :func:`list_image_folder` found.

    Attributes:
        classes: sorted class folder names (label ``i`` = ``classes[i]``).
        samples: ``(path, label)`` in torchvision's order, each real file once.
        skipped_links: ``(link, target)`` of directory links not followed (loops, links into the tree, repeats).
        duplicates: files left out because their real file was listed already.
    """
    classes: list[str]
    samples: list[tuple[str, int]] = field(default_factory=list)
    skipped_links: list[tuple[str, str]] = field(default_factory=list)
    duplicates: int = 0


def _class_dirs(root: str) -> list[str]:
    try:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    except (FileNotFoundError, NotADirectoryError) as e:
        raise ValueError(f"{root!r} is not an ImageFolder tree: {e}") from e
    if not classes:
        raise ValueError(f"{root!r} is not an ImageFolder tree: it has no class folders (one sub-folder per class)")
    return classes


class _Walker:
    """Depth-first walk of class folders with loop and repeat guards; shared by the listing and the probe."""

    def __init__(self, root: str, classes: list[str]):
        self.root_real = os.path.realpath(root)
        self.visited = {self.root_real} | {os.path.realpath(os.path.join(root, c)) for c in classes}
        self.skipped_links: list[tuple[str, str]] = []

    def inside(self, real: str) -> bool:
        return real == self.root_real or real.startswith(self.root_real + os.sep)

    def file_key(self, real_dir: str, entry: os.DirEntry) -> str | None:
        """The real path that identifies the file, or None for a link to a file inside the root (listed where
        it lives)."""
        if not entry.is_symlink():
            return os.path.join(real_dir, entry.name)
        target = os.path.realpath(entry.path)
        return None if self.inside(target) and os.path.isfile(target) else target

    def _follow(self, link: str) -> str | None:
        """The link's real target if it should be walked, else None (and the link is recorded)."""
        target = os.path.realpath(link)
        inside = self.inside(target)
        contains = self.root_real == target or self.root_real.startswith(target.rstrip(os.sep) + os.sep)
        if inside or contains or target in self.visited:
            self.skipped_links.append((link, target))
            return None
        self.visited.add(target)
        return target

    def walk(self, class_dir: str) -> Iterator[tuple[str, str, list[os.DirEntry]]]:
        """``(folder path, its real path, its non-folder entries)`` below ``class_dir`` (itself included)."""
        stack = [(class_dir, os.path.realpath(class_dir))]
        while stack:
            path, real = stack.pop()
            try:
                entries = sorted(os.scandir(path), key=lambda e: e.name)
            except OSError:
                continue  # as os.walk: an unreadable folder is left out
            files, subdirs = [], []
            for e in entries:
                try:
                    is_dir = e.is_dir()
                except OSError:
                    is_dir = False
                if not is_dir:
                    files.append(e)
                elif not e.is_symlink():
                    subdirs.append((e.path, os.path.join(real, e.name)))
                else:
                    target = self._follow(e.path)
                    if target is not None:
                        subdirs.append((e.path, target))
            yield path, real, files
            stack.extend(reversed(subdirs))


def _warn(root: str, skipped_links: list[tuple[str, str]], duplicates: int) -> None:
    for link, target in skipped_links:
        logger.warning("data folder %s: not following the link %s -> %s (a loop, a link into the data folder, or "
                       "a folder already listed): its images are listed once, where they live", root, link, target)
    if duplicates:
        logger.warning("data folder %s: %d file(s) reached a second time through links were listed once", root,
                       duplicates)


def list_image_folder(root: str) -> FolderListing:
    """Lists ``root/<class>/**/<image>`` (see the module docstring).

    Raises:
        ValueError: ``root`` is not a folder, has no class folders, or a class folder holds no image.
    """
    classes = _class_dirs(root)
    walker = _Walker(root, classes)
    out = FolderListing(classes)
    seen: set[str] = set()
    for label, name in enumerate(classes):
        folders = sorted(walker.walk(os.path.join(root, name)), key=lambda f: f[0])  # torchvision: by folder path
        for path, real, files in folders:
            for e in files:
                if not is_image_file(e.name):
                    continue
                key = walker.file_key(real, e)
                if key is None or key in seen:
                    out.duplicates += 1
                    continue
                seen.add(key)
                out.samples.append((os.path.join(path, e.name), label))
    out.skipped_links = walker.skipped_links
    empty = sorted(set(classes) - {classes[label] for _, label in out.samples})
    if empty:
        raise ValueError(f"{root!r}: class folder(s) with no image: {', '.join(empty[:10])}"
                         f"{' ...' if len(empty) > 10 else ''} (image extensions: {', '.join(IMG_EXTENSIONS)})")
    _warn(root, out.skipped_links, out.duplicates)
    return out


def probe_image_folder(root: str, need: int) -> int:
    """Cheap check before any worker starts: every class folder holds an image, and ``min(images, need)``.

    Walks each class folder only until its first image, then goes on counting (distinct real files) until
    ``need`` images are found; a folder of 1.28M images is not listed in full.

    Raises:
        ValueError: as :func:`list_image_folder`.
    """
    classes = _class_dirs(root)
    walker = _Walker(root, classes)
    walks = {name: walker.walk(os.path.join(root, name)) for name in classes}
    seen: set[str] = set()

    def take(name: str, limit: int) -> int:
        found = 0
        for _, real, files in walks[name]:
            for e in files:
                if is_image_file(e.name):
                    key = walker.file_key(real, e)
                    if key is not None and key not in seen:
                        seen.add(key)
                        found += 1
            if found >= limit:
                break
        return found

    empty = [name for name in classes if take(name, 1) == 0]
    if empty:
        raise ValueError(f"{root!r}: class folder(s) with no image: {', '.join(empty[:10])}"
                         f"{' ...' if len(empty) > 10 else ''} (image extensions: {', '.join(IMG_EXTENSIONS)})")
    for name in classes:
        if len(seen) >= need:
            break
        take(name, need - len(seen))
    return min(len(seen), need)
