"""Which emoji class (emojibase subgroup) an openclipart or Tux Paint category folder depicts.

Both packages sort their pictures into category folders that other people made ("animals/mammals",
"food/fruit"). Where a folder's pictures all belong to one of the task label set's subgroups, its pictures get
that subgroup's bare class words as extra pretraining captions, as the pretraining emoji do. The map was
written from the folder names and a look at their file names, never from a task picture; folders whose
pictures mix several subgroups (openclipart's `office`, `tools`, `recreation/music`, `people/smilies`; Tux Paint's
`symbols/shapes`) are left out, after a contact sheet of each mapped class was looked at.
A key covers its sub-folders; a `None` value takes a sub-folder back out.
"""

from __future__ import annotations

from pathlib import PurePosixPath

OPENCLIPART_FOLDERS: dict[str, str | None] = {
    "animals/birds": "animal-bird",
    "animals/bugs": "animal-bug",
    "animals/mammals": "animal-mammal",
    "animals/fish": "animal-marine",
    "plants/flowers": "plant-flower",
    "plants/trees": "plant-other",
    "food/fruit": "food-fruit",
    "food/vegetables": "food-vegetable",
    "food/desserts": "food-sweet",
    "food/beverages": "drink",
    "food/breads_and_carbs": "food-prepared",
    "food/meats_and_eggs": "food-prepared",
    "people/clothing": "clothing",
    "people/bodypart": "body-parts",
    "recreation/sports": "sport",
    "recreation/games": "game",
    "recreation/party": "event",
    "recreation/holiday": "event",
    "recreation/religion": "religion",
    "buildings/homes": "place-building",
    "buildings/furniture": "household",
    "transportation/vehicles": "transport-ground",
    "transportation/aiga-symbols": "transport-sign",
    "signs_and_symbols/clocks": "time",
    "signs_and_symbols/weather": "sky-weather",
    "signs_and_symbols/money": "money",
    "signs_and_symbols/hazard": "warning",
    "geography/astronomy": "sky-weather",
    "science/astronomy": "sky-weather",
    "shapes/arrows": "arrow",
    "education/books": "book-paper",
    "tools/weapons": "tool",
    "electronics/bulb": "light-video",
    "computer/hardware": "computer",
}

TUXPAINT_FOLDERS: dict[str, str | None] = {
    "animals/mammals": "animal-mammal",
    "animals/marsupials": "animal-mammal",
    "animals/birds": "animal-bird",
    "animals/insects": "animal-bug",
    "animals/fish": "animal-marine",
    "food/fruit": "food-fruit",
    "food/vegetables": "food-vegetable",
    "food/nuts": "food-vegetable",
    "food/dessert": "food-sweet",
    "household/tools": "tool",
    "clothes/hats": "clothing",
    "plants/flowers": "plant-flower",
    "plants/trees": "plant-other",
    "town/houses": "place-building",
    "symbols/money": "money",
    "symbols/alphabets": "alphanum",
    "symbols/alphabets/asl": None,
    "symbols/chess": "game",
    "space/moon": "sky-weather",
    "space/planets": "sky-weather",
    "vehicles": "transport-ground",
    "vehicles/flight": "transport-air",
    "vehicles/ship": None,
    "hobbies/music": "musical-instrument",
    "people/body_parts": "body-parts",
    "seasonal": "event",
}

FOLDER_MAPS: dict[str, dict[str, str | None]] = {"openclipart": OPENCLIPART_FOLDERS, "tuxpaint": TUXPAINT_FOLDERS}


def folder_subgroup(source: str, folder: str) -> str | None:
    """The subgroup a picture in `folder` (relative to its package's root, '/'-separated) depicts, or None.

    The longest mapped folder that contains `folder` decides.
    """
    mapping = FOLDER_MAPS.get(source, {})
    path = PurePosixPath(folder)
    for candidate in (path, *path.parents):
        key = candidate.as_posix()
        if key in mapping:
            return mapping[key]
    return None
