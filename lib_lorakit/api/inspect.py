"""Routes: inspect LoRAs, user metadata, max-safe strength tables."""

# no "from __future__ import annotations": FastAPI reads the route annotations through guard()

from typing import Optional

from ..ops import gen, inspect
from ..ops.context import HostContext
from ..ops.inspect import InspectRequest, StrengthsRequest, UserMetadataRequest
from .common import RESPONSES, error, feature_router, guard
from .schemas import InspectManyOut, InspectOut, StrengthsOut, UserMetadataOut


def router(ctx: HostContext):
    r = feature_router()

    @r.get(
        "/inspect",
        response_model=InspectOut,
        responses=RESPONSES,
        summary="What a LoRA really is: family, network, real trigger, kind, category, max-safe strength",
    )
    @guard
    def inspect_one(lora: str, checkpoint: Optional[str] = None, weights: bool = False):
        rep = inspect.inspect(ctx, {"loras": [lora], "checkpoint": checkpoint, "weights": weights})[0]
        if "error" in rep:
            return error(400, "FormatError", rep["error"])
        return rep

    @r.post("/inspect", response_model=InspectManyOut, responses=RESPONSES, summary="Inspect several LoRAs (or all)")
    @guard
    def inspect_many(body: InspectRequest):
        return {"reports": inspect.inspect(ctx, body)}

    @r.post(
        "/inspect/user-metadata",
        response_model=UserMetadataOut,
        responses=RESPONSES,
        summary="Write a trigger and strength into the WebUI's per-LoRA user metadata (<lora>.json)",
    )
    @guard
    def user_metadata(body: UserMetadataRequest):
        return inspect.write_user_metadata(ctx, body)

    @r.get("/inspect/strengths", response_model=StrengthsOut, summary="The max-safe strength tables in use")
    @guard
    def strengths():
        return inspect.strengths(ctx)

    @r.put(
        "/inspect/strengths",
        response_model=StrengthsOut,
        responses=RESPONSES,
        summary="Change entries of the max-safe strength tables (merged key by key)",
    )
    @guard
    def set_strengths(body: StrengthsRequest):
        return inspect.set_strengths(ctx, body)

    @r.get("/profiles", summary="The generation profiles in use (per architecture and lineage)")
    @guard
    def profiles():
        return gen.profiles(ctx)

    @r.put("/profiles", responses=RESPONSES, summary="Change fields of the generation profiles (merged field by field)")
    @guard
    def set_profiles(body: gen.ProfilesRequest):
        return gen.update_profiles(ctx, body)

    @r.get(
        "/profiles/for",
        responses=RESPONSES,
        summary="The profile a checkpoint gets (default: the loaded one), why, and its settings",
    )
    @guard
    def profile_for(checkpoint: Optional[str] = None, profile: Optional[str] = None):
        return gen.profile_for(ctx, checkpoint, profile)

    return r
