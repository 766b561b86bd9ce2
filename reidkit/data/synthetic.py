"""Procedural re-ID dataset in Market-1501 layout: structured people seen through unlike cameras.

Each identity has discrete clothing attributes (colours from a small palette, a pattern, a lower
garment, hair, a bag) and a build; each camera has its own colour cast, exposure, blur, framing
and background; each image adds pose and noise jitter. The palette is small on purpose, so many
identities share colours and differ only in pattern or garment shape, and the casts are strong
enough that raw colour mostly matches the camera, not the person: matching must be learned.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from rich.console import Console
from rich.progress import track

from reidkit.data.datasets import DISTRACTOR_PID, SPLIT_FOLDERS, PublishedCounts
from reidkit.errors import DatasetError
from reidkit.terminal import draws_bars


@dataclass(frozen=True)
class SyntheticSpec:
    """Size and seed of a synthetic dataset; the same spec always gives byte-identical files."""

    train_ids: int = 60
    test_ids: int = 40
    cameras: int = 4
    # 60 ids x 4 cameras x 3 = 720 training images: ResNet-18 at 192x64 trains a few epochs in
    # a couple of minutes on 2 CPU cores.
    images_per_camera: int = 3
    height: int = 128  # Market-1501's crop size
    width: int = 64
    seed: int = 0
    query_cameras: int = 2  # each test identity has one query image in this many cameras
    distractors: int = 20  # pid-0 gallery images of people outside every identity set

    def __post_init__(self) -> None:
        if self.train_ids < 1 or self.test_ids < 1:
            raise DatasetError("synthetic: --train-ids and --test-ids must be at least 1")
        if self.train_ids + self.test_ids > 9999:
            raise DatasetError("synthetic: at most 9,999 identities fit the 4-digit file names")
        if not 2 <= self.cameras <= len(_CASTS):
            raise DatasetError(f"synthetic: --cameras must be between 2 and {len(_CASTS)}")
        if self.images_per_camera < 1 or self.distractors < 0:
            raise DatasetError("synthetic: images_per_camera >= 1 and distractors >= 0 required")
        if not 1 <= self.query_cameras <= self.cameras:
            raise DatasetError("synthetic: query_cameras must be between 1 and the camera count")
        if self.query_cameras == self.cameras and self.images_per_camera < 2:
            # otherwise a query's only true matches would sit in its own camera
            raise DatasetError("synthetic: query_cameras = cameras needs images_per_camera >= 2")
        if self.height < 32 or self.width < 16:
            raise DatasetError("synthetic: images must be at least 32x16 pixels")
        if self.seed < 0:
            raise DatasetError("synthetic: --seed must be non-negative")

    def counts(self) -> PublishedCounts:
        """What `generate_synthetic` writes for this spec."""
        per_id = self.cameras * self.images_per_camera
        queries = self.test_ids * self.query_cameras
        return PublishedCounts(
            train_ids=self.train_ids,
            train_images=self.train_ids * per_id,
            query_ids=self.test_ids,
            query_images=queries,
            gallery_images=self.test_ids * per_id - queries + self.distractors,
            cameras=self.cameras,
        )


@dataclass(frozen=True)
class Appearance:
    """What stays the same about a person in every camera."""

    upper: int  # index into PALETTE
    upper_pattern: str  # one of PATTERNS
    upper_second: int  # PALETTE index of the pattern's second colour
    lower: int  # index into PALETTE
    lower_style: str  # one of LOWER_STYLES
    hair: int  # index into HAIR
    long_hair: bool
    skin: int  # index into SKIN
    bag: str  # one of BAGS
    bag_colour: int  # index into PALETTE
    height: float  # fraction of the camera's full person height
    build: float  # width factor

    def signature(self) -> tuple:
        """The discrete attributes: two identities never share all of them."""
        return (
            self.upper,
            self.upper_pattern,
            self.upper_second if self.upper_pattern != "plain" else -1,
            self.lower,
            self.lower_style,
            self.bag,
        )


@dataclass(frozen=True)
class CameraLook:
    """What a camera does to everyone it sees."""

    gain: tuple[float, float, float]  # per-channel colour cast
    contrast: float
    blur: float  # Gaussian radius, pixels at 128x64
    scale: float  # full person height / image height
    shift: float  # horizontal offset of the walking line, fraction of width
    texture: str  # one of TEXTURES
    wall: tuple[float, float, float]
    floor: tuple[float, float, float]
    floor_line: float  # fraction of the height where the floor starts


# Eight clothing colours: few enough that identities share them (RGB 0-255).
PALETTE = np.array(
    [
        (200, 40, 40),  # red
        (40, 70, 170),  # blue
        (40, 140, 60),  # green
        (225, 200, 60),  # yellow
        (35, 35, 35),  # black
        (230, 230, 225),  # white
        (130, 130, 130),  # grey
        (120, 75, 45),  # brown
    ],
    dtype=np.float32,
)
PATTERNS = ("plain", "hstripes", "vstripes", "checks")
LOWER_STYLES = ("trousers", "shorts", "skirt")
BAGS = ("none", "backpack", "shoulder")
HAIR = np.array([(25, 20, 15), (90, 55, 30), (200, 170, 100), (160, 160, 160)], np.float32)
SKIN = np.array([(235, 195, 165), (200, 150, 110), (140, 95, 65), (90, 60, 40)], np.float32)
TEXTURES = ("bricks", "fence", "gradient", "tiles", "speckle")

# Strong, distinct camera casts (a seed permutes and perturbs them): a red shirt under the warm
# camera and an orange one under the neutral camera have nearly the same raw colour.
_CASTS = (
    (1.00, 1.00, 1.00),  # neutral
    (1.35, 1.00, 0.65),  # warm, sodium lamps
    (0.70, 0.95, 1.40),  # cool, shade
    (0.85, 1.30, 0.80),  # green fluorescent
    (0.60, 0.60, 0.68),  # dim
    (1.25, 0.80, 1.15),  # magenta
    (1.10, 1.10, 0.55),  # yellow
    (0.75, 0.80, 1.05),  # dusk
    (1.30, 1.30, 1.25),  # overexposed
)


def draw_identities(spec: SyntheticSpec) -> dict[int, Appearance]:
    """Pid -> appearance; pids 1..train_ids train, then the test ids; signatures all differ."""
    rng = np.random.default_rng([spec.seed, 1])
    people: dict[int, Appearance] = {}
    seen: set[tuple] = set()
    for pid in range(1, spec.train_ids + spec.test_ids + 1):
        person = _draw_appearance(rng)
        while person.signature() in seen:
            person = _draw_appearance(rng)
        seen.add(person.signature())
        people[pid] = person
    return people


def camera_looks(spec: SyntheticSpec) -> list[CameraLook]:
    """One look per camera; index 0 is camera c1."""
    rng = np.random.default_rng([spec.seed, 2])
    casts = [_CASTS[i] for i in rng.permutation(len(_CASTS))[: spec.cameras]]
    textures = [TEXTURES[i % len(TEXTURES)] for i in rng.permutation(spec.cameras)]
    looks = []
    for cast, texture in zip(casts, textures, strict=True):
        jitter = np.exp(rng.normal(0.0, 0.05, 3))
        looks.append(
            CameraLook(
                gain=tuple(float(g) for g in np.asarray(cast) * jitter),
                contrast=float(rng.uniform(0.75, 1.15)),
                blur=float(rng.choice([0.0, 0.4, 0.8, 1.2])),
                scale=float(rng.uniform(0.74, 0.95)),
                shift=float(rng.uniform(-0.08, 0.08)),
                texture=texture,
                wall=tuple(float(v) for v in rng.uniform(60, 220, 3)),
                floor=tuple(float(v) for v in rng.uniform(40, 180, 3)),
                floor_line=float(rng.uniform(0.72, 0.86)),
            )
        )
    return looks


def generate_synthetic(spec: SyntheticSpec, folder: Path, progress: bool = True) -> None:
    """Write `bounding_box_train/`, `query/` and `bounding_box_test/` under `folder`.

    File names are Market-style, `0001_c1s1_000001_00.jpg`. Training identities are pids
    1..train_ids, test identities follow. Every test identity has `images_per_camera` images in
    each camera; one of them is the query in `query_cameras` cameras chosen per identity, the
    gallery holds the rest, so every query has true matches in another camera. `distractors`
    gallery images (pid 0) show people outside every identity set.
    """
    folder = Path(folder)
    for name in SPLIT_FOLDERS.values():
        (folder / name).mkdir(parents=True, exist_ok=True)
    people = draw_identities(spec)
    looks = camera_looks(spec)
    jobs = _plan(spec, people)
    canvas = _Canvas(spec.height, spec.width)
    console = Console(stderr=True)
    steps = track(
        enumerate(jobs, start=1),
        total=len(jobs),
        description="generating synthetic images",
        disable=not draws_bars(progress, console),
        transient=True,
        console=console,
    )
    for frame, (split, pid, cam, person, image_seed) in steps:
        rng = np.random.default_rng([spec.seed, *image_seed])
        pixels = canvas.render(person, looks[cam - 1], rng)
        name = f"{pid:04d}_c{cam}s1_{frame:06d}_00.jpg"
        # no EXIF, fixed quality and subsampling: the bytes depend only on the pixels
        Image.fromarray(pixels).save(
            folder / SPLIT_FOLDERS[split] / name, "JPEG", quality=90, subsampling=0
        )


def _plan(spec: SyntheticSpec, people: dict[int, Appearance]) -> list[tuple]:
    """(split, pid, camera, appearance, per-image seed) for every image, in file order."""
    jobs = []
    for pid, person in people.items():
        is_test = pid > spec.train_ids
        query_cams: set[int] = set()
        if is_test:
            rng = np.random.default_rng([spec.seed, 3, pid])
            picked = rng.choice(spec.cameras, spec.query_cameras, replace=False)
            query_cams = {int(c) + 1 for c in picked}
        for cam in range(1, spec.cameras + 1):
            for k in range(spec.images_per_camera):
                if not is_test:
                    split = "train"
                else:
                    split = "query" if cam in query_cams and k == 0 else "gallery"
                jobs.append((split, pid, cam, person, (4, pid, cam, k)))
    rng = np.random.default_rng([spec.seed, 5])
    for j in range(spec.distractors):
        person = _draw_appearance(rng)
        cam = int(rng.integers(1, spec.cameras + 1))
        jobs.append(("gallery", DISTRACTOR_PID, cam, person, (6, j)))
    return jobs


def _draw_appearance(rng: np.random.Generator) -> Appearance:
    upper, second = rng.choice(len(PALETTE), 2, replace=False)
    return Appearance(
        upper=int(upper),
        upper_pattern=str(rng.choice(PATTERNS)),
        upper_second=int(second),
        lower=int(rng.integers(len(PALETTE))),
        lower_style=str(rng.choice(LOWER_STYLES, p=[0.6, 0.2, 0.2])),
        hair=int(rng.integers(len(HAIR))),
        long_hair=bool(rng.random() < 0.3),
        skin=int(rng.integers(len(SKIN))),
        bag=str(rng.choice(BAGS, p=[0.5, 0.25, 0.25])),
        bag_colour=int(rng.integers(len(PALETTE))),
        height=float(rng.uniform(0.86, 1.0)),
        build=float(rng.uniform(0.85, 1.15)),
    )


class _Canvas:
    """Renders one image at a fixed size; holds the pixel grids the shape masks are made from."""

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        self.yy, self.xx = yy, xx  # (H, W) pixel-centre coordinates
        self.unit = height / 128  # geometry is tuned at 128x64; scale pixel sizes with height

    def render(self, person: Appearance, look: CameraLook, rng: np.random.Generator) -> np.ndarray:
        """An (H, W, 3) uint8 image of `person` as `look`'s camera sees it."""
        image = self._background(look, rng)  # (H, W, 3) float32, 0-255
        self._paint_person(image, person, look, rng)
        image *= np.asarray(look.gain, np.float32) * rng.uniform(0.92, 1.08)
        image = (image - 128.0) * look.contrast + 128.0
        pixels = np.clip(image, 0, 255).astype(np.uint8)
        if look.blur > 0:
            blur = ImageFilter.GaussianBlur(look.blur * self.unit)
            pixels = np.asarray(Image.fromarray(pixels).filter(blur))
        noisy = pixels + 4.0 * rng.standard_normal(pixels.shape, dtype=np.float32)
        return np.clip(noisy, 0, 255).astype(np.uint8)

    def _background(self, look: CameraLook, rng: np.random.Generator) -> np.ndarray:
        h, w = self.height, self.width
        yy, xx = self.yy, self.xx + rng.integers(0, w)  # a new stretch of wall in each image
        wall = np.asarray(look.wall, np.float32)
        shade = np.ones((h, w), np.float32)
        step = 6 * self.unit
        if look.texture == "bricks":
            row = np.floor(yy / step)
            offset = (row % 2) * step
            mortar = (yy % step < self.unit) | ((xx + offset) % (2 * step) < self.unit)
            shade = np.where(mortar, 0.6, 1.0)
        elif look.texture == "fence":
            shade = np.where(xx % (1.5 * step) < 0.5 * step, 0.7, 1.0)
        elif look.texture == "gradient":
            shade = 1.0 - 0.45 * yy / h
        elif look.texture == "tiles":
            shade = np.where((np.floor(yy / (2 * step)) + np.floor(xx / (2 * step))) % 2, 0.8, 1.0)
        elif look.texture == "speckle":
            shade = 1.0 + rng.normal(0.0, 0.12, (h, w))
        image = wall * shade.astype(np.float32)[..., None]  # (H, W, 3)
        floor = yy >= look.floor_line * h
        image[floor] = np.asarray(look.floor, np.float32)
        return image

    def _paint_person(
        self, image: np.ndarray, person: Appearance, look: CameraLook, rng: np.random.Generator
    ) -> None:
        yy, xx = self.yy, self.xx
        tall = self.height * look.scale * person.height * rng.uniform(0.96, 1.04)
        top = self.height * 0.985 - tall + rng.uniform(-2, 2) * self.unit
        cx = self.width * (0.5 + look.shift) + rng.uniform(-3, 3) * self.unit
        side = 1.0 if rng.random() < 0.5 else -1.0  # which way the person faces
        stride = rng.uniform(-1.0, 1.0)  # walking phase: legs apart, arms swung
        torso_half = 0.12 * tall * person.build
        leg_width = 0.09 * tall * person.build
        skin = SKIN[person.skin]
        upper, second = PALETTE[person.upper], PALETTE[person.upper_second]
        lower = PALETTE[person.lower]

        def rect(y0: float, y1: float, x0: float, x1: float) -> np.ndarray:
            return (yy >= top + y0 * tall) & (yy < top + y1 * tall) & (xx >= x0) & (xx < x1)

        if person.long_hair:
            image[rect(0.05, 0.26, cx - 0.06 * tall, cx + 0.06 * tall)] = HAIR[person.hair]
        if person.bag == "backpack":  # the pack shows beside the back, opposite the facing side
            x0, x1 = sorted((cx - side * torso_half, cx - side * (torso_half + 0.07 * tall)))
            image[rect(0.18, 0.45, x0, x1)] = PALETTE[person.bag_colour]

        # legs: lower garment down to the ankle (trousers) or knee (shorts, skirt)
        spread = 0.03 * tall * abs(stride)
        hem = {"trousers": 0.93, "shorts": 0.7, "skirt": 0.52}[person.lower_style]
        for sign in (-1.0, 1.0):
            x_in = cx + sign * spread
            x0, x1 = sorted((x_in, x_in + sign * leg_width))
            image[rect(0.5, 0.93, x0, x1)] = skin
            image[rect(0.5, hem, x0, x1)] = lower
            image[rect(0.93, 0.985, x0 - 0.01 * tall, x1 + 0.01 * tall)] = (40, 35, 35)
        if person.lower_style == "skirt":
            depth = (yy - (top + 0.5 * tall)) / tall  # 0 at the waist, 0.22 at the hem
            skirt = (depth >= 0) & (depth < 0.22) & (np.abs(xx - cx) < torso_half * (1 + 2 * depth))
            image[skirt] = lower

        # arms, then the torso over their shoulders; the swing lengthens one arm, shortens the other
        for sign in (-1.0, 1.0):
            reach = 0.47 + 0.03 * stride * sign
            x0, x1 = sorted((cx + sign * torso_half, cx + sign * (torso_half + 0.05 * tall)))
            image[rect(0.17, reach, x0, x1)] = skin
            image[rect(0.17, 0.33, x0, x1)] = upper
        torso = rect(0.15, 0.52, cx - torso_half, cx + torso_half)
        image[torso] = upper
        period = max(2.0, 0.05 * tall)
        rows = np.floor((yy - top) / period)
        cols = np.floor((xx - cx) / period)
        pattern = {
            "plain": np.zeros_like(torso),
            "hstripes": rows % 2 == 1,
            "vstripes": cols % 2 == 1,
            "checks": (rows + cols) % 2 == 1,
        }[person.upper_pattern]
        image[torso & pattern] = second

        if person.bag == "shoulder":
            strap = np.abs((xx - cx) - side * ((yy - top) - 0.3 * tall) * 0.7) < 0.8 * self.unit
            image[strap & torso] = PALETTE[person.bag_colour]
            x = cx + side * torso_half
            x0, x1 = sorted((x - side * 0.03 * tall, x + side * 0.06 * tall))
            image[rect(0.44, 0.58, x0, x1)] = PALETTE[person.bag_colour]
        if person.bag == "backpack":  # straps over the shoulders
            for sign in (-1.0, 1.0):
                x = cx + sign * 0.6 * torso_half
                image[rect(0.15, 0.34, x - 0.6 * self.unit, x + 0.6 * self.unit)] = PALETTE[
                    person.bag_colour
                ]

        # head: face, then the hair cap over its upper part
        cy = top + 0.08 * tall
        hx = cx + side * 0.01 * tall
        head = ((yy - cy) / (0.075 * tall)) ** 2 + ((xx - hx) / (0.055 * tall)) ** 2 <= 1
        image[head] = skin
        image[head & (yy < cy - 0.015 * tall)] = HAIR[person.hair]
