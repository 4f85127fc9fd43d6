"""Opening a slide whose levels are not local files: which pixel source reads which URI.

`transforms.patches.open_slide` hands every record whose `files` hold URIs here. WADO-RS
instance URLs go to DICOMweb (ez-wsi DicomSlide, batched frame requests); gs://, s3:// and
http(s) file URLs go to the byte-range reader. Both return ez-wsi slides (`levels`,
`get_patch(level, x, y, w, h).image_bytes()`), so `read_patches` works on either unchanged.

Colour: pixels are the stored values. With color.icc_profile = srgb, ReadPatches converts
patches through ez-wsi's `create_icc_profile_transformation` (`transforms.patches.srgb_transform`),
which both slide kinds offer.
"""

from __future__ import annotations

from collections.abc import Sequence

from transforms.dicom_io import byte_ranges, dicomweb
from transforms.errors import ReasonCode, SlideError


def open_remote_slide(files: Sequence[tuple[str, str]], dicomweb_auth: str = "auto"):
    """The ez-wsi slide of these (SOPInstanceUID, URI) levels; DICOMweb reads authenticate
    as `dicomweb_auth` says (transforms.dicom_io.dicomweb.credentials_for)."""
    uris = [uri for _, uri in files]
    web = [dicomweb.is_instance_url(u) for u in uris]
    if all(web):
        try:
            return dicomweb.open_dicomweb_slide(uris, dicomweb_auth)
        except ValueError as exc:
            raise SlideError(ReasonCode.READ_ERROR, f"DICOMweb slide: {exc}") from exc
    if any(web):
        raise SlideError(ReasonCode.READ_ERROR, "a slide mixes DICOMweb URLs and file URIs")
    return byte_ranges.open_range_slide(uris)
