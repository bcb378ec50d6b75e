"""Drawing a layout as a before/after pair of aerial-looking images, and its exact change labels.

Each image is drawn as a *material id map* (PIL ImageDraw, fast C code) that a palette turns into
colours in one numpy gather, modulated by texture noise shared by both images. Sharing terrain and
texture means an unchanged pixel is identical in A and B before the nuisances, so every real
difference comes from a changed road or building (or its shadow).

The nuisances — illumination and white balance, season, haze, sensor noise, blur, and a pixel or
two of misregistration — are the variation a change model must learn to ignore.
"""

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .scene import BOTH, ONLY_A, ONLY_B, Layout, convex_hull, draw_road

# Material ids of the id map.
TERRAIN, WATER, SOIL, CURB, ROAD = 0, 1, 2, 3, 4
FIRST_BUILDING_ID = 16  # two ids per building (the halves of a gable roof, or rim and top of a flat one)
FIRST_TREE_ID = 208  # 8 canopy shades, then their 8 sunlit highlights
GROUND_IDS = (TERRAIN, WATER, SOIL, CURB, ROAD)  # what a shadow can fall on

# Internal change labels, one per change group; the public mask merges them (see MASK_VALUES).
ROAD_ADDED, ROAD_REMOVED, BUILDING_ADDED, BUILDING_REMOVED = 1, 2, 3, 4
MASK_VALUES = np.array([0, 128, 128, 255, 255], np.uint8)  # LEVIR-MCI: 128 road, 255 building

TERRAIN_COLOURS = {  # (dominant colour, secondary patch colour)
    "grass": ((88, 108, 56), (130, 126, 82)),
    "bare": ((184, 166, 134), (150, 134, 104)),
    "desert": ((206, 190, 158), (182, 162, 126)),
    "mixed": ((96, 114, 62), (180, 162, 130)),
}
ROAD_COLOURS = {  # (curb, surface)
    "asphalt": ((178, 175, 168), (92, 94, 97)),
    "concrete": ((150, 148, 142), (188, 186, 180)),
    "dirt": ((160, 142, 110), (194, 176, 142)),
}
TREE_COLOURS = np.array([(34, 56, 30), (40, 62, 34), (46, 70, 38), (52, 76, 40), (36, 52, 32), (58, 80, 44), (44, 60, 30), (30, 48, 28)], float)
TEXTURE_STRENGTH = {TERRAIN: 0.07, WATER: 0.025, SOIL: 0.09, CURB: 0.03, ROAD: 0.04}
BUILDING_TEXTURE, TREE_TEXTURE = 0.03, 0.22
HAZE = np.array([200, 205, 212], np.float32)
SHADE = np.array([0.5, 0.53, 0.62], np.float32)  # shade is lit by the blue sky only
SEASON_TINT = np.array([0.35, 0.05, -0.25], np.float32)  # per unit of "season": green turns yellow-brown

# Nuisance ranges per --variation level.
VARIATION = {
    "light": dict(gain=0.08, channel=0.03, offset=5, gamma=0.05, season=(-0.15, 0.25), haze=0.08, noise=(0.5, 2.0), blur=0.0, shift=1),
    "heavy": dict(gain=0.25, channel=0.08, offset=15, gamma=0.2, season=(-0.4, 0.8), haze=0.3, noise=(1.0, 5.0), blur=0.3, shift=2),
}


def smooth_noise(rng: np.random.Generator, cells: int, size: int) -> np.ndarray:
    """Smooth random field of about unit std with `cells` blobs across: a tiny random grid, upsampled with
    cubic interpolation (as two small matrix products, much cheaper than PIL's float resize)."""
    grid = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    weights = _cubic_weights(cells + 1, size)
    return weights @ grid @ weights.T


@lru_cache(maxsize=16)
def _cubic_weights(src: int, dst: int) -> np.ndarray:
    """(dst, src) matrix of Keys' cubic interpolation weights (a = -0.5), pixel-centre aligned."""
    x = (np.arange(dst) + 0.5) * src / dst - 0.5
    left = np.floor(x).astype(int)
    weights = np.zeros((dst, src), np.float32)
    for offset in (-1, 0, 1, 2):
        d = np.abs(x - (left + offset))
        k = np.where(d <= 1, 1.5 * d**3 - 2.5 * d**2 + 1, np.where(d < 2, -0.5 * d**3 + 2.5 * d**2 - 4 * d + 2, 0))
        np.add.at(weights, (np.arange(dst), np.clip(left + offset, 0, src - 1)), k)
    return weights


def _jitter(rng, colour, amount: float) -> np.ndarray:
    jittered = np.array(colour, float) * rng.uniform(1 - amount, 1 + amount) + rng.normal(0, 4, 3)
    return np.clip(jittered, 0, 255).astype(np.float32)


@dataclass
class Materials:
    """Per-pair colours and textures, shared by A and B. Images are planar (3, n, n) float32 until the end:
    per-channel arithmetic on contiguous planes is several times faster than on interleaved RGB."""

    terrain: np.ndarray  # (3, n, n)
    grain: np.ndarray  # (n, n), fine texture noise
    palette: np.ndarray  # (3, 256)
    texture: np.ndarray  # (256,), grain strength per material


def make_materials(rng: np.random.Generator, layout: Layout) -> Materials:
    n = layout.canvas
    coarse = max(n // 4, 8)  # the terrain colour field is smooth: build it at quarter resolution
    main, patch = (_jitter(rng, c, 0.06) for c in TERRAIN_COLOURS[layout.terrain])
    sharpness = 3.0 if layout.terrain == "mixed" else 1.2  # mixed = distinct grass and bare patches
    patches = 1 / (1 + np.exp(-sharpness * (smooth_noise(rng, int(rng.integers(3, 7)), coarse) - 0.4)))
    unevenness = 1 + 0.06 * smooth_noise(rng, 24, coarse)  # mid-scale variation of the ground
    coarse_rgb = np.stack([(m + patches * (p - m)) * unevenness for m, p in zip(main, patch)], axis=-1)
    # Upsample as 8-bit RGB: PIL's integer resize is ~10x faster than its float one, and the grain and
    # noise added later hide the quantisation.
    rgb = Image.fromarray(np.clip(coarse_rgb + 0.5, 0, 255).astype(np.uint8)).resize((n, n), Image.BILINEAR)
    terrain = np.asarray(rgb).transpose(2, 0, 1).astype(np.float32)

    # Grain: half-resolution noise upsampled, so it has a little spatial structure, like foliage or gravel.
    grain_bytes = Image.fromarray(rng.integers(0, 256, (max(n // 2, 1),) * 2, np.uint8))
    grain = np.asarray(grain_bytes.resize((n, n), Image.BILINEAR)).astype(np.float32)
    grain = (grain - np.float32(127.5)) * np.float32(1 / 57)  # ~0.8 std: bilinear interpolation smooths it

    palette = np.zeros((256, 3), np.float32)
    texture = np.zeros(256, np.float32)
    palette[WATER] = _jitter(rng, (44, 72, 88), 0.15)
    palette[SOIL] = _jitter(rng, (176, 156, 122), 0.05)
    curb, surface = ROAD_COLOURS[layout.road_style]
    palette[CURB], palette[ROAD] = _jitter(rng, curb, 0.04), _jitter(rng, surface, 0.08)
    for material, strength in TEXTURE_STRENGTH.items():
        texture[material] = strength
    for k, building in enumerate(layout.buildings):
        roof = np.array(building.roof, np.float32)
        lit, shaded = FIRST_BUILDING_ID + 2 * k, FIRST_BUILDING_ID + 2 * k + 1
        palette[lit] = roof
        palette[shaded] = roof * (0.74 if building.gable else 0.88)
        texture[[lit, shaded]] = BUILDING_TEXTURE
    palette[FIRST_TREE_ID : FIRST_TREE_ID + 8] = TREE_COLOURS
    palette[FIRST_TREE_ID + 8 : FIRST_TREE_ID + 16] = TREE_COLOURS * 1.35
    texture[FIRST_TREE_ID : FIRST_TREE_ID + 16] = TREE_TEXTURE
    return Materials(terrain, grain, np.ascontiguousarray(palette.T), texture)


def _present(presence: str, image: str) -> bool:
    return presence == BOTH or presence == image


def _roof_parts(corners: list, gable: bool) -> tuple:
    """(lit part, shaded part) polygons. A gable roof splits along its ridge (the long axis);
    a flat roof is a rim with a slightly different top inset 2 px."""
    c0, c1, c2, c3 = corners
    mid = lambda p, q: ((p[0] + q[0]) / 2, (p[1] + q[1]) / 2)  # noqa: E731
    if gable:
        if math.dist(c0, c1) >= math.dist(c1, c2):
            return [c0, c1, mid(c1, c2), mid(c0, c3)], [mid(c0, c3), mid(c1, c2), c2, c3]
        return [c0, mid(c0, c1), mid(c2, c3), c3], [mid(c0, c1), c1, c2, mid(c2, c3)]
    cx, cy = sum(p[0] for p in corners) / 4, sum(p[1] for p in corners) / 4
    inset = []
    for x, y in corners:
        d = math.hypot(x - cx, y - cy) or 1.0
        inset.append((x - (x - cx) / d * 2.8, y - (y - cy) / d * 2.8))
    return corners, inset


def draw_id_map(layout: Layout, image: str) -> tuple:
    """(material id map, shadow map) of image "A" or "B", both (n, n) uint8 on the canvas."""
    n = layout.canvas
    ids = Image.new("L", (n, n), TERRAIN)
    shadow = Image.new("L", (n, n), 0)
    draw, draw_shadow = ImageDraw.Draw(ids), ImageDraw.Draw(shadow)
    sx, sy = layout.sun

    if layout.pond is not None:
        draw.polygon(layout.pond, fill=WATER)
    roads = [r for r in layout.roads if _present(r.presence, image)]
    for road in roads:  # all curbs first, so crossings join without a curb line across them
        draw_road(draw, road, CURB, road.footprint_width)
    for road in roads:
        draw_road(draw, road, ROAD, road.width)
    for k, building in enumerate(layout.buildings):
        if building.presence == ONLY_A and image == "B":
            draw.polygon(building.corners, fill=SOIL)  # a demolished house leaves bare ground
        if not _present(building.presence, image):
            continue
        h = building.height
        draw_shadow.polygon(convex_hull(building.corners + [(x + sx * h, y + sy * h) for x, y in building.corners]), fill=255)
        lit, shaded = _roof_parts(building.corners, building.gable)
        draw.polygon(lit, fill=FIRST_BUILDING_ID + 2 * k)
        draw.polygon(shaded, fill=FIRST_BUILDING_ID + 2 * k + 1)
    for tree in layout.trees:
        x, y, r = tree.x, tree.y, tree.radius
        ox, oy = x + sx * r * 0.9, y + sy * r * 0.9
        draw_shadow.ellipse([ox - r, oy - r, ox + r, oy + r], fill=255)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=FIRST_TREE_ID + tree.shade)
        hx, hy, hr = x - sx * r * 0.3, y - sy * r * 0.3, r * 0.5
        draw.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=FIRST_TREE_ID + 8 + tree.shade)
    return np.asarray(ids), np.asarray(shadow)


def count_visible_trees(layout: Layout) -> int:
    """Trees with canopy pixels inside image A's frame (the frame of the mask and of all the ground truth).

    Trees are scattered over the whole canvas, margin included, and nothing is drawn over a canopy, so a tree is
    in the picture exactly when its ellipse, as draw_id_map draws it, has a pixel in the frame. Only trees
    astride the frame's edge are drawn to find out, on the full canvas so that the pixels are the same.
    """
    n, low, high = layout.canvas, layout.margin, layout.margin + layout.size
    count = 0
    for tree in layout.trees:
        x, y, r = tree.x, tree.y, tree.radius
        if low + 1 <= x - r and x + r <= high - 2 and low + 1 <= y - r and y + r <= high - 2:
            count += 1  # well inside: a disc of radius >= 0.75 px always covers a pixel
        elif low - 1 <= x + r and x - r <= high and low - 1 <= y + r and y - r <= high:
            canopy = Image.new("L", (n, n), 0)
            ImageDraw.Draw(canopy).ellipse([x - r, y - r, x + r, y + r], fill=255)
            count += bool(np.asarray(canopy)[low:high, low:high].any())
    return count


def colourise(ids: np.ndarray, shadow: np.ndarray, materials: Materials) -> np.ndarray:
    """Material ids -> planar float32 RGB (3, n, n), before nuisances."""
    # np.take: much faster than fancy indexing for these lookups.
    colour = np.where(ids == TERRAIN, materials.terrain, np.take(materials.palette, ids, axis=1))
    colour *= 1 + np.take(materials.texture, ids) * materials.grain
    shaded = (shadow > 0) & (ids < FIRST_BUILDING_ID)  # shadows fall on the ground only (ids < 16)
    colour *= np.where(shaded, SHADE[:, None, None], np.float32(1))
    return colour


def sample_nuisance(rng: np.random.Generator, variation: str) -> dict:
    v = VARIATION[variation]
    return {
        "gain": float(1 + rng.uniform(-v["gain"], v["gain"])),
        "channel_gain": [float(1 + g) for g in rng.uniform(-v["channel"], v["channel"], 3)],
        "offset": float(rng.uniform(-v["offset"], v["offset"])),
        "gamma": float(1 + rng.uniform(-v["gamma"], v["gamma"])),
        "season": float(rng.uniform(*v["season"])),
        "haze": float(rng.uniform(0, v["haze"])),
        "noise": float(rng.uniform(*v["noise"])),
        "blur": float(rng.uniform(0.5, 0.9)) if rng.random() < v["blur"] else 0.0,
        "shift": [int(s) for s in rng.integers(-v["shift"], v["shift"] + 1, 2)],  # (dx, dy), used for B only
    }


def apply_nuisance(colour: np.ndarray, nuisance: dict, rng: np.random.Generator) -> np.ndarray:
    """Photometric nuisances on a planar float32 RGB image (3, h, w) -> interleaved uint8 (h, w, 3)."""
    r, g, b = colour
    # Season: only green things (vegetation) turn yellow (>0) or lusher (<0); roofs and roads do not.
    vegetation = np.clip((g - r - 2) * np.float32(1 / 15), 0, 1) * (g > b)
    tint = np.float32(nuisance["season"]) * SEASON_TINT
    gains = np.float32(nuisance["gain"]) * np.array(nuisance["channel_gain"], np.float32)
    colour = colour * (1 + vegetation * tint[:, None, None])
    colour *= gains[:, None, None]
    colour += np.float32(nuisance["offset"])
    if nuisance["haze"] > 0:
        alpha = np.float32(nuisance["haze"]) * np.clip(0.7 + 0.3 * smooth_noise(rng, 3, colour.shape[1]), 0, 1)
        colour = colour * (1 - alpha) + alpha * HAZE[:, None, None]
    # Sensor noise, uniform with the given std (uniform numbers are much cheaper to draw than normal ones).
    noise = rng.random(colour.shape[1:], np.float32) - np.float32(0.5)
    colour += noise * np.float32(nuisance["noise"] * 12**0.5) + np.float32(0.5)
    image = Image.fromarray(np.ascontiguousarray(np.clip(colour, 0, 255).astype(np.uint8).transpose(1, 2, 0)))
    # Gamma as an 8-bit lookup table in PIL: a float power per pixel would be the slowest step here.
    image = image.point([round(255 * (v / 255) ** nuisance["gamma"]) for v in range(256)] * 3)
    if nuisance["blur"] > 0:
        image = image.filter(ImageFilter.GaussianBlur(nuisance["blur"]))
    return np.asarray(image)


def change_labels(layout: Layout) -> np.ndarray:
    """(size, size) uint8 of change-group labels (ROAD_ADDED ... BUILDING_REMOVED), in A's frame.

    A changed road's label covers its footprint (curb included) except where an unchanged road lies
    under it: those pixels look the same in both images. Shadows are not labelled (as in LEVIR-CD).
    """
    n, m, size = layout.canvas, layout.margin, layout.size
    labels = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(labels)
    for road in layout.roads:
        if road.presence != BOTH:
            draw_road(draw, road, ROAD_ADDED if road.presence == ONLY_B else ROAD_REMOVED, road.footprint_width)
    for road in layout.roads:
        if road.presence == BOTH:
            draw_road(draw, road, 0, road.footprint_width)
    for building in layout.buildings:
        if building.presence != BOTH:
            draw.polygon(building.corners, fill=BUILDING_ADDED if building.presence == ONLY_B else BUILDING_REMOVED)
    return np.asarray(labels)[m : m + size, m : m + size].copy()


def render_pair(layout: Layout, rng: np.random.Generator, variation: str) -> tuple:
    """(image A, image B, change labels, nuisances) — images (size, size, 3) uint8."""
    materials = make_materials(rng, layout)
    m, size = layout.margin, layout.size
    images, nuisances = [], {}
    for name in ("A", "B"):
        ids, shadow = draw_id_map(layout, name)
        nuisance = sample_nuisance(rng, variation)
        if name == "A":
            nuisance["shift"] = [0, 0]  # misregistration is relative: only B moves
        dx, dy = nuisance["shift"]
        colour = colourise(ids, shadow, materials)[:, m + dy : m + dy + size, m + dx : m + dx + size]
        images.append(apply_nuisance(colour, nuisance, rng))
        nuisances[name] = nuisance
    return images[0], images[1], change_labels(layout), nuisances
