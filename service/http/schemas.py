"""Response models: the OpenAPI contract at /docs, with examples."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["AuditEventOut", "AuditPage", "CalibrationOut", "ClassInfo", "ClassList", "ClassListItem", "ClassQuality",
           "ClassScores", "ConfusionOut", "Deleted", "DriftOut", "DriftPoint", "FromResults", "FromResultsResponse",
           "Heatmap", "Histogram", "ImageResultOut", "KeptResultList", "KeptResultOut", "KeyCreated", "KeyInfo",
           "KeyList", "KeyRequest", "Me", "ModelInfo", "PredictResponse", "PreviousState", "ReadyInfo", "RecentScore",
           "RecordList", "RecordOut", "Region", "ReviewRequest", "ShotList", "ShotRef", "ShotScore",
           "SuggestedThreshold", "ThresholdUpdate"]


class Heatmap(BaseModel):
    format: Literal["png", "raw"]
    data: str = Field(description="base64")
    dtype: str | None = Field(None, description="raw: float32 (little-endian)")
    shape: list[int] | None = Field(None, description="raw: [S, S] at model resolution")
    width: int | None = Field(None, description="png: original image width")
    height: int | None = Field(None, description="png: original image height")
    scale: list[float] | None = Field(None, description="png: map values at grey 0 and 255")


class Region(BaseModel):
    box: list[int] = Field(description="[x0, y0, x1, y1) in original image pixels", examples=[[12, 40, 96, 80]])
    peak: float = Field(description="highest map value inside the region (reference scale)")
    area: float = Field(description="fraction of the image")


class ImageResultOut(BaseModel):
    filename: str
    score: float = Field(description="online image score in (0, 1) (docs/scoring.md)", examples=[0.91])
    normalized_score: float = Field(description="score mapped onto [0, 1] with the threshold at 0.5")
    text_score: float = Field(description="zero-shot image-level anomaly probability")
    threshold: float = Field(description="the class's threshold on `score` (0.5 without a class)")
    is_anomalous: bool
    heatmap: Heatmap | None = None
    regions: list[Region] = Field(default_factory=list, description="connected areas above the pixel threshold")
    result_id: str | None = Field(None, description="id of the kept result (keep=true: the record's id), else null")
    record_id: str | None = Field(None, description="the inspection record's id (GET /records/{id}); null when not "
                                  "recorded (zero-shot, record=false) or not kept")
    record_kept: bool | None = Field(None, description="false: this image's record could not be kept (the record "
                                     "store unreachable and the spool full); null: not recorded")


class ModelInfo(BaseModel):
    arch: str
    image_size: int
    taps: list[int]
    trained: bool
    fingerprint: str
    version: str = Field(description="the model version that produced the answer: its label, else its fingerprint")
    device: str
    dtype: str
    compile: str = Field(description="torch.compile mode of the vision pass, or off")


class PredictResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "class_name": "widget",
        "results": [{"filename": "part-0001.jpg", "score": 0.93, "normalized_score": 0.81, "text_score": 0.71,
                     "threshold": 0.73, "is_anomalous": True, "heatmap": None,
                     "regions": [{"box": [12, 40, 96, 80], "peak": 3.1, "area": 0.02}]}],
        "model": {"arch": "ViT-L-14-336-quickgelu", "image_size": 336, "taps": [5, 11, 17, 23], "trained": True,
                  "fingerprint": "3f1c2a9b0d4e5f67", "version": "v2", "device": "cuda", "dtype": "bfloat16",
                  "compile": "off"},
    }]})

    class_name: str | None
    results: list[ImageResultOut]
    model: ModelInfo


class ClassInfo(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "name": "widget", "shots": 4, "bank_vectors": 2304, "bank_bytes": 28311552, "threshold": 0.74,
        "calibrated_threshold": 0.74, "threshold_overridden": False, "pixel_threshold": 3.2,
        "created": 1763940000.0, "updated": 1763940000.0}]})

    name: str
    shots: int
    bank_vectors: int = Field(description="patch vectors per stage (K x L)")
    bank_bytes: int
    threshold: float
    calibrated_threshold: float
    threshold_overridden: bool
    pixel_threshold: float
    created: float
    updated: float


class ClassListItem(ClassInfo):
    first_shot: str | None = Field(None, description="sha256 of the class's first shot")
    first_shot_thumbnail: str | None = Field(None, description="base64 JPEG of the first shot, at most 128 px a "
                                             "side (with thumbnails=true)")
    recent_results: list[KeptResultOut] | None = Field(None, description="the last kept results, newest first "
                                                       "(with recent=N)")


class ClassList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "classes": [{"name": "widget", "shots": 4, "bank_vectors": 2304, "bank_bytes": 28311552, "threshold": 0.74,
                     "calibrated_threshold": 0.74, "threshold_overridden": False, "pixel_threshold": 3.2,
                     "created": 1763940000.0, "updated": 1763940000.0, "first_shot": "9c1e" + "0" * 60}],
        "total": 120, "next": "widget"}]})

    classes: list[ClassListItem] = Field(description="one page, in name order")
    total: int = Field(description="classes registered, on every page")
    next: str | None = Field(description="pass as `after` for the next page; null on the last")


class ThresholdUpdate(BaseModel):
    threshold: float | None = Field(description="new threshold in (0, 1); null restores the calibrated one",
                                    examples=[0.8])


class Deleted(BaseModel):
    deleted: str


class ReadyInfo(BaseModel):
    ready: bool
    model_loaded: bool
    warmed_up: bool
    classes_restored: bool
    classes: int
    refused_classes: dict[str, str] = Field(default_factory=dict)
    error: str | None = None
    store: str | None = Field(None, description="the class store: directory or postgresql")
    store_error: str | None = Field(None, description="set while the store cannot be reached: predictions are "
                                    "served from what this replica holds, registrations answer 503")
    model: dict[str, Any] | None = Field(None, description="the serving model version, and a version being "
                                         "prepared to replace it (phase, classes done of classes), if any")


# -- the console's API: kept results, shots, the numbers behind a threshold ------------------------------------
class KeptResultOut(BaseModel):
    id: str = Field(description="the record's id")
    class_name: str
    filename: str
    width: int
    height: int
    score: float = Field(description="online raw score, as computed with the class's calibration at the time")
    normalized_score: float
    text_score: float
    threshold: float = Field(description="the threshold used for this result (the per-request one if given)")
    is_anomalous: bool
    time: float = Field(description="unix time it was scored")
    regions: list[Region]
    image_kept: bool = Field(description="the upload is kept, so the result can become a shot by its id")
    thumbnail: str | None = Field(None, description="base64 JPEG, at most 128 px a side, heatmap blended over "
                                  "(with thumbnails=true)")


class KeptResultList(BaseModel):
    class_name: str
    results: list[KeptResultOut] = Field(description="newest first")


class ShotScore(BaseModel):
    score: float = Field(description="the shot's online raw score against the other shots (leave-one-out)")
    map_max: float = Field(description="maximum of its leave-one-out final map")
    text_score: float


class RecentScore(BaseModel):
    id: str
    score: float
    threshold: float
    is_anomalous: bool
    time: float


class CalibrationOut(BaseModel):
    threshold: float = Field(description="calibrated threshold")
    map_mean: float
    map_std: float
    text_mean: float
    z: float
    shots: int
    pixel_threshold: float
    shots_recorded: bool = Field(description="false for classes calibrated before per-shot scores were kept "
                                 "(register a shot again to record them)")

    @staticmethod
    def of(cal: Any) -> dict[str, Any]:
        """The fields of a `model.calibration.Calibration`."""
        return {"threshold": cal.threshold, "map_mean": cal.map_mean, "map_std": cal.map_std,
                "text_mean": cal.text_mean, "z": cal.z, "shots": cal.shots, "pixel_threshold": cal.pixel_threshold,
                "shots_recorded": len(cal.shot_map_max) == cal.shots}


class Histogram(BaseModel):
    edges: list[float] = Field(description="bins + 1 increasing bin edges over the scores and both thresholds")
    shots: list[int]
    recent: list[int]


class ClassScores(BaseModel):
    class_name: str
    threshold: float = Field(description="the threshold in force (override or calibrated)")
    calibrated_threshold: float
    threshold_overridden: bool
    calibration: CalibrationOut
    shots: list[ShotScore] = Field(description="the calibration: one leave-one-out score per shot")
    recent: list[RecentScore] = Field(description="kept results, newest first")
    histogram: Histogram


class ShotRef(BaseModel):
    sha256: str = Field(description="content hash of the stored PNG: the shot's id")


class ShotList(BaseModel):
    class_name: str
    shots: list[ShotRef] = Field(description="in registration order")


class FromResults(BaseModel):
    result_ids: list[str] = Field(min_length=1, description="ids of kept results of this class",
                                  examples=[["3f2a9c0e4b1d4e6f8a7b6c5d4e3f2a1b"]])


class PreviousState(BaseModel):
    shots: int
    threshold: float
    calibrated_threshold: float


class FromResultsResponse(BaseModel):
    class_info: ClassInfo = Field(description="the class after the shots were added")
    previous: PreviousState = Field(description="the class before")
    calibration: CalibrationOut = Field(description="the new calibration")
    added: list[str] = Field(description="the result ids added (an image already a shot adds no shot)")


# -- keys ------------------------------------------------------------------------------------------------------------
class KeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, description="what the audit trail will call its holder",
                      examples=["line1-camera"])
    role: Literal["inspect", "operate", "admin"] = Field(description="inspect: score parts and read; operate: also "
                                                         "register shots and set thresholds; admin: everything")
    classes: str | None = Field(None, max_length=64, description="a shell-style pattern of the class names this key "
                                "may touch (`line1-*`); omit for all", examples=["line1-*"])


class KeyInfo(BaseModel):
    name: str
    role: str
    classes: str | None
    created: float
    created_by: str
    revoked: float | None = None
    revoked_by: str | None = None


class KeyCreated(KeyInfo):
    key: str = Field(description="the key itself: shown this once, stored only as a hash")


class KeyList(BaseModel):
    keys: list[KeyInfo] = Field(description="oldest first, revoked ones included")


class Me(BaseModel):
    name: str = Field(description="the key's name (anonymous while no key is configured or stored)")
    role: str
    classes: str | None
    keys_required: bool = Field(description="whether requests must carry a key")
    may: dict[str, bool] = Field(description="for each role, whether this key has it")


# -- the audit trail -------------------------------------------------------------------------------------------------
class AuditEventOut(BaseModel):
    id: str = Field(description="time-ordered: a larger id is a later event")
    time: float = Field(description="unix seconds")
    actor: str = Field(description="the key's name (SOWA_API_KEY, anonymous, cli:<user>)")
    action: str = Field(description="class.created, shots.added, shots.replaced, threshold.set, threshold.reset, "
                        "class.deleted, key.added, key.revoked")
    target: str = Field(description="the class or key changed")
    before: dict[str, Any] | None = Field(description="what mattered of it before (null: it did not exist)")
    after: dict[str, Any] | None = Field(description="and after (null: it is gone)")


class AuditPage(BaseModel):
    events: list[AuditEventOut] = Field(description="newest first")
    next: str | None = Field(description="pass as `after` for the next (older) page; null on the last")


# -- inspection records (service/http/routes/records.py) ---------------------------------------------------------------
class RecordOut(BaseModel):
    id: str = Field(description="time-ordered: ids sort as the parts were scored")
    time: float = Field(description="unix time it was scored")
    class_name: str
    revision: str = Field(description="the class's shots it was scored against (a digest; GET /classes/{name} "
                          "names the current one)")
    model: str = Field(description="the bundle fingerprint: which model scored it")
    threshold: float = Field(description="the threshold in force for it")
    threshold_per_request: bool = Field(description="the threshold was the request's own, not the class's")
    score: float
    normalized_score: float
    text_score: float
    is_anomalous: bool
    verdict: Literal["pass", "fail"]
    filename: str
    width: int
    height: int
    regions: list[Region]
    part_id: str | None
    station: str | None
    tags: list[str]
    image_kept: bool = Field(description="the upload is kept: GET /records/{id}/image")
    thumbnail_kept: bool = Field(description="the heatmap thumbnail is kept: GET /records/{id}/thumbnail")
    image_sha256: str | None
    thumbnail_sha256: str | None
    image_bytes: int = Field(description="bytes of the kept image and thumbnail")
    review: Literal["good", "defective"] | None = Field(description="what a reviewer said; null until reviewed")
    review_note: str | None
    reviewed_by: str | None = Field(description="the key that reviewed it")
    reviewed_at: float | None


class RecordList(BaseModel):
    records: list[RecordOut] = Field(description="newest first")
    next: str | None = Field(description="pass as `before` for the next page; null on the last")


class ReviewRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    verdict: Literal["good", "defective"] = Field(description="what the part really is")
    note: str | None = Field(None, max_length=1000, description="free text, shown as text")


class ConfusionOut(BaseModel):
    """What one threshold does on the reviewed parts; defective is positive, a rate is null where it divides by 0."""

    threshold: float
    tp: int = Field(description="defective parts flagged")
    fp: int = Field(description="good parts flagged: false calls")
    fn: int = Field(description="defective parts passed: escapes")
    tn: int = Field(description="good parts passed")
    escape_rate: float | None = Field(description="fn / (tp + fn)")
    false_call_rate: float | None = Field(description="fp / (fp + tn)")
    precision: float | None
    recall: float | None
    f1: float | None


class SuggestedThreshold(ConfusionOut):
    rule: Literal["best_f1", "escape_target"]


class DriftPoint(BaseModel):
    until: float = Field(description="time of the window's newest part (Unix seconds)")
    parts: int
    ks: float
    p_value: float


class DriftOut(BaseModel):
    window: int = Field(description="passed parts per window")
    min_parts: int = Field(description="fewer recent passed parts give no figure")
    ks: float | None = Field(description="one-sided KS D+ of the last window against the shots' scores: how far "
                             "the passed parts' scores rose (0 not above, 1 all above)")
    p_value: float | None
    parts: int = Field(description="passed parts in the last window")
    series: list[DriftPoint] = Field(description="consecutive windows, oldest first")


class ClassQuality(BaseModel):
    class_name: str
    threshold: float = Field(description="the threshold in force")
    calibrated_threshold: float
    threshold_overridden: bool
    reviewed: int = Field(description="reviewed parts scored with the current shots")
    defective: int
    good: int
    other_calibration: int = Field(description="reviewed parts scored with earlier shots: left out")
    escape_target: float | None
    at_threshold: ConfusionOut
    suggested: SuggestedThreshold | None = Field(description="null until a good and a defective part are reviewed")
    best_f1: SuggestedThreshold | None
    drift: DriftOut
