import numpy as np
import pytest

from udaseg.data.labels import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_ID_TABLE,
    MAPILLARY_ID_TABLE,
    MAPILLARY_V12_LABELS,
    PROTOCOLS,
    SYNTHIA_ID_TABLE,
    ClassSet,
    colorize,
    map_ids,
    palette_lookup,
    trainid_table,
)

# The cityscapesScripts table, written out plainly (labelId: trainId).
CITYSCAPES_PLAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                    25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
SYNTHIA_PLAIN = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11, 17: 12,
                 8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18}


def reference_map(values, mapping, known):
    out = np.full(values.shape, 255, dtype=np.uint8)
    unknown = 0
    for idx, v in np.ndenumerate(values):
        if int(v) in mapping:
            out[idx] = mapping[int(v)]
        elif int(v) not in known:
            unknown += 1
    return out, unknown


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32])
def test_map_ids_matches_plain_loop(dtype):
    values = np.random.default_rng(0).integers(0, 40, (7, 9)).astype(dtype)
    values[0, 0] = 255
    known = set(range(34)) | {255}
    expected, unknown = reference_map(values, CITYSCAPES_PLAIN, known)
    got, n = map_ids(values, CITYSCAPES_ID_TABLE)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)
    assert n == unknown > 0


def test_map_ids_counts_values_beyond_table():
    values = np.array([[3, 4, 23, 300]], dtype=np.uint16)
    got, n = map_ids(values, SYNTHIA_ID_TABLE)
    assert got.tolist() == [[0, 1, 255, 255]] and n == 2  # 23 undefined in SYNTHIA, 300 beyond the table


def test_synthia_table_matches_spec():
    values = np.arange(23, dtype=np.uint8)
    got, n = map_ids(values, SYNTHIA_ID_TABLE)
    assert n == 0
    for raw, train_id in SYNTHIA_PLAIN.items():
        assert got[raw] == train_id
    assert got[0] == 255 and got[13] == 255 and got[14] == 255 and got[22] == 255


def test_trainid_table_identity_and_ignore():
    got, n = map_ids(np.array([0, 18, 19, 255], dtype=np.uint8), trainid_table(19))
    assert got.tolist() == [0, 18, 255, 255] and n == 1


def test_mapillary_mapping_spot_checks():
    names = [name for name, _ in MAPILLARY_V12_LABELS]
    assert len(names) == 66 and len({c for _, c in MAPILLARY_V12_LABELS}) == 66

    def train_id(name):
        return int(map_ids(np.array([names.index(name)], dtype=np.uint8), MAPILLARY_ID_TABLE)[0][0])

    assert train_id("construction--flat--road") == 0
    assert train_id("marking--general") == 0
    assert train_id("construction--barrier--curb") == 1
    assert train_id("human--rider--motorcyclist") == 12
    assert train_id("object--traffic-sign--back") == 7
    assert train_id("object--vehicle--on-rails") == 16
    assert train_id("object--vehicle--caravan") == 255
    assert train_id("construction--barrier--guard-rail") == 255
    assert train_id("void--unlabeled") == 255
    mapped = {train_id(n) for n in names} - {255}
    assert mapped == set(range(19))


def test_protocols():
    assert PROTOCOLS["19"] == tuple(range(19))
    assert len(PROTOCOLS["16"]) == 16 and not {9, 14, 16} & set(PROTOCOLS["16"])
    assert len(PROTOCOLS["13"]) == 13 and not {3, 4, 5, 9, 14, 16} & set(PROTOCOLS["13"])


def test_cityscapes_classes():
    assert CITYSCAPES_CLASSES.num_classes == 19 and CITYSCAPES_CLASSES.ignore_index == 255
    assert CITYSCAPES_CLASSES.names[13] == "car" and CITYSCAPES_CLASSES.palette[13] == (0, 0, 142)
    with pytest.raises(ValueError):
        ClassSet("bad", ("a", "b"), ((0, 0, 0),))


def test_colorize():
    label = np.array([[0, 1], [255, 7]], dtype=np.uint8)
    rgb = colorize(label, [(10, 20, 30), (40, 50, 60)])
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert rgb[0, 0].tolist() == [10, 20, 30] and rgb[0, 1].tolist() == [40, 50, 60]
    assert rgb[1, 0].tolist() == [0, 0, 0] and rgb[1, 1].tolist() == [0, 0, 0]
    big = colorize(np.array([[13]], dtype=np.int64), CITYSCAPES_CLASSES.palette)
    assert big[0, 0].tolist() == [0, 0, 142]


def test_palette_lookup():
    colours = [(1, 2, 3), (9, 9, 9), (0, 0, 0)]
    rgb = np.array([[[9, 9, 9], [0, 0, 0], [5, 5, 5]]], dtype=np.uint8)
    idx, known = palette_lookup(rgb, colours)
    assert idx[0, :2].tolist() == [1, 2] and known.tolist() == [[True, True, False]]
