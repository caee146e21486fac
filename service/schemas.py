"""The JSON answers of the service (they also document the API at /docs)."""

from pydantic import BaseModel, Field


class ClassScore(BaseModel):
    """One of an image's top-k artists, as ``inference_artist.py`` reports it."""

    class_id: int
    class_name: str
    probability: float = Field(description="softmax probability (sigmoid confidence for a multi-label model)")


class LabelScore(BaseModel):
    """One label of a multi-label model, as ``predict_artist_multilabel.py --normalize-ratio`` reports it."""

    label: str
    confidence: float = Field(description="sigmoid confidence of this label")
    ratio: float = Field(description="share of this label in the kept labels' confidence sum (they sum to 1)")


class GlanceFocusSteps(BaseModel):
    """Where a glance-and-focus model looked, as ``inference_artist.py`` reports it."""

    steps: int = Field(description="focus crops read before the exit")
    glance_box: list[int] = Field(description="the whole image, x0 y0 x1 y1 in original pixels")
    boxes: list[list[int]] = Field(description="the focus crops, x0 y0 x1 y1 in original pixels, in reading order")
    gflops: float = Field(description="compute spent on this image")


class FileClassification(BaseModel):
    file: str = Field(description="the upload's file name")
    classification: list[ClassScore] | None = Field(None, description="single-label models: top-k artists")
    labels: list[LabelScore] | None = Field(None, description="multi-label models: top-k labels with ratios")
    glance_focus: GlanceFocusSteps | None = Field(None, description="glance-and-focus models: where it looked")


class ClassifyResponse(BaseModel):
    model: str
    multi_label: bool
    results: list[FileClassification]


class FileFeatures(BaseModel):
    file: str
    features: list[float] = Field(description="the style vector (float32 values, feature_dim of them)")


class FeaturesResponse(BaseModel):
    model: str
    feature_dim: int
    results: list[FileFeatures]


class Limits(BaseModel):
    max_files: int = Field(description="images per request")
    max_upload_mb: float = Field(description="size of one request body")
    max_pixels: int = Field(description="width x height of one image")
    max_batch: int = Field(description="images per model call")
    max_queue: int = Field(description="inference requests in progress at once; more get 429")


class GallerySummary(BaseModel):
    artists: int = Field(description="enrolled artists")
    works: int = Field(description="reference images (ids 0 .. works - 1)")
    unknown_threshold: float | None = Field(description="calibrated cosine below which an image is unknown (for "
                                                        "artists without a threshold of their own)")
    index: str = Field(description="Faiss index type (flat_ip exact, ivf_flat_ip approximate)")


class GalleryInfo(GallerySummary):
    artist_thresholds: dict[str, float] | None = Field(description="each calibrated artist's own threshold: an image "
                                                                   "whose closest artist it is and whose score is "
                                                                   "below it is unknown")


class ModelInfo(BaseModel):
    model: str = Field(description="architecture")
    classes: list[str] | None = Field(description="class (artist) names in class-id order; null: features only")
    num_classes: int | None
    multi_label: bool
    input_size: int
    feature_dim: int
    descriptor: str = Field(description="style vector of /v1/features and /v1/similar: pooled or texture (the "
                                        "gallery's)")
    checkpoint: str = Field(description="checkpoint file name")
    version: str = Field(description="first 12 hex digits of the checkpoint file's SHA-256")
    loaded_at: str = Field(description="when this model was loaded (ISO 8601, UTC)")
    reloads: int = Field(description="reloads since start (POST /v1/admin/reload, SIGHUP)")
    gallery: GalleryInfo | None = Field(description="the gallery behind POST /v1/similar; null: none loaded")
    limits: Limits


class ReloadRequest(BaseModel):
    """New paths to load; a field left out keeps the current one."""

    checkpoint: str | None = Field(None, description="model folder or checkpoint file on the server")
    gallery: str | None = Field(None, description="gallery folder on the server (of that model)")


class ArtistEntry(BaseModel):
    artist: str
    references: int = Field(description="reference images of the artist in the gallery")
    threshold: float | None = Field(description="an image whose best score is this artist's and below this is "
                                                "unknown: its own calibrated threshold, else the gallery's (null: "
                                                "the gallery is not calibrated)")
    calibrated: bool = Field(description="the threshold is the artist's own (tools/build_gallery.py --calibrate)")


class ArtistList(BaseModel):
    total: int = Field(description="enrolled artists")
    unknown_threshold: float | None = Field(description="threshold of artists without their own")
    artists: list[ArtistEntry] = Field(description="sorted by name, from offset, at most limit of them")


class ArtistChange(ArtistEntry):
    added: int = Field(description="reference images this request added")
    gallery: GallerySummary


class ArtistRemoved(BaseModel):
    artist: str
    removed: int = Field(description="reference images removed with the artist")
    gallery: GallerySummary


class ArtistScore(BaseModel):
    artist: str
    score: float = Field(description="cosine of the image's style vector to the artist's prototype")


class SimilarWork(BaseModel):
    id: int = Field(description="index in the gallery's image list")
    artist: str
    score: float = Field(description="cosine of the two style vectors")
    name: str = Field(description="the work's file name")
    thumbnail: str = Field(description="relative URL of its JPEG thumbnail")


class FileSimilar(BaseModel):
    file: str
    artists: list[ArtistScore] = Field(description="closest artists, best first")
    unknown: bool = Field(description="best artist score below that artist's calibrated threshold (never "
                                         "without calibration)")
    works: list[SimilarWork] = Field(description="nearest works, most similar first")


class SimilarResponse(BaseModel):
    model: str
    unknown_threshold: float | None
    artist_thresholds: dict[str, float] | None = Field(description="the per-artist thresholds (GET /v1/model)")
    results: list[FileSimilar]


class Health(BaseModel):
    status: str
    in_flight: int = Field(description="inference requests in progress")
    batches: int = Field(description="model calls since start")
    images: int = Field(description="images run since start")


class ErrorBody(BaseModel):
    error: str = Field(description="what is wrong and what to do, one line")
    file: str | None = Field(description="the upload it is about, if one")
