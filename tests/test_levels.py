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
    levels = [LevelInfo(1000, 1000, spacing, "1.2.3"), *pyramid(4.0)]
    with pytest.raises(SlideError) as err:
        choose_levels(levels)
    assert err.value.reason is reason


def test_empty_pyramid():
    with pytest.raises(SlideError) as err:
        choose_levels([])
    assert err.value.reason is ReasonCode.NO_PYRAMID
