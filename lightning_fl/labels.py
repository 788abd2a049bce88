"""The unified label space and what each site annotates in it (`docs/explanation/label-space.md`).

Everything a site needs to know about classes is derived here from the config: its foreground set
F_k, its ConDist background groups (each organ with its tumours, true background alone) and how
a class it does not annotate is written in its label files. Nothing downstream hard-codes a class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lightning_fl.errors import UserInputError

BACKGROUND = "background"


class LabelSpaceError(UserInputError):
    """A class list, tumour map or site task that does not describe a usable label space."""


@dataclass(frozen=True)
class LabelSpace:
    """The unified classes every site's labels are written in, and what each site's task means in them.

    Holds the class names by index (0 is background) and which organ each tumour belongs to;
    everything else (a site's foreground indices, its ConDist background groups, organ-level
    scoring) is derived from these two, so nothing downstream hard-codes a class.
    """

    classes: tuple[str, ...]
    tumor_of: Mapping[str, str]

    def __post_init__(self) -> None:
        if not self.classes or self.classes[0] != BACKGROUND:
            raise LabelSpaceError(f"labels.classes must start with '{BACKGROUND}' (index 0), got {list(self.classes)}")
        seen: set[str] = set()
        for name in self.classes:
            if name in seen:
                raise LabelSpaceError(f"labels.classes lists '{name}' twice")
            seen.add(name)
        for tumor, organ in self.tumor_of.items():
            for role, name in (("tumour", tumor), ("organ", organ)):
                if name not in seen or name == BACKGROUND:
                    raise LabelSpaceError(
                        f"labels.tumors maps '{tumor}' -> '{organ}', but {role} '{name}' is not a "
                        f"foreground class of labels.classes {list(self.classes[1:])}"
                    )
            if organ in self.tumor_of:
                raise LabelSpaceError(f"labels.tumors: '{organ}' is a tumour, it cannot own '{tumor}'")

    @staticmethod
    def of(labels: Any) -> LabelSpace:
        """The label space of a config's `labels` section (`classes`, `tumors`), checked."""
        return LabelSpace(tuple(labels.classes), dict(labels.tumors))

    @property
    def num_classes(self) -> int:
        """How many classes, background included: the network's output channels."""
        return len(self.classes)

    @property
    def organs(self) -> list[str]:
        """Foreground classes that are not tumours, in class order."""
        return [c for c in self.classes[1:] if c not in self.tumor_of]

    def index(self, name: str, where: str = "labels") -> int:
        """Class index of `name`; `where` names the config entry for the error message."""
        try:
            return self.classes.index(name)
        except ValueError:
            raise LabelSpaceError(f"{where}: unknown class '{name}'; known classes are {list(self.classes)}") from None

    def foreground(self, site_classes: Sequence[str], where: str = "site") -> list[int]:
        """Sorted indices of the classes a site annotates (F_k); background is never one of them."""
        if not site_classes:
            raise LabelSpaceError(f"{where}: a site must label at least one class, got none")
        indices = [self.index(c, where) for c in site_classes]
        if 0 in indices:
            raise LabelSpaceError(f"{where}: '{BACKGROUND}' is implicit and cannot be a labelled class")
        if len(set(indices)) != len(indices):
            raise LabelSpaceError(f"{where}: a class is listed twice in {list(site_classes)}")
        return sorted(indices)

    def group_of(self, index: int) -> int:
        """The class that heads `index`'s anatomical group: the organ of a tumour, else itself."""
        name = self.classes[index]
        return self.classes.index(self.tumor_of[name]) if name in self.tumor_of else index

    def background_groups(self, foreground: Sequence[int], by: str = "organ") -> list[list[int]]:
        """ConDist groups of the classes outside F_k: by "organ", true background alone and each organ
        with its tumours; by "class", one group per class."""
        if by == "class":
            return [[c] for c in range(self.num_classes) if c not in foreground]
        groups: dict[int, list[int]] = {}
        for c in range(self.num_classes):
            if c not in foreground:
                head = self.group_of(c) if self.group_of(c) not in foreground else c
                groups.setdefault(head, []).append(c)
        return [groups[h] for h in sorted(groups)]

    def annotation_lut(self, site_classes: Sequence[str], where: str = "site") -> np.ndarray:
        """Map a full label volume to what a site annotates: its classes kept; a tumour the site
        does not label drawn as its organ when the site labels the organ (an organ outline includes
        its lesions, as in AMOS); everything else background."""
        foreground = self.foreground(site_classes, where)
        lut = np.zeros(self.num_classes, dtype=np.uint8)
        for c in range(1, self.num_classes):
            if c in foreground:
                lut[c] = c
            elif self.group_of(c) in foreground:
                lut[c] = self.group_of(c)
        return lut

    def organ_lut(self) -> np.ndarray:
        """Map every class to its organ (tumours merged), for organ-level evaluation."""
        return np.array([self.group_of(c) for c in range(self.num_classes)], dtype=np.int64)


@dataclass(frozen=True)
class LabelMap:
    """A dataset's native label values → unified class indices (an entry of configs/prepare/tasks.yaml)."""

    name: str
    values: Mapping[int, int]  # native value -> unified class index
    background: frozenset[int]  # native values drawn as background
    unlisted_background: bool  # every other value is background too (schemes with many structures)
    per_organ: bool = False  # labelled without tumours: predicted tumours are scored as their organ

    @property
    def classes(self) -> list[int]:
        """The unified classes these labels annotate."""
        return sorted(set(self.values.values()))

    def unexpected(self, native: np.ndarray) -> list[int]:
        """Values the map does not list (none where unlisted values count as background)."""
        if self.unlisted_background:
            return []
        return sorted(set(np.unique(native).tolist()) - set(self.values) - self.background - {0})

    def apply(self, native: np.ndarray) -> np.ndarray:
        """Native label values → unified class indices (uint8); values the map does not list become 0."""
        mapped = np.zeros(native.shape, dtype=np.uint8)
        for value, index in self.values.items():
            mapped[native == value] = index
        return mapped
