"""Why a slide could not be processed: one small enum of reason codes and one exception.

Every stage that touches a slide turns a `SlideError` (or any unexpected exception, as
`internal_error`) into a failure row; the run goes on and the slide can be rerun by UUID.
"""

from __future__ import annotations

import enum


class ReasonCode(enum.StrEnum):
    """Reason codes recorded in the failures output (documented in docs/failures.md)."""

    NO_PIXEL_SPACING = "no_pixel_spacing"
    IMPLAUSIBLE_PIXEL_SPACING = "implausible_pixel_spacing"
    NON_SQUARE_PIXELS = "non_square_pixels"
    MULTIPLE_PLANES = "multiple_planes"
    NO_PYRAMID = "no_pyramid"
    NO_HIGH_RESOLUTION_LEVEL = "no_high_resolution_level"
    NO_TISSUE = "no_tissue"
    INCOMPLETE_SLIDE = "incomplete_slide"
    DECODE_ERROR = "decode_error"
    UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"
    MALFORMED_HEADER = "malformed_header"
    UNSUPPORTED_PIXEL_FORMAT = "unsupported_pixel_format"
    UNSUPPORTED_TILING = "unsupported_tiling"
    INCONSISTENT_FRAMES = "inconsistent_frames"
    TRUNCATED_PIXEL_DATA = "truncated_pixel_data"
    INCONSISTENT_LEVELS = "inconsistent_levels"
    AMBIGUOUS_LEVEL = "ambiguous_level"
    TOO_SMALL = "too_small"
    NON_FINITE_EMBEDDING = "non_finite_embedding"
    BAD_MODEL_OUTPUT = "bad_model_output"
    INFERENCE_ERROR = "inference_error"
    INVALID_UUID = "invalid_uuid"
    MALFORMED_MANIFEST_ROW = "malformed_manifest_row"
    READ_ERROR = "read_error"
    TRANSIENT_HTTP = "transient_http"
    INTERNAL_ERROR = "internal_error"
    # A URL the source configuration does not allow (transforms/urls.py).
    UNTRUSTED_URL = "untrusted_url"
    # An SM series whose illumination is not transmitted light (transforms/sql/idc_slides.sql).
    NOT_BRIGHTFIELD = "not_brightfield"
    # A header value that would drive an unbounded allocation (frames, offset tables, ...).
    OVERSIZED_HEADER = "oversized_header"
    # Another run took the slide over while this one was working on it (its lease expired).
    LEASE_LOST = "lease_lost"


class SlideError(Exception):
    """A slide cannot be processed, for a reason the user can act on."""

    def __init__(self, reason: ReasonCode, message: str):
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self):  # keep class, reason and message when Beam pickles the exception
        return (type(self), (self.reason, self.message))
