"""Atlas and template loading: label tables, hemisphere and group assignment, geometry."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from qsmdask.atlas import (ROI_GROUPS, group_table_path, load_atlas, load_template,
                           load_template_mask)
from qsmdask.atlas.groups import aal_group, brainnetome_group
from qsmdask.io.nifti import InputError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
BN_DIR = SHARED / "atlas-brainnetome"
BN_NII = BN_DIR / "BN_Atlas_274_noCb_uint16.nii.gz"
BN_TSV = BN_DIR / "BN_Atlas_274_noCb_labels.tsv"
needs_bn = pytest.mark.skipif(not BN_NII.is_file(), reason="shared Brainnetome atlas absent")


def _centroid_x_mm(atlas, index):
    ijk = np.argwhere(atlas.labels == index).mean(axis=0)
    return (atlas.affine @ np.r_[ijk, 1.0])[0]


@pytest.fixture(scope="module")
def aal():
    return load_atlas("aal")


def test_aal_table_and_volume(aal):
    assert aal.name == "aal"
    assert aal.labels.shape == (181, 217, 181)
    np.testing.assert_allclose(aal.voxel_size_mm, (1.0, 1.0, 1.0))
    assert list(aal.table.columns) == ["index", "name", "roi", "hemisphere"]
    assert len(aal.table) == 116
    present = set(np.unique(aal.labels)) - {0}
    assert present == set(aal.table["index"])
    # every AAL label has a group, and every group used belongs to the vocabulary
    assert (aal.table["roi"] != "").all()
    assert set(aal.table["roi"]) <= set(ROI_GROUPS)
    for g in ("frontal", "temporal", "occipital", "hippocampus", "putamen", "thalamus",
              "cingulum", "cerebellum", "caudate", "pallidum"):
        assert (aal.table["roi"] == g).sum() >= 2
    row = aal.table.set_index("name").loc["Putamen_L"]
    assert (row["roi"], row["hemisphere"]) == ("putamen", "L")
    vermis = aal.table[aal.table["name"].str.startswith("Vermis")]
    assert len(vermis) == 8 and (vermis["hemisphere"] == "").all()


def test_aal_hemispheres_are_anatomically_left_and_right(aal):
    # RAS: left hemisphere labels have negative x centroids
    for name in ("Putamen_L", "Thalamus_L", "Hippocampus_L", "Frontal_Sup_L"):
        i = int(aal.table.loc[aal.table["name"] == name, "index"].iloc[0])
        assert _centroid_x_mm(aal, i) < -5
        assert _centroid_x_mm(aal, i + 1) > 5


def test_shipped_aal_groups_follow_rules(aal):
    for r in aal.table.itertuples():
        assert aal_group(r.name) == (r.roi, r.hemisphere)


def test_brainnetome_rules():
    assert brainnetome_group(1, "SFG_L_7_1 (8m)") == ("frontal", "L")
    assert brainnetome_group(222, "Str_R_6_2 (GP)") == ("pallidum", "R")
    assert brainnetome_group(229, "Str_L_6_6 (dlPu)") == ("putamen", "L")
    assert brainnetome_group(219, "Str_L_6_1 (vCa)") == ("caudate", "L")
    assert brainnetome_group(252, "Cb_Vermis_VI") == ("cerebellum", "")
    assert brainnetome_group(253, "Cb_Right_VI") == ("cerebellum", "R")
    assert brainnetome_group(216, "Hipp_R_2_1 (rHipp)") == ("hippocampus", "R")


@needs_bn
def test_shipped_brainnetome_groups_match_labels():
    labels = pd.read_csv(BN_TSV, sep="\t")
    shipped = pd.read_csv(group_table_path("brainnetome274"), sep="\t", keep_default_na=False)
    assert list(shipped["index"]) == list(labels["index"])
    for i, n, r, h in zip(labels["index"], labels["name"], shipped["roi"], shipped["hemisphere"]):
        assert brainnetome_group(int(i), n) == (r, h)
        if i <= 246:
            assert ("_L_" in n) == (h == "L")
    assert (shipped["roi"] != "").all()


@needs_bn
def test_load_brainnetome():
    bn = load_atlas(BN_NII, labels_tsv=BN_TSV)
    assert bn.name == "brainnetome274"
    assert bn.labels.shape == (145, 173, 145)
    np.testing.assert_allclose(bn.voxel_size_mm, (1.25, 1.25, 1.25))
    t = bn.table.set_index("index")
    assert t.loc[229, "roi"] == "putamen" and t.loc[229, "hemisphere"] == "L"
    assert _centroid_x_mm(bn, 229) < -10 and _centroid_x_mm(bn, 230) > 10
    assert set(np.unique(bn.labels)) - {0} <= set(bn.table["index"])


def test_custom_atlas_and_errors(tmp_path):
    lab = np.zeros((8, 8, 8), np.int16)
    lab[1:4, 1:4, 1:4] = 1
    lab[4:7, 4:7, 4:7] = 2
    nib.save(nib.Nifti1Image(lab, np.eye(4)), tmp_path / "toy.nii.gz")
    (tmp_path / "toy.tsv").write_text("index\tname\n1\tPutamen_L\n2\tMystery\n")
    a = load_atlas(tmp_path / "toy.nii.gz", labels_tsv=tmp_path / "toy.tsv")
    assert a.name == "toy"
    assert list(a.table["roi"]) == ["putamen", ""]
    assert list(a.table["hemisphere"]) == ["L", ""]
    (tmp_path / "g.tsv").write_text("index\troi\themisphere\n2\tthalamus\tR\n")
    b = load_atlas(tmp_path / "toy.nii.gz", labels_tsv=tmp_path / "toy.tsv",
                   groups_tsv=tmp_path / "g.tsv")
    assert list(b.table["roi"]) == ["", "thalamus"]
    with pytest.raises(InputError, match="not found"):
        load_atlas(tmp_path / "missing.nii.gz", labels_tsv=tmp_path / "toy.tsv")
    with pytest.raises(ValueError, match="labels_tsv"):
        load_atlas(tmp_path / "toy.nii.gz")
    (tmp_path / "bad.tsv").write_text("idx\tname\n1\tx\n")
    with pytest.raises(InputError, match="missing columns"):
        load_atlas(tmp_path / "toy.nii.gz", labels_tsv=tmp_path / "bad.tsv")


def test_template_and_mask():
    t2, a2 = load_template(2)
    m2, am = load_template_mask(2)
    assert t2.shape == m2.shape == (99, 117, 95)
    assert t2.dtype == np.float32 and m2.dtype == bool
    np.testing.assert_allclose(a2, am)
    np.testing.assert_allclose(np.linalg.norm(a2[:3, :3], axis=0), 2.0)
    assert 0.2 < m2.mean() < 0.4
    assert t2[m2].mean() > 5 * max(t2[~m2].mean(), 1e-6)
    with pytest.raises(ValueError, match="resolution_mm"):
        load_template(3)
