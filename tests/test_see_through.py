"""Openings that show the background are cut out of a mask (tasks/segment_checks.py ``see_through``)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from tasks.segment import SegmenterSettings
from tasks.segment_checks import see_through

GREEN = (80, 132, 82)  # BGR, the turntables' plain background


def product_scene(seed: int = 0, opening: tuple[slice, slice] | None = (slice(40, 56), slice(60, 90))):
    """A 160 x 200 frame: a noisy beige-and-white product (rows 20-120, cols 40-160) on noisy green, and
    its filled mask. ``opening``: where the background shows through the product."""
    rng = np.random.default_rng(seed)
    image = np.clip(rng.normal(GREEN, 3.0, (160, 200, 3)), 0, 255)
    product = np.zeros((160, 200), bool)
    product[20:120, 40:160] = True
    weave = np.where((np.arange(200)[None, :] // 6 + np.arange(160)[:, None] // 6) % 2 == 0, 0, 1)
    colours = np.array([[150, 200, 225], [235, 240, 240]], float)  # beige, white (BGR)
    image[product] = np.clip(colours[weave[product]] + rng.normal(0, 6, (int(product.sum()), 3)), 0, 255)
    truth = product.copy()
    if opening is not None:
        image[opening] = np.clip(rng.normal(GREEN, 3.0, image[opening].shape), 0, 255)
        truth[opening] = False
    return image.astype(np.uint8), product, truth


def test_an_opening_showing_the_background_is_cut_out():
    image, filled, truth = product_scene()
    cut = see_through(image, filled, SegmenterSettings())
    opening = filled & ~truth
    assert cut[opening].mean() > 0.95  # the whole opening, rim included
    assert not cut[truth].any()  # and nothing of the product


def test_a_product_without_openings_loses_nothing():
    image, filled, _ = product_scene(opening=None)
    assert not see_through(image, filled, SegmenterSettings()).any()


def test_a_background_coloured_line_thinner_than_the_radius_stays():
    image, filled, _ = product_scene(opening=(slice(40, 43), slice(50, 150)))  # 3 px: a printed stripe
    assert not see_through(image, filled, replace(SegmenterSettings(), see_through_min_radius_px=2)).any()


@pytest.mark.parametrize("margin", [0.0, -1.0])
def test_a_margin_of_zero_turns_the_check_off(margin):
    image, filled, _ = product_scene()
    assert not see_through(image, filled, replace(SegmenterSettings(), see_through_margin=margin)).any()


def test_an_empty_mask_gives_an_empty_cut():
    image, _, _ = product_scene()
    assert not see_through(image, np.zeros(image.shape[:2], bool), SegmenterSettings()).any()
