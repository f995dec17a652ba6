"""Image-caption pairs: photographs that ship with scikit-image (`skimage.data`) with captions written
for them in this project, or a user's own folder / JSONL of pairs.

The shipped photographs are split by name into calibration/training photographs and evaluation ones,
which never overlap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hyperquant.errors import HyperquantError

SKIMAGE_INSTALL = "pip install scikit-image"
# Captions written for this project, two per photograph (what each one shows).
PHOTOS: dict[str, tuple[str, ...]] = {
    "astronaut": ("A smiling astronaut in an orange flight suit poses beside an American flag and a space shuttle model.",
                  "Portrait of a woman astronaut holding her white helmet in front of a flag."),
    "coffee": ("A cup of coffee on a red saucer with a spoon, on a wooden table.",
               "An espresso in a white cup with a brown rim, seen from above."),
    "camera": ("A man in a dark coat looks through a camera on a tripod in a grassy field.",
               "Black-and-white photograph of a photographer at work, with buildings in the distance."),
    "moon": ("The grey surface of the moon, covered with small craters and dark patches.",
             "A close view of a cratered lunar landscape in shades of grey."),
    "page": ("A scanned book page about region-based segmentation, with a line of Python code.",
             "Printed text on a slightly curved page with a heading in bold."),
    "text": ("Handwritten mathematical symbols on lined paper, photographed at an angle.",
             "Chalk-like handwritten numbers and letters on a grey surface."),
    "clock": ("A blurred wall clock, moving fast in front of a plain grey background.",
              "A round clock face smeared by motion blur."),
    "hubble_deep_field": ("Thousands of distant galaxies scattered across a black sky.",
                          "A deep-field space telescope image of faint colourful galaxies."),
    "immunohistochemistry": ("A microscope image of stained tissue, brown cells on a pale blue background.",
                             "Tissue under a microscope, with brown stained glands and blue nuclei."),
    "brick": ("A grey brick wall seen at an angle, with long rows of bricks.",
              "A close view of bricks laid in a running pattern."),
    "grass": ("A patch of short grass seen from above, in black and white.",
              "Dense blades of grass filling the whole picture."),
    "gravel": ("A bed of small grey pebbles seen from above.",
               "Gravel stones of many shapes packed close together."),
    # evaluation photographs: never used for calibration or training
    "chelsea": ("A close-up of a tabby cat with green eyes and long white whiskers.",
                "The face of a striped orange and grey cat looking at the camera."),
    "rocket": ("A rocket stands on its launch pad at night, lit by floodlights between tall towers.",
               "A white rocket ready for launch under a dark blue evening sky."),
    "coins": ("Rows of old silver coins on a dark background.",
              "A black-and-white photograph of two dozen ancient coins laid out in a grid."),
    "retina": ("A photograph of the back of a human eye, with red blood vessels spreading from the optic disc.",
               "An orange-red image of a retina with branching vessels."),
}
EVAL_PHOTOS = ("chelsea", "rocket", "coins", "retina")


@dataclass(frozen=True)
class ImageCaption:
    name: str
    image: object  # PIL.Image.Image, RGB
    caption: str


def _skimage_photo(name: str):
    from PIL import Image

    try:
        import skimage.data
    except ImportError:
        raise HyperquantError(f"the shipped photographs come from scikit-image, which is not installed; "
                              f"install it with: {SKIMAGE_INSTALL}") from None
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def shipped_pairs(split: str) -> list[ImageCaption]:
    """The shipped photographs of ``split`` ("calibration" or "evaluation"), each with each caption."""
    if split not in ("calibration", "evaluation"):
        raise ValueError(f"split={split!r}: calibration or evaluation")
    names = [n for n in PHOTOS if (n in EVAL_PHOTOS) == (split == "evaluation")]
    pairs = []
    for name in names:
        image = _skimage_photo(name)
        pairs += [ImageCaption(f"{name}#{i}", image, caption) for i, caption in enumerate(PHOTOS[name])]
    return pairs


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _open_image(path: Path, origin: str):
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise HyperquantError(f"{origin}: image {path} does not exist; fix the path")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise HyperquantError(f"{origin}: {path} is not a readable image ({e}); give PNG or JPEG files") from None


def read_pairs(path: str | Path) -> list[ImageCaption]:
    """A user's image-caption pairs: a folder of images, each with a caption file of the same name and
    the suffix .txt (one caption per line), or a JSONL file of {"image": path, "caption": text} lines
    (paths relative to the file)."""
    path = Path(path)
    if not path.exists():
        raise HyperquantError(f"image-caption data {path} does not exist; give a folder of images with .txt "
                              f"captions or a JSONL file of {{\"image\", \"caption\"}} lines")
    pairs: list[ImageCaption] = []
    if path.is_dir():
        for image_path in sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            caption_file = image_path.with_suffix(".txt")
            if not caption_file.is_file():
                raise HyperquantError(f"{image_path} has no caption file {caption_file.name}; write its caption "
                                      f"there (one per line)")
            captions = [line.strip() for line in caption_file.read_text(encoding="utf-8").splitlines() if line.strip()]
            if not captions:
                raise HyperquantError(f"{caption_file} is empty; write the image's caption in it")
            image = _open_image(image_path, str(path))
            pairs += [ImageCaption(f"{image_path.name}#{i}", image, c) for i, c in enumerate(captions)]
    else:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                image_name, caption = entry["image"], entry["caption"]
            except (ValueError, KeyError, TypeError):
                raise HyperquantError(f"{path}:{number} is not a JSON object with \"image\" and \"caption\"; "
                                      f"fix that line") from None
            if not isinstance(caption, str) or not caption.strip():
                raise HyperquantError(f"{path}:{number}: the caption is empty; write one")
            image = _open_image(path.parent / image_name, f"{path}:{number}")
            pairs.append(ImageCaption(f"{image_name}#{number}", image, caption.strip()))
    if not pairs:
        raise HyperquantError(f"{path} holds no image-caption pairs; give images with .txt captions or JSONL lines")
    return pairs
