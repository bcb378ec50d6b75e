"""Layout of one synthetic bi-temporal scene: which roads, buildings, trees and water exist, and in
which of the two images (A = before, B = after) each road and building is present.

Everything is placed in *canvas* coordinates. The canvas is the image plus a border of
`CANVAS_MARGIN` pixels on each side, so that image B can be cropped a pixel or two off-centre
(misregistration) without running out of picture. The visible frame of image A is
`[margin, margin + size)` in both axes, and every building lies fully inside it.

Placement keeps objects apart (an occupancy map with a small gap): trees never cover a road or a
building, buildings never touch each other or a road, and a changed road never crosses another road
except where it branches off, and is kept only if its part of the change mask is one blob of its own.
That keeps the ground truth exact: a changed object is exactly one connected blob of its value in the
change mask.
"""

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

CANVAS_MARGIN = 4  # > the largest misregistration shift (2 px in "heavy")

BOTH, ONLY_A, ONLY_B = "both", "A", "B"  # presence of an object in the before/after image

TERRAINS = ("grass", "bare", "desert", "mixed")

# Smallest building side at 256 px. A ViT at 224 px sees ~10 px, a little under one 14-px patch.
MIN_BUILDING_SIDE = 12.0
BUILDING_GAP = 3  # px of clear ground kept around every building (also keeps changed ones apart)
ROAD_GAP = 3  # px of clear ground kept between a spur road and any road it does not branch from
CHANGE_ATTEMPTS = 60  # placement tries of a planned change (scenery gets 12 per road, 25 per building)


@dataclass
class Road:
    points: list  # centre line [(x, y), ...] in canvas coordinates
    width: int  # asphalt width; the footprint adds a 1-px light curb on each side
    presence: str
    is_main: bool  # main roads run border to border; spurs branch off a main road
    cul_de_sac: bool = False  # a dead-end spur ends in a turning circle

    @property
    def footprint_width(self) -> int:
        return self.width + 2


@dataclass
class Building:
    corners: list  # 4 corners [(x, y), ...] in order around the rectangle
    roof: tuple  # RGB
    gable: bool  # gable roofs are drawn as two halves of different brightness
    height: float  # in px of shadow length per unit sun offset
    presence: str


@dataclass
class Tree:
    x: float
    y: float
    radius: float
    shade: int  # index into the tree palette


@dataclass
class Layout:
    size: int
    margin: int
    terrain: str
    sun: tuple  # shadow direction (unit vector, pointing away from the sun)
    road_style: str
    roads: list = field(default_factory=list)
    buildings: list = field(default_factory=list)
    trees: list = field(default_factory=list)
    pond: list | None = None  # polygon or None

    @property
    def canvas(self) -> int:
        return self.size + 2 * self.margin

    @property
    def scale(self) -> float:
        return self.size / 256.0


@dataclass
class ChangePlan:
    roads_added: int = 0
    roads_removed: int = 0
    buildings_added: int = 0
    buildings_removed: int = 0

    @property
    def total(self) -> int:
        return self.roads_added + self.roads_removed + self.buildings_added + self.buildings_removed


# ----------------------------------------------------------------------------------------------
# Change plans: which kind of change a changed pair shows. Mostly construction, as in LEVIR-CC.


def choose_change_plan(rng: np.random.Generator, change_probability: float) -> ChangePlan:
    if rng.random() >= change_probability:
        return ChangePlan()
    few_buildings = lambda: int(min(1 + rng.geometric(0.35), 8))  # noqa: E731 - 2..8, mostly 2-3
    kind = rng.choice(
        ["buildings_added", "road_added", "road_and_buildings", "buildings_removed", "road_removed", "mixed"],
        p=[0.38, 0.12, 0.22, 0.13, 0.05, 0.10],
    )
    if kind == "buildings_added":
        return ChangePlan(buildings_added=int(rng.choice([1, few_buildings()], p=[0.35, 0.65])))
    if kind == "road_added":
        return ChangePlan(roads_added=int(rng.choice([1, 2], p=[0.85, 0.15])))
    if kind == "road_and_buildings":
        return ChangePlan(roads_added=1, buildings_added=few_buildings())
    if kind == "buildings_removed":
        return ChangePlan(buildings_removed=int(rng.integers(1, 4)))
    if kind == "road_removed":
        return ChangePlan(roads_removed=1)
    return ChangePlan(buildings_added=int(rng.integers(1, 4)), buildings_removed=int(rng.integers(1, 3)))


# ----------------------------------------------------------------------------------------------
# Geometry helpers


def _unit(dx: float, dy: float) -> tuple:
    length = math.hypot(dx, dy) or 1.0
    return dx / length, dy / length


def rectangle_corners(cx: float, cy: float, along: float, depth: float, angle: float) -> list:
    ux, uy = math.cos(angle), math.sin(angle)
    nx, ny = -uy, ux
    a, d = along / 2, depth / 2
    return [
        (cx - ux * a - nx * d, cy - uy * a - ny * d),
        (cx + ux * a - nx * d, cy + uy * a - ny * d),
        (cx + ux * a + nx * d, cy + uy * a + ny * d),
        (cx - ux * a + nx * d, cy - uy * a + ny * d),
    ]


def grow_polygon(corners: list, amount: float) -> list:
    """Push each corner of a convex polygon `amount` px further from its centre (a cheap dilation)."""
    cx = sum(x for x, _ in corners) / len(corners)
    cy = sum(y for _, y in corners) / len(corners)
    grown = []
    for x, y in corners:
        ux, uy = _unit(x - cx, y - cy)
        grown.append((x + ux * amount * 1.42, y + uy * amount * 1.42))  # corners sit on the diagonal
    return grown


def convex_hull(points: list) -> list:
    """Andrew's monotone chain; used for the shadow of a box (footprint ∪ shifted footprint)."""
    pts = sorted(set(points))
    if len(pts) < 3:
        return pts

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return lower[:-1] + upper[:-1]


def draw_road(draw: ImageDraw.ImageDraw, road: Road, fill: int, width: int) -> None:
    """Centre line of `width` px; a turning circle at a dead end."""
    draw.line(road.points, fill=fill, width=width, joint="curve")
    if road.cul_de_sac:
        x, y = road.points[-1]
        r = width * 0.95
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)


def count_blobs(mask: np.ndarray) -> int:
    """Number of 8-connected components of a boolean mask.

    Union-find over the horizontal runs of each row: the Python loop visits runs (a few per row of a
    road), not pixels, so checking a candidate road costs well under a millisecond.
    """
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), np.int8)
    padded[:, 1:-1] = mask
    step = np.diff(padded, axis=1)
    rows, starts = np.nonzero(step == 1)  # row-major order, so the i-th start and i-th end form a run
    ends = np.nonzero(step == -1)[1]  # one past the run's last pixel
    rows, starts, ends = rows.tolist(), starts.tolist(), ends.tolist()
    parent = list(range(len(rows)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    components, previous, current, current_row = len(rows), [], [], None
    for i, row in enumerate(rows):
        if row != current_row:
            previous = current if current_row == row - 1 else []
            current, current_row = [], row
        for j in previous:
            # Runs [s, e) on adjacent rows touch 8-connectedly when they overlap or meet at a corner.
            if starts[j] <= ends[i] and starts[i] <= ends[j]:
                a, b = find(i), find(j)
                if a != b:
                    parent[a] = b
                    components -= 1
        current.append(i)
    return components


def rasterize_road(road: Road, canvas: int, extra: int = 0) -> np.ndarray:
    image = Image.new("L", (canvas, canvas), 0)
    draw_road(ImageDraw.Draw(image), road, 255, road.footprint_width + 2 * extra)
    return np.asarray(image) > 0


def _polygon_patch(corners: list, canvas: int):
    """Rasterise a small polygon into its own bounding-box patch: (mask, y0, x0), or None if off-canvas."""
    xs = [x for x, _ in corners]
    ys = [y for _, y in corners]
    x0, y0 = max(int(math.floor(min(xs))), 0), max(int(math.floor(min(ys))), 0)
    x1, y1 = min(int(math.ceil(max(xs))) + 1, canvas), min(int(math.ceil(max(ys))) + 1, canvas)
    if x1 <= x0 or y1 <= y0:
        return None
    patch = Image.new("L", (x1 - x0, y1 - y0), 0)
    ImageDraw.Draw(patch).polygon([(x - x0, y - y0) for x, y in corners], fill=255)
    return np.asarray(patch) > 0, y0, x0


# ----------------------------------------------------------------------------------------------
# Layout generation


class _Placer:
    """Occupancy bookkeeping for one layout."""

    def __init__(self, layout: Layout):
        self.layout = layout
        n = layout.canvas
        self.occupied = np.zeros((n, n), bool)  # everything placed, dilated by its gap
        self.road_pixels = np.zeros((n, n), bool)  # undilated road footprints
        self.unchanged_road_pixels = np.zeros((n, n), bool)  # the same, of the roads in both images
        self.changed_road_pixels = np.zeros((n, n), bool)  # and of the roads only in A or only in B
        self.num_changed_roads = 0

    def add_road(self, road: Road, footprint: np.ndarray) -> None:
        self.layout.roads.append(road)
        self.road_pixels |= footprint
        if road.presence == BOTH:
            self.unchanged_road_pixels |= footprint
        else:
            self.changed_road_pixels |= footprint
            self.num_changed_roads += 1
        self.occupied |= rasterize_road(road, self.layout.canvas, extra=2)

    def changed_road_label(self, candidate: np.ndarray) -> np.ndarray:
        """The changed roads' pixels of the change mask, in the image frame, with a candidate footprint added:
        changed footprints minus the unchanged roads' footprints, as render.change_labels draws them. Exact
        once every unchanged road is placed, which build_layout does before any changed one."""
        m, size = self.layout.margin, self.layout.size
        label = (self.changed_road_pixels | candidate) & ~self.unchanged_road_pixels
        return label[m : m + size, m : m + size]

    def inside_frame(self, corners: list, inset: float = 2.0) -> bool:
        lo = self.layout.margin + inset
        hi = self.layout.margin + self.layout.size - inset
        return all(lo <= x < hi and lo <= y < hi for x, y in corners)

    def polygon_is_free(self, corners: list) -> bool:
        # Cheap rejection first: most failed candidates have their centre or a corner on something.
        cx, cy = sum(x for x, _ in corners) / len(corners), sum(y for _, y in corners) / len(corners)
        n = self.layout.canvas
        for x, y in corners + [(cx, cy)]:
            if 0 <= x < n and 0 <= y < n and self.occupied[int(y), int(x)]:
                return False
        patch = _polygon_patch(corners, self.layout.canvas)
        if patch is None:
            return False
        mask, y0, x0 = patch
        h, w = mask.shape
        return not (self.occupied[y0 : y0 + h, x0 : x0 + w] & mask).any()

    def occupy_polygon(self, corners: list) -> None:
        mask, y0, x0 = _polygon_patch(corners, self.layout.canvas)
        h, w = mask.shape
        self.occupied[y0 : y0 + h, x0 : x0 + w] |= mask

    def disc_is_free(self, x: float, y: float, r: float) -> bool:
        x0, y0 = max(int(x - r), 0), max(int(y - r), 0)
        region = self.occupied[y0 : int(y + r) + 1, x0 : int(x + r) + 1]
        return region.size > 0 and not region.any()

    def occupy_disc(self, x: float, y: float, r: float) -> None:
        x0, y0 = max(int(x - r), 0), max(int(y - r), 0)
        self.occupied[y0 : int(y + r) + 1, x0 : int(x + r) + 1] = True


def _border_point(rng, side: int, canvas: int) -> tuple:
    """A point just outside the canvas on side 0=top, 1=right, 2=bottom, 3=left."""
    t = rng.uniform(0.15, 0.85) * canvas
    out = 12.0
    return [(t, -out), (canvas + out, t), (t, canvas + out), (-out, t)][side]


def _main_road(rng, layout: Layout) -> Road:
    n = layout.canvas
    start_side = int(rng.integers(4))
    end_side = (start_side + int(rng.choice([2, 2, 1, 3]))) % 4  # mostly straight across
    start, end = _border_point(rng, start_side, n), _border_point(rng, end_side, n)
    points = [start]
    bends = int(rng.integers(0, 3))
    for k in range(1, bends + 1):  # gentle bends: jitter points on the straight line
        t = k / (bends + 1)
        jitter = rng.normal(0, 14 * layout.scale, 2)
        points.append((start[0] + (end[0] - start[0]) * t + jitter[0], start[1] + (end[1] - start[1]) * t + jitter[1]))
    points.append(end)
    width = int(round(rng.uniform(8, 13) * layout.scale))
    return Road(points, max(width, 3), BOTH, is_main=True)


def _spur_road(rng, layout: Layout, parent: Road, presence: str) -> Road:
    """A side road leaving `parent` roughly at right angles: to the border, or a dead end with a circle."""
    seg = int(rng.integers(len(parent.points) - 1))
    (ax, ay), (bx, by) = parent.points[seg], parent.points[seg + 1]
    t = rng.uniform(0.1, 0.9)
    x, y = ax + (bx - ax) * t, ay + (by - ay) * t
    ux, uy = _unit(bx - ax, by - ay)
    side = rng.choice([-1.0, 1.0])
    angle = math.atan2(ux * side, -uy * side) + rng.normal(0, 0.15)
    dead_end = rng.random() < 0.5
    length = rng.uniform(55, 130) * layout.scale if dead_end else 2.0 * layout.canvas
    points = [(x, y)]
    pieces = int(rng.integers(1, 3))
    for _ in range(pieces):
        step = length / pieces
        x, y = x + math.cos(angle) * step, y + math.sin(angle) * step
        points.append((x, y))
        angle += rng.normal(0, 0.2)
    width = int(round(rng.uniform(6, 10) * layout.scale))
    return Road(points, max(width, 3), presence, is_main=False, cul_de_sac=dead_end)


def _try_add_spur(rng, layout: Layout, placer: _Placer, presence: str, attempts: int = 12) -> bool:
    parents = [r for r in layout.roads if r.is_main]
    if not parents:
        return False
    n = layout.canvas
    for _ in range(attempts):
        parent = parents[int(rng.integers(len(parents)))]
        road = _spur_road(rng, layout, parent, presence)
        footprint = rasterize_road(road, n)
        frame = footprint[layout.margin : layout.margin + layout.size, layout.margin : layout.margin + layout.size]
        # Too little of it is visible: 40 lengths of its width at 256 px, scaled with the image's side (a fixed
        # threshold rejected every dead-end spur at 64 px, where they are at most ~33 px long).
        if frame.sum() < 40 * layout.scale * road.footprint_width:
            continue
        if road.cul_de_sac and not placer.inside_frame([road.points[-1]], inset=road.width * 1.5):
            continue
        # Roads are placed before ponds and buildings, so only roads can be in its way. It may touch them
        # only where it leaves its parent (near its first point): then its change-mask blob stays in one piece.
        near_start = road.footprint_width + parent.footprint_width
        dilated = rasterize_road(road, n, extra=ROAD_GAP)
        ys, xs = np.nonzero(dilated & placer.road_pixels)
        sx, sy = road.points[0]
        if len(xs) and np.hypot(xs - sx, ys - sy).max() > near_start:
            continue
        if presence != BOTH:
            # Where the spur leaves its parent near a crossing of two unchanged roads, erasing those roads from its
            # label can cut off a sliver (a second blob, and maybe a wrong grid cell); two changed spurs can touch
            # and merge into one blob. Keep only candidates that leave each changed road exactly one blob.
            if count_blobs(placer.changed_road_label(footprint)) != placer.num_changed_roads + 1:
                continue
        placer.add_road(road, footprint)
        return True
    return False


def _add_main_roads(rng, layout: Layout, placer: _Placer, count: int) -> None:
    n = layout.canvas
    for _ in range(count):
        for _attempt in range(6):
            road = _main_road(rng, layout)
            footprint = rasterize_road(road, n)
            # Two main roads may cross, but must not run on top of each other.
            if (footprint & placer.road_pixels).sum() > 4 * road.footprint_width**2:
                continue
            placer.add_road(road, footprint)
            break


def _add_pond(rng, layout: Layout, placer: _Placer) -> None:
    s, n = layout.scale, layout.canvas
    for _ in range(8):
        cx, cy = rng.uniform(0.15, 0.85, 2) * n
        rx, ry = rng.uniform(16, 42, 2) * s
        rotation = rng.uniform(0, math.pi)
        wobble = rng.normal(0, 0.12, 5)
        polygon = []
        for k in range(20):
            a = 2 * math.pi * k / 20
            r = 1 + wobble[0] * math.sin(a) + wobble[1] * math.cos(2 * a) + wobble[2] * math.sin(3 * a + wobble[3])
            px, py = rx * r * math.cos(a), ry * r * math.sin(a)
            polygon.append(
                (cx + px * math.cos(rotation) - py * math.sin(rotation), cy + px * math.sin(rotation) + py * math.cos(rotation))
            )
        if placer.polygon_is_free(grow_polygon(polygon, 4)):
            layout.pond = polygon
            placer.occupy_polygon(grow_polygon(polygon, 4))
            return


ROOF_COLOURS = (
    (112, 112, 116), (84, 86, 92), (150, 150, 148), (170, 80, 62), (140, 70, 55),
    (120, 96, 78), (196, 194, 186), (222, 220, 214), (92, 104, 124), (160, 128, 96),
)


def _roof_colour(rng) -> tuple:
    base = np.array(ROOF_COLOURS[int(rng.integers(len(ROOF_COLOURS)))], float)
    return tuple(int(v) for v in np.clip(base * rng.uniform(0.9, 1.1) + rng.normal(0, 5, 3), 0, 255))


def _building_candidate(rng, layout: Layout, roads: list, presence: str):
    """A house set back from a road and aligned with it, or a free-standing building of any size."""
    s = layout.scale
    if roads and rng.random() < 0.75:
        road = roads[int(rng.integers(len(roads)))]
        seg = int(rng.integers(len(road.points) - 1))
        (ax, ay), (bx, by) = road.points[seg], road.points[seg + 1]
        t = rng.uniform(0.0, 1.0)
        px, py = ax + (bx - ax) * t, ay + (by - ay) * t
        ux, uy = _unit(bx - ax, by - ay)
        nx, ny = -uy, ux
        along, depth = rng.uniform(MIN_BUILDING_SIDE, 22) * s, rng.uniform(MIN_BUILDING_SIDE + 2, 24) * s
        side = rng.choice([-1.0, 1.0])
        offset = road.footprint_width / 2 + rng.uniform(4, 10) * s + depth / 2
        cx, cy = px + nx * side * offset, py + ny * side * offset
        corners = rectangle_corners(cx, cy, along, depth, math.atan2(uy, ux))
        gable = rng.random() < 0.7
    else:
        large = rng.random() < 0.3
        along = rng.uniform(28, 48) * s if large else rng.uniform(MIN_BUILDING_SIDE, 24) * s
        depth = rng.uniform(20, 34) * s if large else rng.uniform(MIN_BUILDING_SIDE, 22) * s
        lo, hi = layout.margin + 20 * s, layout.margin + layout.size - 20 * s
        cx, cy = rng.uniform(lo, hi, 2)
        angle = 0.0 if rng.random() < 0.4 else rng.uniform(0, math.pi)
        corners = rectangle_corners(cx, cy, along, depth, angle)
        gable = (not large) and rng.random() < 0.6
    height = rng.uniform(3, 7) * s * (1.6 if not gable and along > 28 * s else 1.0)
    return Building(corners, None, gable, height, presence)  # the roof colour is drawn once it is placed


def _try_add_building(rng, layout: Layout, placer: _Placer, roads: list, presence: str, attempts: int = 25) -> bool:
    for _ in range(attempts):
        building = _building_candidate(rng, layout, roads, presence)
        if not placer.inside_frame(building.corners):
            continue
        if not placer.polygon_is_free(building.corners):
            continue
        building.roof = _roof_colour(rng)
        layout.buildings.append(building)
        placer.occupy_polygon(grow_polygon(building.corners, BUILDING_GAP))
        return True
    return False


def _add_trees(rng, layout: Layout, placer: _Placer) -> None:
    s, n = layout.scale, layout.canvas
    density = rng.choice(["sparse", "medium", "dense"], p=[0.35, 0.4, 0.25])
    clusters = {"sparse": 1, "medium": 3, "dense": 6}[density]
    per_cluster = {"sparse": 8, "medium": 14, "dense": 22}[density]
    centres = [rng.uniform(0, n, 2) for _ in range(clusters)]
    spreads = [rng.uniform(15, 45) * s for _ in range(clusters)]
    candidates = []
    for centre, spread in zip(centres, spreads):
        for _ in range(per_cluster):
            candidates.append(centre + rng.normal(0, spread, 2))
    candidates += [rng.uniform(0, n, 2) for _ in range(int(rng.integers(2, 10)))]  # lone trees
    for x, y in candidates:
        r = rng.uniform(3, 8) * s
        if not placer.disc_is_free(x, y, r + 1):
            continue
        layout.trees.append(Tree(float(x), float(y), float(r), int(rng.integers(8))))
        placer.occupy_disc(x, y, r * 0.6)  # canopies may overlap each other a little, like real crowns


def _add_fallback_change(rng, layout: Layout, placer: _Placer) -> None:
    """One change that fits in any scene, for a changed pair none of whose planned changes could be placed:
    a new building, else a demolished one, else the smallest building at the first free spot of a scan."""
    after_roads = [r for r in layout.roads if r.presence != ONLY_A]
    if _try_add_building(rng, layout, placer, after_roads, ONLY_B, attempts=200):
        return
    existing = [b for b in layout.buildings if b.presence == BOTH]
    if existing:
        existing[int(rng.integers(len(existing)))].presence = ONLY_A
        return
    side = MIN_BUILDING_SIDE * layout.scale
    low, high = layout.margin + side, layout.margin + layout.size - side
    for cy in np.arange(low, high, side / 2):
        for cx in np.arange(low, high, side / 2):
            corners = rectangle_corners(float(cx), float(cy), side, side, 0.0)
            if placer.inside_frame(corners) and placer.polygon_is_free(corners):
                building = Building(corners, _roof_colour(rng), False, 3 * layout.scale, ONLY_B)
                layout.buildings.append(building)
                placer.occupy_polygon(grow_polygon(corners, BUILDING_GAP))
                return
    raise RuntimeError("no room for a single building in the scene")  # roads and water cover the whole frame


def build_layout(rng: np.random.Generator, size: int, plan: ChangePlan) -> Layout:
    angle = rng.uniform(0, 2 * math.pi)
    terrain = str(rng.choice(TERRAINS, p=[0.35, 0.3, 0.1, 0.25]))
    # Dirt roads only on grass: on bare land or sand they would be nearly invisible, and so would their changes.
    if terrain == "grass":
        road_style = str(rng.choice(["asphalt", "concrete", "dirt"], p=[0.55, 0.25, 0.2]))
    else:
        road_style = str(rng.choice(["asphalt", "concrete"], p=[0.7, 0.3]))
    layout = Layout(size=size, margin=CANVAS_MARGIN, terrain=terrain, sun=(math.cos(angle), math.sin(angle)), road_style=road_style)
    placer = _Placer(layout)
    main_roads = int(rng.choice([0, 1, 2], p=[0.15, 0.55, 0.3]))
    if plan.roads_added or plan.roads_removed:
        main_roads = max(main_roads, 1)  # spurs need a road to branch from
    _add_main_roads(rng, layout, placer, main_roads)
    for _ in range(int(rng.integers(0, 3))):
        _try_add_spur(rng, layout, placer, BOTH)
    # A planned change gets more tries than scenery. The first tries draw what they always drew, so a pair that
    # placed its change at once is unchanged by the extra ones.
    for _ in range(plan.roads_added):
        _try_add_spur(rng, layout, placer, ONLY_B, attempts=CHANGE_ATTEMPTS)
    for _ in range(plan.roads_removed):
        _try_add_spur(rng, layout, placer, ONLY_A, attempts=CHANGE_ATTEMPTS)
    if rng.random() < 0.35:
        _add_pond(rng, layout, placer)

    both_roads = [r for r in layout.roads if r.presence == BOTH]
    for _ in range(int(rng.choice([0, rng.integers(2, 8), rng.integers(8, 20)], p=[0.15, 0.45, 0.4]))):
        _try_add_building(rng, layout, placer, both_roads, BOTH)

    # New houses go mostly along a new road when there is one ("a road is built and houses appear along it").
    new_roads = [r for r in layout.roads if r.presence == ONLY_B]
    after_roads = new_roads or [r for r in layout.roads if r.presence != ONLY_A]
    for _ in range(plan.buildings_added):
        _try_add_building(rng, layout, placer, after_roads, ONLY_B, attempts=CHANGE_ATTEMPTS)

    # Demolitions: existing houses vanish; build extra ones to demolish if the scene has too few.
    existing = [b for b in layout.buildings if b.presence == BOTH]
    picked = rng.permutation(len(existing))[: plan.buildings_removed]
    for k in sorted(int(i) for i in picked):
        existing[k].presence = ONLY_A
    for _ in range(plan.buildings_removed - len(picked)):
        _try_add_building(rng, layout, placer, both_roads, ONLY_A, attempts=CHANGE_ATTEMPTS)

    # A pair drawn as changed must show a change (--change-probability 1 means every pair), even when the
    # scene left no room for what was planned.
    if plan.total and all(obj.presence == BOTH for obj in layout.roads + layout.buildings):
        _add_fallback_change(rng, layout, placer)

    _add_trees(rng, layout, placer)
    return layout
