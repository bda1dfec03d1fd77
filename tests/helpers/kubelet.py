"""A ConfigMap or Secret volume as the kubelet writes it, and its update.

The kubelet's atomic writer (pkg/volume/util/atomic_writer.go) puts each version of the
payload in a new hidden directory named after the time, ``..2006_01_02_15_04_05.<random>``,
points the ``..data`` symlink at it by renaming a fresh ``..data_tmp`` link over it (one atomic
step), and makes each key a symlink ``key -> ..data/key``. So a file of the volume keeps its
path while its content moves to a new inode, and a directory mount sees every version; a
subPath mount binds the first version's file and never sees another.
"""

from __future__ import annotations

import itertools
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

DATA = "..data"


class KubeletVolume:
    """A volume directory holding ``files`` (key to text), updated as the kubelet does."""

    def __init__(self, directory: Path, files: Mapping[str, str]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._versions = itertools.count(1)
        self._keys: set[str] = set()
        self.update(files)

    def path(self, key: str) -> Path:
        """Where the container sees one key: the symlink through ``..data``."""
        return self.directory / key

    def update(self, files: Mapping[str, str]) -> None:
        """Publish a new version: new timestamped directory, ``..data`` renamed over, key
        links for new keys, old keys' links and the old directory removed."""
        stamp = time.strftime("%Y_%m_%d_%H_%M_%S", time.gmtime())
        version = self.directory / f"..{stamp}.{next(self._versions):09d}"
        version.mkdir()
        for key, text in files.items():
            (version / key).write_text(text)
        data = self.directory / DATA
        old = data.resolve() if data.is_symlink() else None
        temporary = self.directory / "..data_tmp"
        temporary.symlink_to(version.name)
        temporary.rename(data)
        for key in files.keys() - self._keys:
            (self.directory / key).symlink_to(f"{DATA}/{key}")
        for key in self._keys - files.keys():
            (self.directory / key).unlink()
        self._keys = set(files)
        if old is not None:
            shutil.rmtree(old)
