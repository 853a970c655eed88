"""The plan of the synthetic corpus (``radstream.ingest.synth``): how many images per region and patient, their sizes,
file formats and encodings, decided before any pixel is drawn. A pure function of (n, seed, max_side).

Region counts follow the IRMA training list's imbalance; sizes come from real detector formats or a random
aspect ratio, scaled by ``max_side / REFERENCE_SIDE``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REGION_COUNTS: dict[str, int] = {
    "whole_body": 3,
    "cranium": 1246,
    "spine": 1475,
    "upper_extremity": 2041,
    "chest": 4829,
    "breast": 339,
    "abdomen": 307,
    "pelvis": 284,
    "lower_extremity": 2153,
}
"""Images per body region in the IRMA training list (train_codes_02.csv), in IRMA region-digit order."""

FORMAT_SHARES = {"png8": 0.45, "png16": 0.30, "dicom": 0.25}
"""Share of each file format in the corpus."""

REFERENCE_SIDE = 2500
"""The ``max_side`` the detector formats below are given for; other values scale them proportionally."""

# Real IRMA codes (from the training list) per region digit; an image gets one of its region's codes.
_IRMA_CODES = {
    1: "1121-125-110-000",
    2: "1121-110-213-700 1121-120-200-700 1121-210-212-700 1121-210-213-700 1121-210-221-700 1121-210-230-700 "
    "1121-220-212-700 1121-220-213-700 1121-220-215-700 1121-220-221-700 1121-220-230-700 1121-420-212-700 "
    "1121-420-213-700 1121-430-213-700 1121-430-215-700 1121-460-216-700 1121-4b0-233-700",
    3: "1121-120-310-700 1121-120-311-700 1121-120-320-700 1121-120-330-700 1121-120-331-700 1121-200-300-700 "
    "1121-210-310-700 1121-210-320-700 1121-210-321-700 1121-210-330-700 1121-210-331-700 1121-210-333-700 "
    "1121-218-310-700 1121-220-310-700 1121-220-330-700 1121-228-310-700 1121-490-310-700 1122-220-333-700",
    4: "1121-110-411-700 1121-110-414-700 1121-110-415-700 1121-120-412-700 1121-120-413-700 1121-120-421-700 "
    "1121-120-422-700 1121-120-433-700 1121-120-434-700 1121-120-441-700 1121-120-442-700 1121-120-451-700 "
    "1121-120-462-700 1121-120-463-700 1121-12f-466-700 1121-200-411-700 1121-230-463-700 1121-240-421-700 "
    "1121-240-441-700 1121-490-415-700 1121-4a0-414-700",
    5: "1121-110-540-370 1121-120-514-700 1121-120-516-700 1121-490-514-700 1123-110-500-000 1123-112-500-000 "
    "1123-127-500-000 1123-211-500-000 112d-121-500-000",
    6: "1124-310-610-625 1124-310-620-625 1124-410-610-625 1124-410-620-625 1127-310-600-625",
    7: "1121-115-700-400 1121-115-710-400 1121-117-731-443 1121-120-720-400 1121-127-700-400 1121-127-700-500 "
    "1121-129-700-400 1123-115-710-400",
    8: "1121-120-800-700 1121-120-811-700 1121-120-820-700 1121-127-800-700 1121-200-800-700 1121-200-810-700",
    9: "1121-120-911-700 1121-120-914-700 1121-120-915-700 1121-120-921-700 1121-120-922-700 1121-120-942-700 "
    "1121-120-943-700 1121-120-961-700 1121-120-962-700 1121-230-921-700 1121-230-922-700 1121-230-942-700 "
    "1121-230-943-700 1121-320-941-700 1121-4a0-914-700 1121-490-915-700",
}
IRMA_CODES: dict[str, tuple[str, ...]] = {
    name: tuple(_IRMA_CODES[digit].split()) for digit, name in enumerate(REGION_COUNTS, start=1)
}
"""Region → the real IRMA codes synthetic images of that region are given."""

# Detector formats per region as "HxW:weight" at REFERENCE_SIDE (larger ones are shrunk to fit max_side).
# The weight left over goes to random sizes in the region's aspect range; EXPORT_SHARE of all images are
# archive exports with a 512 px longest side (at REFERENCE_SIDE), the size of the IRMA images themselves.
_DETECTOR_FORMATS = {
    "whole_body": "2500x1000:.5",
    "cranium": "2010x1670:.2 1670x2010:.15 1760x1760:.15 1024x1024:.1",
    "spine": "2500x1000:.12 2964x2364:.15 2010x1670:.15 1760x1760:.08",
    "upper_extremity": "2010x1670:.12 1670x2010:.1 1760x1760:.1 2500x1000:.05 1000x2500:.05 1024x1024:.08",
    "chest": "2500x2048:.25 2048x2500:.08 2964x2364:.15 3000x3000:.07 1760x1760:.1 1024x1024:.05",
    "breast": "2294x1914:.35 3328x2560:.3",
    "abdomen": "2500x2048:.25 2048x2500:.1 2964x2364:.15 1760x1760:.08",
    "pelvis": "2048x2500:.3 2364x2964:.2 1760x1760:.1",
    "lower_extremity": "2500x1000:.1 2010x1670:.12 1670x2010:.1 1760x1760:.08 1000x2500:.05",
}


def _parse_formats(text: str) -> list[tuple[int, int, float]]:
    """'HxW:weight ...' → [(h, w, weight), ...]."""
    formats = []
    for item in text.split():
        shape, weight = item.split(":")
        h, w = shape.split("x")
        formats.append((int(h), int(w), float(weight)))
    return formats


_FORMATS = {region: _parse_formats(text) for region, text in _DETECTOR_FORMATS.items()}
_ASPECTS = {  # random sizes: h/w drawn log-uniform in (low, high), inverted (landscape) with the given chance
    "whole_body": (2.0, 2.5, 0.0),
    "cranium": (0.75, 1.35, 0.0),
    "spine": (1.1, 2.5, 0.1),
    "upper_extremity": (1.25, 2.5, 0.3),
    "chest": (0.8, 1.3, 0.0),
    "breast": (1.15, 1.5, 0.0),
    "abdomen": (0.75, 1.35, 0.0),
    "pelvis": (0.6, 1.0, 0.0),
    "lower_extremity": (1.25, 2.5, 0.3),
}
EXPORT_SHARE = 0.12
MIN_SIDE_AT_REFERENCE = 200


@dataclass(frozen=True)
class ImageSpec:
    """Everything decided about one image before it is drawn (the plan; cheap, in the main process).

    Attributes:
        index: position in the corpus; with the seed it gives the image's random stream.
        region: body region (the label).
        patient_id: e.g. "P000123".
        k: the image's number within its patient.
        height, width: pixel size of the file.
        fmt: "png8", "png16" or "dicom".
        irma_code: the image's IRMA code (its region digit matches ``region``).
        bits_stored: significant bits of the stored values (8, 12 or 16).
        shift: left shift of the stored values in their 16-bit container (12-bit data scaled: 4).
        photometric: "MONOCHROME1" (stored inverted) or "MONOCHROME2".
        modality: DICOM modality (CR, DX, MG), "" for PNG.
        rescale: DICOM (slope, intercept), or None when not set.
    """

    index: int
    region: str
    patient_id: str
    k: int
    height: int
    width: int
    fmt: str
    irma_code: str
    bits_stored: int
    shift: int
    photometric: str
    modality: str
    rescale: tuple[float, float] | None

    @property
    def relpath(self) -> str:
        """Path of the file relative to the corpus root."""
        ext = "dcm" if self.fmt == "dicom" else "png"
        return f"images/{self.region}/{self.patient_id}_{self.k}.{ext}"


def region_counts(n: int) -> dict[str, int]:
    """Images per region for a corpus of ``n``: the IRMA proportions by largest remainder.

    ``whole_body`` gets its ~0.02 % share but at least one image when n ≥ 200; every other region gets at least
    one image when n ≥ 16.
    """
    total = sum(REGION_COUNTS.values())
    whole = max(round(n * REGION_COUNTS["whole_body"] / total), 1 if n >= 200 else 0)
    names = [r for r in REGION_COUNTS if r != "whole_body"]
    weights = np.array([REGION_COUNTS[r] for r in names], dtype=np.float64)
    rest = n - whole
    exact = rest * weights / weights.sum()
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: rest - counts.sum()]:
        counts[i] += 1
    if n >= 16:  # no region may vanish: take the missing images from the largest class
        for i in np.flatnonzero(counts == 0):
            counts[i] += 1
            counts[np.argmax(counts)] -= 1
    return {"whole_body": whole, **{r: int(c) for r, c in zip(names, counts, strict=True)}}


def _patients(counts: dict[str, int], rng: np.random.Generator) -> list[list[str]]:
    """Group the images of each region into patients of 1–4; about one patient in ten gets a second region."""
    patients: list[list[str]] = []
    for region, count in counts.items():
        left = count
        while left > 0:
            size = min(left, int(rng.choice([1, 2, 3, 4], p=[0.45, 0.3, 0.15, 0.1])))
            patients.append([region] * size)
            left -= size
    multi = [i for i, p in enumerate(patients) if len(p) > 1]
    for i in multi:  # swap one image with another patient's: region counts stay exact
        if rng.random() < 0.1:
            j = int(rng.integers(len(patients)))
            a, b = int(rng.integers(len(patients[i]))), int(rng.integers(len(patients[j])))
            patients[i][a], patients[j][b] = patients[j][b], patients[i][a]
    order = rng.permutation(len(patients))
    return [sorted(patients[i], key=list(REGION_COUNTS).index) for i in order]


def _size(region: str, max_side: int, rng: np.random.Generator) -> tuple[int, int]:
    """(height, width) of one image: a detector format, an archive export or a random size."""
    scale = max_side / REFERENCE_SIDE
    min_side = max(32, round(MIN_SIDE_AT_REFERENCE * scale))
    formats = _FORMATS[region]
    u = rng.random()
    for h, w, weight in formats:
        if u < weight:
            f = min(scale, max_side / max(h, w))
            return max(min_side, round(h * f)), max(min_side, round(w * f))
        u -= weight
    low, high, landscape = _ASPECTS[region]
    aspect = float(np.exp(rng.uniform(np.log(low), np.log(high))))
    stretch = min(max(aspect, 1.0 / aspect), max_side / min_side)  # a tiny max_side caps the elongation
    if rng.random() < landscape:
        aspect = 1.0 / aspect
    if rng.random() < EXPORT_SHARE / max(1.0 - sum(f[2] for f in formats), 1e-9):
        longest = max(round(512 * scale), round(min_side * stretch))
    else:
        longest = round(
            np.exp(rng.uniform(np.log(max(0.2 * max_side, min_side * stretch)), np.log(max_side)))
        )
    longest = min(longest, max_side)
    short = max(min_side, round(longest / stretch))
    return (longest, short) if aspect >= 1 else (short, longest)


def _encoding(region: str, rng: np.random.Generator) -> dict:
    """File format and stored-value encoding of one image."""
    fmt = str(rng.choice(list(FORMAT_SHARES), p=list(FORMAT_SHARES.values())))
    enc = {
        "fmt": fmt,
        "bits_stored": 8,
        "shift": 0,
        "photometric": "MONOCHROME2",
        "modality": "",
        "rescale": None,
    }
    if fmt == "png16":
        enc["bits_stored"], enc["shift"] = [(12, 0), (12, 4), (16, 0)][int(rng.integers(3))]
    elif fmt == "dicom":
        enc["modality"] = "MG" if region == "breast" else str(rng.choice(["CR", "DX"]))
        enc["bits_stored"] = 12 if rng.random() < 0.6 else 16
        mono1 = rng.random() < (0.6 if enc["modality"] == "CR" else 0.25)
        enc["photometric"] = "MONOCHROME1" if mono1 else "MONOCHROME2"
        if rng.random() < 0.4:
            enc["rescale"] = (float(rng.choice([0.5, 1.0, 2.0])), float(rng.choice([0.0, -1024.0, 100.0])))
    return enc


def check_args(n: int, seed: int, max_side: int, workers: int) -> None:
    """Reject arguments no corpus can be made from (one clear line each)."""
    if n < 1:
        raise ValueError(f"n={n}: need at least one image")
    if seed < 0:
        raise ValueError(f"seed={seed}: must be non-negative")
    if max_side < 64:
        raise ValueError(f"max_side={max_side}: must be at least 64 px")
    if workers < 1:
        raise ValueError(f"workers={workers}: must be at least 1")


def plan_corpus(n: int, seed: int, max_side: int = REFERENCE_SIDE) -> list[ImageSpec]:
    """Decide every image of the corpus (region, patient, size, format) without drawing any.

    Args:
        n: number of images.
        seed: non-negative corpus seed.
        max_side: longest image side in pixels; detector formats are scaled by ``max_side / 2500``.

    Returns:
        The specs in corpus order (patients in random order, their images consecutive).
    """
    check_args(n, seed, max_side, 1)
    rng = np.random.default_rng([seed, 0])
    specs: list[ImageSpec] = []
    for p, regions in enumerate(_patients(region_counts(n), rng), start=1):
        for k, region in enumerate(regions):
            h, w = _size(region, max_side, rng)
            code = IRMA_CODES[region][int(rng.integers(len(IRMA_CODES[region])))]
            enc = _encoding(region, rng)
            specs.append(ImageSpec(len(specs), region, f"P{p:06d}", k, h, w, irma_code=code, **enc))
    return specs
