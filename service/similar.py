"""``POST /v1/similar`` and gallery thumbnails: nearest works and artists of a loaded retrieval gallery (a folder
or a Milvus collection).

A work is addressed only by its id in the gallery (a folder's row, a Milvus primary key); no path from a request
reaches the file system.
"""

import io
from typing import Any

import numpy as np
from PIL import Image

from data.images import ImageLoadError, load_image
from retrieval.gallery import BaseGallery
from retrieval.index import l2_normalize
from service.limits import ServiceError

THUMBNAIL_PX = 256  # longest side of a thumbnail
THUMBNAIL_ROUTE = "v1/gallery/images/{image_id}"  # relative: the page works behind a proxy's sub-path


class GallerySearch:
    """A loaded gallery answering similarity queries (a folder's Faiss index is built once) and serving its works'
    thumbnails."""

    def __init__(self, gallery: BaseGallery):
        self.gallery = gallery
        self.index_params = gallery.index_parameters()

    def info(self, per_artist: bool = True) -> dict[str, Any]:
        """What ``GET /v1/model`` says about the gallery; without ``per_artist`` (the answers of gallery writes) the
        per-artist thresholds are left out, as they grow with the gallery (``GET /v1/gallery/artists`` pages them)."""
        g = self.gallery
        thresholds = g.thresholds()
        if not per_artist:
            del thresholds["artist_thresholds"]
        return {"artists": len(g.artist_names), "works": g.size, **thresholds,
                "index": self.index_params.get("type", "")}

    def similar(self, features: np.ndarray, top_k: int, top_artists: int) -> list[dict[str, Any]]:
        """Per feature row: the closest artists (cosine to their prototypes, with the unknown decision when the
        gallery has a threshold) and the ``top_k`` nearest works (cosine, artist, thumbnail URL)."""
        vectors = l2_normalize(np.asarray(features, np.float32), "style vector")
        matches = self.gallery.match(vectors, top_artists)
        results = []
        for match, nearest in zip(matches, self.gallery.nearest(vectors, top_k), strict=True):
            works = [{"id": work["id"], "artist": work["artist"], "score": work["score"],
                      "name": work["path"].replace("\\", "/").rsplit("/", 1)[-1],
                      "thumbnail": THUMBNAIL_ROUTE.format(image_id=work["id"])} for work in nearest]
            results.append({**match, "works": works})
        return results

    def thumbnail(self, image_id: int) -> bytes:
        """The JPEG thumbnail of gallery work ``image_id`` (404 for an id the gallery lacks or a file gone)."""
        work = self.gallery.work(image_id)
        if work is None:
            raise ServiceError(404, f"gallery image {image_id} does not exist; use an id POST /v1/similar returned")
        try:
            image = load_image(work[1])
        except ImageLoadError as err:
            raise ServiceError(404, f"gallery image {image_id} cannot be read ({err.reason.rstrip('.')}); rebuild "
                                    "the gallery if its images moved") from None
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX), Image.Resampling.BICUBIC)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=85)
        return out.getvalue()
