import pytest

from transforms.errors import ReasonCode, SlideError
from transforms.levels import LevelInfo, PixelSpacing, choose_levels


def level(um: float, width: int, uid: str, col_um: float | None = None) -> LevelInfo:
    spacing = PixelSpacing(um / 1000, (col_um or um) / 1000)
    return LevelInfo(width=width, height=width // 2, spacing=spacing, sop_instance_uid=uid)


def pyramid(*ums: float) -> list[LevelInfo]:
    return [level(um, int(40000 * 0.25 / um), f"1.2.{i}") for i, um in enumerate(ums)]


def test_native_20x_is_read_as_is():
    choice = choose_levels(pyramid(0.5, 2.0, 4.0, 16.0))
    assert choice.embedding.sop_instance_uid == "1.2.0"
    assert choice.downsample == 1.0
    assert choice.mask.sop_instance_uid == "1.2.2"  # 4 µm is nearest ~2X (5 µm)
    assert (choice.source_width, choice.source_height) == (20000, 10000)


def test_native_40x_with_20x_level_prefers_the_coarser_20x():
    choice = choose_levels(pyramid(0.25, 0.5, 1.0, 8.0))
    assert choice.embedding.sop_instance_uid == "1.2.1"
    assert choice.downsample == 1.0


def test_native_40x_only_is_downsampled_to_20x():
    choice = choose_levels(pyramid(0.25, 4.0, 8.0))
    assert choice.embedding.sop_instance_uid == "1.2.0"
    assert choice.downsample == pytest.approx(2.0)
    assert choice.source_width == 40000 // 2


def test_within_tolerance_is_not_resized():
    choice = choose_levels(pyramid(0.46, 0.55 * 4))
    assert choice.downsample == 1.0
    choice = choose_levels(pyramid(0.5 * 1.15, 5.0))
    assert choice.embedding.spacing.um == pytest.approx(0.575)


def test_only_coarse_levels_fail_with_reason():
    with pytest.raises(SlideError) as err:
        choose_levels(pyramid(0.6, 2.4, 9.6))
    assert err.value.reason is ReasonCode.NO_HIGH_RESOLUTION_LEVEL
    assert "0.6" in err.value.message


@pytest.mark.parametrize(
    ("spacing", "reason"),
    [
        (None, ReasonCode.NO_PIXEL_SPACING),
        (PixelSpacing(0.0, 0.0), ReasonCode.IMPLAUSIBLE_PIXEL_SPACING),
        (PixelSpacing(-0.0005, -0.0005), ReasonCode.IMPLAUSIBLE_PIXEL_SPACING),
        (PixelSpacing(5.0, 5.0), ReasonCode.IMPLAUSIBLE_PIXEL_SPACING),
        (PixelSpacing(0.0005, 0.00025), ReasonCode.NON_SQUARE_PIXELS),
    ],
)
def test_bad_spacing_is_a_failure_not_a_guess(spacing, reason):
    """A level larger than every usable one (it would be the ~20x level) with a bad spacing
    fails the slide with its own reason."""
    levels = [LevelInfo(20000, 10000, spacing, "1.2.3"), *pyramid(4.0)]
    with pytest.raises(SlideError) as err:
        choose_levels(levels)
    assert err.value.reason is reason


@pytest.mark.parametrize(
    "spacing", [None, PixelSpacing(1.02, 1.02), PixelSpacing(0.0, 0.0), PixelSpacing(0.1, 0.2)]
)
def test_an_unused_bad_level_does_not_veto_the_slide(spacing):
    """Like the real CMU pyramid's 1 x 1 px level at 1.02 mm/px: left out, the slide is read."""
    levels = [*pyramid(0.5, 2.0, 4.0, 16.0), LevelInfo(1, 1, spacing, "1.2.9")]
    choice = choose_levels(levels)
    assert (choice.embedding.sop_instance_uid, choice.mask.sop_instance_uid) == ("1.2.0", "1.2.2")


def test_a_level_whose_extent_disagrees_is_left_out_or_fails_when_needed():
    # 4 µm/px claimed, but the level has twice the pixels that makes: not the same image.
    liar = LevelInfo(10000, 5000, PixelSpacing(0.004, 0.004), "1.2.7")
    choice = choose_levels([*pyramid(0.5, 2.0, 16.0), liar])
    assert choice.mask.sop_instance_uid == "1.2.1"  # 4 µm would be nearer 5 µm, but it lies
    # The only ~20x level disagrees with the largest level: the slide fails with that reason.
    big = LevelInfo(40000, 20000, PixelSpacing(0.002, 0.002), "1.2.6")
    small_20x = LevelInfo(4000, 2000, PixelSpacing(0.0005, 0.0005), "1.2.5")
    with pytest.raises(SlideError) as err:
        choose_levels([big, small_20x])
    assert err.value.reason is ReasonCode.INCONSISTENT_LEVELS
    assert "1.2.5" in err.value.message and "1.2.6" in err.value.message


def test_two_instances_at_a_needed_level_are_ambiguous_an_unneeded_one_is_left_out():
    twin = level(0.5, int(40000 * 0.25 / 0.5), "1.2.5")
    with pytest.raises(SlideError) as err:
        choose_levels([*pyramid(0.5, 2.0, 4.0), twin])
    assert err.value.reason is ReasonCode.AMBIGUOUS_LEVEL
    assert "1.2.0" in err.value.message and "1.2.5" in err.value.message
    # Two parts of one concatenation are one level, not duplicates.
    choice = choose_levels(
        [*pyramid(0.5, 2.0, 4.0), twin], concatenations={"1.2.0": "9.9", "1.2.5": "9.9"}
    )
    assert choice.embedding.sop_instance_uid == "1.2.0"


def test_empty_pyramid():
    with pytest.raises(SlideError) as err:
        choose_levels([])
    assert err.value.reason is ReasonCode.NO_PYRAMID
