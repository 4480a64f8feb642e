import pytest

from lib_lorakit.blocks import PRESETS_17, format_weights, parse_block_weights, preset_names
from lib_lorakit.errors import RecipeError
from lib_lorakit.formats.arch import ARCHS


def test_lbw_17_vector_maps_onto_26_blocks_and_unlisted_are_zero():
    implicit = set()
    w = parse_block_weights("0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1,1.1,1.2,1.3,1.4,1.5,1.6,1.7", "sd15", implicit)
    assert w["BASE"] == 0.1 and w["IN01"] == 0.2 and w["IN08"] == 0.7 and w["M00"] == 0.8 and w["OUT11"] == 1.7
    assert w["IN00"] == 0 and w["IN03"] == 0 and w["OUT02"] == 0
    assert implicit == {"IN00", "IN03", "IN06", "IN09", "IN10", "IN11", "OUT00", "OUT01", "OUT02"}
    assert len(w) == 26


def test_sdxl_12_and_20_vectors():
    w = parse_block_weights("1,2,3,4,5,6,7,8,9,10,11,12", "sdxl")
    assert (w["IN04"], w["IN08"], w["M00"], w["OUT00"], w["OUT05"], w["OUT08"]) == (2, 5, 6, 7, 12, 0)
    full = parse_block_weights(",".join(str(i) for i in range(20)), "sdxl")
    assert [full[b] for b in ARCHS["sdxl"].blocks] == list(range(20))


def test_presets_and_named_weights():
    assert parse_block_weights("INALL", "sd15")["OUT03"] == 0 and parse_block_weights("inall", "sd15")["IN05"] == 1
    assert set(parse_block_weights("ALL", "sdxl").values()) == {1.0}  # uniform presets cover every block
    assert parse_block_weights("TEONLY", "sdxl")["BASE"] == 1 and parse_block_weights("TEONLY", "sdxl")["IN04"] == 0
    named = parse_block_weights("IN04=0.5, mid=0, OUT05=2", "sdxl")
    assert named["IN04"] == 0.5 and named["M00"] == 0 and named["OUT05"] == 2 and named["BASE"] == 1
    assert format_weights(parse_block_weights("ALL0.5", "sd15"), "sd15") == ",".join(["0.5"] * 26)
    assert "MIDD" in preset_names("sd15") and len(PRESETS_17["MIDD"].split(",")) == 17


@pytest.mark.parametrize(
    "text,arch,match",
    [
        ("1,1,1", "sd15", r"has 3 values; SD1\.5 takes 17 or 26"),
        (",".join(["1"] * 17), "sdxl", r"has 17 values; SDXL takes 12 or 20"),
        ("INAL", "sd15", r"Unknown block-weight preset 'INAL' for SD1\.5\. Did you mean 'INALL'"),
        ("IN12=1", "sd15", r"Unknown block 'IN12'"),
        ("1,x,1", "sd15", r"'x' in block weights"),
        ("", "sd15", "Empty block weights"),
    ],
)
def test_errors(text, arch, match):
    with pytest.raises(RecipeError, match=match):
        parse_block_weights(text, arch)
