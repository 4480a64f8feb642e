"""Response models of the HTTP API (the request models are the operations' own, in lib_lorakit.ops)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from pydantic import BaseModel, Field


class DiffOut(BaseModel):
    a: str
    b: str
    arch: str
    by_component: Dict[str, Dict[str, float]] = Field(
        ..., description="Relative change |B-A|/|A| and cosine per component"
    )
    by_block: Dict[str, Dict[str, Dict[str, float]]] = Field(..., description="The same per component and block")
    only_in_a: List[str]
    only_in_b: List[str]
    shape_mismatch: List[str]


class TriggerCandidateOut(BaseModel):
    tag: str
    share: float = Field(..., description="Share of the training images whose captions carry the tag")
    count: int
    score: float
    evidence: List[str]


class InspectOut(BaseModel):
    """The inspector's report (fields beyond these documented ones are passed through as they are)."""

    if int(__import__("pydantic").VERSION.split(".")[0]) >= 2:
        model_config = {"extra": "allow"}
    else:  # pragma: no cover - pydantic 1 (A1111)

        class Config:
            extra = "allow"

    lora: str = Field(..., description="The name asked for (or the host's list name)")
    file: str
    architecture: Optional[str] = Field(None, description="sd15, sdxl, or null when undetermined")
    algorithms: List[str] = Field(default_factory=list, description="LoRA, LoCon, LoHa, LoKr, DoRA, ...")
    rank: Optional[int] = None
    alpha: Optional[float] = None
    components: List[str] = Field(default_factory=list, description="unet, te1, te2")
    trigger: Optional[str] = Field(None, description="The real trigger, or null when there is none")
    trigger_reason: str = ""
    trigger_candidates: List[TriggerCandidateOut] = Field(default_factory=list)
    most_frequent_tags: List[str] = Field(default_factory=list, description="What the images share; not the trigger")
    kind: str = Field("", description="passive or trigger-dependent")
    kind_evidence: List[str] = Field(default_factory=list)
    baking: str = ""
    category: str = ""
    category_detail: Dict[str, Any] = Field(default_factory=dict)
    max_safe_strength: Optional[float] = None
    max_safe_reason: str = ""
    family: Dict[str, Any] = Field(default_factory=dict)
    structure: Dict[str, Any] = Field(
        default_factory=dict, description="Modules, ranks/alphas and their spread, blocks"
    )
    training: Dict[str, Any] = Field(default_factory=dict, description="kohya/modelspec metadata, folders, tag counts")
    weight_stats: Optional[Dict[str, Any]] = Field(None, description="Per-block |dW| (relative with a checkpoint)")
    warnings: List[str] = Field(default_factory=list)
    error: Optional[str] = Field(None, description="Set (and little else) when the file could not be read")


class InspectManyOut(BaseModel):
    reports: List[InspectOut]


class UserMetadataOut(BaseModel):
    path: str
    before: Dict[str, Any]
    after: Dict[str, Any]


class JobRef(BaseModel):
    job_id: str


class JobOut(BaseModel):
    id: str
    kind: str
    state: str = Field(..., description="queued, running, done, error or cancelled")
    progress: float = Field(..., description="0 to 1")
    message: str
    result: Optional[Dict[str, Any]] = Field(None, description="When done: the report and the output")
    error: Optional[str] = Field(None, description="When failed or cancelled: what happened and what to do")
    params: Dict[str, Any] = Field(default_factory=dict)
    created: float
    started: Optional[float] = None
    finished: Optional[float] = None


class Txt2ImgOut(BaseModel):
    images: List[str] = Field(..., description="PNG images, base64")
    infotexts: List[str]
    seed: int


class ModelOut(BaseModel):
    name: str
    file: str


class ErrorOut(BaseModel):
    error: str
    message: str


class StrengthsOut(BaseModel):
    max_safe_strength: Dict[str, float] = Field(default_factory=dict, description="category -> ceiling")
    cross_lineage: Dict[str, float] = Field(
        default_factory=dict, description="'LoRA lineage>checkpoint lineage' -> ceiling, '*>*' default"
    )
